"""Feature-based distillation terms with trainable adapters: FT, VID, FSP, AB and CRD.

Each term reads intermediate feature maps of the student and of the teacher (by module path),
creates its adapters in `setup` (on the dry-run sample's device and dtype) as submodules of the
term, so they are trained with the student by the same optimizer, saved in the objective's state,
and never part of the exported student. Feature maps of different spatial size are compared after
adaptive average pooling of the larger one (`match_spatial`). Losses are computed in float32, also
under autocast.

The plain loss functions (`factor_transfer_loss`, `vid_nll`, `fsp_matrix`, `ab_loss`,
`info_nce`) are usable on their own; the term classes add option checks, shape checks and the
adapters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compresskit.distill.losses import (
    Term,
    TermInputs,
    _check_number,
    _feature,
    _PairTerm,
    match_spatial,
)

__all__ = [
    "FTTerm",
    "VIDTerm",
    "FSPTerm",
    "ABTerm",
    "CRDTerm",
    "TERMS",
    "factor_transfer_loss",
    "vid_nll",
    "fsp_matrix",
    "ab_loss",
    "info_nce",
]


# ---------------------------------------------------------------- functional losses


def factor_transfer_loss(student_factor: Tensor, teacher_factor: Tensor, p: float = 1.0, *,
                         per_element: bool = True) -> Tensor:
    """Kim et al. (2018) factor-transfer loss between two (N, k, H, W) factors.

    The paper: ``mean over samples n of || F_t[n]/||F_t[n]||_2 - F_s[n]/||F_s[n]||_2 ||_p``,
    each sample's factor flattened to D = k*H*W values and L2-normalised; that is what
    ``per_element=False`` returns. The default divides it by ``D ** (1/p)``, a constant of the
    factor's size: ``mean_n (mean over the D elements of |d[n]|^p) ** (1/p)``. For p=1 that is the
    mean absolute difference, for p=2 the root-mean-square difference: still the paper's p-norm
    (same direction of the gradient, not its p-th power), but of a size independent of D, which is
    the scale the reference weight (200) was tuned for; with the undivided norm that weight made
    training diverge on the default pair. Factors of different H or W are pooled to the smaller
    size first. float32.
    """
    f_s, f_t = match_spatial(student_factor.float(), teacher_factor.float())
    f_s = F.normalize(f_s.flatten(1), dim=1)
    f_t = F.normalize(f_t.flatten(1), dim=1)
    dist = torch.linalg.vector_norm(f_t - f_s, ord=p, dim=1)
    if per_element:
        dist = dist / f_s.shape[1] ** (1.0 / p)
    return dist.mean()


def vid_nll(mean: Tensor, target: Tensor, variance: Tensor) -> Tensor:
    """Ahn et al. (2019) VID loss: Gaussian negative log-likelihood of `target` under
    ``N(mean, variance)``, without the constant ``0.5 * log(2 * pi)``.

    ``mean over batch, channels and positions of 0.5 * log(var_c) + (t - mu)^2 / (2 * var_c)``.
    `mean` and `target` are (N, C) or (N, C, H, W) of equal shape, `variance` is (C,) (one value
    per channel, broadcast over the positions). float32.
    """
    mu, t, var = mean.float(), target.float(), variance.float()
    var = var.view(1, -1, *([1] * (mu.dim() - 2)))
    return (0.5 * torch.log(var) + (t - mu).pow(2) / (2.0 * var)).mean()


def fsp_matrix(first: Tensor, second: Tensor) -> Tensor:
    """Yim et al. (2017) flow-of-solution-procedure matrix of two (N, C1, H, W), (N, C2, H', W')
    maps: ``G = F1 @ F2^T / (H * W)``, of shape (N, C1, C2), in float32.

    The two maps are first pooled to a common spatial size (`match_spatial`), so G[n, i, j] is the
    mean over positions of ``F1[n, i, pos] * F2[n, j, pos]``.
    """
    a, b = match_spatial(first.float(), second.float())
    positions = a.shape[-2] * a.shape[-1]
    return torch.bmm(a.flatten(2), b.flatten(2).transpose(1, 2)) / positions


def ab_loss(student_pre: Tensor, teacher_pre: Tensor, margin: float = 1.0) -> Tensor:
    """Heo et al. (2019) activation-boundary loss (squared hinge) between pre-activations.

    Per element, with s the (connected) student and t the teacher pre-activation and margin mu:
    ``(s + mu)^2 * [s > -mu and t <= 0] + (s - mu)^2 * [s <= mu and t > 0]``, i.e.
    ``relu(mu + s)^2`` where the teacher neuron is off and ``relu(mu - s)^2`` where it is on.
    Summed over all elements and divided by (batch size * elements per sample): the mean over
    elements. Maps of different H or W are pooled to the smaller size first. float32.
    """
    s, t = match_spatial(student_pre.float(), teacher_pre.float())
    on = t > 0
    off_part = F.relu(margin + s).pow(2) * (~on)
    on_part = F.relu(margin - s).pow(2) * on
    return (off_part + on_part).sum() / s.numel()


def info_nce(
    anchor: Tensor,
    positive: Tensor,
    memory: Tensor | None,
    temperature: float,
    memory_valid: Tensor | None = None,
) -> Tensor:
    """InfoNCE of each anchor against its positive, the other positives of the batch and a memory.

    `anchor` and `positive` are (N, D) (L2-normalised), `memory` (M, D) or None, `memory_valid`
    an optional (M,) bool mask of the memory rows in use. For anchor i the logits are
    ``anchor_i . positive_j / T`` for every j of the batch (j = i is the positive) and
    ``anchor_i . memory_k / T`` for every valid k; the loss is the cross-entropy of picking
    j = i, averaged over the batch: ``mean_i -log(exp(a_i.p_i/T) / sum(exp(all logits of i)))``.
    float32.
    """
    a, pos = anchor.float(), positive.float()
    logits = a @ pos.t() / temperature
    if memory is not None and memory.shape[0] > 0:
        mem_logits = a @ memory.float().t() / temperature
        if memory_valid is not None:
            mem_logits = mem_logits.masked_fill(~memory_valid.view(1, -1), float("-inf"))
        logits = torch.cat([logits, mem_logits], dim=1)
    labels = torch.arange(a.shape[0], device=a.device)
    return F.cross_entropy(logits, labels)


# ---------------------------------------------------------------- helpers


def _check_int(name: str, value: object, *, low: int) -> int:
    """Return `value` if it is an int >= low, else raise ValueError naming the option."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return value


