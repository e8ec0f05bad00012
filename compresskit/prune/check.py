"""What Torch-Pruning can do with a model, found before it touches it.

Torch-Pruning traces the forward pass into a dependency graph and prunes groups of coupled
channels. What it does not model, it crashes on or prunes wrongly (found on torchvision's
classifiers with Torch-Pruning 1.6 and PyTorch 2.x):

- reshapes that regroup the channel dimension, such as ShuffleNet's channel shuffle
  (``view(N, g, C/g, H, W)``, ``transpose``, ``view(N, C, H, W)``), ``channel_shuffle`` and
  pixel (un)shuffle: its reshape index mapping divides by an inferred channel count of 0
  (``ZeroDivisionError`` while building the graph);
- channel splits (``chunk``/``split``/``unbind`` along the channel dimension) whose parts go
  straight into a concatenation: it infers the split sizes from the consumers, gets them wrong
  and then fails with an ``IndexError`` while grouping (or maps the wrong channels);
- layers whose pruning breaks the forward pass for reasons outside the graph (ViT reshapes
  with its stored ``hidden_dim``; attention heads that no longer divide the width).

`inspect_graph` traces the model with the channel-mixing operations made opaque (each becomes
one node Torch-Pruning treats as element-wise, so the graph builds), compares every channel
split's inferred sizes with the true ones, and sorts the layer groups: a group whose channels
cross such an operation (or a wrongly sized split, or an LSTM) is kept whole, with the reason;
every other group may be pruned. `prune_structured` prunes with the same tracing, passes the
kept layers as ignored and keeps whole any group whose pruning breaks the forward pass.
`check_prunable` lists what makes structured pruning impossible (the graph cannot be built at
all, or no group is left to prune), one line each with the reason and what to change.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch_pruning.dependency.index_mapping import update_split_index_mapping

from compresskit.prune.common import ExampleInputs, _as_tuple, _check_paths, _layer_call_order, expand_paths

ROOT_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear, nn.LSTM)
"""Layers whose output channels root a pruning group (Torch-Pruning's default)."""

_UNSAVED_TYPES: tuple[type[nn.Module], ...] = (nn.RNNBase,)
"""Types Torch-Pruning reshapes whose new shape a compresskit pruning state cannot record."""

_REASON_ATTR = "compresskit_reason"


class PruneRefused(ValueError):
    """Structured pruning cannot be done on this model as configured; the message is one line:
    the model, the reason, and what to change."""


def one_line(text: object, limit: int = 300) -> str:
    """`text` on one line (whitespace collapsed), cut to `limit` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def describe_error(err: BaseException) -> str:
    """"Type: message" of an exception, on one line, with the Torch-Pruning function that raised
    it when it came from inside Torch-Pruning."""
    where = ""
    tb = err.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        if "/torch_pruning/" in filename:
            where = f" (in torch_pruning {filename.rsplit('/torch_pruning/', 1)[1]}:{tb.tb_frame.f_code.co_name})"
        tb = tb.tb_next
    message = one_line(err) or "no message"
    return f"{type(err).__name__}: {message}{where}"


# ---------------------------------------------------------------- tracing with opaque channel mixing


class _ChannelMix(torch.autograd.Function):
    """One graph node for an operation that mixes or splits channels: Torch-Pruning sees an
    element-wise operation (so its index mapping cannot crash on it), and the node carries the
    reason, so groups that cross it are kept whole. Used only while tracing."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: Callable[[Tensor], Any], reason: str) -> Any:  # type: ignore[override]
        setattr(ctx, _REASON_ATTR, reason)
        out = fn(x)
        if isinstance(out, (tuple, list)):
            return tuple(t.clone() for t in out)
        return out.clone()

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> Any:  # pragma: no cover - tracing never runs backward
        raise RuntimeError("compresskit's channel-mix marker is for tracing only")


_RESHAPES = frozenset({torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.flatten, torch.flatten,
                       torch.Tensor.unflatten, torch.unflatten, torch.Tensor.view_as, torch.Tensor.reshape_as})
# channel splits: the position of `dim` among the positional arguments (the tensor first)
_SPLITS = {torch.Tensor.chunk: 2, torch.chunk: 2, torch.Tensor.split: 2, torch.split: 2,
           torch.Tensor.tensor_split: 2, torch.tensor_split: 2, torch.Tensor.unbind: 1, torch.unbind: 1}
_ALWAYS_MIX = {F.pixel_shuffle: "pixel shuffle", F.pixel_unshuffle: "pixel unshuffle",  # F.* are torch.*
               torch.channel_shuffle: "channel shuffle", torch.native_channel_shuffle: "channel shuffle"}


def _func_name(func: Callable[..., Any]) -> str:
    return getattr(func, "__name__", str(func))


def _mixing(func: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[str, str] | None:
    """(kind, detail) when `func(*args, **kwargs)` mixes or splits the channel dimension of a
    feature map (N, C, ...) in a way Torch-Pruning cannot map, else None. Reshapes are judged
    by their output (see `_reshape_mixes`)."""
    if not args or not isinstance(args[0], Tensor) or not args[0].requires_grad:
        return None
    x = args[0]
    if func in _ALWAYS_MIX:
        return _ALWAYS_MIX[func], f"{_func_name(func)} of {tuple(x.shape)}"
    if x.dim() < 4:  # token tensors (N, L, D) and vectors: Torch-Pruning's own business
        return None
    if func in _SPLITS:
        pos = _SPLITS[func]
        dim = kwargs.get("dim", args[pos] if len(args) > pos else 0)
        if isinstance(dim, int) and dim % x.dim() == 1:
            return "channel split", f"{_func_name(func)} of {tuple(x.shape)}"
    return None


def _reshape_mixes(x: Tensor, out: Any) -> bool:
    """A reshape of a feature map that neither keeps (N, C) in front nor flattens to (N, C*H*W)."""
    if not isinstance(out, Tensor) or x.dim() < 4:
        return False
    if tuple(out.shape[:2]) == tuple(x.shape[:2]):
        return False
    return not (out.dim() == 2 and out.shape[0] == x.shape[0])


class _OpaqueMixing(TorchFunctionMode):
    """While active, operations that mix channels return through a `_ChannelMix` node."""

    def __init__(self, where: Callable[[], str]) -> None:
        super().__init__()
        self.where = where
        self.found: list[str] = []
        self.splits: dict[Any, tuple[list[int], str]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        found = _mixing(func, args, kwargs)
        if found is None and func in _RESHAPES and args and isinstance(args[0], Tensor) and args[0].requires_grad:
            out = func(*args, **kwargs)
            if not _reshape_mixes(args[0], out):
                return out
            found = "channel shuffle or regrouping", f"{_func_name(func)} {tuple(args[0].shape)} -> {tuple(out.shape)}"
        elif found is None:
            return func(*args, **kwargs)
        kind, detail = found
        where = self.where()
        reason = f"{kind} ({detail} in {where})" if where else f"{kind} ({detail})"
        if kind == "channel split":  # Torch-Pruning maps splits; remember the true sizes to check it
            outs = func(*args, **kwargs)
            if isinstance(outs, (tuple, list)) and outs and getattr(outs[0], "grad_fn", None) is not None:
                self.splits[outs[0].grad_fn] = ([int(o.shape[1]) for o in outs], reason)
            return outs
        self.found.append(reason)
        return _ChannelMix.apply(args[0], functools.partial(_call_rest, func, args[1:], kwargs), reason)


def _call_rest(func: Callable[..., Any], rest: tuple, kwargs: dict, x: Tensor) -> Any:
    return func(x, *rest, **kwargs)


@contextlib.contextmanager
def _module_stack(model: nn.Module) -> Iterator[Callable[[], str]]:
    """Yields a function naming the innermost module running now (its path in `model`)."""
    names = {m: n for n, m in model.named_modules()}
    stack: list[str] = []

    def push(module: nn.Module, _inputs: Any) -> None:
        stack.append(names.get(module, ""))

    def pop(module: nn.Module, _inputs: Any, _output: Any) -> None:
        if stack:
            stack.pop()

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(push))
        handles.append(module.register_forward_hook(pop, always_call=True))
    try:
        yield lambda: next((n for n in reversed(stack) if n), "")
    finally:
        for h in handles:
            h.remove()


class Tracer:
    """A `forward_fn` for Torch-Pruning: the model's forward with channel-mixing operations made
    opaque. `found` lists what was made opaque; `splits` maps each channel split's autograd node
    to its true output sizes (and where it happens), to check the sizes Torch-Pruning infers."""

    def __init__(self) -> None:
        self.found: list[str] = []
        self.splits: dict[Any, tuple[list[int], str]] = {}

    def __call__(self, model: nn.Module, inputs: Any) -> Any:
        with _module_stack(model) as where:
            mode = _OpaqueMixing(where)
            try:
                with mode:
                    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)
            finally:
                self.found.extend(r for r in mode.found if r not in self.found)
                self.splits.update(mode.splits)


# ---------------------------------------------------------------- sorting the groups


@dataclass
class GraphCheck:
    """What `inspect_graph` found: `problems` make structured pruning impossible; `kept` maps
    each layer whose output channels must stay whole to the reason; `prunable` lists the root
    layers of the groups that may be pruned; `opaque` the channel-mixing operations met."""

    model: str
    problems: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    prunable: list[str] = field(default_factory=list)
    opaque: list[str] = field(default_factory=list)


def _wrong_splits(graph: tp.DependencyGraph, splits: dict[Any, tuple[list[int], str]]) -> dict[Any, str]:
    """Channel-split nodes whose sizes Torch-Pruning inferred wrongly (it infers them from the
    consumers, which fails when a part goes straight into a concatenation): node -> reason.
    Their sizes are corrected in `graph`, so its groups show what crosses them."""
    wrong = {}
    for node in graph.module2node.values():
        if node.type != tp.ops.OPTYPE.SPLIT or node.grad_fn not in splits:
            continue
        sizes, reason = splits[node.grad_fn]
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        if list(node.module.offsets or []) != offsets:
            wrong[node] = reason.replace("channel split", "channel split of wrongly inferred sizes", 1)
            # the true sizes, so grouping follows the channels instead of crashing (IndexError)
            node.module.split_sizes, node.module.offsets = sizes, offsets
            with contextlib.suppress(Exception):
                update_split_index_mapping(graph, node)
    return wrong


def _group_obstacle(group: Any, names: dict[Any, str], wrong: dict[Any, str]) -> str | None:
    """Why this group must not be pruned, or None."""
    mixes: list[str] = []
    for dep, _ in group:
        node = dep.target
        reason = getattr(node.grad_fn, _REASON_ATTR, None) or wrong.get(node)
        if reason and reason not in mixes:
            mixes.append(reason)
        module = node.module
        if isinstance(module, _UNSAVED_TYPES):
            return (f"pruning it reshapes the {type(module).__name__} {names.get(module, '?')!r}, "
                    "whose pruned shape a compresskit checkpoint cannot record")
    if not mixes:
        return None
    mixes.sort(key=lambda r: r.startswith("channel split"))  # a shuffle says more than a split
    more = f" (and {len(mixes) - 1} more such operation{'s' if len(mixes) > 2 else ''})" if len(mixes) > 1 else ""
    return f"its channels pass through a {mixes[0]}{more}, which Torch-Pruning cannot map"


def _out_pruned_layers(graph: tp.DependencyGraph, group: Any) -> list[nn.Module]:
    return [dep.target.module for dep, _ in group
            if graph.is_out_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, ROOT_TYPES)]


