"""Feature-based distillation terms with adapters (ft, vid, fsp, ab, crd): loss values against
hand-written formulas, gradients through `build_objective`, and clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from compresskit.distill import TermInputs, build_objective
from compresskit.distill.feature import (
    TERMS,
    ABTerm,
    CRDTerm,
    FSPTerm,
    FTTerm,
    VIDTerm,
    ab_loss,
    factor_transfer_loss,
    fsp_matrix,
    info_nce,
    vid_nll,
)

CLASSES = 3


class TwoStageNet(nn.Module):
    """Tiny two-stage conv classifier. Student: width 4 (8x8 then 4x4 maps); teacher: width 8,
    stride 2 first (4x4 then 2x2), so channels and spatial sizes differ at every tap."""

    def __init__(self, width: int, stride1: int = 1) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=stride1, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.stage2 = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(2 * width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.pool(self.stage2(self.stage1(x)))))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def nets() -> tuple[TwoStageNet, TwoStageNet]:
    return TwoStageNet(4), TwoStageNet(8, stride1=2)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])


def _inputs(s: torch.Tensor, t: torch.Tensor | list[torch.Tensor], s2: torch.Tensor | None = None) -> TermInputs:
    """TermInputs with student features {"s": s[, "s2": s2]} and teacher {"t": t[, "t2": ...]}."""
    s_feats = {"s": s} if s2 is None else {"s": s, "s2": s2}
    t_feats = {"t": t} if isinstance(t, torch.Tensor) else {"t": t[0], "t2": t[1]}
    return TermInputs(logits=torch.zeros(s.shape[0], CLASSES), targets=None, teacher_logits=None,
                      student_features=s_feats, teacher_features=t_feats)


def _backward(nets, batch, term: dict) -> tuple[TwoStageNet, nn.Module]:
    """Build an objective of one term, run one training step's backward; return student, term."""
    student, teacher = nets
    images, targets = batch
    obj = build_objective([term], student=student, teacher=teacher, example_input=images)
    with obj:
        obj.train()
        out = obj(images, targets)
        assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32
        out.loss.backward()
    return student, obj.terms[0]


def _nonzero_grad(module: nn.Module) -> bool:
    return all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters() if p.requires_grad)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def test_feature_terms_registered_in_config_order() -> None:
    assert list(TERMS) == ["ft", "vid", "fsp", "ab", "crd"]
    assert not any(cls.teacher_logits_only for cls in TERMS.values())
    assert all(cls.needs_teacher and cls.needs_features for cls in TERMS.values())


# ---------------------------------------------------------------- ft


def _paper_factor_loss(f_s: np.ndarray, f_t: np.ndarray, p: int) -> float:
    """Kim et al. (2018), by explicit loops: the mean over samples of the p-norm
    ``(sum |f_t/||f_t||_2 - f_s/||f_s||_2|^p) ** (1/p)`` of each flattened sample."""
    norms = []
    for a, b in zip(f_s, f_t, strict=True):
        a, b = a.ravel(), b.ravel()
        a_n = a / math.sqrt(sum(v * v for v in a))
        b_n = b / math.sqrt(sum(v * v for v in b))
        norms.append(sum(abs(x - y) ** p for x, y in zip(b_n, a_n, strict=True)) ** (1.0 / p))
    return sum(norms) / len(norms)


