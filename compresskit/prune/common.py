"""What every pruning method shares: the result type, MAC/parameter counting, and module paths.

`PruneResult` carries the pruned model and its before/after figures. MACs are counted with
forward hooks on Conv/Linear layers (see `count_macs_params`); zero counting sees weights as the
forward pass does, masks applied. `expand_paths` and `_check_paths` turn user-given module
paths (shell patterns allowed) into modules, with errors that name the valid paths.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

Method = Literal["structured", "magnitude"]
ExampleInputs = Tensor | tuple[Tensor, ...]

_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class PruneResult:
    """What a pruning call produced: the pruned model and honest before/after figures.

    `macs_*` are multiply-accumulates of Conv/Linear layers per sample (see `count_macs_params`);
    they are None when magnitude pruning was run without example inputs. `sparsity` is the
    fraction of exactly-zero weights among the Conv/Linear weights that the method could prune.
    `history` is a JSON-able per-layer summary: for structured pruning
    `{layer: {"out_before": n, "out_after": m}}` for every Conv/Linear layer, for magnitude pruning
    `{layer: {"numel": n, "zeros": z}}` for every masked layer.
    """

    model: nn.Module
    method: Method
    macs_before: int | None
    macs_after: int | None
    params_before: int
    params_after: int
    nonzero_params_after: int
    sparsity: float
    history: dict[str, dict[str, int]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def macs_ratio(self) -> float | None:
        """MACs after / before, or None when MACs were not counted."""
        if self.macs_before and self.macs_after is not None:
            return self.macs_after / self.macs_before
        return None

    @property
    def params_ratio(self) -> float | None:
        """Dense parameter count after / before (1.0 for magnitude pruning, which keeps shapes)."""
        return self.params_after / self.params_before if self.params_before else None

    def to_json(self) -> dict[str, Any]:
        """The figures as a JSON-able dict: every field except the model, plus the two ratios.

        Containers are copied, so editing the dict leaves the result untouched.
        """
        return {
            "method": self.method,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "macs_ratio": self.macs_ratio,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_ratio": self.params_ratio,
            "nonzero_params_after": self.nonzero_params_after,
            "sparsity": self.sparsity,
            "settings": dict(self.settings),
            "history": {k: dict(v) for k, v in self.history.items()},
        }


# ---------------------------------------------------------------- measuring


def _as_tuple(example_inputs: ExampleInputs) -> tuple[Tensor, ...]:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if (
        isinstance(example_inputs, (tuple, list))
        and example_inputs
        and all(isinstance(t, Tensor) for t in example_inputs)
    ):
        return tuple(example_inputs)
    raise ValueError(
        "example_inputs must be a Tensor or a non-empty tuple of Tensors, "
        f"got {type(example_inputs).__name__}"
    )


def _run_eval(model: nn.Module, inputs: tuple[Tensor, ...]) -> Any:
    """One forward pass in eval mode without gradients, restoring the training flags after.

    Eval mode matters: a forward in train mode would update BatchNorm running statistics.
    """
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return model(*inputs)
    finally:
        for m, flag in flags.items():
            m.training = flag


def _layer_call_order(model: nn.Module, example_inputs: ExampleInputs) -> list[str]:
    """Names of Conv/Linear modules in the order a forward pass calls them (each once)."""
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []
    handles = []

    def hook(module: nn.Module, _inp: Any, _out: Any) -> None:
        name = names[module]
        if name not in order:
            order.append(name)

    for module in model.modules():
        if isinstance(module, _WEIGHTED):
            handles.append(module.register_forward_hook(hook))
    try:
        _run_eval(model, _as_tuple(example_inputs))
    finally:
        for h in handles:
            h.remove()
    return order


def count_macs_params(model: nn.Module, example_inputs: ExampleInputs) -> tuple[int, int]:
    """Multiply-accumulates per sample of all Conv/Linear layers, and the parameter count.

    Torch-Pruning's `count_ops_and_params` also adds BatchNorm (2 per element), ReLU and pooling
    element-wise operations and bias additions to its count, so its figure is "ops", larger than
    MACs (by about 14% on MobileNetV2-0.35 at 28x28). This counts MACs only, the figure papers and
    model cards quote. Parameters are counted densely (masked weights included).
    """
    inputs = _as_tuple(example_inputs)
    total = 0
    handles = []

    def hook(module: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += out.numel() * module.in_features
        elif module.transposed:
            total += (
                inp[0].numel()
                * (module.out_channels // module.groups)
                * math.prod(module.kernel_size)
            )
        else:
            total += (
                out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
            )

    for module in model.modules():
        if isinstance(module, _WEIGHTED):
            handles.append(module.register_forward_hook(hook))
    try:
        _run_eval(model, inputs)
    finally:
        for h in handles:
            h.remove()
    batch = inputs[0].shape[0] if inputs[0].dim() > 0 else 1
    params = sum(p.numel() for p in model.parameters())
    return total // max(batch, 1), params


def _effective_tensors(module: nn.Module) -> Iterable[tuple[str, Tensor]]:
    """A module's own parameters as the forward pass sees them (masks applied)."""
    masked = set(_masked_names(module))
    for name, param in module._parameters.items():
        if param is None:
            continue
        base = name[: -len("_orig")]
        if name.endswith("_orig") and base in masked:
            yield base, getattr(module, base)
        else:
            yield name, param