def inspect_graph(model: nn.Module, example_inputs: ExampleInputs, ignored: Sequence[nn.Module] = ()) -> GraphCheck:
    """Build Torch-Pruning's dependency graph of `model` (channel-mixing operations made opaque)
    and sort its layer groups; `ignored` modules (and their submodules) root no group. Nothing
    raises: what goes wrong is in `problems`. Train/eval flags are restored."""
    inputs = _as_tuple(example_inputs)
    cls = type(model).__name__
    result = GraphCheck(model=cls)
    tracer = Tracer()
    names = {m: n for n, m in model.named_modules()}
    flags = {m: m.training for m in model.modules()}
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Unwrapped parameters detected")  # the pruner says it again
            graph = tp.DependencyGraph().build_dependency(
                model, inputs if len(inputs) > 1 else inputs[0], forward_fn=tracer,
                verbose=False)
    except Exception as err:  # anything Torch-Pruning's tracing raises
        result.problems.append(
            f"Torch-Pruning cannot build the dependency graph of {cls}: {describe_error(err)}; ignoring layers "
            "does not avoid this, use prune.pruner.method: magnitude (or make the model traceable)")
        return result
    finally:
        for m, flag in flags.items():
            m.training = flag
    result.opaque = list(tracer.found)
    wrong = _wrong_splits(graph, tracer.splits)
    result.opaque += [r for r in wrong.values() if r not in result.opaque]
    skip = {sub for m in ignored for sub in m.modules()}
    visited: set[nn.Module] = set()
    for module in list(graph.module2node):
        if not isinstance(module, ROOT_TYPES) or module in skip or module in visited:
            continue
        pruner = graph.get_pruner_of_module(module)
        channels = pruner.get_out_channels(module) if pruner is not None else None
        if not channels:
            continue
        try:
            group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(channels)))
        except Exception as err:  # Torch-Pruning cannot follow this layer's channels
            result.kept[names[module]] = f"Torch-Pruning cannot follow its channels ({describe_error(err)})"
            visited.add(module)
            continue
        layers = _out_pruned_layers(graph, group)
        visited.update(layers)
        if any(m in skip for m in layers):
            continue  # coupled to an ignored layer: Torch-Pruning skips the group itself
        obstacle = _group_obstacle(group, names, wrong)
        if obstacle is None:
            result.prunable.append(names[module])
            continue
        for layer in layers or [module]:
            result.kept.setdefault(names[layer], obstacle)
    if not result.prunable:
        why = "; ".join(sorted(set(result.kept.values()))[:2]) or "every layer is the classifier or ignored"
        result.problems.append(f"structured pruning of {cls} has nothing to prune: no layer group can lose channels "
                               f"({why}); use prune.pruner.method: magnitude")
    return result


def check_prunable(model: nn.Module, example_inputs: ExampleInputs, ignored_layers: Sequence[str] = ()) -> list[str]:
    """Problems (one line each) that make `prune_structured` refuse `model`; [] when it can prune.

    Builds Torch-Pruning's dependency graph on the example inputs (an untrained model will do)
    the way `prune_structured` does: the classifier (the last Conv/Linear called) and
    `ignored_layers` (module paths, shell patterns allowed) root no group. Layer groups that
    Torch-Pruning cannot handle are not problems: `prune_structured` keeps them whole and
    reports them (`settings["kept_layers"]`); see `inspect_graph` for the full picture.
    """
    inputs = _as_tuple(example_inputs)
    try:
        paths = expand_paths(model, ignored_layers)
        _check_paths(model, paths, "ignored_layers")
        order = _layer_call_order(model, inputs)
    except (ValueError, RuntimeError, TypeError) as err:
        return [one_line(err)]
    if not order:
        return [f"{type(model).__name__} calls no Conv or Linear layer; nothing to prune"]
    ignored = [model.get_submodule(p) for p in (order[-1], *paths)]
    return inspect_graph(model, inputs, ignored).problems
