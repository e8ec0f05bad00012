"""Relation-based distillation: the student matches how the teacher relates samples (or channels).

Instead of matching features one to one, these terms compare a relation computed within each
network: similarities between the samples of the batch (sp, pkt, cc), distances and angles
between sample embeddings (rkd), or the distribution of a sample's channel maps (nst). Student and
teacher may therefore differ in width and, except for nst's channel sets, in feature layout.

Each term reads one student and one teacher feature by module path (`_PairTerm`). The plain
functions (`sp_loss`, `rkd_loss`, `pkt_loss`, `cc_correlation`, `nst_loss`) are usable on their
own. All losses are computed in float32 with autocast switched off inside them (so their
matrix products are not run in half precision).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compresskit.distill.losses import Term, TermInputs, _check_number, _PairTerm, match_spatial

__all__ = [
    "SPTerm",
    "RKDTerm",
    "PKTTerm",
    "CCTerm",
    "NSTTerm",
    "TERMS",
    "sp_loss",
    "rkd_distance_loss",
    "rkd_angle_loss",
    "pkt_loss",
    "cc_correlation",
    "nst_loss",
]

PKT_EPS = 1e-7
"""Added to both conditional probabilities in PKT's log ratio (the authors' value)."""

_DIST_EPS = 1e-12
"""Floor of squared distances before the square root (its gradient is infinite at 0)."""


# ---------------------------------------------------------------- functional losses


def _embedding(feature: Tensor) -> Tensor:
    """(N, D) float32 embedding: (N, C, H, W) maps are global-average-pooled, (N, C) kept."""
    f = feature.float()
    if f.dim() == 4:
        f = f.mean(dim=(2, 3))
    return f.flatten(1)


def _full_precision(feature: Tensor) -> torch.autocast:
    """Autocast switched off on the feature's device: under autocast, matrix products of float32
    inputs would still run in half precision, and Gram matrices of long flattened features
    overflow float16."""
    return torch.autocast(feature.device.type, enabled=False)


def _zero_like(feature: Tensor) -> Tensor:
    """A zero loss still connected to the graph (degenerate batches must not break backward)."""
    return feature.float().sum() * 0.0


def sp_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """Tung & Mori (2019) similarity-preserving loss between two features of the same batch.

    Each feature is flattened to (N, D) (D may differ between the two), ``G = f f^T`` is its
    (N, N) Gram matrix of the batch, and every row of G is L2-normalised. Loss =
    ``||G_s - G_t||_F^2 / N^2``.
    """
    n = student_feature.shape[0]
    with _full_precision(student_feature):
        s = student_feature.float().flatten(1)
        t = teacher_feature.float().flatten(1)
        g_s = F.normalize(s @ s.t(), dim=1)
        g_t = F.normalize(t @ t.t(), dim=1)
        return (g_s - g_t).pow(2).sum() / (n * n)


def _off_diagonal_distances(e: Tensor) -> Tensor:
    """Euclidean distances ||e_i - e_j|| of all ordered pairs i != j, as a flat vector."""
    n = e.shape[0]
    sq = (e.unsqueeze(1) - e.unsqueeze(0)).pow(2).sum(dim=2)
    mask = ~torch.eye(n, dtype=torch.bool, device=e.device)
    return sq[mask].clamp(min=_DIST_EPS).sqrt()


def _rkd_distance_potential(e: Tensor) -> Tensor:
    """psi_D of every ordered pair i != j: distance divided by the mean distance of the batch."""
    d = _off_diagonal_distances(e)
    return d / d.mean().clamp(min=_DIST_EPS)


def _rkd_angle_potential(e: Tensor) -> Tensor:
    """psi_A[j, i, k] = cos of the angle at e_j between e_i - e_j and e_k - e_j, for distinct
    i, j, k, as a flat vector (N(N-1)(N-2) entries)."""
    n = e.shape[0]
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), dim=2)  # diff[j, i] = unit(e_i - e_j)
    cos = torch.bmm(diff, diff.transpose(1, 2))  # cos[j, i, k]
    eye = torch.eye(n, dtype=torch.bool, device=e.device)
    distinct = ~(eye.unsqueeze(2) | eye.unsqueeze(1) | eye.unsqueeze(0))
    return cos[distinct]


def rkd_distance_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """Park et al. (2019) distance-wise RKD loss (see `RKDTerm`); 0 for a batch of 1."""
    s, t = _embedding(student_feature), _embedding(teacher_feature)
    if s.shape[0] < 2:
        return _zero_like(s)
    with torch.no_grad():
        psi_t = _rkd_distance_potential(t)
    return F.smooth_l1_loss(_rkd_distance_potential(s), psi_t, beta=1.0)


def rkd_angle_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """Park et al. (2019) angle-wise RKD loss (see `RKDTerm`); 0 for a batch of fewer than 3."""
    s, t = _embedding(student_feature), _embedding(teacher_feature)
    if s.shape[0] < 3:
        return _zero_like(s)
    with _full_precision(s):
        with torch.no_grad():
            psi_t = _rkd_angle_potential(t)
        return F.smooth_l1_loss(_rkd_angle_potential(s), psi_t, beta=1.0)


def _pkt_probabilities(e: Tensor) -> Tensor:
    """Row-conditional probabilities of the cosine-similarity kernel (f f^T + 1) / 2."""
    f = F.normalize(e, dim=1)
    k = (f @ f.t() + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


def pkt_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """Passalis & Tefas (2018) probabilistic knowledge transfer (see `PKTTerm`)."""
    with _full_precision(student_feature):
        p_s = _pkt_probabilities(_embedding(student_feature))
        p_t = _pkt_probabilities(_embedding(teacher_feature))
        return (p_t * torch.log((p_t + PKT_EPS) / (p_s + PKT_EPS))).mean()


def cc_correlation(embedding: Tensor, gamma: float, order: int) -> Tensor:
    """Peng et al. (2019) correlation matrix of a batch of embeddings (N, D), in float32.

    The embeddings are L2-normalised, then ``C(i, j) = sum_{p=0..order} exp(-2 gamma)
    (2 gamma)^p / p! (e_i . e_j)^p``: the order-P Taylor expansion of the Gaussian RBF kernel
    ``exp(-gamma ||e_i - e_j||^2) = exp(-2 gamma) exp(2 gamma e_i . e_j)`` for unit vectors.
    """
    with _full_precision(embedding):
        e = F.normalize(embedding.float(), dim=1)
        sim = e @ e.t()
        power = torch.ones_like(sim)
        corr = torch.zeros_like(sim)
        for p in range(order + 1):
            if p:
                power = power * sim
            corr = corr + math.exp(-2.0 * gamma) * (2.0 * gamma) ** p / math.factorial(p) * power
        return corr


NSTKernel = Literal["poly", "linear", "gaussian"]


def _nst_kernel(x: Tensor, y: Tensor, kernel: NSTKernel) -> Tensor:
    """Kernel matrices between the channel sets of each sample: (N, A, L) x (N, B, L) -> (N, A, B)."""
    dot = torch.bmm(x, y.transpose(1, 2))
    if kernel == "linear":
        return dot
    if kernel == "poly":
        return dot.pow(2)
    sq = x.pow(2).sum(dim=2).unsqueeze(2) + y.pow(2).sum(dim=2).unsqueeze(1) - 2.0 * dot
    return torch.exp(-sq.clamp(min=0.0) / 2.0)


def nst_loss(student_feature: Tensor, teacher_feature: Tensor, kernel: NSTKernel = "poly") -> Tensor:
    """Huang & Wang (2017) neuron selectivity transfer between two (N, C, H, W) maps (see `NSTTerm`).

    Channel counts may differ; maps of different H or W are first pooled to the smaller size.
    """
    with _full_precision(student_feature):
        s, t = match_spatial(student_feature.float(), teacher_feature.float())
        s = F.normalize(s.flatten(2), dim=2)
        t = F.normalize(t.flatten(2), dim=2)
        mmd = (
            _nst_kernel(s, s, kernel).mean(dim=(1, 2))
            + _nst_kernel(t, t, kernel).mean(dim=(1, 2))
            - 2.0 * _nst_kernel(s, t, kernel).mean(dim=(1, 2))
        )
        return mmd.mean()


# ---------------------------------------------------------------- terms


class _RelationTerm(_PairTerm):
    """Pair term comparing relations between the samples of the batch.

    Accepts (N, C) vectors or (N, C, H, W) maps on either side (the two may differ in layout
    and width); the batch sizes must match.
    """

    needs_relations = True

    def setup(self, sample: TermInputs) -> None:
        s, t = self.pair(sample)
        if s.dim() not in (2, 4) or t.dim() not in (2, 4):
            raise self._shape_error(s, t, "each feature must be (N, C) or (N, C, H, W)")
        if s.shape[0] != t.shape[0]:
            raise self._shape_error(s, t, "batch sizes must match")


class SPTerm(_RelationTerm):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019), `sp_loss`.

    Each feature (N, C) or (N, C, H, W) is flattened to (N, D); ``G = f f^T`` with each row
    L2-normalised; loss = ``||G_s - G_t||_F^2 / N^2``, as in the paper (one tapped pair per
    term: the paper's sum over layer pairs is several terms). No adapter: the (N, N) matrices
    compare regardless of the widths.
    """

    method = "sp"
    description = "similarity-preserving KD: match the batch's row-normalised similarity matrices"

    def __init__(self, *, weight: float, student: str, teacher: str) -> None:
        super().__init__(weight=weight, student=student, teacher=teacher)

    def forward(self, inputs: TermInputs) -> Tensor:
        s, t = self.pair(inputs)
        return sp_loss(s, t)


