"""The distillation objective: a weighted sum of loss terms declared in the config.

`build_objective(terms, student=..., teacher=..., example_input=...)` turns the config's list of
term dicts into an `Objective`, a module the training loop calls as ``loss_fn(images, targets)``.
Everything that can be wrong with a config (unknown method, unknown option, a feature term
without a teacher, a module path that does not exist, features that cannot be paired) is found
at build time, by one dry forward pass, not in the first training step.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from compresskit.distill.losses import Term, TermInputs
from compresskit.distill.registry import TEACHER_SCHEMES, TERMS
from compresskit.distill.taps import FeatureTaps, unwrap_model
from compresskit.distill.taps import eval_mode as _eval_mode

__all__ = ["LossOutput", "Objective", "build_objective", "methods"]


@dataclass(frozen=True)
class LossOutput:
    """One step's result: `loss` to backpropagate, the student `logits` (for accuracy), and
    `parts`, each term's weighted contribution as a float (they sum to `loss`)."""

    loss: Tensor
    logits: Tensor
    parts: dict[str, float]


def methods() -> list[tuple[str, str]]:
    """(method name, one-line description) of every distillation method: the loss terms, then
    the teacher schemes configured in the teacher stage."""
    return [(name, cls.description) for name, cls in TERMS.items()] + list(TEACHER_SCHEMES.items())


def _device_of(model: nn.Module) -> torch.device | None:
    """Device of the model's first parameter or buffer (None for a stateless model)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return None


def _as_logits(output: object, what: str) -> Tensor:
    """The model output as a logits tensor; other outputs (tuples, dicts) are a usage error."""
    if not isinstance(output, Tensor):
        raise ValueError(
            f"{what} returned {type(output).__name__}; the objective needs a model whose forward "
            "returns one logits tensor"
        )
    return output


class Objective(nn.Module):
    """Weighted sum of distillation terms, called once per training step.

    Adapters (e.g. FitNet regressors) are submodules, so ``objective.parameters()`` are the
    extra trainable parameters the optimizer must include and ``objective.state_dict()`` holds
    only them. The student and the teacher are plain references, not submodules: the training
    loop owns the student; the teacher is frozen (``requires_grad_(False)``), kept in eval mode
    and run under ``torch.no_grad()`` (not inference mode: its features enter autograd as
    constants). ``objective.to(...)`` moves the adapters and the teacher.

    The student runs once per step, the teacher once per step and only if a term needs it.
    Hooks stay on the models until `close()` (or the end of a ``with`` block), which must happen
    before the student is exported.
    """

    def __init__(
        self,
        terms: Sequence[Term],
        names: Sequence[str],
        *,
        student: nn.Module,
        teacher: nn.Module | None,
    ) -> None:
        super().__init__()
        self.terms = nn.ModuleList(terms)
        self.names = list(names)
        object.__setattr__(self, "_student", student)
        object.__setattr__(self, "_teacher", teacher if self.needs_teacher else None)
        s_paths = [p for term in terms for p in term.student_paths()]
        t_paths = [p for term in terms for p in term.teacher_paths()]
        self._epoch = 0.0
        self._student_taps = FeatureTaps(student, s_paths, what="student")
        try:
            # a combined teacher (ensemble, generalist + specialists) is tapped on its primary model
            tapped = getattr(teacher, "primary", teacher)
            self._teacher_taps = FeatureTaps(tapped, t_paths, what="teacher") if t_paths else None
        except ValueError:
            self._student_taps.remove()
            raise

    @property
    def student(self) -> nn.Module:
        """The model being trained (as passed in, possibly DDP-wrapped)."""
        return self._student

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher, or None when no term needs one."""
        return self._teacher

    @property
    def needs_teacher(self) -> bool:
        """True if some term reads teacher logits or features."""
        return any(term.needs_teacher for term in self.terms)

    def _all_taps(self) -> list[FeatureTaps]:
        return [t for t in (self._student_taps, self._teacher_taps) if t is not None]

    def set_epoch(self, epoch: float) -> None:
        """Tell the terms how far training is, in epochs (the training loop calls this each step)."""
        self._epoch = float(epoch)

    def _run(self, student: nn.Module, images: Tensor, targets: Tensor | None) -> TermInputs:
        """Run student (and teacher if needed) once and collect what the terms read."""
        for taps in self._all_taps():
            taps.clear()
        logits = _as_logits(student(images), "student")
        teacher_logits, members = None, None
        if self._teacher is not None:
            with torch.no_grad():
                if callable(getattr(self._teacher, "forward_members", None)):
                    members = tuple(_as_logits(m, "teacher member")
                                    for m in self._teacher.forward_members(images))
                    teacher_logits = self._teacher.combine(members)
                else:
                    teacher_logits = _as_logits(self._teacher(images), "teacher")
        return TermInputs(
            logits=logits,
            targets=targets,
            teacher_logits=teacher_logits,
            student_features=dict(self._student_taps.features),
            teacher_features=dict(self._teacher_taps.features) if self._teacher_taps else {},
            images=images,
            epoch=self._epoch,
            student=student,
            teacher=self._teacher,
            teacher_members=members,
        )

    def _check_ready(self, images: Tensor) -> None:
        """Fail clearly on a closed objective or a teacher/adapter on another device."""
        if any(taps.paths and not taps.active for taps in self._all_taps()):
            raise RuntimeError("objective was closed (its feature hooks are removed)")
        for what, module in (("teacher", self._teacher), ("adapters", self.terms)):
            device = None if module is None else _device_of(module)
            if device is not None and device != images.device:
                raise ValueError(
                    f"{what} on {device} but the input on {images.device}; "
                    f"call objective.to({str(images.device)!r})"
                )
        if self._teacher is not None and self._teacher.training:
            self._teacher.eval()

    def forward(self, images: Tensor, targets: Tensor | None) -> LossOutput:
        """Loss of one batch: ``sum(weight_i * term_i)``; see `LossOutput`."""
        self._check_ready(images)
        try:
            inputs = self._run(self._student, images, targets)
            weighted = torch.stack([term.weight * term(inputs) for term in self.terms])
        finally:
            for taps in self._all_taps():
                taps.clear()
        parts = dict(zip(self.names, weighted.detach().tolist(), strict=True))
        return LossOutput(loss=weighted.sum(), logits=inputs.logits, parts=parts)

    def setup(self, example_input: Tensor) -> None:
        """Dry run in eval mode without gradients; each term checks shapes, creates adapters.

        Freezes the teacher once every term has accepted the shapes.
        """
        student = unwrap_model(self._student)
        for what, model in (("student", student), ("teacher", self._teacher)):
            device = None if model is None else _device_of(model)
            if device is not None and device != example_input.device:
                raise ValueError(f"{what} on {device} but example_input on {example_input.device}")
        autocast_off = torch.autocast(example_input.device.type, enabled=False)
        with _eval_mode(student, self._teacher), torch.no_grad(), autocast_off:
            try:
                sample = self._run(student, example_input, None)
            except RuntimeError as err:
                raise ValueError(
                    f"forward on example_input of shape {tuple(example_input.shape)} failed: {err}"
                ) from err
        for taps in self._all_taps():
            taps.clear()
        for index, term in enumerate(self.terms):
            try:
                term.setup(sample)
            except ValueError as err:
                raise ValueError(f"terms[{index}]: {err}") from None
        if self._teacher is not None:
            self._teacher.requires_grad_(False).eval()

    def close(self) -> None:
        """Remove all feature hooks from student and teacher (the objective's taps, and any a term
        keeps: a term with a `close()` method is closed too); safe to call twice."""
        for taps in self._all_taps():
            taps.remove()
        for term in self.terms:
            closer = getattr(term, "close", None)
            if callable(closer):
                closer()

    def __enter__(self) -> Objective:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def to(self, *args: Any, **kwargs: Any) -> Objective:
        """Move/cast the adapters and the teacher (the student is the training loop's)."""
        super().to(*args, **kwargs)
        if self._teacher is not None:
            self._teacher.to(*args, **kwargs)
        return self

    def extra_repr(self) -> str:
        return f"names={self.names}, teacher={'yes' if self._teacher is not None else 'no'}"


