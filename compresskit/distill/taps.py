"""Feature taps: capture the outputs of named submodules during a forward pass.

Feature distillation needs intermediate activations of the student and the teacher. Rather than
changing model code, `FeatureTaps` attaches forward hooks to modules named by their dotted path
(the names `model.named_modules()` prints, e.g. ``features.6`` or ``layer2.1.conv1``), so any
`nn.Module` can be tapped, torchvision models included.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["FeatureTaps", "eval_mode", "unwrap_model", "resolve_module"]

_MAX_SUGGESTIONS = 8


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the user's module inside DDP / DataParallel / `torch.compile` wrappers.

    Paths in a config name modules of the plain model; a wrapped model prefixes them
    (``module.`` or ``_orig_mod.``), so paths are resolved on the unwrapped one.
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _suggestions(model: nn.Module, path: str) -> list[str]:
    """Valid module paths close to `path`: siblings under the longest existing prefix."""
    names = [name for name, _ in model.named_modules() if name]
    parts = path.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:cut])
        if prefix and prefix not in names:
            continue
        depth = cut + 1
        near = [n for n in names if n.startswith(prefix) and n.count(".") + 1 == depth]
        if prefix:
            near = [n for n in near if n.startswith(prefix + ".")]
        if near:
            return _shorten(near)
    return _shorten(names)


def _shorten(names: list[str]) -> list[str]:
    """At most `_MAX_SUGGESTIONS` names: the first ones, an ellipsis, the last two."""
    if len(names) <= _MAX_SUGGESTIONS:
        return names
    return [*names[: _MAX_SUGGESTIONS - 3], "...", *names[-2:]]


def resolve_module(model: nn.Module, path: str, *, what: str = "model") -> nn.Module:
    """Return the submodule at dotted `path`, or raise ValueError listing nearby valid paths.

    `what` names the model in the message ("student", "teacher") because the path comes from a
    config file and the user needs to know which model to look at.
    """
    if not isinstance(path, str) or not path:
        raise ValueError(f"{what} module path must be a non-empty string, got {path!r}")
    inner = unwrap_model(model)
    try:
        return inner.get_submodule(path)
    except AttributeError:
        near = ", ".join(_suggestions(inner, path)) or "(the model has no submodules)"
        raise ValueError(
            f"{what} has no module {path!r}; valid paths near it: {near} "
            f"(see model.named_modules() for all)"
        ) from None


class FeatureTaps:
    """Forward hooks that record the outputs of modules named by dotted path.

    After a forward pass of `model`, ``taps.features[path]`` holds the output of that module for
    the last call (a module called twice in one forward keeps its last output). Recorded tensors
    keep their autograd graph, so losses on them train the model. Call `clear()` after each step
    to drop references, and `remove()` (or leave the `with` block) before exporting the model:
    hooks must not stay attached to a model that is saved, traced or exported.
    """

    def __init__(self, model: nn.Module, paths: list[str], *, what: str = "model") -> None:
        self.paths: list[str] = list(dict.fromkeys(paths))
        self.features: dict[str, Tensor] = {}
        modules = {p: resolve_module(model, p, what=what) for p in self.paths}
        self._handles: list[RemovableHandle] = [
            module.register_forward_hook(self._recorder(p)) for p, module in modules.items()
        ]

    def _recorder(self, path: str):
        """Build the hook for one path (a closure, so each hook knows its key)."""

        def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
            self.features[path] = output

        return hook

    @property
    def active(self) -> bool:
        """True while the hooks are attached."""
        return bool(self._handles)

    def clear(self) -> None:
        """Forget recorded features (releases the tensors and their graphs)."""
        self.features.clear()

    def remove(self) -> None:
        """Detach all hooks and forget recorded features; safe to call more than once."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


@contextmanager
def eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Put models in eval mode for a block and restore every submodule's own mode after, so a
    dry run or a side forward never updates BatchNorm statistics of the user's models."""
    saved = [(m, m.training) for model in models if model is not None for m in model.modules()]
    try:
        for model in models:
            if model is not None:
                model.eval()
        yield
    finally:
        for module, training in saved:
            module.training = training
