"""Unstructured magnitude pruning: zero the smallest weights, keep shapes dense.

Shapes stay dense, so dense kernels run no faster: the result is reported as sparsity, never as
a speed-up. The `torch.nn.utils.prune` masks stay active so fine-tuning keeps pruned weights at
zero; `finalize_magnitude` bakes them in before saving or export.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from compresskit.prune.common import (
    _WEIGHTED,
    ExampleInputs,
    PruneResult,
    _check_paths,
    _count_nonzero,
    _layer_call_order,
    _masked_names,
    _zero_fraction,
    count_macs_params,
    expand_paths,
)

MagnitudeLayers = Literal["conv+linear", "conv"]


def _magnitude_targets(
    model: nn.Module,
    layers: str,
    ignored: Sequence[nn.Module],
    keep_first_conv: bool,
    keep_classifier: bool,
    order: Sequence[str],
) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs whose weights magnitude pruning may zero."""
    kinds: tuple[type, ...] = (nn.modules.conv._ConvNd,) if layers == "conv" else _WEIGHTED
    convs = [n for n in order if isinstance(model.get_submodule(n), nn.modules.conv._ConvNd)]
    skip: set[str] = set()
    if keep_first_conv and convs:
        skip.add(convs[0])
    if keep_classifier and order:
        skip.add(order[-1])
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, kinds) and n not in skip and not any(m is i for i in ignored)
    ]


def prune_magnitude(
    model: nn.Module,
    *,
    sparsity: float,
    layers: MagnitudeLayers = "conv+linear",
    ignored_layers: Sequence[str] = (),
    keep_first_conv: bool = True,
    keep_classifier: bool = True,
    example_inputs: ExampleInputs | None = None,
) -> PruneResult:
    """Zero the `sparsity` fraction of smallest-|w| weights, ranked globally across the chosen
    layers (`torch.nn.utils.prune.global_unstructured` with L1), on a deep copy of `model`.

    The first conv (few weights, sensitive) and the classifier are kept dense by default. Without
    `example_inputs` they are found in module registration order, with it in call order, and
    MACs are counted (dense, so unchanged). Masks stay active: call `finalize_magnitude` before
    saving a plain state dict or exporting.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if layers not in ("conv+linear", "conv"):
        raise ValueError(f"layers must be 'conv+linear' or 'conv', got {layers!r}")
    ignored_layers = expand_paths(model, ignored_layers)
    _check_paths(model, ignored_layers, "ignored_layers")
    pruned = copy.deepcopy(model)
    ignored = [pruned.get_submodule(p) for p in ignored_layers]
    if example_inputs is not None:
        order = _layer_call_order(pruned, example_inputs)
    else:
        order = [n for n, m in pruned.named_modules() if isinstance(m, _WEIGHTED)]
        linears = [n for n in order if isinstance(pruned.get_submodule(n), nn.Linear)]
        if linears:  # without a trace, the classifier is taken to be the last Linear
            order = [n for n in order if n != linears[-1]] + [linears[-1]]
    targets = _magnitude_targets(pruned, layers, ignored, keep_first_conv, keep_classifier, order)
    if not targets:
        raise ValueError(f"no {layers} layers left to prune after the exclusions")

    macs_before = macs_after = None
    if example_inputs is not None:
        macs_before, params_before = count_macs_params(pruned, example_inputs)
    else:
        params_before = sum(p.numel() for p in pruned.parameters())
    if sparsity > 0:
        torch_prune.global_unstructured(
            [(m, "weight") for _, m in targets],
            pruning_method=torch_prune.L1Unstructured,
            amount=sparsity,
        )
    if example_inputs is not None:
        macs_after, _ = count_macs_params(pruned, example_inputs)
    history = {}
    for name, module in targets:
        weight = module.weight.detach()
        history[name] = {
            "numel": weight.numel(),
            "zeros": weight.numel() - int(torch.count_nonzero(weight)),
        }
    return PruneResult(
        model=pruned,
        method="magnitude",
        macs_before=macs_before,
        macs_after=macs_after,
        params_before=params_before,
        params_after=sum(p.numel() for p in pruned.parameters()),
        nonzero_params_after=_count_nonzero(pruned),
        sparsity=_zero_fraction(m for _, m in targets),
        history=history,
        settings={
            "sparsity": sparsity,
            "layers": layers,
            "ignored_layers": list(ignored_layers),
            "keep_first_conv": keep_first_conv,
            "keep_classifier": keep_classifier,
        },
    )


def finalize_magnitude(model: nn.Module) -> nn.Module:
    """Make magnitude masks permanent in place (`prune.remove`): `weight_orig`/`weight_mask`
    become a plain `weight` with the zeros baked in. Returns the same model; a model without
    masks is returned unchanged."""
    for module in model.modules():
        for name in _masked_names(module):
            torch_prune.remove(module, name)
    return model
