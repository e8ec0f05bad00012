"""Logit-based distillation terms: DKD, DIST, ensemble KD and class-wise self-KD.

Each term reads only logits (the student's, the teacher's, or each ensemble member's) and
returns an unweighted scalar computed in float32. The plain functions (`dkd_loss`, `dist_loss`,
`ensemble_kd_loss`, `cskd_loss`, `same_class_partners`) are usable on their own; the term
classes add option validation, shape checks on the objective's dry run and the needs flags.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from compresskit.distill.losses import Term, TermInputs, _check_number

__all__ = [
    "DKDTerm",
    "DISTTerm",
    "EnsembleTerm",
    "CSKDTerm",
    "TERMS",
    "dkd_loss",
    "dist_loss",
    "pearson",
    "average_probabilities",
    "ensemble_kd_loss",
    "same_class_partners",
    "cskd_loss",
]


# ---------------------------------------------------------------- functional losses


def _check_targets(method: str, targets: Tensor | None, logits: Tensor) -> Tensor:
    """The (N,) class indices of the batch, or a ValueError naming the method."""
    if targets is None:
        raise ValueError(f"{method} needs targets (labels), got None")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"{method} needs (N,) class-index targets for logits {tuple(logits.shape)}, got "
            f"shape {tuple(targets.shape)}"
        )
    return targets.long()


def _split_target(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(N, 1) target logit and (N, C-1) non-target logits (in class order) of each row.

    The target column is removed by a gather, not masked with a large negative constant nor
    obtained by dividing probabilities: exact at any logit scale and free of host syncs.
    """
    n, c = logits.shape
    cols = torch.arange(c - 1, device=logits.device).expand(n, c - 1)
    cols = cols + (cols >= targets[:, None]).long()
    return logits.gather(1, targets[:, None]), logits.gather(1, cols)


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q)`` of each row from log-probabilities: (N,)."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    *,
    alpha: float,
    beta: float,
    temperature: float,
) -> Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): ``T^2 * mean_n(alpha*TCKD + beta*NCKD)``.

    With p = softmax(z/T): TCKD = KL(b_t || b_s), b = [p_target, 1 - p_target]; NCKD =
    KL(p̂_t || p̂_s), p̂ the softmax at T over the non-target classes only. Both are formed in
    log space: log b = log_softmax([z_y/T, logsumexp_{j!=y}(z_j/T)]), log p̂ =
    log_softmax(non-target z/T), so nothing is divided and no probability is logged.
    """
    t = temperature
    s_y, s_other = _split_target(student_logits.float() / t, targets)
    t_y, t_other = _split_target(teacher_logits.float() / t, targets)
    log_b_s = F.log_softmax(torch.cat([s_y, s_other.logsumexp(1, keepdim=True)], dim=1), dim=1)
    log_b_t = F.log_softmax(torch.cat([t_y, t_other.logsumexp(1, keepdim=True)], dim=1), dim=1)
    tckd = _kl_rows(log_b_t, log_b_s)
    nckd = _kl_rows(F.log_softmax(t_other, dim=1), F.log_softmax(s_other, dim=1))
    return (alpha * tckd + beta * nckd).mean() * (t * t)


def pearson(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of a with the same row of b: (N,).

    ``<a - mean a, b - mean b> / (|a - mean a| |b - mean b| + eps)``; a constant row gives 0
    (not NaN), with zero gradient.
    """
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(
    student_logits: Tensor, teacher_logits: Tensor, *, beta: float, gamma: float, temperature: float
) -> Tensor:
    """DIST (Huang et al., NeurIPS 2022): ``T^2 * (beta*inter + gamma*intra)``.

    p = softmax(z/T); inter = 1 - mean_n Pearson(p_s[n, :], p_t[n, :]) (each sample's class
    ranking), intra = 1 - mean_c Pearson(p_s[:, c], p_t[:, c]) (each class across the batch).
    """
    t = temperature
    p_s = F.softmax(student_logits.float() / t, dim=1)
    p_t = F.softmax(teacher_logits.float() / t, dim=1)
    inter = 1.0 - pearson(p_s, p_t).mean()
    intra = 1.0 - pearson(p_s.t(), p_t.t()).mean()
    return (beta * inter + gamma * intra) * (t * t)