@pytest.mark.parametrize("p", [1, 2])
def test_ft_factor_loss_matches_the_papers_formula(p: int) -> None:
    f_s = torch.tensor([[[[3.0, 0.0], [0.0, 4.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])  # (2, 1, 2, 2)
    f_t = torch.tensor([[[[0.0, 3.0], [4.0, 0.0]]], [[[2.0, 2.0], [2.0, 2.0]]]])
    # sample 0: (0,.6,.8,0) - (.6,0,0,.8): |d| = .6,.6,.8,.8, so ||d||_1 = 2.8 and ||d||_2 = sqrt(2);
    # sample 1: identical directions, 0; the paper averages the per-sample norms over the 2 samples
    paper = {1: 2.8 / 2, 2: math.sqrt(2.0) / 2}[p]
    assert _paper_factor_loss(_np(f_s), _np(f_t), p) == pytest.approx(paper)
    assert factor_transfer_loss(f_s, f_t, p, per_element=False).item() == pytest.approx(paper, rel=1e-5)
    # the default divides by D ** (1/p) with D = 4 elements per sample: for p=2 the RMS difference
    # (a norm, not the mean squared difference the loss used to return: 2.0 / 8 = 0.25)
    default = factor_transfer_loss(f_s, f_t, p).item()
    assert default == pytest.approx(paper / 4 ** (1.0 / p), rel=1e-5)
    if p == 2:
        assert default == pytest.approx(math.sqrt(2.0) / 2 / 2, rel=1e-5) and default != pytest.approx(0.25)


def test_ft_factor_loss_scales_as_a_norm() -> None:
    """Doubling the distance doubles the loss for every p (a p-th power would quadruple it at p=2)."""
    f_t = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    near = torch.tensor([[[[1.0, 0.01], [0.0, 0.0]]]])
    far = torch.tensor([[[[1.0, 0.02], [0.0, 0.0]]]])
    for p in (1, 2):
        ratio = factor_transfer_loss(far, f_t, p).item() / factor_transfer_loss(near, f_t, p).item()
        assert ratio == pytest.approx(2.0, rel=0.02)


def test_ft_term_values_in_both_phases() -> None:
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    term = FTTerm(weight=1.0, student="s", teacher="t", factor_rate=0.4, p=2, paraphraser_steps=1)
    term.setup(_inputs(s, t))
    term.eval()
    assert term.encoder[-2].num_features == 2  # k = round(0.4 * 5)
    # phase 1 (eval-mode forwards are not counted): reconstruction MSE of the teacher feature
    recon = _np(term.decoder(term.encoder(t)))
    expected = float(np.mean((recon - _np(t)) ** 2))
    assert term(_inputs(s, t)).item() == pytest.approx(expected, rel=1e-5)
    assert term(_inputs(s, t)).item() == pytest.approx(expected, rel=1e-5)
    assert int(term.steps_done) == 0
    # one training-mode forward ends phase 1; then the factor loss
    term.train()
    term(_inputs(s, t))
    term.eval()
    assert term.paraphraser_trained
    d = term.encoder(t)[0].numel()  # elements per sample
    expected = _paper_factor_loss(_np(term.translator(s)), _np(term.encoder(t)), 2) / math.sqrt(d)
    assert term(_inputs(s, t)).item() == pytest.approx(expected, rel=1e-5)


def test_ft_paraphraser_phase_then_frozen_factor_phase(nets, batch) -> None:
    student, teacher = nets
    images, targets = batch
    spec = {"method": "ft", "weight": 1.0, "student": "stage2", "teacher": "stage2", "paraphraser_steps": 2}
    with build_objective([spec], student=student, teacher=teacher, example_input=images) as obj:
        term = obj.terms[0]
        obj.eval()
        obj(images, targets)  # eval forward: not counted
        assert int(term.steps_done) == 0
        obj.train()
        for _ in range(2):
            student.zero_grad(set_to_none=True)
            obj.zero_grad(set_to_none=True)
            before = [p.detach().clone() for p in term.encoder.parameters()]
            out = obj(images, targets)
            out.loss.backward()
            # reconstruction only: the paraphraser learns (its own optimizer steps inside the
            # forward), the student and the translator get nothing, the loop's optimizer sees no
            # paraphraser gradient
            assert any(not torch.equal(b, p) for b, p in zip(before, term.encoder.parameters(), strict=True))
            assert out.parts["ft"] > 0
            assert all(p.grad is None or not p.grad.any() for p in student.parameters())
            assert all(p.grad is None for p in term.translator.parameters())
            assert all(p.grad is None for p in [*term.encoder.parameters(), *term.decoder.parameters()])
        assert int(term.steps_done) == 2 and term.paraphraser_trained
        obj(images, targets).loss.backward()
        # factor phase: paraphraser frozen and in eval mode, even with the objective in train mode
        assert not term.encoder.training and not term.decoder.training
        assert all(not p.requires_grad and p.grad is None for p in term.encoder.parameters())
        assert _nonzero_grad(term.translator)
        assert student.stage2[0].weight.grad.abs().sum() > 0
        obj.eval()
        value = obj(images, targets).parts["ft"]
        state = obj.state_dict()
    assert int(state["terms.0.steps_done"]) == 2  # counted up to the end of phase 1
    # a resumed run continues in the factor phase with the same adapters
    with build_objective([spec], student=student, teacher=teacher, example_input=images) as resumed:
        assert not resumed.terms[0].paraphraser_trained
        resumed.load_state_dict(state)
        assert resumed.terms[0].paraphraser_trained
        resumed.eval()
        assert resumed(images, targets).parts["ft"] == pytest.approx(value, rel=1e-5)


def test_ft_gradients_reach_student_and_translator(nets, batch) -> None:
    spec = {"method": "ft", "weight": 1.0, "student": "stage1", "teacher": "stage1", "paraphraser_steps": 0}
    student, term = _backward(nets, batch, spec)
    assert student.stage1[0].weight.grad.abs().sum() > 0
    assert _nonzero_grad(term.translator)


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ({"student": "flat", "teacher": "stage2"}, r"ft cannot pair student 'flat' \(4, 8\) with teacher 'stage2'"),
        ({"student": "stage2", "teacher": "stage2", "factor_rate": 0.0}, r"ft\.factor_rate must be > 0"),
        ({"student": "stage2", "teacher": "stage2", "p": 0.5}, r"ft\.p must be >= 1"),
        ({"student": "stage2", "teacher": "stage2", "paraphraser_steps": 1.5}, r"ft\.paraphraser_steps must be an int"),
    ],
)
def test_ft_errors(nets, batch, spec, pattern) -> None:
    student, teacher = nets
    with pytest.raises(ValueError, match=pattern):
        build_objective([{"method": "ft", "weight": 1.0, **spec}], student=student, teacher=teacher,
                        example_input=batch[0])


# ---------------------------------------------------------------- vid


def test_vid_nll_matches_hand_formula() -> None:
    mu = torch.tensor([[[[0.0, 1.0]], [[2.0, 2.0]]]])  # (1, 2, 1, 2)
    t = torch.tensor([[[[1.0, 1.0]], [[0.0, 4.0]]]])
    var = torch.tensor([2.0, 0.5])
    terms = []
    for c in range(2):
        for w in range(2):
            diff = t[0, c, 0, w].item() - mu[0, c, 0, w].item()
            terms.append(0.5 * math.log(var[c].item()) + diff * diff / (2 * var[c].item()))
    # by hand: c0: .5ln2 + 1/4, .5ln2 + 0; c1: .5ln.5 + 4, .5ln.5 + 4 -> mean = (8.25) / 4
    assert sum(terms) / 4 == pytest.approx(8.25 / 4)
    assert vid_nll(mu, t, var).item() == pytest.approx(8.25 / 4, rel=1e-6)


@pytest.mark.parametrize("spatial", [True, False])
def test_vid_term_initial_variance_and_value(spatial: bool) -> None:
    shape_s, shape_t = ((2, 3, 2, 2), (2, 2, 2, 2)) if spatial else ((2, 3), (2, 2))
    s, t = torch.randn(shape_s), torch.randn(shape_t)
    term = VIDTerm(weight=1.0, student="s", teacher="t", init_variance=3.0, min_variance=0.5)
    term.setup(_inputs(s, t))
    assert isinstance(term.regressor[0], nn.Conv2d if spatial else nn.Linear)
    assert term.variance().tolist() == pytest.approx([3.0, 3.0], rel=1e-6)
    # make the regressor output a constant mean per channel: mu = (1, -2)
    last = term.regressor[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([1.0, -2.0]))
    mu = (1.0, -2.0)
    total, count = 0.0, 0
    for value, c in ((v, idx[1]) for idx, v in np.ndenumerate(_np(t))):
        total += 0.5 * math.log(3.0) + (value - mu[c]) ** 2 / (2 * 3.0)
        count += 1
    assert term(_inputs(s, t)).item() == pytest.approx(total / count, rel=1e-5)


def test_vid_gradients_reach_student_regressor_and_variance(nets, batch) -> None:
    spec = {"method": "vid", "weight": 1.0, "student": "stage2", "teacher": "stage2"}
    student, term = _backward(nets, batch, spec)
    assert student.stage2[0].weight.grad.abs().sum() > 0
    assert _nonzero_grad(term.regressor) and term.alpha.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ({"student": "stage2", "teacher": "flat"}, r"vid cannot pair student 'stage2' \(4, 8, 4, 4\) with teacher"),
        ({"student": "stage2", "teacher": "stage2", "init_variance": 1e-6}, r"vid\.init_variance must be > vid\.min"),
        ({"student": "stage2", "teacher": "stage2", "min_variance": -1.0}, r"vid\.min_variance must be > 0"),
    ],
)
def test_vid_errors(nets, batch, spec, pattern) -> None:
    student, teacher = nets
    with pytest.raises(ValueError, match=pattern):
        build_objective([{"method": "vid", "weight": 1.0, **spec}], student=student, teacher=teacher,
                        example_input=batch[0])


