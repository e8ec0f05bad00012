"""Tests of the relation-based distillation terms (sp, rkd, pkt, cc, nst).

Expected values are computed independently with explicit loops over samples and channels
(plain Python / numpy), from the papers' formulas; gradients and errors go through
`build_objective` on tiny conv nets.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from compresskit.distill import build_objective
from compresskit.distill.losses import TermInputs
from compresskit.distill.relation import TERMS, CCTerm, NSTTerm, PKTTerm, RKDTerm, SPTerm

CLASSES = 3


class RelNet(nn.Module):
    """Tiny conv net with taps of every layout: `stage1`/`stage2` (N, C, H, W), `tokens`
    (N, C, H*W), `embed` (N, C)."""

    def __init__(self, width: int, stride1: int = 1) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, width, 3, stride=stride1, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.tokens = nn.Flatten(2)
        self.embed = nn.Linear(2 * width, 2 * width)
        self.fc = nn.Linear(2 * width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(self.tokens(self.stage2(self.stage1(x))).mean(dim=2)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def nets() -> tuple[RelNet, RelNet]:
    """Student (width 2: 8x8 then 4x4 maps) and a wider teacher (width 3: 4x4 then 2x2)."""
    return RelNet(2), RelNet(3, stride1=2)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8)


def _inputs(s: torch.Tensor, t: torch.Tensor) -> TermInputs:
    """TermInputs holding one student feature 's' and one teacher feature 't'."""
    return TermInputs(logits=torch.zeros(s.shape[0], CLASSES), targets=None, teacher_logits=None,
                      student_features={"s": s}, teacher_features={"t": t})


def _run(term, s: torch.Tensor, t: torch.Tensor) -> float:
    sample = _inputs(s, t)
    term.setup(sample)
    return term(sample).item()


def _huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1.0 else abs(x) - 0.5


def _gap(f: np.ndarray) -> np.ndarray:
    """Global average pooling of (N, C, H, W) by explicit loops, to (N, C)."""
    n, c = f.shape[:2]
    return np.array([[f[i, k].sum() / f[i, k].size for k in range(c)] for i in range(n)])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / math.sqrt(float(np.dot(v, v)))


# ---------------------------------------------------------------- registry and flags


def test_terms_order_and_flags() -> None:
    assert list(TERMS) == ["sp", "rkd", "pkt", "cc", "nst"]
    for name, cls in TERMS.items():
        assert cls.method == name and cls.needs_teacher and cls.needs_features
        assert not cls.teacher_logits_only
        assert cls.needs_relations == (name != "nst")


# ---------------------------------------------------------------- values by hand


def test_sp_matches_hand_computed_gram_matrices() -> None:
    s = [[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]
    t = [[2.0, 1.0], [0.0, 1.0], [1.0, -1.0]]  # as (3, 2, 1, 1) maps: flattening gives these rows
    n = len(s)

    def gram_rows(f: list[list[float]]) -> list[list[float]]:
        g = [[sum(a * b for a, b in zip(fi, fj, strict=True)) for fj in f] for fi in f]
        return [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in g]

    g_s, g_t = gram_rows(s), gram_rows(t)
    expected = sum((g_s[i][j] - g_t[i][j]) ** 2 for i in range(n) for j in range(n)) / n**2
    got = _run(SPTerm(weight=1.0, student="s", teacher="t"),
               torch.tensor(s), torch.tensor(t).reshape(3, 2, 1, 1))
    assert got == pytest.approx(expected, rel=1e-5)
    assert expected > 0.01


def _rkd_expected(s: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """(loss_D, loss_A) of Park et al. by loops over pairs i != j and distinct triplets."""
    n = len(s)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]

    def psi_d(e: np.ndarray) -> dict[tuple[int, int], float]:
        dist = {(i, j): float(np.linalg.norm(e[i] - e[j])) for i, j in pairs}
        mu = sum(dist.values()) / len(dist)
        return {k: v / mu for k, v in dist.items()}

    triplets = [(i, j, k) for i, j, k in itertools.product(range(n), repeat=3) if len({i, j, k}) == 3]

    def psi_a(e: np.ndarray) -> dict[tuple[int, int, int], float]:
        return {(i, j, k): float(np.dot(_unit(e[i] - e[j]), _unit(e[k] - e[j]))) for i, j, k in triplets}

    ds, dt = psi_d(s), psi_d(t)
    as_, at = psi_a(s), psi_a(t)
    loss_d = sum(_huber(ds[p] - dt[p]) for p in pairs) / len(pairs)
    loss_a = sum(_huber(as_[p] - at[p]) for p in triplets) / len(triplets)
    return loss_d, loss_a


def test_rkd_matches_hand_computed_distances_and_angles() -> None:
    # student far from uniform (psi_D differences above 1 exercise Huber's linear part)
    s = np.array([[0.0, 0.0], [1.0, 0.0], [12.0, 0.0], [0.5, 3.0]])
    t_map = np.arange(4 * 3 * 2 * 2, dtype=np.float64).reshape(4, 3, 2, 2) % 7 - 3.0
    loss_d, loss_a = _rkd_expected(s, _gap(t_map))
    assert max(abs(v) for v in (loss_d, loss_a)) > 0.01
    s_t, t_t = torch.tensor(s, dtype=torch.float32), torch.tensor(t_map, dtype=torch.float32)
    got = _run(RKDTerm(weight=1.0, student="s", teacher="t", distance_weight=2.0, angle_weight=3.0), s_t, t_t)
    assert got == pytest.approx(2.0 * loss_d + 3.0 * loss_a, rel=1e-5)
    only_d = _run(RKDTerm(weight=1.0, student="s", teacher="t", distance_weight=1.0, angle_weight=0.0), s_t, t_t)
    assert only_d == pytest.approx(loss_d, rel=1e-5)


def test_rkd_teacher_gets_no_gradient_and_small_batches_are_finite() -> None:
    term = RKDTerm(weight=1.0, student="s", teacher="t")
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    term(_inputs(s, t)).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0
    # two samples: one distance (psi = 1 on both sides) and no triplet; one sample: no pair
    for n in (1, 2):
        s = torch.randn(n, 5, requires_grad=True)
        loss = term(_inputs(s, torch.randn(n, 6)))
        loss.backward()
        assert loss.item() == pytest.approx(0.0, abs=1e-6)
        assert torch.isfinite(s.grad).all()


def test_pkt_matches_hand_computed_conditional_probabilities() -> None:
    s = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, -1.0, 2.0]])
    t_map = np.array([[[[1.0, 3.0]], [[0.0, 0.0]]], [[[0.0, 2.0]], [[1.0, 1.0]]], [[[-1.0, -1.0]], [[2.0, 0.0]]]])
    t = _gap(t_map)  # (3, 2)
    n, eps = len(s), 1e-7

    def probs(e: np.ndarray) -> list[list[float]]:
        u = [_unit(v) for v in e]
        k = [[(float(np.dot(u[i], u[j])) + 1.0) / 2.0 for j in range(n)] for i in range(n)]
        return [[v / sum(row) for v in row] for row in k]

    p_s, p_t = probs(s), probs(t)
    expected = sum(p_t[i][j] * math.log((p_t[i][j] + eps) / (p_s[i][j] + eps))
                   for i in range(n) for j in range(n)) / n**2
    got = _run(PKTTerm(weight=1.0, student="s", teacher="t"),
               torch.tensor(s, dtype=torch.float32), torch.tensor(t_map, dtype=torch.float32))
    assert got == pytest.approx(expected, rel=1e-4)
    assert expected > 1e-3


def test_cc_matches_hand_computed_taylor_kernel() -> None:
    gamma, order = 0.7, 3
    term = CCTerm(weight=1.0, student="s", teacher="t", embed_dim=2, gamma=gamma, order=order)
    s = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0], [2.0, -1.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 2.0]]).reshape(3, 2, 1, 1)
    sample = _inputs(s, t)
    term.setup(sample)
    w_s = [[1.0, 0.0, 1.0], [0.0, 2.0, -1.0]]
    b_s = [0.5, 0.0]
    w_t = [[1.0, 1.0], [-1.0, 0.5]]
    b_t = [0.0, 0.2]
    with torch.no_grad():
        term.embed_s.weight.copy_(torch.tensor(w_s))
        term.embed_s.bias.copy_(torch.tensor(b_s))
        term.embed_t.weight.copy_(torch.tensor(w_t))
        term.embed_t.bias.copy_(torch.tensor(b_t))

    def corr(f: np.ndarray, w: list[list[float]], b: list[float]) -> np.ndarray:
        e = [_unit(np.array(w) @ v + np.array(b)) for v in f]
        c = np.zeros((len(f), len(f)))
        for i, j in itertools.product(range(len(f)), repeat=2):
            x = float(np.dot(e[i], e[j]))
            c[i, j] = sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * x**p
                          for p in range(order + 1))
        return c

    c_s, c_t = corr(s.numpy(), w_s, b_s), corr(t.flatten(1).numpy(), w_t, b_t)
    expected = float(((c_s - c_t) ** 2).sum()) / 9
    assert term(sample).item() == pytest.approx(expected, rel=1e-5)
    assert expected > 1e-4


def test_cc_high_order_approaches_the_gaussian_kernel() -> None:
    """The Taylor series is of exp(-gamma ||e_i - e_j||^2) for unit embeddings."""
    from compresskit.distill.relation import cc_correlation

    e = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-2.0, 0.5]], dtype=torch.float64)
    u = e / e.norm(dim=1, keepdim=True)
    gamma = 0.4
    exact = np.array([[math.exp(-gamma * float(((u[i] - u[j]) ** 2).sum())) for j in range(3)] for i in range(3)])
    approx = cc_correlation(e, gamma, order=8).numpy()
    assert np.allclose(approx, exact, atol=1e-6)


def _nst_kernel(x: np.ndarray, y: np.ndarray, kernel: str) -> float:
    if kernel == "poly":
        return float(np.dot(x, y)) ** 2
    if kernel == "linear":
        return float(np.dot(x, y))
    return math.exp(-float(np.dot(x - y, x - y)) / 2.0)


@pytest.mark.parametrize("kernel", ["poly", "linear", "gaussian"])
def test_nst_matches_hand_computed_mmd(kernel: str) -> None:
    rng = np.random.default_rng(0)
    s_map = rng.normal(size=(2, 3, 4, 4))  # pooled 2x2 to the teacher's size
    t_map = rng.normal(size=(2, 2, 2, 2))
    pooled = np.array([[[[s_map[n, c, 2 * h:2 * h + 2, 2 * w:2 * w + 2].mean() for w in range(2)] for h in range(2)]
                        for c in range(3)] for n in range(2)])
    total = 0.0
    for n in range(2):
        s = [_unit(pooled[n, c].reshape(-1)) for c in range(3)]
        t = [_unit(t_map[n, c].reshape(-1)) for c in range(2)]
        k_ss = sum(_nst_kernel(a, b, kernel) for a in s for b in s) / (len(s) * len(s))
        k_tt = sum(_nst_kernel(a, b, kernel) for a in t for b in t) / (len(t) * len(t))
        k_st = sum(_nst_kernel(a, b, kernel) for a in s for b in t) / (len(s) * len(t))
        total += k_ss + k_tt - 2.0 * k_st
    expected = total / 2
    got = _run(NSTTerm(weight=1.0, student="s", teacher="t", kernel=kernel),
               torch.tensor(s_map, dtype=torch.float32), torch.tensor(t_map, dtype=torch.float32))
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert expected > 1e-4


# ---------------------------------------------------------------- through build_objective

GRAD_TERMS = [
    {"method": "sp", "weight": 1.0, "student": "stage2", "teacher": "stage1"},
    {"method": "rkd", "weight": 1.0, "student": "embed", "teacher": "stage2"},
    {"method": "pkt", "weight": 1.0, "student": "stage2", "teacher": "embed"},
    {"method": "cc", "weight": 1.0, "student": "embed", "teacher": "stage2", "embed_dim": 4},
    {"method": "nst", "weight": 1.0, "student": "stage1", "teacher": "stage2"},
    {"method": "nst", "weight": 1.0, "student": "stage2", "teacher": "stage1", "kernel": "gaussian"},
]


@pytest.mark.parametrize("term", GRAD_TERMS, ids=lambda t: f"{t['method']}-{t.get('kernel', '')}")
def test_gradients_reach_student_and_adapters_not_teacher(nets, images, term) -> None:
    student, teacher = nets
    with build_objective([term], student=student, teacher=teacher, example_input=images) as obj:
        out = obj(images, None)
        assert math.isfinite(out.loss.item()) and out.loss.item() > 0
        out.loss.backward()
    grads = [p.grad for p in student.stage1.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in teacher.parameters())
    adapters = list(obj.parameters())
    if term["method"] == "cc":
        assert len(adapters) == 4  # two Linear layers: weight and bias each
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters)
    else:
        assert adapters == []


def test_relation_terms_under_autocast_return_float32(nets, images) -> None:
    student, teacher = nets
    with build_objective(GRAD_TERMS, student=student, teacher=teacher, example_input=images) as obj:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = obj(images, None)
        assert out.loss.dtype == torch.float32 and math.isfinite(out.loss.item())
        out.loss.backward()


@pytest.mark.parametrize("cls", list(TERMS.values()))
def test_losses_keep_float32_precision_under_autocast(cls) -> None:
    """Large flattened features: half-precision Gram matrices would overflow (sp) or round.

    cc's linear adapters are layers like the student's and do run in half precision under
    autocast; only its correlation matrices are float32, hence its looser tolerance."""
    s = torch.rand(4, 8, 16, 16) * 30.0
    t = torch.rand(4, 6, 16, 16) * 30.0
    term = cls(weight=1.0, student="s", teacher="t")
    plain = _run(term, s, t)
    with torch.autocast("cpu", dtype=torch.float16):
        autocast = term(_inputs(s, t))
    assert autocast.dtype == torch.float32
    assert autocast.item() == pytest.approx(plain, rel=2e-2 if cls is CCTerm else 1e-5)


@pytest.mark.parametrize(
    ("term", "pattern"),
    [
        ({"method": "sp", "weight": 1.0, "student": "tokens", "teacher": "stage1"},
         r"sp cannot pair student 'tokens' \(4, 4, 16\) with teacher 'stage1' \(4, 3, 4, 4\)"),
        ({"method": "rkd", "weight": 1.0, "student": "embed", "teacher": "tokens"},
         r"rkd cannot pair student 'embed' \(4, 4\) with teacher 'tokens' \(4, 6, 4\)"),
        ({"method": "pkt", "weight": 1.0, "student": "tokens", "teacher": "embed"}, r"pkt cannot pair .*'tokens'"),
        ({"method": "cc", "weight": 1.0, "student": "stage1", "teacher": "tokens"}, r"cc cannot pair .*'tokens'"),
        ({"method": "nst", "weight": 1.0, "student": "embed", "teacher": "stage2"},
         r"nst cannot pair student 'embed' \(4, 4\) with teacher 'stage2' \(4, 6, 2, 2\): .*\(N, C, H, W\)"),
        ({"method": "rkd", "weight": 1.0, "student": "embed", "teacher": "embed", "distance_weight": -1.0},
         r"rkd\.distance_weight must be >= 0"),
        ({"method": "rkd", "weight": 1.0, "student": "embed", "teacher": "embed", "angle_weight": "x"},
         r"rkd\.angle_weight must be a finite number"),
        ({"method": "cc", "weight": 1.0, "student": "embed", "teacher": "embed", "gamma": 0.0},
         r"cc\.gamma must be > 0"),
        ({"method": "cc", "weight": 1.0, "student": "embed", "teacher": "embed", "order": -1},
         r"cc\.order must be an integer >= 0"),
        ({"method": "cc", "weight": 1.0, "student": "embed", "teacher": "embed", "embed_dim": 1.5},
         r"cc\.embed_dim must be an integer >= 2"),
        ({"method": "nst", "weight": 1.0, "student": "stage1", "teacher": "stage1", "kernel": "rbf"},
         r"nst\.kernel must be one of"),
        ({"method": "sp", "weight": 1.0, "student": "", "teacher": "stage1"}, r"sp\.student must be a module path"),
    ],
)
def test_bad_shapes_and_options_raise(nets, images, term, pattern) -> None:
    student, teacher = nets
    with pytest.raises(ValueError, match=pattern):
        build_objective([term], student=student, teacher=teacher, example_input=images)


@pytest.mark.parametrize("method", list(TERMS))
def test_missing_teacher_is_rejected(nets, images, method) -> None:
    term = {"method": method, "weight": 1.0, "student": "stage1", "teacher": "stage1"}
    with pytest.raises(ValueError, match=rf"\['{method}'\] need a teacher"):
        build_objective([term], student=nets[0], teacher=None, example_input=images)


@pytest.mark.parametrize("cls", list(TERMS.values()))
def test_setup_rejects_mismatched_batch_sizes(cls) -> None:
    term = cls(weight=1.0, student="s", teacher="t")
    with pytest.raises(ValueError, match=rf"{cls.method} cannot pair student 's' \(4, 2, 3, 3\) .*batch sizes"):
        term.setup(_inputs(torch.randn(4, 2, 3, 3), torch.randn(3, 2, 3, 3)))