def average_probabilities(member_logits: Sequence[Tensor], temperature: float = 1.0) -> Tensor:
    """``mean_k softmax(z_k / T)`` over an ensemble's members, in float32: (N, classes).

    Here rather than beside `compresskit.teacher.ensemble.TeacherEnsemble` (which uses it too),
    so that the loss terms do not import the teacher package: teacher builds on distill.
    """
    if not member_logits:
        raise ValueError("an ensemble needs at least one member's logits")
    shapes = {tuple(z.shape) for z in member_logits}
    if len(shapes) != 1:
        raise ValueError(f"ensemble members disagree on the logits shape: {sorted(shapes)}")
    stacked = torch.stack([z.float() for z in member_logits])
    return torch.softmax(stacked / temperature, dim=-1).mean(0)


def ensemble_kd_loss(student_logits: Tensor, member_logits: tuple[Tensor, ...], temperature: float) -> Tensor:
    """``T^2 * KL(mean_k softmax(t_k/T) || softmax(s/T))``, summed over classes, batch mean."""
    t = temperature
    target = average_probabilities(member_logits, t)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    return F.kl_div(log_p_student, target, reduction="batchmean") * (t * t)


def same_class_partners(targets: Tensor) -> tuple[Tensor, Tensor]:
    """Each sample's partner in the batch: the next sample of the same label, cyclically.

    Returns (partner, has_partner), both (N,): ``partner[i]`` is the index of the first sample
    after i (in batch order) with ``targets[i]``'s label, wrapping to the first such sample; a
    sample alone with its label is its own partner and has ``has_partner[i] = False``.
    Computed with tensor ops only (a stable sort by label), so no host sync on GPU.
    """
    n = targets.shape[0]
    pos = torch.arange(n, device=targets.device)
    order = torch.argsort(targets, stable=True)  # grouped by label, batch order within a group
    labels = targets[order]
    starts = torch.ones(n, dtype=torch.bool, device=targets.device)
    starts[1:] = labels[1:] != labels[:-1]
    group_start = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=0).values
    ends = torch.ones(n, dtype=torch.bool, device=targets.device)
    ends[:-1] = starts[1:]
    partner_sorted = torch.where(ends, group_start, pos + 1)  # last of a group wraps to its start
    partner = torch.empty_like(order)
    partner[order] = order[partner_sorted]
    return partner, partner != pos


