"""Distillation losses: plain functions, and the loss terms an objective is built from.

The functions (`kd_loss`, `fitnet_loss`, `attention_map`, `at_loss`) are usable on their own
from a user's training script. The term classes wrap them with what a config-driven objective
needs: options validated at construction, a declaration of what they read (teacher logits,
feature maps), a `setup` that checks shapes on a sample and creates adapters, and a `forward`
that returns the unweighted loss.

Adding a distillation method is one `Term` subclass plus one entry in `TERMS`; nothing is
registered by importing a module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "TermInputs",
    "Term",
    "CETerm",
    "KDTerm",
    "FitNetTerm",
    "ATTerm",
    "TERMS",
    "kd_loss",
    "fitnet_loss",
    "attention_map",
    "at_loss",
    "match_spatial",
    "make_regressor",
]


# ---------------------------------------------------------------- functional losses


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton et al. (2015) soft-target loss: ``T^2 * KL(softmax(t/T) || softmax(s/T))``.

    KL divergence is summed over classes and averaged over the batch ("batchmean", the true KL
    per sample). The ``T^2`` factor keeps gradient magnitudes comparable across temperatures, so
    the weight of this term need not be retuned when T changes. Computed in float32, also under
    autocast, because softmax at high temperature loses precision in half types.
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    p_teacher = F.softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * (t * t)


def match_spatial(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Bring two (N, C, H, W) maps to the same H and W by adaptive average pooling.

    Each spatial dimension is pooled down to the smaller of the two sizes (a map already at that
    size is left as is). Pooling, unlike upsampling, invents no values: the larger map is
    summarised, never the smaller one stretched.
    """
    if a.shape[-2:] == b.shape[-2:]:
        return a, b
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    if a.shape[-2:] != size:
        a = F.adaptive_avg_pool2d(a, size)
    if b.shape[-2:] != size:
        b = F.adaptive_avg_pool2d(b, size)
    return a, b


def fitnet_loss(student_hint: Tensor, teacher_feature: Tensor) -> Tensor:
    """Romero et al. (2015) hint loss: mean squared error between the (regressed) student
    feature and the teacher feature, averaged over every element.

    Both are (N, C) or (N, C, H, W) with equal C; 4D maps of different H or W are matched by
    `match_spatial` (pooling the larger to the smaller). Computed in float32.
    """
    s, t = student_hint.float(), teacher_feature.float()
    if s.dim() == 4:
        s, t = match_spatial(s, t)
    return F.mse_loss(s, t)


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """Zagoruyko & Komodakis (2017) activation-based attention: ``mean_c |f|^p`` per position.

    Returns the unnormalised (N, 1, H, W) map in float32; `at_loss` pools and normalises it.
    """
    return feature.float().abs().pow(p).mean(dim=1, keepdim=True)


def at_loss(student_feature: Tensor, teacher_feature: Tensor, p: float = 2.0) -> Tensor:
    """Attention-transfer loss between two (N, C, H, W) maps; channel counts may differ.

    a = L2-normalise(flatten(attention_map(f, p))) per sample, with the two attention maps first
    pooled to a common H and W (`match_spatial`). Loss = ``(a_s - a_t).pow(2).mean()``, the form
    of the authors' reference code: the mean over batch and positions of the squared difference,
    i.e. ``(1 / (N*H*W)) * sum_n ||a_s[n] - a_t[n]||^2``. Being divided by H*W it is small; the
    reference code weights it by beta/2 = 500 per tapped pair.
    """
    a_s, a_t = match_spatial(attention_map(student_feature, p), attention_map(teacher_feature, p))
    a_s = F.normalize(a_s.flatten(1), dim=1)
    a_t = F.normalize(a_t.flatten(1), dim=1)
    return (a_s - a_t).pow(2).mean()


def make_regressor(student_channels: int, teacher_channels: int, *, spatial: bool) -> nn.Module:
    """FitNet regressor from student to teacher channels.

    A 1x1 convolution followed by BatchNorm for (N, C, H, W) maps (BN puts the regressed map on
    a scale the teacher's can be matched against from the first step), a Linear layer for (N, C)
    vectors.
    """
    if spatial:
        return nn.Sequential(
            nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(teacher_channels),
        )
    return nn.Linear(student_channels, teacher_channels)


# ---------------------------------------------------------------- terms