# ---------------------------------------------------------------- fsp


def _gram(f1: np.ndarray, f2: np.ndarray) -> np.ndarray:
    """G[n, i, j] = sum over positions of f1[n, i] * f2[n, j] / positions, by loops."""
    n, c1, h, w = f1.shape
    c2 = f2.shape[1]
    g = np.zeros((n, c1, c2))
    for b in range(n):
        for i in range(c1):
            for j in range(c2):
                g[b, i, j] = sum(f1[b, i, y, x] * f2[b, j, y, x] for y in range(h) for x in range(w)) / (h * w)
    return g


def test_fsp_matrix_hand_values_and_pooling() -> None:
    f1 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
    f2 = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[2.0, 2.0], [2.0, 2.0]]]])  # (1, 2, 2, 2)
    # G[0,0] = (1 + 4) / 4, G[0,1] = 2 * (1 + 2 + 3 + 4) / 4
    assert fsp_matrix(f1, f2).tolist() == [[[1.25, 5.0]]]
    big = torch.arange(16.0).view(1, 1, 4, 4)  # pooled 2x2 -> [[2.5, 4.5], [10.5, 12.5]]
    assert fsp_matrix(big, f2).flatten().tolist() == pytest.approx([(2.5 + 12.5) / 4, 2 * 30 / 4])