def cskd_loss(logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """Class-wise self-KD with in-batch partners (see `CSKDTerm`).

    ``T^2 * mean_{i with a partner j} KL(softmax(z_j/T).detach() || softmax(z_i/T))``; exactly
    zero, still attached to the graph, when no sample has a partner.
    """
    t = temperature
    partner, has_partner = same_class_partners(targets)
    log_p = F.log_softmax(logits.float() / t, dim=1)
    log_q = log_p[partner].detach()
    kl = _kl_rows(log_q, log_p) * has_partner
    return kl.sum() / has_partner.sum().clamp_min(1) * (t * t)


# ---------------------------------------------------------------- terms


def _logits_shape_error(method: str, s: Tensor, t: Tensor | None, what: str = "teacher") -> ValueError:
    t_shape = None if t is None else tuple(t.shape)
    return ValueError(
        f"{method} needs student and {what} logits of equal (N, classes) shape, got student "
        f"{tuple(s.shape)} and {what} {t_shape}"
    )


class DKDTerm(Term):
    """Decoupled KD (Zhao, Cui, Song, Qiu & Liang, CVPR 2022).

    Hinton KD splits into KD = TCKD + (1 - p_t^target) * NCKD; DKD weights the parts freely:
    ``loss = T^2 * mean_n(alpha * TCKD + beta * NCKD)`` with TCKD = KL(b_t || b_s),
    b = [p_target, 1 - p_target], NCKD = KL(p̂_t || p̂_s), p = softmax(z/T) and p̂ the softmax
    over the non-target classes (see `dkd_loss`). The loss is multiplied by the warm-up factor
    ``min(1, epoch / warmup_epochs)`` when warmup_epochs > 0 (the paper warms up linearly over
    its first 20 epochs because NCKD with large beta destabilises early training).

    Deviation: the non-target softmax removes the target column instead of subtracting 1000
    from it as the authors' code does; the value is the same, and exact at any logit scale.
    """

    method = "dkd"
    description = "Decoupled KD: T^2 * (alpha * target-class KD + beta * non-target-class KD)"
    needs_teacher = True
    needs_targets = True
    needs_epoch = True
    teacher_logits_only = True

    def __init__(
        self,
        *,
        weight: float,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        warmup_epochs: float = 0.0,
    ) -> None:
        super().__init__(weight=weight)
        self.alpha = _check_number("dkd.alpha", alpha, low=0.0)
        self.beta = _check_number("dkd.beta", beta, low=0.0)
        self.temperature = _check_number("dkd.temperature", temperature, low=0.0, low_open=True)
        self.warmup_epochs = _check_number("dkd.warmup_epochs", warmup_epochs, low=0.0)

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, alpha={self.alpha}, beta={self.beta}, "
            f"temperature={self.temperature}, warmup_epochs={self.warmup_epochs}"
        )

    def setup(self, sample: TermInputs) -> None:
        s, t = sample.logits, sample.teacher_logits
        if t is None or s.dim() != 2 or s.shape != t.shape:
            raise _logits_shape_error("dkd", s, t)
        if s.shape[1] < 2:
            raise ValueError(f"dkd needs at least 2 classes, got logits of shape {tuple(s.shape)}")

    def warmup(self, epoch: float) -> float:
        """The factor the loss is multiplied by at this point of training."""
        if self.warmup_epochs <= 0:
            return 1.0
        return min(1.0, max(0.0, epoch) / self.warmup_epochs)

    def forward(self, inputs: TermInputs) -> Tensor:
        targets = _check_targets("dkd", inputs.targets, inputs.logits)
        loss = dkd_loss(
            inputs.logits,
            inputs.teacher_logits,
            targets,
            alpha=self.alpha,
            beta=self.beta,
            temperature=self.temperature,
        )
        return loss * self.warmup(inputs.epoch)


class DISTTerm(Term):
    """DIST: knowledge distillation from a stronger teacher (Huang, You, Wang, Qian & Xu,
    NeurIPS 2022).

    Matches relations rather than exact probabilities: ``loss = T^2 * (beta * inter + gamma *
    intra)``, inter = 1 - mean over samples of Pearson(p_s[n, :], p_t[n, :]), intra = 1 - mean
    over classes of Pearson(p_s[:, c], p_t[:, c]) across the batch, p = softmax(z/T) (see
    `dist_loss`). The intra-class part compares samples with each other, so it needs batches of
    two or more (a batch of one contributes a constant 1 with no gradient).
    """

    method = "dist"
    description = "DIST: Pearson correlation of predictions per sample (inter) and per class (intra)"
    needs_teacher = True
    needs_relations = True
    teacher_logits_only = True

    def __init__(
        self, *, weight: float, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0
    ) -> None:
        super().__init__(weight=weight)
        self.beta = _check_number("dist.beta", beta, low=0.0)
        self.gamma = _check_number("dist.gamma", gamma, low=0.0)
        self.temperature = _check_number("dist.temperature", temperature, low=0.0, low_open=True)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}"

    def setup(self, sample: TermInputs) -> None:
        s, t = sample.logits, sample.teacher_logits
        if t is None or s.dim() != 2 or s.shape != t.shape:
            raise _logits_shape_error("dist", s, t)

    def forward(self, inputs: TermInputs) -> Tensor:
        return dist_loss(
            inputs.logits, inputs.teacher_logits, beta=self.beta, gamma=self.gamma, temperature=self.temperature
        )