@dataclass(frozen=True)
class TermInputs:
    """Everything a term may read in one step.

    `teacher_logits` is None unless some term needs the teacher; `targets` is None in the dry
    run that `build_objective` makes to learn shapes. Feature dicts are keyed by module path.
    `images` is the batch the student saw (schemes that run extra forwards read it), `epoch`
    the training progress in epochs (2.5 = half-way through the third epoch; warm-ups read
    it), `student` and `teacher` the models themselves (the teacher frozen; None when no term
    needs it), and `teacher_members` the logits of each member when the teacher is an ensemble
    (`compresskit.teacher.ensemble.TeacherEnsemble`), else None.
    """

    logits: Tensor
    targets: Tensor | None
    teacher_logits: Tensor | None
    student_features: Mapping[str, Tensor]
    teacher_features: Mapping[str, Tensor]
    images: Tensor | None = None
    epoch: float = 0.0
    student: nn.Module | None = None
    teacher: nn.Module | None = None
    teacher_members: tuple[Tensor, ...] | None = None


def _check_number(name: str, value: object, *, low: float, low_open: bool = False) -> float:
    """Return `value` as float, or raise ValueError if it is not a finite number >= low."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return float(value)


def _feature(features: Mapping[str, Tensor], path: str, what: str) -> Tensor:
    """Fetch a tapped feature, insisting that the module returned a single tensor."""
    value = features.get(path)
    if not isinstance(value, Tensor):
        raise ValueError(
            f"{what} module {path!r} produced {type(value).__name__}, not a tensor; "
            "tap a module that returns one tensor"
        )
    return value


class Term(nn.Module):
    """One weighted part of a distillation objective.

    Subclasses set `method` (its config name), `description`, and the needs flags, take their
    options as keyword arguments of `__init__` (which the objective checks config keys against),
    and implement `forward(inputs) -> scalar` (unweighted; the objective applies `weight`).
    Adapters created in `setup` become submodules and so trainable parameters of the objective.
    """

    method: ClassVar[str]
    description: ClassVar[str]
    needs_teacher: ClassVar[bool] = False
    needs_features: ClassVar[bool] = False
    needs_targets: ClassVar[bool] = False
    needs_images: ClassVar[bool] = False
    needs_relations: ClassVar[bool] = False
    """Compares samples of the batch with each other (needs batches of 2 or more)."""
    needs_epoch: ClassVar[bool] = False
    teacher_logits_only: ClassVar[bool] = False
    """Reads nothing of the teacher but its logits on the batch images, so the teacher's
    outputs may be memoised per image (`CachedTeacher`) when inputs repeat exactly."""

    def __init__(self, *, weight: float) -> None:
        super().__init__()
        self.weight = _check_number(f"{self.method}.weight", weight, low=0.0)

    def student_paths(self) -> list[str]:
        """Student module paths whose outputs this term reads."""
        return []

    def teacher_paths(self) -> list[str]:
        """Teacher module paths whose outputs this term reads."""
        return []

    def setup(self, sample: TermInputs) -> None:
        """Check shapes on a dry-run sample and create adapters; raise ValueError if unusable."""

    def extra_repr(self) -> str:
        return f"weight={self.weight}"

    def forward(self, inputs: TermInputs) -> Tensor:
        raise NotImplementedError


class CETerm(Term):
    """Cross-entropy of the student logits against the hard labels, with label smoothing."""

    method = "ce"
    description = "cross-entropy on the labels (optional label smoothing)"
    needs_targets = True
    teacher_logits_only = True

    def __init__(self, *, weight: float, label_smoothing: float = 0.0) -> None:
        super().__init__(weight=weight)
        self.label_smoothing = _check_number("ce.label_smoothing", label_smoothing, low=0.0)
        if self.label_smoothing >= 1.0:
            raise ValueError(f"ce.label_smoothing must be < 1, got {label_smoothing!r}")

    def setup(self, sample: TermInputs) -> None:
        if sample.logits.dim() < 2:
            shape = tuple(sample.logits.shape)
            raise ValueError(f"ce needs (N, classes) logits, got shape {shape}")

    def forward(self, inputs: TermInputs) -> Tensor:
        if inputs.targets is None:
            raise ValueError("ce needs targets (labels), got None")
        return F.cross_entropy(
            inputs.logits.float(), inputs.targets, label_smoothing=self.label_smoothing
        )


class KDTerm(Term):
    """Hinton KD on logits: ``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` (`kd_loss`)."""

    method = "kd"
    description = "Hinton KD: T^2 * KL(teacher soft targets || student) at temperature T"
    needs_teacher = True
    teacher_logits_only = True

    def __init__(self, *, weight: float, temperature: float = 4.0) -> None:
        super().__init__(weight=weight)
        self.temperature = _check_number("kd.temperature", temperature, low=0.0, low_open=True)

    def setup(self, sample: TermInputs) -> None:
        s, t = sample.logits, sample.teacher_logits
        if t is None or s.dim() != 2 or s.shape != t.shape:
            t_shape = None if t is None else tuple(t.shape)
            raise ValueError(
                f"kd needs student and teacher logits of equal (N, classes) shape, got student "
                f"{tuple(s.shape)} and teacher {t_shape}"
            )

    def forward(self, inputs: TermInputs) -> Tensor:
        return kd_loss(inputs.logits, inputs.teacher_logits, self.temperature)


class _PairTerm(Term):
    """Base of terms that compare one student feature with one teacher feature."""

    needs_teacher = True
    needs_features = True

    def __init__(self, *, weight: float, student: str, teacher: str) -> None:
        super().__init__(weight=weight)
        for key, value in (("student", student), ("teacher", teacher)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{self.method}.{key} must be a module path, got {value!r}")
        self.student, self.teacher = student, teacher

    def student_paths(self) -> list[str]:
        return [self.student]

    def teacher_paths(self) -> list[str]:
        return [self.teacher]

    def extra_repr(self) -> str:
        return f"weight={self.weight}, student={self.student!r}, teacher={self.teacher!r}"

    def pair(self, inputs: TermInputs) -> tuple[Tensor, Tensor]:
        """The (student, teacher) features this term compares."""
        return (
            _feature(inputs.student_features, self.student, "student"),
            _feature(inputs.teacher_features, self.teacher, "teacher"),
        )

    def _shape_error(self, s: Tensor, t: Tensor, need: str) -> ValueError:
        return ValueError(
            f"{self.method} cannot pair student {self.student!r} {tuple(s.shape)} with teacher "
            f"{self.teacher!r} {tuple(t.shape)}: {need}"
        )


class FitNetTerm(_PairTerm):
    """FitNet hints: MSE between regressor(student feature) and the teacher feature.

    The regressor is created only when channel counts differ: a 1x1 conv + BN for (N, C, H, W)
    maps, a Linear layer for (N, C) vectors. Maps of different H or W are compared after adaptive
    average pooling of the larger map to the smaller size (see `fitnet_loss`).
    """

    method = "fitnet"
    description = "FitNet hints: MSE(regressor(student feature), teacher feature)"

    def __init__(self, *, weight: float, student: str, teacher: str) -> None:
        super().__init__(weight=weight, student=student, teacher=teacher)
        self.regressor: nn.Module | None = None

    def setup(self, sample: TermInputs) -> None:
        s, t = self.pair(sample)
        if s.dim() != t.dim() or s.dim() not in (2, 4):
            raise self._shape_error(s, t, "both must be (N, C) or both (N, C, H, W)")
        if s.shape[1] != t.shape[1]:
            regressor = make_regressor(s.shape[1], t.shape[1], spatial=s.dim() == 4)
            self.regressor = regressor.to(device=s.device, dtype=s.dtype)

    def forward(self, inputs: TermInputs) -> Tensor:
        s, t = self.pair(inputs)
        if self.regressor is not None:
            s = self.regressor(s)
        return fitnet_loss(s, t)


class ATTerm(_PairTerm):
    """Attention transfer between (N, C, H, W) maps; no adapter (channel counts may differ).

    Loss as in `at_loss`: ``(a_s - a_t).pow(2).mean()`` over batch and positions, with a the
    per-sample L2-normalised channel mean of ``|f|^p``, pooled to a common spatial size.
    """

    method = "at"
    description = "attention transfer: match normalised channel-mean |f|^p maps"

    def __init__(self, *, weight: float, student: str, teacher: str, p: float = 2.0) -> None:
        super().__init__(weight=weight, student=student, teacher=teacher)
        self.p = _check_number("at.p", p, low=0.0, low_open=True)

    def setup(self, sample: TermInputs) -> None:
        s, t = self.pair(sample)
        if s.dim() != 4 or t.dim() != 4:
            raise self._shape_error(s, t, "attention transfer needs two (N, C, H, W) maps")

    def forward(self, inputs: TermInputs) -> Tensor:
        s, t = self.pair(inputs)
        return at_loss(s, t, self.p)


TERMS: dict[str, type[Term]] = {
    CETerm.method: CETerm,
    KDTerm.method: KDTerm,
    FitNetTerm.method: FitNetTerm,
    ATTerm.method: ATTerm,
}
"""Every loss term by its config name (`method`). A new term: one class, one entry here."""
