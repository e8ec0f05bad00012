"""Distillation schemes that own extra networks: DML, BYOT, DDGSD and DAFL.

These terms do more than compare two tensors: they train peers of the student (`dml`), auxiliary
classifier heads on the student's intermediate stages (`byot`), run the student on a second,
distorted view of the batch (`ddgsd`), or train a generator that replaces the training images
(`dafl`). The extra networks are created in `setup(sample)` as submodules of the term, on the
sample's device: so they are trained by the same optimizer as the student (DAFL's generator by
the term's own optimizer), saved in the objective's state, and never part of the exported student.

How to configure them:

- ``[ce, dml]``: the student's own cross-entropy comes from `ce`; `dml` adds the peers' cross-
  entropy and the mutual KL of every model (student and peers) with the others.
- ``[ce, byot]``: `ce` trains the deepest classifier (the student itself); `byot` the heads.
- ``[ce, ddgsd]``: `ce` on the batch; `ddgsd` the second view's cross-entropy and the mutual
  KL (and MMD) between the views.
- ``[dafl]`` alone, without `ce`, for data-free training: the real images and labels are not
  used by the loss. The training loop still iterates the loader (to count steps) and selects the
  best epoch on the validation split.

The plain functions (`linear_mmd`, `distort_batch`, `dafl_generator_loss`) are usable on their
own; `DAFLGenerator` is the generator `dafl` trains.
"""

from __future__ import annotations

import contextlib
import copy
import math
import weakref
from collections import deque
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from compresskit.distill.losses import Term, TermInputs, _check_number, _feature, kd_loss
from compresskit.distill.taps import eval_mode as _eval_mode
from compresskit.distill.taps import resolve_module, unwrap_model

__all__ = [
    "DMLTerm",
    "BYOTTerm",
    "DDGSDTerm",
    "DAFLTerm",
    "DAFLGenerator",
    "TERMS",
    "linear_mmd",
    "distort_batch",
    "dafl_generator_loss",
]

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_HOOK_EXTRAS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")
_PEER_SEED_STRIDE = 0x9E3779B1
"""Seed offset between peers (a large odd constant, so the peers' seeds never coincide)."""
_MAX_CAPTURES = 8
"""How many recent classifier inputs BYOT keeps (one per student forward since its last step)."""


# ---------------------------------------------------------------- functional pieces


def linear_mmd(first: Tensor, second: Tensor) -> Tensor:
    """Maximum mean discrepancy with a linear kernel: ``||mean_i a_i - mean_i b_i||^2``.

    `first` and `second` are (N, C) batches of features; the biased estimate of the MMD^2 under
    the kernel k(a, b) = a . b reduces to the squared distance between the batch means. float32.
    """
    return (first.float().mean(dim=0) - second.float().mean(dim=0)).pow(2).sum()


def distort_batch(images: Tensor, padding: int, noise_std: float) -> Tensor:
    """A distorted view of an (N, C, H, W) batch: per-sample random crop and Gaussian noise.

    Each image is zero-padded by `padding` pixels on every side and cropped back to H x W at an
    offset drawn independently per sample (uniform in ``0..2*padding`` on each axis), then
    Gaussian noise of standard deviation `noise_std` is added. Drawn with torch ops on the batch's
    device (global RNG), so a seeded run is reproducible and nothing leaves the device.
    """
    x = images
    n, _, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (n,), device=x.device)
        ox = torch.randint(0, 2 * padding + 1, (n,), device=x.device)
        rows = oy[:, None] + torch.arange(h, device=x.device)  # (N, H)
        cols = ox[:, None] + torch.arange(w, device=x.device)  # (N, W)
        batch = torch.arange(n, device=x.device)[:, None, None]
        # advanced indices on dims 0, 2, 3 around a slice: the result is (N, H, W, C)
        x = padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if noise_std > 0:
        x = x + noise_std * torch.randn_like(x)
    return x


