"""Pruning: structured channel pruning (Torch-Pruning) and unstructured magnitude pruning.

Two methods with different promises:

- `prune_structured` removes whole channels with Torch-Pruning's dependency graph, so parameter
  tensors really shrink and every runtime (onnxruntime included) does less work. The final
  classifier is never pruned, so the output shape stays.
- `prune_magnitude` zeroes the smallest weights globally with `torch.nn.utils.prune`. Shapes stay
  dense, so dense kernels run no faster; it is reported as sparsity, never as a speed-up. The
  masks stay active so fine-tuning keeps pruned weights at zero; `finalize_magnitude` bakes them
  in before saving or export.

A pruned model is rebuilt from a checkpoint loaded with `torch.load(..., weights_only=True)`:
`pruning_state(model)` records, per module, its structural attributes and tensor shapes as plain
data, and `rebuild_pruned(fresh_model, state)` reshapes a freshly built unpruned model so the
pruned `state_dict` loads into it. Rebuilding needs no example input and no tracing.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

Importance = Literal["l1", "l2", "bn_scale", "taylor", "lamp", "fpgm"]
MagnitudeLayers = Literal["conv+linear", "conv"]
ExampleInputs = Tensor | tuple[Tensor, ...]

IMPORTANCES: tuple[str, ...] = ("l1", "l2", "bn_scale", "taylor", "lamp", "fpgm")
STATE_FORMAT = "compresskit.pruning"
STATE_VERSION = 1
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
    method: Literal["structured", "magnitude"]
    macs_before: int | None
    macs_after: int | None
    params_before: int
    params_after: int
    nonzero_params_after: int
    sparsity: float
    history: dict[str, dict[str, int]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The figures as a JSON-able dict (everything except the model itself)."""
        macs_ratio = None
        if self.macs_before and self.macs_after is not None:
            macs_ratio = self.macs_after / self.macs_before
        return {
            "method": self.method,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "macs_ratio": macs_ratio,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_ratio": self.params_after / self.params_before if self.params_before else None,
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


def _layer_widths(model: nn.Module) -> dict[str, int]:
    widths: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            widths[name] = module.out_channels
        elif isinstance(module, nn.Linear):
            widths[name] = module.out_features
    return widths


def _make_importance(name: str) -> tp.importance.Importance:
    """Torch-Pruning's importance criterion for a name (a plain lookup, no registry)."""
    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "bn_scale":
        return tp.importance.BNScaleImportance()
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "lamp":
        return tp.importance.LAMPImportance(p=2)
    if name == "fpgm":
        return tp.importance.FPGMImportance(p=2)
    raise ValueError(f"unknown importance {name!r}; choose one of {', '.join(IMPORTANCES)}")


# ---------------------------------------------------------------- structured


def _check_structured_args(
    importance: str,
    ratio: float,
    iterative_steps: int,
    round_to: int | None,
    max_layer_ratio: float,
) -> None:
    if importance not in IMPORTANCES:
        choices = ", ".join(IMPORTANCES)
        raise ValueError(f"unknown importance {importance!r}; choose one of {choices}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if iterative_steps < 1:
        raise ValueError(f"iterative_steps must be >= 1, got {iterative_steps}")
    if round_to is not None and round_to < 1:
        raise ValueError(f"round_to must be None or >= 1, got {round_to}")
    if not 0.0 < max_layer_ratio <= 1.0:
        raise ValueError(f"max_layer_ratio must be in (0, 1], got {max_layer_ratio}")


def _accumulate_gradients(
    model: nn.Module,
    batches: Sequence[tuple[Tensor, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
) -> None:
    """Fresh gradients for Taylor importance: backward over the batches in eval mode, so
    BatchNorm statistics and dropout do not change the model."""
    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        for inputs, targets in batches:
            loss = loss_fn(model(inputs.to(device)), targets.to(device))
            loss.backward()
    finally:
        for m, flag in flags.items():
            m.training = flag


def _capped_indices(
    pruner: tp.pruner.BasePruner, group: Any, max_layer_ratio: float, round_to: int | None
) -> list[int]:
    """The group's pruning indices, trimmed so its root layer keeps at least
    `1 - max_layer_ratio` of its initial channels (the least important ones go first).

    Torch-Pruning's own `max_pruning_ratio` only stops pruning a layer that is already past the
    cap, so one global step can still take a layer below it; this enforces the cap per step.
    """
    root, idxs = group[0].dep.target.module, list(group[0].idxs)
    graph = pruner.DG
    if graph.is_out_channel_pruning_fn(group[0].dep.handler):
        current, initial = graph.get_out_channels(root), pruner.layer_init_out_ch.get(root)
    else:
        current, initial = graph.get_in_channels(root), pruner.layer_init_in_ch.get(root)
    if current is None or initial is None:
        return idxs
    keep = max(1, math.ceil(initial * (1.0 - max_layer_ratio)), current - len(idxs))
    if round_to:
        keep = math.ceil(keep / round_to) * round_to
    n_remove = max(0, current - keep)
    if n_remove >= len(idxs):
        return idxs
    full = graph.get_pruning_group(root, group[0].dep.handler, list(range(current)))
    scores = pruner.estimate_importance(full)
    if scores is None or len(scores) != current:  # grouped channels: leave as planned
        return idxs
    return sorted(idxs, key=lambda i: float(scores[i]))[:n_remove]


def _run_pruner(
    pruned: nn.Module,
    inputs: tuple[Tensor, ...],
    ignored: list[nn.Module],
    *,
    importance: str,
    ratio: float,
    global_pruning: bool,
    iterative_steps: int,
    round_to: int | None,
    max_layer_ratio: float,
    batches: Sequence[tuple[Tensor, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
) -> None:
    """Build Torch-Pruning's pruner on `pruned` and run its steps in place, with fresh Taylor
    gradients before each step and the per-layer cap applied to every group."""
    flags = {m: m.training for m in pruned.modules()}
    pruned.eval()  # the pruner traces the model; keep BatchNorm statistics untouched
    try:
        pruner = tp.pruner.BasePruner(
            pruned,
            inputs if len(inputs) > 1 else inputs[0],
            importance=_make_importance(importance),
            global_pruning=global_pruning,
            pruning_ratio=ratio,
            max_pruning_ratio=max_layer_ratio,
            iterative_steps=iterative_steps,
            round_to=round_to,
            ignored_layers=ignored,
        )
    finally:
        for m, flag in flags.items():
            m.training = flag
    for _ in range(iterative_steps):
        if batches:
            _accumulate_gradients(pruned, batches, loss_fn)
        for group in pruner.step(interactive=True):
            group.prune(_capped_indices(pruner, group, max_layer_ratio, round_to))


def prune_structured(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    importance: Importance = "l2",
    ratio: float = 0.5,
    global_pruning: bool = False,
    iterative_steps: int = 1,
    round_to: int | None = None,
    ignored_layers: Sequence[str] = (),
    max_layer_ratio: float = 0.95,
    taylor_batches: Iterable[tuple[Tensor, Tensor]] | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> PruneResult:
    """Remove `ratio` of the channels of every prunable layer group (or of all groups together
    with `global_pruning`), on a deep copy of `model`.

    The classifier (the last Conv/Linear called in the forward pass) is ignored automatically;
    `ignored_layers` adds module paths such as "features.0". `max_layer_ratio` caps how much any
    one layer loses (it matters for global pruning). `round_to` keeps channel counts multiples
    of it (hardware-friendly widths). Taylor importance needs `taylor_batches` of (inputs,
    targets); they are held in memory and back-propagated through `loss_fn` (cross-entropy by
    default) before each of the `iterative_steps`, so a few batches are enough.
    """
    _check_structured_args(importance, ratio, iterative_steps, round_to, max_layer_ratio)
    inputs = _as_tuple(example_inputs)
    batches: list[tuple[Tensor, Tensor]] = []
    if importance == "taylor":
        if taylor_batches is None:
            raise ValueError("importance='taylor' needs taylor_batches of (inputs, targets)")
        batches = list(taylor_batches)
        if not batches:
            raise ValueError("taylor_batches is empty; Taylor importance needs at least one batch")
    ignored_layers = expand_paths(model, ignored_layers)
    _check_paths(model, ignored_layers, "ignored_layers")
    param = next(model.parameters(), None)
    if param is not None and any(t.device != param.device for t in inputs):
        raise ValueError(
            f"example_inputs are on {inputs[0].device} but the model is on "
            f"{param.device}; move them to the same device"
        )

    pruned = copy.deepcopy(model)
    order = _layer_call_order(pruned, inputs)
    if not order:
        raise ValueError("the model calls no Conv or Linear layer; nothing to prune")
    ignored = [pruned.get_submodule(p) for p in (order[-1], *ignored_layers)]
    out_before = _run_eval(pruned, inputs)
    macs_before, params_before = count_macs_params(pruned, inputs)
    widths_before = _layer_widths(pruned)

    _run_pruner(
        pruned,
        inputs,
        ignored,
        importance=importance,
        ratio=ratio,
        global_pruning=global_pruning,
        iterative_steps=iterative_steps,
        round_to=round_to,
        max_layer_ratio=max_layer_ratio,
        batches=batches,
        loss_fn=loss_fn or F.cross_entropy,
    )
    pruned.zero_grad(set_to_none=True)
    if ratio > 0 and sum(p.numel() for p in pruned.parameters()) == params_before:
        warnings.warn(
            f"structured pruning with ratio {ratio} removed no channel: the "
            f"{importance!r} scores are tied (e.g. BatchNorm scales all equal in an "
            "untrained model) or the layers are too narrow",
            stacklevel=2,
        )

    out_after = _run_eval(pruned, inputs)
    if isinstance(out_before, Tensor) and out_before.shape != out_after.shape:
        raise RuntimeError(
            f"pruning changed the output shape from {tuple(out_before.shape)} "
            f"to {tuple(out_after.shape)}; add the output layer to ignored_layers"
        )
    macs_after, params_after = count_macs_params(pruned, inputs)
    widths_after = _layer_widths(pruned)
    return PruneResult(
        model=pruned,
        method="structured",
        macs_before=macs_before,
        macs_after=macs_after,
        params_before=params_before,
        params_after=params_after,
        nonzero_params_after=_count_nonzero(pruned),
        sparsity=_zero_fraction(m for m in pruned.modules() if isinstance(m, _WEIGHTED)),
        history={
            name: {"out_before": widths_before[name], "out_after": widths_after[name]}
            for name in widths_before
            if name in widths_after
        },
        settings={
            "importance": importance,
            "ratio": ratio,
            "global_pruning": global_pruning,
            "iterative_steps": iterative_steps,
            "round_to": round_to,
            "max_layer_ratio": max_layer_ratio,
            "classifier": order[-1],
            "ignored_layers": list(ignored_layers),
        },
    )


def search_ratio(
    model: nn.Module,
    example_inputs: ExampleInputs,
    measure: Callable[[nn.Module], float],
    *,
    ratios: Sequence[float],
    target_latency_ms: float | None = None,
    target_speedup: float | None = None,
    **prune_kwargs: Any,
) -> tuple[PruneResult, dict[str, Any]]:
    """Pick the pruning ratio by measuring: the smallest of `ratios` whose pruned model meets
    the latency target (the least pruning, so the least accuracy lost, that is fast enough).

    `measure(model) -> ms` times a model on the target (the pipeline exports it to ONNX and
    times it with onnxruntime at the budget's batch size and threads). `target_latency_ms` is an
    absolute p50; `target_speedup` is relative to the unpruned model (latency before / after).
    Every ratio tried is a row with its MAC ratio beside its measured latency ratio, because
    fewer MACs is not the same as lower latency. When no ratio meets the target the largest is
    used and ``met_target`` is False. `prune_kwargs` go to `prune_structured`.
    """
    if (target_latency_ms is None) == (target_speedup is None):
        raise ValueError("give exactly one of target_latency_ms and target_speedup")
    if not ratios or any(not 0.0 < r < 1.0 for r in ratios):
        raise ValueError(f"ratios must be a non-empty list of fractions in (0, 1), got {list(ratios)}")
    base_ms = float(measure(model))
    target = target_latency_ms if target_latency_ms is not None else base_ms / float(target_speedup)
    rows: list[dict[str, Any]] = []
    chosen: PruneResult | None = None
    for ratio in sorted(set(ratios)):
        result = prune_structured(model, example_inputs, ratio=ratio, **prune_kwargs)
        ms = float(measure(result.model))
        rows.append({"ratio": ratio, "macs": result.macs_after, "params": result.params_after,
                     "mac_ratio": result.macs_after / result.macs_before if result.macs_before else None,
                     "latency_ms": ms, "latency_ratio": ms / base_ms if base_ms > 0 else None,
                     "meets_target": ms <= target})
        chosen = result
        if ms <= target:
            break
    assert chosen is not None
    info = {"base_latency_ms": base_ms, "target_latency_ms": target, "target_speedup": target_speedup,
            "chosen_ratio": rows[-1]["ratio"], "met_target": rows[-1]["meets_target"], "tried": rows}
    return chosen, info


# ---------------------------------------------------------------- magnitude


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


def _masked_names(module: nn.Module) -> list[str]:
    """Names of a module's tensors under an active `torch.nn.utils.prune` mask."""
    return [
        n[: -len("_orig")]
        for n in module._parameters
        if n.endswith("_orig") and f"{n[: -len('_orig')]}_mask" in module._buffers
    ]


# ---------------------------------------------------------------- checkpoints


def _structural_attrs(module: nn.Module) -> dict[str, Any] | None:
    """The attributes that describe a module's tensor shapes, or None for an unknown type."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return {
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "groups": module.groups,
        }
    if isinstance(module, nn.Linear):
        return {"in_features": module.in_features, "out_features": module.out_features}
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return {"num_features": module.num_features}
    if isinstance(module, nn.LayerNorm):
        return {"normalized_shape": list(module.normalized_shape)}
    if isinstance(module, nn.GroupNorm):
        return {"num_groups": module.num_groups, "num_channels": module.num_channels}
    if isinstance(module, nn.PReLU):
        return {"num_parameters": module.num_parameters}
    return None


def pruning_state(pruned_model: nn.Module) -> dict[str, Any]:
    """Plain data (str/int/bool/list/dict only, so `weights_only=True` loading works) that lets
    `rebuild_pruned` reshape a fresh unpruned model of the same architecture to this one.

    For every module that owns tensors it records the type name, the structural attributes
    (channels, features, groups) and every parameter/buffer shape; active magnitude masks are
    listed so a checkpoint taken mid fine-tuning rebuilds with its masks.
    """
    modules: dict[str, Any] = {}
    masked: list[str] = []
    for name, module in pruned_model.named_modules():
        tensors = {n: list(t.shape) for n, t in module._parameters.items() if t is not None}
        tensors.update({n: list(t.shape) for n, t in module._buffers.items() if t is not None})
        if not tensors:
            continue
        modules[name] = {
            "type": type(module).__name__,
            "attrs": _structural_attrs(module),
            "tensors": tensors,
        }
        masked += [f"{name}.{n}" if name else n for n in _masked_names(module)]
    return {"format": STATE_FORMAT, "version": STATE_VERSION, "modules": modules, "masked": masked}


def _resize(module: nn.Module, name: str, shape: list[int]) -> None:
    """Replace a parameter or buffer by a zero tensor of `shape` (same dtype, device, grad)."""
    if name in module._parameters:
        old = module._parameters[name]
        new = torch.zeros(shape, dtype=old.dtype, device=old.device)
        module._parameters[name] = nn.Parameter(new, requires_grad=old.requires_grad)
    else:
        old = module._buffers[name]
        module._buffers[name] = torch.zeros(shape, dtype=old.dtype, device=old.device)


def _rebuild_module(path: str, module: nn.Module, record: dict[str, Any]) -> None:
    if type(module).__name__ != record["type"]:
        raise ValueError(
            f"module {path!r} is a {type(module).__name__}, the pruning state "
            f"records a {record['type']}: not the same architecture"
        )
    own = {**module._parameters, **module._buffers}
    changed = []
    for name, shape in record["tensors"].items():
        if own.get(name) is None:
            raise ValueError(
                f"module {path!r} has no tensor {name!r} recorded in the pruning "
                "state: not the same architecture"
            )
        if list(own[name].shape) != list(shape):
            changed.append((name, shape))
    if not changed:
        return
    attrs = record["attrs"]
    if attrs is None:
        raise ValueError(
            f"cannot rebuild module {path!r}: tensors of a {record['type']} changed "
            "shape and its structural attributes are unknown to compresskit"
        )
    for key, value in attrs.items():
        setattr(module, key, tuple(value) if isinstance(value, list) else value)
    for name, shape in changed:
        _resize(module, name, shape)


def rebuild_pruned(unpruned_model: nn.Module, state: dict[str, Any]) -> nn.Module:
    """Reshape a freshly built unpruned model in place (and return it) so that the state dict of
    the pruned model `state` was taken from loads into it. Weights are zeros until loaded."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(
            "not a compresskit pruning state (missing format "
            f"{STATE_FORMAT!r}); make it with pruning_state(model)"
        )
    if state.get("version") != STATE_VERSION:
        raise ValueError(
            f"pruning state version {state.get('version')} is not supported "
            f"(expected {STATE_VERSION})"
        )
    modules = dict(unpruned_model.named_modules())
    missing = [p for p in state["modules"] if p not in modules]
    if missing:
        raise ValueError(
            f"the model has no module(s) {missing[:5]} recorded in the pruning "
            "state: not the same architecture"
        )
    for dotted in state["masked"]:
        path, _, name = dotted.rpartition(".")
        torch_prune.identity(modules[path], name)
    for path, record in state["modules"].items():
        _rebuild_module(path, modules[path], record)
    for dotted in state["masked"]:  # refresh the masked view to the new shape
        path, _, name = dotted.rpartition(".")
        module = modules[path]
        setattr(module, name, getattr(module, f"{name}_orig") * getattr(module, f"{name}_mask"))
    return unpruned_model