class RKDTerm(_RelationTerm):
    """Relational KD (Park et al., CVPR 2019): distance-wise and angle-wise relations.

    Embeddings e are the feature, global-average-pooled if (N, C, H, W), as (N, D).

    - Distance-wise: ``psi_D(i, j) = ||e_i - e_j||_2 / mu`` with mu the mean distance over pairs
      i != j; loss_D = smooth-L1 (Huber, delta 1) between student and teacher psi_D, averaged
      over the ordered pairs i != j.
    - Angle-wise: ``psi_A(i, j, k) = <unit(e_i - e_j), unit(e_k - e_j)>``, the cosine of the
      angle at e_j; loss_A = smooth-L1, averaged over triplets of distinct samples.

    Loss = ``distance_weight * loss_D + angle_weight * loss_A``; the teacher's relations are
    computed without gradient. Deviation: the paper sums over pairs/triplets; we average (the
    authors' code does too, but over all N^2 / N^3 entries, degenerate ones included, which
    differs only by the factor of the degenerate share, e.g. (N-1)/N for distances). With
    fewer than 2 (distance) or 3 (angle) samples the corresponding part is 0.
    """

    method = "rkd"
    description = "relational KD: match normalised distances and angles between sample embeddings"

    def __init__(
        self,
        *,
        weight: float,
        student: str,
        teacher: str,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
    ) -> None:
        super().__init__(weight=weight, student=student, teacher=teacher)
        self.distance_weight = _check_number("rkd.distance_weight", distance_weight, low=0.0)
        self.angle_weight = _check_number("rkd.angle_weight", angle_weight, low=0.0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"

    def forward(self, inputs: TermInputs) -> Tensor:
        s, t = self.pair(inputs)
        loss = _zero_like(s)
        if self.distance_weight:
            loss = loss + self.distance_weight * rkd_distance_loss(s, t)
        if self.angle_weight:
            loss = loss + self.angle_weight * rkd_angle_loss(s, t)
        return loss


class PKTTerm(_RelationTerm):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018), `pkt_loss`.

    f = the feature, global-average-pooled if (N, C, H, W), as (N, D), L2-normalised;
    ``K = (f f^T + 1) / 2`` (cosine similarity mapped to [0, 1]); ``P = K / row sums`` (the
    conditional probability of sample j given sample i); loss = the mean over i, j of
    ``P_t * log((P_t + eps) / (P_s + eps))`` with eps = 1e-7. Deviations: the paper's
    divergence is a sum over i, j; the mean over the N^2 entries (as in the authors' code) keeps
    the value independent of the batch size. For maps, global average pooling to an embedding
    is our choice (the paper transfers embedding/penultimate-layer vectors).
    """

    method = "pkt"
    description = "probabilistic KT: KL between the batch's cosine-similarity distributions"

    def __init__(self, *, weight: float, student: str, teacher: str) -> None:
        super().__init__(weight=weight, student=student, teacher=teacher)

    def forward(self, inputs: TermInputs) -> Tensor:
        s, t = self.pair(inputs)
        return pkt_loss(s, t)


class CCTerm(_RelationTerm):
    """Correlation congruence KD (Peng et al., ICCV 2019), with `cc_correlation`.

    Both features, global-average-pooled if (N, C, H, W), as (N, D_s) and (N, D_t), are projected
    by trainable linear adapters (created in `setup`) to `embed_dim` and L2-normalised; the
    correlation matrix of each is ``C(i, j) = sum_{p=0..order} exp(-2 gamma) (2 gamma)^p / p!
    (e_i . e_j)^p``, the Taylor expansion of the Gaussian RBF kernel; loss =
    ``||C_s - C_t||_F^2 / N^2``. Only the correlation congruence part of the paper's objective
    (its CE and KD parts are separate terms); its batch-sampling strategies are not implemented.
    Both adapters are trained (the teacher's through its projected feature, the teacher itself
    stays frozen).
    """

    method = "cc"
    description = "correlation congruence: match Gaussian-kernel correlations between embedded samples"

    def __init__(
        self,
        *,
        weight: float,
        student: str,
        teacher: str,
        embed_dim: int = 128,
        gamma: float = 0.4,
        order: int = 2,
    ) -> None:
        super().__init__(weight=weight, student=student, teacher=teacher)
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 2:
            raise ValueError(f"cc.embed_dim must be an integer >= 2, got {embed_dim!r}")
        if isinstance(order, bool) or not isinstance(order, int) or order < 0:
            raise ValueError(f"cc.order must be an integer >= 0, got {order!r}")
        self.embed_dim = embed_dim
        self.gamma = _check_number("cc.gamma", gamma, low=0.0, low_open=True)
        self.order = order
        self.embed_s: nn.Linear | None = None
        self.embed_t: nn.Linear | None = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, embed_dim={self.embed_dim}, gamma={self.gamma}, order={self.order}"

    def setup(self, sample: TermInputs) -> None:
        super().setup(sample)
        s, t = self.pair(sample)
        d_s, d_t = _embedding(s).shape[1], _embedding(t).shape[1]
        self.embed_s = nn.Linear(d_s, self.embed_dim).to(device=s.device, dtype=s.dtype)
        self.embed_t = nn.Linear(d_t, self.embed_dim).to(device=t.device, dtype=t.dtype)

    def forward(self, inputs: TermInputs) -> Tensor:
        if self.embed_s is None or self.embed_t is None:
            raise RuntimeError("cc term used before setup (build it with build_objective)")
        s, t = self.pair(inputs)
        pooled_s = s.mean(dim=(2, 3)) if s.dim() == 4 else s.flatten(1)
        pooled_t = t.mean(dim=(2, 3)) if t.dim() == 4 else t.flatten(1)
        c_s = cc_correlation(self.embed_s(pooled_s), self.gamma, self.order)
        c_t = cc_correlation(self.embed_t(pooled_t), self.gamma, self.order)
        n = s.shape[0]
        return (c_s - c_t).pow(2).sum() / (n * n)


class NSTTerm(_PairTerm):
    """Neuron selectivity transfer (Huang & Wang, 2017), `nst_loss`; (N, C, H, W) maps only.

    Each channel's spatial map is flattened to a vector of length H*W and L2-normalised (maps of
    different H or W are first pooled to the smaller size by `match_spatial`); per sample, the
    squared MMD between the set of student channel vectors and the set of teacher channel
    vectors, ``mean k(s, s') + mean k(t, t') - 2 mean k(s, t)``; loss = mean over the batch.
    Channel counts may differ. Kernels: ``poly`` ``k(x, y) = (x . y)^2`` (d = 2, c = 0, the
    paper's best), ``linear`` ``k = x . y``, ``gaussian`` ``k = exp(-||x - y||^2 / (2 sigma^2))``
    with a fixed bandwidth sigma^2 = 1, not a data-dependent one (such as the mean squared pair
    distance): the vectors are unit length, so ``||x - y||^2`` lies in [0, 4] and sigma^2 = 1
    keeps the kernel sensitive over that whole range, deterministically and with no gradient
    through the bandwidth. The paper's lambda / 2 factor is left to the term's weight.
    """

    method = "nst"
    description = "neuron selectivity transfer: MMD between the channel activation distributions"

    def __init__(self, *, weight: float, student: str, teacher: str, kernel: NSTKernel = "poly") -> None:
        super().__init__(weight=weight, student=student, teacher=teacher)
        if kernel not in ("poly", "linear", "gaussian"):
            raise ValueError(f"nst.kernel must be one of 'poly', 'linear', 'gaussian', got {kernel!r}")
        self.kernel: NSTKernel = kernel

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={self.kernel!r}"

    def setup(self, sample: TermInputs) -> None:
        s, t = self.pair(sample)
        if s.dim() != 4 or t.dim() != 4:
            raise self._shape_error(s, t, "neuron selectivity transfer needs two (N, C, H, W) maps")
        if s.shape[0] != t.shape[0]:
            raise self._shape_error(s, t, "batch sizes must match")

    def forward(self, inputs: TermInputs) -> Tensor:
        s, t = self.pair(inputs)
        return nst_loss(s, t, self.kernel)


TERMS: dict[str, type[Term]] = {
    SPTerm.method: SPTerm,
    RKDTerm.method: RKDTerm,
    PKTTerm.method: PKTTerm,
    CCTerm.method: CCTerm,
    NSTTerm.method: NSTTerm,
}
"""The relation-based terms by config name."""