def dafl_generator_loss(
    teacher_logits: Tensor,
    teacher_feature: Tensor | None,
    *,
    onehot_weight: float,
    activation_weight: float,
    entropy_weight: float,
) -> Tensor:
    """Chen et al. (2019) DAFL generator objective on a generated batch; lower is better.

    ``onehot_weight * CE(t, argmax t) - activation_weight * mean|f_T|
    - entropy_weight * H(mean_i softmax(t_i))`` with t the teacher's logits, f_T the teacher's
    feature (the activation term is left out when it is None) and H the entropy in nats. The
    one-hot loss makes the teacher confident, the activation loss makes its features large (real
    images excite the features), and maximising the entropy of the batch-mean prediction
    balances the classes. float32.
    """
    t = teacher_logits.float()
    loss = onehot_weight * F.cross_entropy(t, t.argmax(dim=1))
    if teacher_feature is not None:
        loss = loss - activation_weight * teacher_feature.float().abs().mean()
    mean_p = F.softmax(t, dim=1).mean(dim=0)
    entropy = -(mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()
    return loss - entropy_weight * entropy


# ---------------------------------------------------------------- helpers


def _check_int(name: str, value: object, *, low: int, high: int | None = None) -> int:
    """Return `value` if it is an int in [low, high], else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return value


def _check_path(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a module path, got {value!r}")
    return value


def _targets(method: str, inputs: TermInputs) -> Tensor:
    if inputs.targets is None:
        raise ValueError(f"{method} needs targets (labels), got None")
    return inputs.targets


def _check_batch(method: str, sample: TermInputs, *, image_dims: int | None = 4) -> Tensor:
    """The sample's images (of `image_dims` dimensions, any when None) and (N, classes) logits."""
    images = sample.images
    bad_images = images is None or (image_dims is not None and images.dim() != image_dims)
    if bad_images or sample.logits.dim() != 2:
        shape = None if images is None else tuple(images.shape)
        need = "images" if image_dims is None else "(N, C, H, W) images"
        raise ValueError(
            f"{method} needs {need} and (N, classes) student logits, got images "
            f"{shape} and logits {tuple(sample.logits.shape)}"
        )
    return images


def _pooled(feature: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C) by global average pooling; (N, C) is returned as is."""
    return feature.float().mean(dim=(2, 3)) if feature.dim() == 4 else feature.float()


def _strip_shared_hooks(original: nn.Module, clone: nn.Module) -> None:
    """Remove from a deep copy the hooks it shares with the original.

    `copy.deepcopy` copies functions by reference: a hook that is a closure (the objective's
    feature taps, BYOT's classifier capture) would report the copy's activations into the
    original's recorders and stay attached after the objective is closed. Hooks that deepcopy
    duplicated (stateful objects such as `torch.nn.utils.prune` masks) are the copy's own and
    are kept.
    """
    for src, dst in zip(original.modules(), clone.modules(), strict=True):
        for attr in _HOOK_DICTS:
            hooks, src_hooks = getattr(dst, attr, None), getattr(src, attr, None)
            if not hooks or not src_hooks:
                continue
            for key in [k for k, fn in hooks.items() if src_hooks.get(k) is fn]:
                del hooks[key]
                for extra in _HOOK_EXTRAS:
                    getattr(dst, extra, {}).pop(key, None)


def _reinitialise(model: nn.Module, seed: int) -> None:
    """Reset every submodule that has `reset_parameters`, from a fixed CPU RNG seed.

    The model must be on the CPU; the global RNG state is saved and restored, so building the
    objective does not shift the training run's random stream. Tensors under a
    `torch.nn.utils.prune` mask are re-initialised through their ``*_orig`` parameter (the mask
    is kept).
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if not callable(reset):
                continue
            masked = [n[: -len("_orig")] for n in module._parameters
                      if n.endswith("_orig") and f"{n[: -len('_orig')]}_mask" in module._buffers]
            for name in masked:  # let reset_parameters write into the trained parameter
                module.__dict__[name] = module._parameters[f"{name}_orig"].data
            reset()
            with torch.no_grad():
                for name in masked:
                    module.__dict__[name] = module._parameters[f"{name}_orig"] * module._buffers[f"{name}_mask"]


# ---------------------------------------------------------------- dml


class DMLTerm(Term):
    """Deep mutual learning (Zhang, Xiang, Hospedales & Lu, CVPR 2018).

    `peers` copies of the student architecture, freshly initialised, are trained alongside the
    student; every model learns from the labels and from the others' predictions. With models
    m in {student, peer_1..peer_K}, logits z_m and q_m = softmax(z_m / T)::

        loss = sum_{peers k} CE(z_k, y)
             + sum_m mean_{n != m} T^2 * KL(q_n.detach() || q_m)

    The student's own cross-entropy is a separate `ce` term: configure ``[ce, dml]``. Only the
    student is exported; the peers are submodules of this term (trained by the same optimizer,
    saved in the objective's state).

    Deviations from the paper: the paper updates the networks in turn (one optimizer step per
    network, each seeing the others' latest predictions); here all are updated together by one
    optimizer on the summed loss, each treating the others' predictions as constants (detached),
    which is the usual single-step implementation. The paper uses T = 1; other temperatures are
    allowed, with the Hinton T^2 factor. Peers are deep copies of the student's architecture with
    every module that has `reset_parameters` re-initialised from a seed derived from
    ``torch.initial_seed()`` (reproducible, different from the student); parameters of modules
    without `reset_parameters` start as the student's. Peers follow the term's train/eval mode.
    """

    method = "dml"
    description = "deep mutual learning: freshly initialised peers of the student learn from each other"
    needs_targets = True
    needs_images = True

    def __init__(self, *, weight: float, peers: int = 1, temperature: float = 1.0) -> None:
        super().__init__(weight=weight)
        self.num_peers = _check_int("dml.peers", peers, low=1, high=8)
        self.temperature = _check_number("dml.temperature", temperature, low=0.0, low_open=True)
        self.peers = nn.ModuleList()

    def extra_repr(self) -> str:
        return f"weight={self.weight}, peers={self.num_peers}, temperature={self.temperature}"

    def setup(self, sample: TermInputs) -> None:
        images = _check_batch("dml", sample, image_dims=None)
        if sample.student is None:
            raise ValueError("dml needs the student model in the sample, got None")
        student = unwrap_model(sample.student)
        base = torch.initial_seed()
        peers = []
        for index in range(self.num_peers):
            peer = copy.deepcopy(student)
            _strip_shared_hooks(student, peer)
            peer.to("cpu")
            _reinitialise(peer, (base + _PEER_SEED_STRIDE * (index + 1)) % 2**63)
            peers.append(peer.to(images.device).train(self.training))
        self.peers = nn.ModuleList(peers)

    def forward(self, inputs: TermInputs) -> Tensor:
        y = _targets("dml", inputs)
        if inputs.images is None:
            raise ValueError("dml needs the batch images, got None")
        t = self.temperature
        peer_logits = [peer(inputs.images) for peer in self.peers]
        logits = [inputs.logits, *peer_logits]
        loss = torch.stack([F.cross_entropy(z.float(), y) for z in peer_logits]).sum()
        for m, z_m in enumerate(logits):
            mutual = [kd_loss(z_m, z_n.detach(), t) for n, z_n in enumerate(logits) if n != m]
            loss = loss + torch.stack(mutual).mean()
        return loss


# ---------------------------------------------------------------- byot


class _ClassifierInputs:
    """Records the input of the student's last Linear, per student forward.

    Two forward hooks: one on an anchor module (the first stage BYOT reads) remembers, by weak
    reference, the anchor's output of the forward in progress; the other, on the last Linear,
    stores its input under that anchor output. The term finds this step's classifier input by
    the anchor output the objective tapped (identity, not position), so extra student forwards
    made by other terms (DDGSD's second view, DAFL's generated batch) or validation forwards
    between steps cannot be mistaken for the step's own forward. Only the last few are kept.

    The hooks stay until `remove()`; `BYOTTerm.close()` calls it.
    """

    def __init__(self, anchor: nn.Module, classifier: nn.Module) -> None:
        self._current: weakref.ref[Tensor] | None = None
        self.entries: deque[tuple[weakref.ref[Tensor], Tensor]] = deque(maxlen=_MAX_CAPTURES)

        def on_anchor(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            self._current = weakref.ref(output) if isinstance(output, Tensor) else None

        def on_classifier(_module: nn.Module, args: tuple[Any, ...], _output: Any) -> None:
            if self._current is not None and args and isinstance(args[0], Tensor):
                self.entries.append((self._current, args[0]))
            self._current = None

        self._handles: list[RemovableHandle] = [
            anchor.register_forward_hook(on_anchor),
            classifier.register_forward_hook(on_classifier),
        ]

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def take(self, anchor_output: Tensor) -> Tensor | None:
        """The classifier input of the forward whose anchor output is `anchor_output`; forgets all."""
        found = None
        for ref, value in reversed(self.entries):
            if ref() is anchor_output:
                found = value
                break
        self.clear()
        return found

    def clear(self) -> None:
        self.entries.clear()
        self._current = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()


class BYOTTerm(Term):
    """Be your own teacher: self-distillation through auxiliary heads (Zhang et al., ICCV 2019).

    Every listed intermediate stage i of the student gets a head: a bottleneck (for (N, C, H, W)
    maps a 1x1 conv to D channels + BatchNorm + ReLU + global average pooling; for (N, C)
    vectors Linear + BatchNorm1d + ReLU) giving F_i (N, D), then a Linear classifier giving q_i.
    The deepest classifier is the student itself: its logits z_C and its deepest feature F_C =
    the input of the student's last `nn.Linear` (in `named_modules()` order), with D = F_C's
    dimension. Per head::

        (1 - alpha) * CE(q_i, y)
        + alpha * T^2 * KL(softmax(z_C / T).detach() || softmax(q_i / T))
        + feature_weight * mean((F_i - F_C.detach())^2)

    summed over the heads. The deepest classifier's cross-entropy is a separate `ce` term:
    configure ``[ce, byot]``. The heads are submodules of this term, dropped at export.

    F_C is captured by forward hooks registered in `setup` on the student's last Linear and on
    the first listed stage (`_ClassifierInputs`); they stay on the student until `close()`,
    which must be called before the student is exported (`Objective.close()` does so when it
    closes its terms). `setup` runs the student once more (eval mode, no gradients) to check that
    the last Linear is called after the first listed stage with an (N, D) input.

    Deviations from the paper: the paper's heads are ResNet-style bottleneck blocks that
    downsample to the deepest stage's resolution; here a 1x1 conv + BN + ReLU + pooling (a light
    head that fits any backbone). The feature hint is the mean over elements of the squared
    difference (the paper's squared L2 distance divided by N*D, so `feature_weight` does not
    scale with D), and the KD part has the Hinton T^2 factor.
    """

    method = "byot"
    description = "be your own teacher: heads on intermediate stages learn from the deepest classifier"
    needs_targets = True
    needs_features = True

    def __init__(
        self,
        *,
        weight: float,
        student: list[str],
        temperature: float = 3.0,
        alpha: float = 0.3,
        feature_weight: float = 0.03,
    ) -> None:
        super().__init__(weight=weight)
        if isinstance(student, str) or not isinstance(student, list | tuple) or not student:
            raise ValueError(f"byot.student must be a non-empty list of module paths, got {student!r}")
        self.student = [_check_path("byot.student[]", p) for p in student]
        if len(set(self.student)) != len(self.student):
            raise ValueError(f"byot.student lists a module twice: {self.student}")
        self.temperature = _check_number("byot.temperature", temperature, low=0.0, low_open=True)
        self.alpha = _check_number("byot.alpha", alpha, low=0.0)
        if self.alpha > 1.0:
            raise ValueError(f"byot.alpha must be <= 1, got {alpha!r}")
        self.feature_weight = _check_number("byot.feature_weight", feature_weight, low=0.0)
        self.bottlenecks = nn.ModuleList()
        self.classifiers = nn.ModuleList()
        self._capture: _ClassifierInputs | None = None
        self._classifier_path = ""

    def student_paths(self) -> list[str]:
        return list(self.student)

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, student={self.student}, temperature={self.temperature}, "
                f"alpha={self.alpha}, feature_weight={self.feature_weight}")

    def setup(self, sample: TermInputs) -> None:
        images = _check_batch("byot", sample, image_dims=None)
        if sample.student is None:
            raise ValueError("byot needs the student model in the sample, got None")
        model = unwrap_model(sample.student)
        linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("byot needs a student whose classifier is an nn.Linear (its input is the "
                             "deepest feature F_C); the student has no nn.Linear")
        self._classifier_path, classifier = linears[-1]
        dim, classes = classifier.in_features, sample.logits.shape[1]
        features = [_feature(sample.student_features, p, "student") for p in self.student]
        for path, f in zip(self.student, features, strict=True):
            if f.dim() not in (2, 4):
                raise ValueError(f"byot needs (N, C) or (N, C, H, W) features, got student {path!r} "
                                 f"{tuple(f.shape)}")
        self.close()
        capture = _ClassifierInputs(resolve_module(model, self.student[0], what="student"), classifier)
        try:
            with _eval_mode(model), torch.no_grad():
                model(images)
            f_c = capture.entries[-1][1] if capture.entries else None
            if f_c is None or tuple(f_c.shape) != (images.shape[0], dim):
                got = "no call after it" if f_c is None else f"input {tuple(f_c.shape)}"
                raise ValueError(
                    f"byot needs the student's last nn.Linear {self._classifier_path!r} to be called after "
                    f"{self.student[0]!r} with (N, {dim}) features, got {got}"
                )
        except BaseException:
            capture.remove()
            raise
        capture.clear()
        self._capture = capture
        device, dtype = features[0].device, features[0].dtype
        bottlenecks, classifiers = [], []
        for f in features:
            if f.dim() == 4:
                head: nn.Module = nn.Sequential(
                    nn.Conv2d(f.shape[1], dim, kernel_size=1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                )
            else:
                head = nn.Sequential(nn.Linear(f.shape[1], dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU())
            bottlenecks.append(head)
            classifiers.append(nn.Linear(dim, classes))
        self.bottlenecks = nn.ModuleList(bottlenecks).to(device=device, dtype=dtype).train(self.training)
        self.classifiers = nn.ModuleList(classifiers).to(device=device, dtype=dtype).train(self.training)

    def close(self) -> None:
        """Remove the hooks from the student; safe to call twice. The term cannot run afterwards."""
        if self._capture is not None:
            self._capture.remove()
            self._capture = None

    def forward(self, inputs: TermInputs) -> Tensor:
        if self._capture is None or not self._capture.active:
            raise RuntimeError("byot was closed (its hooks on the student are removed) or never set up")
        y = _targets("byot", inputs)
        anchor = _feature(inputs.student_features, self.student[0], "student")
        f_c = self._capture.take(anchor)
        if f_c is None:
            raise ValueError(f"byot found no input of the student's last nn.Linear {self._classifier_path!r} "
                             "for this batch")
        f_c = f_c.detach().float()
        z_c = inputs.logits.detach()
        t, alpha = self.temperature, self.alpha
        total = inputs.logits.new_zeros((), dtype=torch.float32)
        for path, bottleneck, classifier in zip(self.student, self.bottlenecks, self.classifiers, strict=True):
            f_i = bottleneck(_feature(inputs.student_features, path, "student"))
            q_i = classifier(f_i)
            total = total + (1.0 - alpha) * F.cross_entropy(q_i.float(), y)
            total = total + alpha * kd_loss(q_i, z_c, t)
            total = total + self.feature_weight * (f_i.float() - f_c).pow(2).mean()
        return total


# ---------------------------------------------------------------- ddgsd


class DDGSDTerm(Term):
    """Data-distortion guided self-distillation (Xu & Liu, AAAI 2019).

    A second view of the batch, `distort_batch` (per-sample random crop after zero-padding by
    `crop_padding`, plus Gaussian noise of std `noise_std`), is run through the student: logits
    z2 (z1 = the logits on the batch). With q = softmax(z / T)::

        loss = CE(z2, y) + T^2 * [KL(q1.detach() || q2) + KL(q2.detach() || q1)]
               + mmd_weight * MMD(f1, f2)

    f the student feature at `student` (global-average-pooled to (N, C)) on each view and MMD the
    linear-kernel estimate ``||mean_i f1_i - mean_i f2_i||^2`` (`linear_mmd`); without `student`
    there is no MMD. The first view's cross-entropy is a separate `ce` term: configure
    ``[ce, ddgsd]``. f2 is captured by a forward hook that exists only during the second forward.

    Deviations from the paper: the paper distorts each image twice and runs both views; here the
    first view is the batch as the data pipeline delivers it (already augmented), so one extra
    student forward per step. The paper's distortions are crop/flip/colour transforms; here crop
    and noise, applied on the device. The mutual KL has the Hinton T^2 factor (T = 1 is the
    paper's plain KL).
    """

    method = "ddgsd"
    description = "data-distortion self-distillation: a distorted view and the batch teach each other"
    needs_targets = True
    needs_images = True

    def __init__(
        self,
        *,
        weight: float,
        student: str | None = None,
        temperature: float = 1.0,
        mmd_weight: float = 0.005,
        crop_padding: int = 4,
        noise_std: float = 0.1,
    ) -> None:
        super().__init__(weight=weight)
        self.student = None if student is None else _check_path("ddgsd.student", student)
        self.temperature = _check_number("ddgsd.temperature", temperature, low=0.0, low_open=True)
        self.mmd_weight = _check_number("ddgsd.mmd_weight", mmd_weight, low=0.0)
        self.crop_padding = _check_int("ddgsd.crop_padding", crop_padding, low=0)
        self.noise_std = _check_number("ddgsd.noise_std", noise_std, low=0.0)

    def student_paths(self) -> list[str]:
        return [] if self.student is None else [self.student]

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, student={self.student!r}, temperature={self.temperature}, "
                f"mmd_weight={self.mmd_weight}, crop_padding={self.crop_padding}, noise_std={self.noise_std}")

    def setup(self, sample: TermInputs) -> None:
        _check_batch("ddgsd", sample)
        if sample.student is None:
            raise ValueError("ddgsd needs the student model in the sample, got None")
        if self.student is not None:
            f = _feature(sample.student_features, self.student, "student")
            if f.dim() not in (2, 4):
                raise ValueError(f"ddgsd needs an (N, C) or (N, C, H, W) feature, got student "
                                 f"{self.student!r} {tuple(f.shape)}")

    def distort(self, images: Tensor) -> Tensor:
        """The second view of the batch (see `distort_batch`)."""
        return distort_batch(images, self.crop_padding, self.noise_std)

    def forward(self, inputs: TermInputs) -> Tensor:
        y = _targets("ddgsd", inputs)
        if inputs.images is None or inputs.student is None:
            raise ValueError("ddgsd needs the batch images and the student model")
        view = self.distort(inputs.images)
        captured: list[Any] = []
        handle = None
        if self.student is not None:
            module = resolve_module(inputs.student, self.student, what="student")
            handle = module.register_forward_hook(lambda _m, _a, out: captured.append(out))
        try:
            z2 = inputs.student(view)
        finally:
            if handle is not None:
                handle.remove()
        if not isinstance(z2, Tensor):
            raise ValueError(f"ddgsd: the student returned {type(z2).__name__}, not a logits tensor")
        z1, t = inputs.logits, self.temperature
        loss = F.cross_entropy(z2.float(), y) + kd_loss(z2, z1.detach(), t) + kd_loss(z1, z2.detach(), t)
        if self.student is not None:
            f1 = _feature(inputs.student_features, self.student, "student")
            f2 = _feature({self.student: captured[-1]} if captured else {}, self.student, "student")
            loss = loss + self.mmd_weight * linear_mmd(_pooled(f1), _pooled(f2))
        return loss


# ---------------------------------------------------------------- dafl


class DAFLGenerator(nn.Module):
    """The DAFL generator for (C, H, W) images (Chen et al. 2019, after the DCGAN generator).

    z (latent_dim) -> Linear -> (128, H/4, W/4) -> BN -> upsample x2 -> conv3x3 128 -> BN ->
    LeakyReLU(0.2) -> upsample x2 -> conv3x3 64 -> BN -> LeakyReLU(0.2) -> conv3x3 C -> tanh ->
    BatchNorm2d(C, affine=False). The last BatchNorm puts the images on the zero-mean, unit-
    variance scale of normalised training data. When H or W is not divisible by 4, the start
    size is rounded up and the maps are resized (bilinear) to (H, W) before the last conv.
    """

    def __init__(self, latent_dim: int, channels: int, height: int, width: int) -> None:
        super().__init__()
        self.latent_dim, self.size = latent_dim, (height, width)
        self.start = (max(1, math.ceil(height / 4)), max(1, math.ceil(width / 4)))
        self.project = nn.Linear(latent_dim, 128 * self.start[0] * self.start[1])
        self.bn0 = nn.BatchNorm2d(128)
        self.block1 = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), nn.BatchNorm2d(128), nn.LeakyReLU(0.2))
        self.block2 = nn.Sequential(nn.Conv2d(128, 64, 3, padding=1), nn.BatchNorm2d(64), nn.LeakyReLU(0.2))
        self.out = nn.Sequential(nn.Conv2d(64, channels, 3, padding=1), nn.Tanh(),
                                 nn.BatchNorm2d(channels, affine=False))

    def forward(self, z: Tensor) -> Tensor:
        x = self.bn0(self.project(z).view(z.shape[0], 128, *self.start))
        x = self.block1(F.interpolate(x, scale_factor=2, mode="nearest"))
        x = self.block2(F.interpolate(x, scale_factor=2, mode="nearest"))
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return self.out(x)


class DAFLTerm(Term):
    """Data-free learning of student networks (Chen et al., ICCV 2019, DAFL).

    A generator G (`DAFLGenerator`) trained against the frozen teacher replaces the training
    images. Each training-mode call makes two steps on one generated batch g = G(z), z ~ N(0, 1)
    of the batch size:

    1. generator step, inside this call with the term's own Adam optimizer (lr `generator_lr`):
       minimise `dafl_generator_loss`, ``onehot_weight * CE(t, argmax t) - activation_weight *
       mean|f_T| - entropy_weight * H(mean_i softmax(t_i))``, t = teacher(g) with the gradient
       flowing through the frozen teacher into G, f_T the output of the teacher module at
       `teacher` (when given; captured by a hook that exists only for that call);
    2. student step: return ``T^2 * KL(softmax(t/T) || softmax(s/T))`` with s = student(g.detach())
       and t the teacher's logits on g (constants), for the objective's optimizer.

    The generator's gradients are zeroed (set to None) before and after its step, so the
    objective's optimizer (which also lists the generator's parameters) never moves it; the
    Adam state is saved with the objective's state (`get_extra_state`) for resumed runs. The
    returned loss does not depend on the real images or labels: configure ``[dafl]`` alone for
    data-free training (the loop still iterates the loader to count steps and selects the best
    epoch on the validation split). In eval mode the KD loss on a generated batch is returned
    without training the generator. `weight` scales the student's KD only.

    Deviations from the paper: the student and generator steps are taken in the same call on the
    same batch, as in the authors' code; the teacher's logits for the student step are those of
    the generator step (the teacher is frozen and in eval mode, so they equal a fresh no-grad
    forward on g.detach()). The entropy is in nats (the reference code uses log10, a constant
    factor). Under float16 autocast the generator step runs in float32 (it has no gradient
    scaler). The objective still runs the student and teacher on the real batch each step (for
    the train accuracy it reports), so the student's BatchNorm statistics also see real images:
    a run is data-free in its loss, not in its BatchNorm statistics.
    """

    method = "dafl"
    description = "data-free KD (DAFL): a generator trained against the teacher replaces the training images"
    needs_teacher = True
    needs_images = True
    teacher_logits_only = False

    def __init__(
        self,
        *,
        weight: float,
        teacher: str | None = None,
        latent_dim: int = 100,
        generator_lr: float = 1.0e-3,
        onehot_weight: float = 1.0,
        activation_weight: float = 0.1,
        entropy_weight: float = 5.0,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(weight=weight)
        self.teacher = None if teacher is None else _check_path("dafl.teacher", teacher)
        self.latent_dim = _check_int("dafl.latent_dim", latent_dim, low=1)
        self.generator_lr = _check_number("dafl.generator_lr", generator_lr, low=0.0, low_open=True)
        self.onehot_weight = _check_number("dafl.onehot_weight", onehot_weight, low=0.0)
        self.activation_weight = _check_number("dafl.activation_weight", activation_weight, low=0.0)
        self.entropy_weight = _check_number("dafl.entropy_weight", entropy_weight, low=0.0)
        self.temperature = _check_number("dafl.temperature", temperature, low=0.0, low_open=True)
        self.generator: DAFLGenerator | None = None
        self._optimizer: torch.optim.Adam | None = None
        self._pending_state: dict[str, Any] | None = None

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, teacher={self.teacher!r}, latent_dim={self.latent_dim}, "
                f"generator_lr={self.generator_lr}, temperature={self.temperature}")

    def setup(self, sample: TermInputs) -> None:
        images = _check_batch("dafl", sample)
        s, t = sample.logits, sample.teacher_logits
        if t is None or sample.teacher is None or s.shape != t.shape:
            t_shape = None if t is None else tuple(t.shape)
            raise ValueError(f"dafl needs a teacher whose logits have the student's (N, classes) shape, got "
                             f"student {tuple(s.shape)} and teacher {t_shape}")
        if sample.student is None:
            raise ValueError("dafl needs the student model in the sample, got None")
        if self.teacher is not None:
            feature = self._teacher_forward(sample.teacher, images, eval_only=True)[1]
            if not isinstance(feature, Tensor):
                raise ValueError(f"dafl: teacher module {self.teacher!r} produced {type(feature).__name__}, "
                                 "not a tensor; tap a module that returns one tensor")
        _, c, h, w = images.shape
        generator = DAFLGenerator(self.latent_dim, c, h, w).to(device=images.device, dtype=images.dtype)
        self.generator = generator.train(self.training)
        self._optimizer = None

    def _teacher_forward(self, teacher: nn.Module, images: Tensor, *, eval_only: bool = False) -> tuple[Tensor, Any]:
        """Teacher logits on `images` and the output of the module at `self.teacher` (or None)."""
        captured: list[Any] = []
        handle = None
        if self.teacher is not None:
            # a combined teacher (ensemble, generalist + specialists) names paths of its primary model
            module = resolve_module(getattr(teacher, "primary", teacher), self.teacher, what="teacher")
            handle = module.register_forward_hook(lambda _m, _a, out: captured.append(out))
        try:
            if eval_only:
                with _eval_mode(teacher), torch.no_grad():
                    logits = teacher(images)
            else:
                logits = teacher(images)
        finally:
            if handle is not None:
                handle.remove()
        if not isinstance(logits, Tensor):
            raise ValueError(f"dafl: the teacher returned {type(logits).__name__}, not a logits tensor")
        return logits, (captured[-1] if captured else None)

    def _generator_optimizer(self) -> torch.optim.Adam:
        """The generator's Adam, created on first use (after the objective moved the term)."""
        if self._optimizer is None:
            assert self.generator is not None
            self._optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.generator_lr)
            if self._pending_state:
                self._optimizer.load_state_dict(self._pending_state)
            self._pending_state = None
        return self._optimizer

    def get_extra_state(self) -> dict[str, Any]:
        """The generator optimizer's state, so a resumed run continues its Adam moments."""
        return {} if self._optimizer is None else {"optimizer": self._optimizer.state_dict()}

    def set_extra_state(self, state: Any) -> None:
        pending = state.get("optimizer") if isinstance(state, dict) else None
        if pending and self._optimizer is not None:
            self._optimizer.load_state_dict(pending)
            pending = None
        self._pending_state = pending

    def _generator_step(self, teacher: nn.Module, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """One Adam step of the generator; returns the batch g (detached) and the teacher's logits on it."""
        assert self.generator is not None
        opt = self._generator_optimizer()
        fp16 = (torch.is_autocast_enabled(device.type)
                and torch.get_autocast_dtype(device.type) == torch.float16)
        autocast = torch.autocast(device.type, enabled=False) if fp16 else contextlib.nullcontext()
        with torch.enable_grad(), autocast:
            opt.zero_grad(set_to_none=True)
            z = torch.randn(n, self.latent_dim, device=device)
            g = self.generator(z)
            t, feature = self._teacher_forward(teacher, g)
            if self.teacher is not None and not isinstance(feature, Tensor):
                raise ValueError(f"dafl: teacher module {self.teacher!r} produced {type(feature).__name__}, "
                                 "not a tensor")
            loss = dafl_generator_loss(t, feature, onehot_weight=self.onehot_weight,
                                       activation_weight=self.activation_weight,
                                       entropy_weight=self.entropy_weight)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return g.detach(), t.detach()

    def forward(self, inputs: TermInputs) -> Tensor:
        if self.generator is None:
            raise RuntimeError("dafl was not set up (build it with build_objective)")
        if inputs.teacher is None or inputs.student is None:
            raise ValueError("dafl needs the teacher and the student models")
        n, device = inputs.logits.shape[0], inputs.logits.device
        if self.training:
            g, t = self._generator_step(inputs.teacher, n, device)
        else:
            with torch.no_grad():
                g = self.generator(torch.randn(n, self.latent_dim, device=device))
                t = self._teacher_forward(inputs.teacher, g)[0]
        s = inputs.student(g)
        if not isinstance(s, Tensor):
            raise ValueError(f"dafl: the student returned {type(s).__name__}, not a logits tensor")
        return kd_loss(s, t, self.temperature)


TERMS: dict[str, type[Term]] = {
    DMLTerm.method: DMLTerm,
    BYOTTerm.method: BYOTTerm,
    DDGSDTerm.method: DDGSDTerm,
    DAFLTerm.method: DAFLTerm,
}
"""The scheme terms by config name, in the config's order."""
