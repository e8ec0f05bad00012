"""Pruning: structured channel pruning (Torch-Pruning) and unstructured magnitude pruning.

Two methods with different promises:

- `prune_structured` removes whole channels with Torch-Pruning's dependency graph, so parameter
  tensors really shrink and every runtime (onnxruntime included) does less work. The final
  classifier is never pruned, so the output shape stays. `search_ratio` picks its ratio by
  measured latency.
- `prune_magnitude` zeroes the smallest weights globally with `torch.nn.utils.prune`. Shapes stay
  dense, so dense kernels run no faster; it is reported as sparsity, never as a speed-up. The
  masks stay active so fine-tuning keeps pruned weights at zero; `finalize_magnitude` bakes them
  in before saving or export.

A pruned model is rebuilt from a checkpoint loaded with `torch.load(..., weights_only=True)`
through `pruning_state` and `rebuild_pruned`.

Torch-Pruning's limits are checked before it runs: `check_prunable` lists what makes a model
unprunable (one line each), `prune_structured` keeps whole the layer groups it cannot handle
(reported in `settings["kept_layers"]`) and raises `PruneRefused` (a ValueError) otherwise.

Modules: `common` (PruneResult, MAC/parameter counting, module paths), `check` (what Torch-Pruning
can handle), `structured`, `search`,
`magnitude`, `state` (checkpoints). Everything public is re-exported here, so callers import
from `compresskit.prune` only.
"""

from compresskit.prune.check import PruneRefused, check_prunable, inspect_graph
from compresskit.prune.common import ExampleInputs, Method, PruneResult, count_macs_params, expand_paths
from compresskit.prune.magnitude import MagnitudeLayers, finalize_magnitude, prune_magnitude
from compresskit.prune.search import search_ratio
from compresskit.prune.state import STATE_FORMAT, STATE_VERSION, pruning_state, rebuild_pruned
from compresskit.prune.structured import IMPORTANCES, Importance, prune_structured

__all__ = [
    "IMPORTANCES",
    "STATE_FORMAT",
    "STATE_VERSION",
    "ExampleInputs",
    "Importance",
    "MagnitudeLayers",
    "Method",
    "PruneRefused",
    "PruneResult",
    "check_prunable",
    "count_macs_params",
    "expand_paths",
    "finalize_magnitude",
    "inspect_graph",
    "prune_magnitude",
    "prune_structured",
    "pruning_state",
    "rebuild_pruned",
    "search_ratio",
]