def test_fsp_term_value_equal_channels_no_adapters() -> None:
    s1, s2 = torch.randn(2, 2, 4, 4), torch.randn(2, 3, 2, 2)
    t1, t2 = torch.randn(2, 2, 2, 2), torch.randn(2, 3, 2, 2)
    term = FSPTerm(weight=1.0, student=["s", "s2"], teacher=["t", "t2"])
    term.setup(_inputs(s1, [t1, t2], s2))
    assert all(isinstance(a, nn.Identity) for a in term.adapters)
    s1_pooled = _np(s1).reshape(2, 2, 2, 2, 2, 2).mean(axis=(3, 5))  # 4x4 -> 2x2 by 2x2 means
    g_s, g_t = _gram(s1_pooled, _np(s2)), _gram(_np(t1), _np(t2))
    expected = float(np.mean((g_s - g_t) ** 2))
    assert term(_inputs(s1, [t1, t2], s2)).item() == pytest.approx(expected, rel=1e-5)


def test_fsp_gradients_reach_student_and_adapters(nets, batch) -> None:
    spec = {"method": "fsp", "weight": 1.0, "student": ["stage1", "stage2"], "teacher": ["stage1", "stage2"]}
    student, term = _backward(nets, batch, spec)
    assert [a[0].out_channels for a in term.adapters] == [8, 16]  # student 4 -> 8, 8 -> 16
    assert student.stage1[0].weight.grad.abs().sum() > 0
    assert _nonzero_grad(term.adapters)


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ({"student": ["stage1"], "teacher": ["stage1", "stage2"]}, r"fsp\.student must be two module paths"),
        ({"student": "stage1", "teacher": ["stage1", "stage2"]}, r"fsp\.student must be two module paths"),
        ({"student": ["stage1", "flat"], "teacher": ["stage1", "stage2"]}, r"fsp needs four \(N, C, H, W\) maps"),
    ],
)
def test_fsp_errors(nets, batch, spec, pattern) -> None:
    student, teacher = nets
    with pytest.raises(ValueError, match=pattern):
        build_objective([{"method": "fsp", "weight": 1.0, **spec}], student=student, teacher=teacher,
                        example_input=batch[0])


# ---------------------------------------------------------------- ab


def test_ab_loss_counts_both_hinge_branches() -> None:
    s = torch.tensor([[[[-2.0, -0.5, 0.5, 2.0]], [[-2.0, -0.5, 0.5, 2.0]]]])  # (1, 2, 1, 4)
    t = torch.tensor([[[[-1.0, -1.0, -1.0, -1.0]], [[1.0, 1.0, 1.0, 1.0]]]])  # channel 0 off, 1 on
    # teacher off (t <= 0), penalise s > -1 by (s + 1)^2: 0, 0.25, 2.25, 9
    # teacher on (t > 0), penalise s <= 1 by (s - 1)^2: 9, 2.25, 0.25, 0
    expected = (0 + 0.25 + 2.25 + 9 + 9 + 2.25 + 0.25 + 0) / 8
    assert ab_loss(s, t, margin=1.0).item() == pytest.approx(expected)
    # t == 0 counts as off; a larger margin widens both branches
    assert ab_loss(torch.tensor([[[[0.0]]]]), torch.tensor([[[[0.0]]]]), 2.0).item() == pytest.approx(4.0)