def _make_term(index: int, spec: object) -> Term:
    """Build one term from its config dict, checking method and option names up front.

    Options whose value is None are dropped so the term's default applies (a pydantic dump
    writes unset optional fields as None).
    """
    if not isinstance(spec, Mapping):
        raise ValueError(f"terms[{index}] must be a mapping, got {type(spec).__name__}")
    options = {k: v for k, v in spec.items() if v is not None}
    method = options.pop("method", None)
    if method is None:
        raise ValueError(f"terms[{index}] has no 'method'; known methods: {', '.join(TERMS)}")
    if not isinstance(method, str) or method not in TERMS:
        raise ValueError(
            f"terms[{index}]: unknown method {method!r}; known methods: {', '.join(TERMS)}"
        )
    cls = TERMS[method]
    params = {
        name: p
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    unknown = sorted(set(options) - set(params))
    missing = [n for n, p in params.items() if p.default is p.empty and n not in options]
    if unknown or missing:
        problems = [
            f"unknown option(s) {unknown}" if unknown else "",
            f"missing option(s) {missing}" if missing else "",
        ]
        raise ValueError(
            f"terms[{index}] ({method}): {'; '.join(p for p in problems if p)}; "
            f"options of {method}: {', '.join(params)}"
        )
    try:
        return cls(**options)
    except ValueError as err:
        raise ValueError(f"terms[{index}]: {err}") from None


def _part_names(terms: Sequence[Term]) -> list[str]:
    """Key of each term in `LossOutput.parts`: its method, suffixed _2, _3... when repeated."""
    seen: dict[str, int] = {}
    names = []
    for term in terms:
        seen[term.method] = seen.get(term.method, 0) + 1
        count = seen[term.method]
        names.append(term.method if count == 1 else f"{term.method}_{count}")
    return names


def build_objective(
    terms: Sequence[Mapping[str, Any]],
    *,
    student: nn.Module,
    teacher: nn.Module | None,
    example_input: Tensor,
) -> Objective:
    """Validate the term dicts and build the objective, with adapters, for these models.

    `terms` are dicts such as ``{"method": "kd", "weight": 0.9, "temperature": 4.0}`` (see
    `methods()` and the term classes in `losses` for the options). `student` may be wrapped
    (DDP, torch.compile); module paths refer to the plain model. `example_input` is one batch
    on the models' device; it is run once in eval mode without gradients to learn feature
    shapes. The teacher is used, and frozen, only if some term needs it. Raises ValueError on
    any config or shape problem, naming the term and the module paths involved.
    """
    if not terms:
        raise ValueError("the objective needs at least one loss term")
    if not isinstance(example_input, Tensor):
        raise ValueError(f"example_input must be a tensor, got {type(example_input).__name__}")
    built = [_make_term(i, spec) for i, spec in enumerate(terms)]
    needy = [t.method for t in built if t.needs_teacher]
    if needy and teacher is None:
        raise ValueError(f"term(s) {needy} need a teacher, but no teacher was given")
    if needy and unwrap_model(teacher) is unwrap_model(student):
        raise ValueError("teacher and student are the same module; pass a separate teacher")
    objective = Objective(built, _part_names(built), student=student, teacher=teacher)
    try:
        objective.setup(example_input)
    except BaseException:
        objective.close()
        raise
    return objective