def _conv_bn_lrelu(c_in: int, c_out: int) -> list[nn.Module]:
    """3x3 conv (stride 1, same size) + BatchNorm + LeakyReLU(0.1): one factor-transfer layer."""
    return [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(0.1),
    ]


def _conv_bn(c_in: int, c_out: int) -> nn.Module:
    """1x1 conv + BatchNorm from c_in to c_out channels (the AB connector, the FSP adapter)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=1, bias=False), nn.BatchNorm2d(c_out))


def _vid_regressor(c_s: int, c_t: int, *, spatial: bool) -> nn.Module:
    """VID mean regressor: three 1x1 convs (Linear layers for vectors) with ReLU between,
    C_s -> C_t -> C_t -> C_t."""

    def layer(c_in: int, c_out: int) -> nn.Module:
        return nn.Conv2d(c_in, c_out, kernel_size=1) if spatial else nn.Linear(c_in, c_out)

    return nn.Sequential(layer(c_s, c_t), nn.ReLU(), layer(c_t, c_t), nn.ReLU(), layer(c_t, c_t))


def _placed(module: nn.Module, like: Tensor) -> nn.Module:
    """`module` on the device and in the dtype of `like` (adapters follow the dry-run sample)."""
    return module.to(device=like.device, dtype=like.dtype)


# ---------------------------------------------------------------- terms


class FTTerm(_PairTerm):
    """Factor transfer (Kim, Park & Kwak, NeurIPS 2018) between two (N, C, H, W) maps.

    Adapters, created in `setup` (3x3 convs, stride 1, each followed by BN + LeakyReLU(0.1)):
    a paraphraser on the teacher feature, encoder ``C_t -> C_t -> k -> k`` and decoder
    ``k -> k -> C_t -> C_t`` (its last layer a plain 3x3 conv, so it can reconstruct a
    feature of any sign), and a translator on the student feature ``C_s -> C_s -> k -> k``, with
    ``k = max(1, round(factor_rate * C_t))`` factor channels. Factors ``F_t = encoder(t)``,
    ``F_s = translator(s)``; loss ``mean_n || F_t/||F_t||_2 - F_s/||F_s||_2 ||_p / D^(1/p)`` (per-sample
    normalisation over the flattened factor of D values; the constant 1/D^(1/p) keeps the size
    independent of D, see `factor_transfer_loss`).

    The paper first trains the paraphraser to reconstruct the teacher feature, then freezes it
    and trains the student. Here that is one run: during the first `paraphraser_steps`
    training-mode forwards the term trains the paraphraser on the reconstruction loss
    ``MSE(decoder(encoder(t)), t)`` with its own Adam optimizer and returns that loss's value
    with no gradient (the student gets nothing from it); afterwards the
    paraphraser is frozen (``requires_grad`` off, eval mode, gradients dropped) and the factor
    loss is returned. The step count is a buffer, so it is saved in ``state_dict()`` and a resumed
    run continues in the right phase. Forwards in eval mode are not counted. Deviation: the
    paper's decoder uses transposed convolutions; with stride 1 they are equivalent to the
    convolutions used here. With ``paraphraser_steps=0`` the paraphraser stays at its random
    initialisation (a random projection of the teacher feature).
    """

    method = "ft"
    description = "factor transfer: match the student's translated factor to the teacher's paraphrased factor"

    def __init__(
        self,
        *,
        weight: float,
        student: str,
        teacher: str,
        factor_rate: float = 0.5,
        p: int = 1,
        paraphraser_steps: int = 200,
    ) -> None:
        super().__init__(weight=weight, student=student, teacher=teacher)
        self.factor_rate = _check_number("ft.factor_rate", factor_rate, low=0.0, low_open=True)
        self.p = _check_number("ft.p", p, low=1.0)
        self.paraphraser_steps = _check_int("ft.paraphraser_steps", paraphraser_steps, low=0)
        self.encoder: nn.Module | None = None
        self.decoder: nn.Module | None = None
        self.translator: nn.Module | None = None
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, factor_rate={self.factor_rate}, p={self.p}, "
                f"paraphraser_steps={self.paraphraser_steps}")

    def setup(self, sample: TermInputs) -> None:
        s, t = self.pair(sample)
        if s.dim() != 4 or t.dim() != 4:
            raise self._shape_error(s, t, "factor transfer needs two (N, C, H, W) maps")
        c_s, c_t = s.shape[1], t.shape[1]
        k = max(1, round(self.factor_rate * c_t))
        self.encoder = _placed(nn.Sequential(
            *_conv_bn_lrelu(c_t, c_t), *_conv_bn_lrelu(c_t, k), *_conv_bn_lrelu(k, k)), t)
        self.decoder = _placed(nn.Sequential(
            *_conv_bn_lrelu(k, k), *_conv_bn_lrelu(k, c_t), nn.Conv2d(c_t, c_t, 3, padding=1)), t)
        self.translator = _placed(nn.Sequential(
            *_conv_bn_lrelu(c_s, c_s), *_conv_bn_lrelu(c_s, k), *_conv_bn_lrelu(k, k)), s)
        self.steps_done = self.steps_done.to(t.device)

    @property
    def paraphraser_trained(self) -> bool:
        """True once the paraphraser phase is over (the factor loss is being returned)."""
        return int(self.steps_done) >= self.paraphraser_steps

    def _paraphraser_modules(self) -> tuple[nn.Module, nn.Module]:
        if self.encoder is None or self.decoder is None or self.translator is None:
            raise RuntimeError("ft term used before setup(); build it with build_objective")
        return self.encoder, self.decoder

    def _paraphraser_optimizer(self) -> torch.optim.Optimizer:
        """The paraphraser's own Adam (lr 1e-3), created on first use on the params' device.

        The paper trains the paraphraser before the student, on its own; stepping it here with
        its own optimizer keeps the reconstruction loss out of the student's optimizer and of
        the term's weight (scaled by the reference weight 200 at the student's learning rate,
        it diverged). Its state is not saved: a run resumed in this phase restarts Adam.
        """
        opt = self.__dict__.get("_paraphraser_opt")
        if opt is None:
            params = [p for m in self._paraphraser_modules() for p in m.parameters()]
            opt = torch.optim.Adam(params, lr=1e-3)
            self.__dict__["_paraphraser_opt"] = opt
        return opt

    def _set_paraphraser_frozen(self, frozen: bool) -> None:
        """Freeze (or, after loading an earlier state, unfreeze) encoder and decoder."""
        for module in self._paraphraser_modules():
            if frozen:
                module.eval()
                for param in module.parameters():
                    param.requires_grad_(False)
                    param.grad = None  # an optimizer must not keep moving it on stale grads
            else:
                module.train(self.training)
                module.requires_grad_(True)

    def forward(self, inputs: TermInputs) -> Tensor:
        encoder, decoder = self._paraphraser_modules()
        s, t = self.pair(inputs)
        if not self.paraphraser_trained:
            self._set_paraphraser_frozen(False)
            t = t.detach()
            with torch.enable_grad():
                recon = F.mse_loss(decoder(encoder(t)).float(), t.float())
                if self.training:
                    self.steps_done += 1
                    opt = self._paraphraser_optimizer()
                    opt.zero_grad(set_to_none=True)
                    recon.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)  # the training loop's optimizer sees no gradient
            # the reconstruction loss is reported, but nothing flows from it into the total loss
            return recon.detach() + s.sum() * 0.0
        self._set_paraphraser_frozen(True)
        with torch.no_grad():
            factor_t = encoder(t)
        return factor_transfer_loss(self.translator(s), factor_t, self.p)


class VIDTerm(_PairTerm):
    """Variational information distillation (Ahn, Hu, Damianou, Lawrence & Dai, CVPR 2019).

    The teacher feature t is modelled as a Gaussian with mean ``mu = regressor(s)`` and a
    learned per-channel variance ``sigma^2_c = softplus(alpha_c) + min_variance``, alpha
    initialised so that ``sigma^2_c = init_variance`` at the start. The regressor is
    ``1x1 conv -> ReLU -> 1x1 conv -> ReLU -> 1x1 conv`` (C_s -> C_t -> C_t -> C_t; Linear layers
    for (N, C) vectors). Loss: the negative log-likelihood averaged over batch, channels and
    positions, ``mean(0.5 * log(sigma^2_c) + (t - mu)^2 / (2 * sigma^2_c))`` (`vid_nll`); the
    constant ``0.5 * log(2 * pi)`` per element is dropped (it has no gradient), so the value
    can be negative. Maps of different H or W are pooled to the smaller size before the
    regressor. The hidden width (C_t) is this implementation's choice; the paper does not fix it.
    """

    method = "vid"
    description = "variational information distillation: Gaussian log-likelihood of the teacher feature"

    def __init__(
        self,
        *,
        weight: float,
        student: str,
        teacher: str,
        init_variance: float = 5.0,
        min_variance: float = 1.0e-5,
    ) -> None:
        super().__init__(weight=weight, student=student, teacher=teacher)
        self.init_variance = _check_number("vid.init_variance", init_variance, low=0.0, low_open=True)
        self.min_variance = _check_number("vid.min_variance", min_variance, low=0.0, low_open=True)
        if self.init_variance <= self.min_variance:
            raise ValueError(
                f"vid.init_variance must be > vid.min_variance ({min_variance!r}), got {init_variance!r}"
            )
        self.regressor: nn.Module | None = None
        self.alpha: nn.Parameter | None = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, init_variance={self.init_variance}, min_variance={self.min_variance}"

    def setup(self, sample: TermInputs) -> None:
        s, t = self.pair(sample)
        if s.dim() != t.dim() or s.dim() not in (2, 4):
            raise self._shape_error(s, t, "both must be (N, C) or both (N, C, H, W)")
        c_s, c_t = s.shape[1], t.shape[1]
        self.regressor = _placed(_vid_regressor(c_s, c_t, spatial=s.dim() == 4), s)
        # softplus^-1(v) = log(exp(v) - 1), written as v + log(1 - exp(-v)) to stay finite for large v
        excess = self.init_variance - self.min_variance
        alpha0 = excess + math.log(-math.expm1(-excess))
        self.alpha = nn.Parameter(torch.full((c_t,), alpha0, device=s.device, dtype=s.dtype))

    def variance(self) -> Tensor:
        """Per-channel variance ``softplus(alpha) + min_variance`` (C_t,), float32."""
        if self.alpha is None:
            raise RuntimeError("vid term used before setup(); build it with build_objective")
        return F.softplus(self.alpha.float()) + self.min_variance

    def forward(self, inputs: TermInputs) -> Tensor:
        s, t = self.pair(inputs)
        if s.dim() == 4:
            s, t = match_spatial(s, t)
        return vid_nll(self.regressor(s), t, self.variance())


class FSPTerm(Term):
    """Flow of solution procedure (Yim, Joo, Bae & Kim, CVPR 2017) between two layer pairs.

    ``G(F1, F2) = F1 (N, C1, HW) @ F2^T (N, HW, C2) / (H * W)`` with F1, F2 pooled to a common
    spatial size first (`fsp_matrix`); G_s from the two student maps, G_t from the two teacher
    maps. Loss: ``mean over batch and matrix elements of (G_s - G_t)^2``, i.e. the paper's
    squared Frobenius distance divided by (N * C1 * C2) rather than by N only (so the value does
    not grow with the channel counts). Deviation: the paper requires the student's channel
    counts to equal the teacher's; where they differ, a 1x1 conv + BN adapter (created in
    `setup`, trained with the student) maps that student feature to the teacher's channels.
    """

    method = "fsp"
    description = "flow of solution procedure: match the Gram (FSP) matrix between two layers"
    needs_teacher = True
    needs_features = True

    def __init__(self, *, weight: float, student: Sequence[str], teacher: Sequence[str]) -> None:
        super().__init__(weight=weight)
        self.student = self._two_paths("student", student)
        self.teacher = self._two_paths("teacher", teacher)
        self.adapters = nn.ModuleList([nn.Identity(), nn.Identity()])

    def _two_paths(self, key: str, value: object) -> list[str]:
        if (isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2
                or not all(isinstance(v, str) and v for v in value)):
            raise ValueError(f"fsp.{key} must be two module paths [first, second], got {value!r}")
        return list(value)

    def student_paths(self) -> list[str]:
        return list(self.student)

    def teacher_paths(self) -> list[str]:
        return list(self.teacher)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, student={self.student!r}, teacher={self.teacher!r}"

    def _features(self, inputs: TermInputs) -> tuple[list[Tensor], list[Tensor]]:
        return (
            [_feature(inputs.student_features, p, "student") for p in self.student],
            [_feature(inputs.teacher_features, p, "teacher") for p in self.teacher],
        )

    def setup(self, sample: TermInputs) -> None:
        s_maps, t_maps = self._features(sample)
        shapes = (f"student {self.student} {[tuple(f.shape) for f in s_maps]}, "
                  f"teacher {self.teacher} {[tuple(f.shape) for f in t_maps]}")
        if any(f.dim() != 4 for f in (*s_maps, *t_maps)):
            raise ValueError(f"fsp needs four (N, C, H, W) maps, got {shapes}")
        if len({f.shape[0] for f in (*s_maps, *t_maps)}) != 1:
            raise ValueError(f"fsp needs maps of the same batch size, got {shapes}")
        for i, (s, t) in enumerate(zip(s_maps, t_maps, strict=True)):
            if s.shape[1] != t.shape[1]:
                self.adapters[i] = _placed(_conv_bn(s.shape[1], t.shape[1]), s)

    def forward(self, inputs: TermInputs) -> Tensor:
        (s1, s2), (t1, t2) = self._features(inputs)
        g_s = fsp_matrix(self.adapters[0](s1), self.adapters[1](s2))
        g_t = fsp_matrix(t1, t2)
        return (g_s - g_t).pow(2).mean()


class ABTerm(_PairTerm):
    """Activation-boundary transfer (Heo, Lee, Yun & Choi, AAAI 2019) between pre-activations.

    Tap both networks before their activation (e.g. the BatchNorm ahead of a ReLU). A connector,
    1x1 conv + BN from C_s to C_t (always present, as in the paper), gives ``s = connector(student)``;
    with t the teacher map and margin mu the loss per element is
    ``(s + mu)^2 * [s > -mu and t <= 0] + (s - mu)^2 * [s <= mu and t > 0]``, summed and divided by
    (batch size * elements per sample) (`ab_loss`), so it is the mean over elements; the paper
    writes the sum (a squared L2 norm). Maps of different H or W are pooled to the smaller size.
    Deviation: the paper uses this loss alone to initialise the student before ordinary training;
    here it is one weighted term of the objective, trained alongside the others (a schedule
    running it alone first is a config of two distillation stages).
    """

    method = "ab"
    description = "activation boundaries: hinge loss so student neurons switch on/off with the teacher's"

    def __init__(self, *, weight: float, student: str, teacher: str, margin: float = 1.0) -> None:
        super().__init__(weight=weight, student=student, teacher=teacher)
        self.margin = _check_number("ab.margin", margin, low=0.0, low_open=True)
        self.connector: nn.Module | None = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, margin={self.margin}"

    def setup(self, sample: TermInputs) -> None:
        s, t = self.pair(sample)
        if s.dim() != 4 or t.dim() != 4:
            raise self._shape_error(s, t, "activation boundaries need two (N, C, H, W) pre-activation maps")
        self.connector = _placed(_conv_bn(s.shape[1], t.shape[1]), s)

    def forward(self, inputs: TermInputs) -> Tensor:
        s, t = self.pair(inputs)
        return ab_loss(self.connector(s), t, self.margin)


class CRDTerm(_PairTerm):
    """Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020).

    Features are average-pooled (if (N, C, H, W)) and flattened, then embedded by trainable
    linear maps to `embed_dim` and L2-normalised: s_i (student), t_i (teacher). Loss: the mean of
    two InfoNCE losses at `temperature` (`info_nce`): anchor s_i with positive t_i and negatives
    the other teachers of the batch plus the teacher memory; anchor t_i with positive s_i and
    negatives the other students of the batch plus the student memory.

    Memory: two queues (buffers, saved in ``state_dict()``) of the last `memory_size` detached
    teacher and student embeddings, with a fill count and a write pointer. They start empty (not
    filled with random unit vectors, which would be meaningless negatives): only filled rows are
    used. Each training-mode forward enqueues its embeddings after computing the loss (at most the
    last `memory_size` of a batch); eval-mode forwards leave the memory alone.

    Deviation: the paper's NCE estimator keeps one memory entry per training sample, updated by
    momentum, and so needs each sample's dataset index, which the training loop does not provide.
    A queue of past embeddings of configurable size serves as the negatives instead (as in
    MoCo-style contrastive memories), and the softmax (InfoNCE) form of the contrastive objective
    replaces the binary NCE form.
    """

    method = "crd"
    description = "contrastive representation distillation: InfoNCE with negatives from memory queues"
    needs_relations = True

    def __init__(
        self,
        *,
        weight: float,
        student: str,
        teacher: str,
        embed_dim: int = 128,
        temperature: float = 0.07,
        memory_size: int = 4096,
    ) -> None:
        super().__init__(weight=weight, student=student, teacher=teacher)
        self.embed_dim = _check_int("crd.embed_dim", embed_dim, low=2)
        self.temperature = _check_number("crd.temperature", temperature, low=0.0, low_open=True)
        self.memory_size = _check_int("crd.memory_size", memory_size, low=1)
        self.embed_student: nn.Module | None = None
        self.embed_teacher: nn.Module | None = None
        self.register_buffer("memory_teacher", torch.zeros(self.memory_size, self.embed_dim))
        self.register_buffer("memory_student", torch.zeros(self.memory_size, self.embed_dim))
        self.register_buffer("memory_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("memory_ptr", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, embed_dim={self.embed_dim}, temperature={self.temperature}, "
                f"memory_size={self.memory_size}")

    @staticmethod
    def _flat(feature: Tensor) -> Tensor:
        if feature.dim() == 4:
            feature = F.adaptive_avg_pool2d(feature, 1)
        return feature.flatten(1)

    def setup(self, sample: TermInputs) -> None:
        s, t = self.pair(sample)
        if s.dim() not in (2, 4) or t.dim() not in (2, 4) or s.shape[0] != t.shape[0]:
            raise self._shape_error(s, t, "each must be (N, C) or (N, C, H, W), with the same N")
        self.embed_student = _placed(nn.Linear(s.shape[1], self.embed_dim), s)
        self.embed_teacher = _placed(nn.Linear(t.shape[1], self.embed_dim), t)
        for name in ("memory_teacher", "memory_student"):
            setattr(self, name, getattr(self, name).to(device=s.device, dtype=s.dtype))
        self.memory_count = self.memory_count.to(s.device)
        self.memory_ptr = self.memory_ptr.to(s.device)

    def embed(self, inputs: TermInputs) -> tuple[Tensor, Tensor]:
        """The L2-normalised (N, embed_dim) student and teacher embeddings, float32."""
        if self.embed_student is None or self.embed_teacher is None:
            raise RuntimeError("crd term used before setup(); build it with build_objective")
        s, t = self.pair(inputs)
        e_s = F.normalize(self.embed_student(self._flat(s)).float(), dim=1)
        e_t = F.normalize(self.embed_teacher(self._flat(t)).float(), dim=1)
        return e_s, e_t

    def forward(self, inputs: TermInputs) -> Tensor:
        e_s, e_t = self.embed(inputs)
        valid = torch.arange(self.memory_size, device=e_s.device) < self.memory_count
        loss_s = info_nce(e_s, e_t, self.memory_teacher, self.temperature, valid)
        loss_t = info_nce(e_t, e_s, self.memory_student, self.temperature, valid)
        if self.training:
            self._enqueue(e_s.detach(), e_t.detach())
        return 0.5 * (loss_s + loss_t)

    @torch.no_grad()
    def _enqueue(self, e_s: Tensor, e_t: Tensor) -> None:
        """Write the batch's embeddings at the pointer (wrapping around), without a host sync.

        The memories are replaced out of place: the loss just computed still holds the old ones
        for its backward pass.
        """
        n = min(e_s.shape[0], self.memory_size)
        e_s, e_t = e_s[-n:], e_t[-n:]
        index = (self.memory_ptr + torch.arange(n, device=self.memory_ptr.device)) % self.memory_size
        self.memory_student = self.memory_student.index_copy(0, index, e_s.to(self.memory_student.dtype))
        self.memory_teacher = self.memory_teacher.index_copy(0, index, e_t.to(self.memory_teacher.dtype))
        self.memory_ptr = (self.memory_ptr + n) % self.memory_size
        self.memory_count = torch.clamp(self.memory_count + n, max=self.memory_size)


TERMS: dict[str, type[Term]] = {
    FTTerm.method: FTTerm,
    VIDTerm.method: VIDTerm,
    FSPTerm.method: FSPTerm,
    ABTerm.method: ABTerm,
    CRDTerm.method: CRDTerm,
}
"""The feature-based terms by config name, in the config's order."""