class EnsembleTerm(Term):
    """KD from an ensemble of teachers with averaged soft targets (Hinton, Vinyals & Dean, 2015,
    who distil an ensemble into one model).

    ``loss = T^2 * KL(mean_k softmax(t_k/T) || softmax(s/T))``, summed over classes and averaged
    over the batch (see `ensemble_kd_loss`). The members' probabilities are averaged at the
    term's own temperature, which is why the term reads each member's logits
    (`TermInputs.teacher_members`, filled when the teacher is a `TeacherEnsemble`) and not the
    combined logits, which average at temperature 1.
    """

    method = "ensemble"
    description = "ensemble KD: T^2 * KL(mean of the teachers' soft targets || student)"
    needs_teacher = True
    teacher_logits_only = False

    def __init__(self, *, weight: float, temperature: float = 4.0) -> None:
        super().__init__(weight=weight)
        self.temperature = _check_number("ensemble.temperature", temperature, low=0.0, low_open=True)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, temperature={self.temperature}"

    def setup(self, sample: TermInputs) -> None:
        members = sample.teacher_members
        if members is None:
            raise ValueError(
                "ensemble needs several teachers (teacher.ensemble), but the teacher is a single "
                "model; use a compresskit.teacher.ensemble.TeacherEnsemble, or the kd term"
            )
        s = sample.logits
        for k, member in enumerate(members):
            if s.dim() != 2 or member.shape != s.shape:
                raise _logits_shape_error("ensemble", s, member, what=f"teacher member {k}")

    def forward(self, inputs: TermInputs) -> Tensor:
        if inputs.teacher_members is None:
            raise ValueError("ensemble needs each teacher's logits (teacher.ensemble), got None")
        return ensemble_kd_loss(inputs.logits, inputs.teacher_members, self.temperature)


class CSKDTerm(Term):
    """Class-wise self-knowledge distillation (Yun, Park, Lee & Shin, CVPR 2020). No teacher.

    The student's prediction on one sample is distilled into its prediction on another sample
    of the same class: ``loss = T^2 * mean_i KL(softmax(z_j/T).detach() || softmax(z_i/T))``
    over the samples i that have a partner j, and 0 (attached to the graph) when none has one.

    Deviation: the paper draws each partner with its data sampler, an extra forward of another
    image of the same class. Here the partner is taken from the batch itself: the next sample
    with the same label in batch order, cyclically (`same_class_partners`); samples alone with
    their label are left out. This costs no extra forward, and with 10 classes and batches of
    128 nearly every sample has a partner.
    """

    method = "cskd"
    description = "class-wise self-KD: match the prediction on another sample of the same class"
    needs_targets = True
    needs_relations = True

    def __init__(self, *, weight: float, temperature: float = 4.0) -> None:
        super().__init__(weight=weight)
        self.temperature = _check_number("cskd.temperature", temperature, low=0.0, low_open=True)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, temperature={self.temperature}"

    def setup(self, sample: TermInputs) -> None:
        if sample.logits.dim() != 2:
            raise ValueError(f"cskd needs (N, classes) logits, got shape {tuple(sample.logits.shape)}")

    def forward(self, inputs: TermInputs) -> Tensor:
        targets = _check_targets("cskd", inputs.targets, inputs.logits)
        return cskd_loss(inputs.logits, targets, self.temperature)


TERMS: dict[str, type[Term]] = {
    DKDTerm.method: DKDTerm,
    DISTTerm.method: DISTTerm,
    EnsembleTerm.method: EnsembleTerm,
    CSKDTerm.method: CSKDTerm,
}
"""The logit-based terms by config name."""
