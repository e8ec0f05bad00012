"""Structured channel pruning with Torch-Pruning: whole channels go, so tensors really shrink.

`prune_structured` removes channels through Torch-Pruning's dependency graph, so coupled layers
(residual adds, depthwise convs, BatchNorm) shrink together and every runtime (onnxruntime
included) does less work. The final classifier is never pruned, so the output shape stays.
A per-layer cap (`max_layer_ratio`) is enforced on every step, which Torch-Pruning alone does
not guarantee under global pruning.

What Torch-Pruning cannot handle never ends in its traceback: the dependency graph is checked
first (`compresskit.prune.check`); layer groups whose channels cross a channel shuffle or split
are kept whole, and so is any group whose pruning breaks the forward pass (found by running the
model after each pruning step and, when that fails, after each group); they are listed in
`settings["kept_layers"]` with the reason. A model that cannot be pruned at all is refused with a
`PruneRefused` (a ValueError) of one line.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn

from compresskit.prune.check import (
    PruneRefused,
    Tracer,
    describe_error,
    inspect_graph,
    one_line,
)
from compresskit.prune.common import (
    _WEIGHTED,
    ExampleInputs,
    PruneResult,
    _as_tuple,
    _check_paths,
    _count_nonzero,
    _layer_call_order,
    _run_eval,
    _zero_fraction,
    count_macs_params,
    expand_paths,
)

Importance = Literal["l1", "l2", "bn_scale", "taylor", "lamp", "fpgm"]
IMPORTANCES: tuple[str, ...] = ("l1", "l2", "bn_scale", "taylor", "lamp", "fpgm")


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


class _GroupBroke(Exception):
    """Pruning a group (`layer`: its root; None when not yet known) broke the model: `why`."""

    def __init__(self, layer: str | None, why: str) -> None:
        super().__init__(why)
        self.layer, self.why = layer, why


def _forward_problem(model: nn.Module, inputs: tuple[Tensor, ...], expected: Any) -> str | None:
    """Why the (partly pruned) model no longer runs on `inputs` as before, or None."""
    try:
        out = _run_eval(model, inputs)
    except Exception as err:  # a forward that fails after pruning: whatever it raises
        return f"pruning it breaks the forward pass ({describe_error(err)})"
    if isinstance(expected, Tensor) and isinstance(out, Tensor) and out.shape != expected.shape:
        return f"pruning it changes the output shape from {tuple(expected.shape)} to {tuple(out.shape)}"
    return None


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
    expected: Any = None,
    careful: bool = False,
) -> None:
    """Build Torch-Pruning's pruner on `pruned` and run its steps in place, with fresh Taylor
    gradients before each step and the per-layer cap applied to every group.

    The model is run after every step (after every group when `careful`); when it no longer
    runs like before (`expected`: the output before pruning) a `_GroupBroke` names the group's
    root layer (None after a whole step: rerun with `careful` to find it).
    """
    names = {m: n for n, m in pruned.named_modules()}
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
            forward_fn=Tracer(),
        )
    finally:
        for m, flag in flags.items():
            m.training = flag
    for _ in range(iterative_steps):
        if batches:
            _accumulate_gradients(pruned, batches, loss_fn)
        for group in pruner.step(interactive=True):
            root = names.get(group[0].dep.target.module)
            try:
                group.prune(_capped_indices(pruner, group, max_layer_ratio, round_to))
            except Exception as err:  # Torch-Pruning's own checks (e.g. attention heads) or a crash
                raise _GroupBroke(root, f"Torch-Pruning cannot prune it ({describe_error(err)})") from err
            if careful:
                why = _forward_problem(pruned, inputs, expected)
                if why:
                    raise _GroupBroke(root, why)
        if not careful:
            why = _forward_problem(pruned, inputs, expected)
            if why:
                raise _GroupBroke(None, why)


_MAX_BROKEN_GROUPS = 12


def _prune_keeping_broken_groups(
    base: nn.Module, inputs: tuple[Tensor, ...], fixed: Sequence[str], kept: dict[str, str], **options: Any
) -> nn.Module:
    """Prune a copy of `base`; a group that breaks the model is added to `kept` (path -> reason)
    and pruning starts again from `base` without it. `fixed` paths are always ignored."""
    cls = type(base).__name__
    careful, broken = False, 0
    while True:
        work = copy.deepcopy(base)
        ignored = [work.get_submodule(p) for p in (*fixed, *kept)]
        try:
            _run_pruner(work, inputs, ignored, careful=careful, **options)
            return work
        except _GroupBroke as broke:
            if broke.layer is None and not careful:
                careful = True  # find the group: prune again, running the model after each one
                continue
            if broke.layer is None or broke.layer in kept:
                raise PruneRefused(f"structured pruning of {cls} breaks the model: {broke.why}; "
                                   "use prune.pruner.method: magnitude") from None
            kept[broke.layer] = broke.why
            broken += 1
            if broken > _MAX_BROKEN_GROUPS:
                listed = ", ".join(list(kept)[-broken:][:8])
                raise PruneRefused(
                    f"structured pruning of {cls}: pruning breaks the model in more than {_MAX_BROKEN_GROUPS} layer "
                    f"groups ({listed}, ...; e.g. {one_line(broke.why, 160)}); add them to "
                    "prune.pruner.ignored_layers or use prune.pruner.method: magnitude") from None
        except PruneRefused:
            raise
        except Exception as err:  # anything else from inside Torch-Pruning: one line, never its traceback
            raise PruneRefused(f"structured pruning of {cls} failed in Torch-Pruning: {describe_error(err)}") from None


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

    Layer groups Torch-Pruning cannot handle (channels through a channel shuffle or split, or a
    group whose pruning breaks the forward pass) are kept whole and listed with the reason in
    `settings["kept_layers"]`; add them to `ignored_layers` to skip the retry. A model that
    cannot be pruned at all raises `PruneRefused` (a ValueError, one line, never a Torch-Pruning
    traceback); `check_prunable` finds that before any pruning.
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

    base = copy.deepcopy(model)
    order = _layer_call_order(base, inputs)
    if not order:
        raise ValueError("the model calls no Conv or Linear layer; nothing to prune")
    fixed = (order[-1], *ignored_layers)
    graph = inspect_graph(base, inputs, [base.get_submodule(p) for p in fixed])
    if graph.problems:
        raise PruneRefused(graph.problems[0])
    kept = dict(graph.kept)
    out_before = _run_eval(base, inputs)
    macs_before, params_before = count_macs_params(base, inputs)
    widths_before = _layer_widths(base)

    pruned = _prune_keeping_broken_groups(
        base,
        inputs,
        fixed,
        kept,
        expected=out_before,
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
            "kept_layers": dict(kept),
        },
    )