def _count_nonzero(model: nn.Module) -> int:
    return sum(
        int(torch.count_nonzero(t.detach()))
        for m in model.modules()
        for _, t in _effective_tensors(m)
    )


def _zero_fraction(modules: Iterable[nn.Module]) -> float:
    numel = zeros = 0
    for module in modules:
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor):
            numel += weight.numel()
            zeros += weight.numel() - int(torch.count_nonzero(weight.detach()))
    return zeros / numel if numel else 0.0


def _masked_names(module: nn.Module) -> list[str]:
    """Names of a module's tensors under an active `torch.nn.utils.prune` mask."""
    return [
        n[: -len("_orig")]
        for n in module._parameters
        if n.endswith("_orig") and f"{n[: -len('_orig')]}_mask" in module._buffers
    ]


# ---------------------------------------------------------------- layer selection


def expand_paths(model: nn.Module, patterns: Sequence[str], what: str = "ignored_layers") -> list[str]:
    """Expand shell-style patterns ("features.*.conv.2.0") into module paths, in model order.

    Plain paths pass through unchanged (and are checked later); a pattern matching nothing is
    a ValueError, since it is almost certainly a typo.
    """
    if isinstance(patterns, str):
        raise ValueError(f"{what} must be a list of module paths, got the string {patterns!r}")
    names = [n for n, _ in model.named_modules() if n]
    out: list[str] = []
    for pattern in patterns:
        if not any(ch in pattern for ch in "*?["):
            out.append(pattern)
            continue
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise ValueError(f"{what}: pattern {pattern!r} matches no module")
        out.extend(matched)
    return list(dict.fromkeys(out))


def _check_paths(model: nn.Module, paths: Sequence[str], what: str) -> list[nn.Module]:
    """Resolve module paths such as "features.0"; a ValueError names unknown ones and lists
    valid paths (closest matches first)."""
    if isinstance(paths, str):
        raise ValueError(f"{what} must be a list of module paths, got the string {paths!r}")
    modules = dict(model.named_modules())
    modules.pop("", None)
    unknown = [p for p in paths if p not in modules]
    if unknown:
        close = sorted({c for p in unknown for c in difflib.get_close_matches(p, modules, n=3)})
        valid = list(modules)
        more = f", ... ({len(valid) - 40} more)" if len(valid) > 40 else ""
        shown = ", ".join(valid[:40]) + more
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"{what}: no module named {', '.join(map(repr, unknown))}{hint} Valid paths: {shown}"
        )
    return [modules[p] for p in paths]