def test_ab_term_value_with_identity_connector() -> None:
    s = torch.tensor([[[[-2.0, 0.5]], [[0.5, 2.0]]]])  # (1, 2, 1, 2)
    t = torch.tensor([[[[1.0, -1.0]], [[3.0, 0.0]]]])
    term = ABTerm(weight=1.0, student="s", teacher="t", margin=1.0)
    term.setup(_inputs(s, t))
    assert isinstance(term.connector[0], nn.Conv2d)  # always present, also for equal channels
    conv, bn = term.connector
    with torch.no_grad():
        conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        bn.weight.fill_(math.sqrt(1.0 + bn.eps))  # eval BN with fresh stats: x * w / sqrt(1 + eps)
    term.eval()
    # (s, t): (-2, on) -> 9; (0.5, off) -> 2.25; (0.5, on) -> 0.25; (2, off) -> 9
    assert term(_inputs(s, t)).item() == pytest.approx((9 + 2.25 + 0.25 + 9) / 4, rel=1e-5)


def test_ab_gradients_reach_student_and_connector(nets, batch) -> None:
    spec = {"method": "ab", "weight": 1.0, "student": "stage1.1", "teacher": "stage1.1", "margin": 0.5}
    student, term = _backward(nets, batch, spec)
    assert student.stage1[0].weight.grad.abs().sum() > 0
    assert _nonzero_grad(term.connector)


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ({"student": "flat", "teacher": "stage1.1"}, r"ab cannot pair student 'flat' \(4, 8\)"),
        ({"student": "stage1.1", "teacher": "stage1.1", "margin": 0}, r"ab\.margin must be > 0"),
    ],
)
def test_ab_errors(nets, batch, spec, pattern) -> None:
    student, teacher = nets
    with pytest.raises(ValueError, match=pattern):
        build_objective([{"method": "ab", "weight": 1.0, **spec}], student=student, teacher=teacher,
                        example_input=batch[0])


# ---------------------------------------------------------------- crd


def _info_nce_by_hand(a: np.ndarray, p: np.ndarray, memory: np.ndarray, temp: float) -> float:
    total = 0.0
    for i in range(len(a)):
        others = [float(a[i] @ p[j]) for j in range(len(p))] + [float(a[i] @ m) for m in memory]
        denom = sum(math.exp(v / temp) for v in others)
        total += -math.log(math.exp(float(a[i] @ p[i]) / temp) / denom)
    return total / len(a)


def _unit(n: int, d: int) -> torch.Tensor:
    return nn.functional.normalize(torch.randn(n, d), dim=1)


def test_info_nce_matches_hand_formula_and_ignores_masked_memory() -> None:
    a, p, memory = _unit(3, 4), _unit(3, 4), _unit(5, 4)
    valid = torch.tensor([True, True, False, True, False])
    got = info_nce(a, p, memory, 0.5, valid).item()
    assert got == pytest.approx(_info_nce_by_hand(_np(a), _np(p), _np(memory)[[0, 1, 3]], 0.5), rel=1e-5)
    assert info_nce(a, p, None, 0.5).item() == pytest.approx(
        _info_nce_by_hand(_np(a), _np(p), np.zeros((0, 4)), 0.5), rel=1e-5)


def test_crd_memory_queue_and_value() -> None:
    term = CRDTerm(weight=1.0, student="s", teacher="t", embed_dim=4, temperature=0.5, memory_size=6)
    s1, t1 = torch.randn(4, 3, 2, 2), torch.randn(4, 5)
    term.setup(_inputs(s1, t1))
    assert int(term.memory_count) == 0  # starts empty
    term.eval()
    e_s1, e_t1 = term.embed(_inputs(s1, t1))
    # empty memory: in-batch negatives only; eval forwards do not enqueue
    expected = 0.5 * (_info_nce_by_hand(_np(e_s1), _np(e_t1), np.zeros((0, 4)), 0.5)
                      + _info_nce_by_hand(_np(e_t1), _np(e_s1), np.zeros((0, 4)), 0.5))
    assert term(_inputs(s1, t1)).item() == pytest.approx(expected, rel=1e-5)
    assert int(term.memory_count) == 0
    term.train()
    term(_inputs(s1, t1))
    assert (int(term.memory_count), int(term.memory_ptr)) == (4, 4)
    assert torch.allclose(term.memory_teacher[:4], e_t1) and torch.allclose(term.memory_student[:4], e_s1)
    # second batch: negatives include the memory of the first (teacher memory for student anchors)
    s2, t2 = torch.randn(4, 3, 2, 2), torch.randn(4, 5)
    e_s2, e_t2 = term.embed(_inputs(s2, t2))
    expected = 0.5 * (_info_nce_by_hand(_np(e_s2), _np(e_t2), _np(e_t1), 0.5)
                      + _info_nce_by_hand(_np(e_t2), _np(e_s2), _np(e_s1), 0.5))
    assert term(_inputs(s2, t2)).item() == pytest.approx(expected, rel=1e-5)
    # the queue wraps: rows 4, 5 then 0, 1 hold the second batch; rows 2, 3 still the first
    assert (int(term.memory_count), int(term.memory_ptr)) == (6, 2)
    assert torch.allclose(term.memory_teacher[[4, 5, 0, 1]], e_t2)
    assert torch.allclose(term.memory_teacher[2:4], e_t1[2:4])


def test_crd_batch_larger_than_memory_keeps_the_last_rows() -> None:
    term = CRDTerm(weight=1.0, student="s", teacher="t", embed_dim=2, memory_size=3)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    term.setup(_inputs(s, t))
    term(_inputs(s, t))
    e_s, _ = term.embed(_inputs(s, t))
    assert (int(term.memory_count), int(term.memory_ptr)) == (3, 0)
    assert torch.allclose(term.memory_student, e_s[1:])


def test_crd_gradients_reach_student_and_embeddings(nets, batch) -> None:
    spec = {"method": "crd", "weight": 1.0, "student": "stage2", "teacher": "flat", "embed_dim": 8,
            "memory_size": 16}
    student, term = _backward(nets, batch, spec)
    assert student.stage2[0].weight.grad.abs().sum() > 0
    assert _nonzero_grad(term.embed_student) and _nonzero_grad(term.embed_teacher)
    assert int(term.memory_count) == 4
    assert {"memory_teacher", "memory_student", "memory_count", "memory_ptr"} <= set(term.state_dict())


def test_crd_errors(nets, batch) -> None:
    student, teacher = nets
    spec = {"method": "crd", "weight": 1.0, "student": "stage2", "teacher": "stage2"}
    with pytest.raises(ValueError, match=r"need a teacher"):
        build_objective([spec], student=student, teacher=None, example_input=batch[0])
    with pytest.raises(ValueError, match=r"crd\.temperature must be > 0"):
        build_objective([{**spec, "temperature": 0.0}], student=student, teacher=teacher, example_input=batch[0])
    with pytest.raises(ValueError, match=r"crd\.memory_size must be >= 1"):
        build_objective([{**spec, "memory_size": 0}], student=student, teacher=teacher, example_input=batch[0])
    term = CRDTerm(weight=1.0, student="s", teacher="t")
    with pytest.raises(ValueError, match=r"crd cannot pair student 's' \(2, 3, 4\)"):
        term.setup(_inputs(torch.randn(2, 3, 4), torch.randn(2, 5)))


# ---------------------------------------------------------------- all together


def test_all_feature_terms_under_autocast(nets, batch) -> None:
    student, teacher = nets
    images, targets = batch
    specs = [
        {"method": "ft", "weight": 1.0, "student": "stage2", "teacher": "stage2", "paraphraser_steps": 1},
        {"method": "vid", "weight": 1.0, "student": "stage2", "teacher": "stage2"},
        {"method": "fsp", "weight": 1.0, "student": ["stage1", "stage2"], "teacher": ["stage1", "stage2"]},
        {"method": "ab", "weight": 1.0, "student": "stage1.1", "teacher": "stage1.1"},
        {"method": "crd", "weight": 1.0, "student": "stage2", "teacher": "stage2", "embed_dim": 8, "memory_size": 8},
    ]
    with build_objective(specs, student=student, teacher=teacher, example_input=images) as obj:
        obj.train()
        for _ in range(2):  # the second step is ft's factor phase and crd's first with memory
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = obj(images, targets)
            assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
            assert set(out.parts) == {"ft", "vid", "fsp", "ab", "crd"}
            out.loss.backward()
    assert student.stage1[0].weight.grad.abs().sum() > 0
