"""Tests of compresskit.distill: loss values from hand-written formulas, taps, the objective."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from compresskit.distill import (
    FeatureTaps,
    at_loss,
    attention_map,
    build_objective,
    fitnet_loss,
    kd_loss,
    methods,
)

CLASSES = 5


class TwoStageNet(nn.Module):
    """Tiny two-stage conv classifier; `width` and `stride1` make student/teacher differ."""

    def __init__(self, width: int, stride1: int = 1) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=stride1, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.stage2 = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(2 * width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.pool(self.stage2(self.stage1(x)))))


class CountingNet(TwoStageNet):
    """TwoStageNet that counts its forward calls."""

    def __init__(self, width: int, stride1: int = 1) -> None:
        super().__init__(width, stride1)
        self.calls = 0
        self.grad_enabled: bool | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.grad_enabled = torch.is_grad_enabled()
        return super().forward(x)


class ExplodingNet(nn.Module):
    """A teacher that must never run."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("teacher forward was called")


ALL_TERMS = [
    {"method": "ce", "weight": 0.1, "label_smoothing": 0.1},
    {"method": "kd", "weight": 0.9, "temperature": 4.0},
    {"method": "fitnet", "weight": 1.0, "student": "stage2", "teacher": "stage2"},
    {"method": "at", "weight": 100.0, "student": "stage1", "teacher": "stage1", "p": 2},
]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def nets() -> tuple[CountingNet, CountingNet]:
    """Student (width 4, 8x8 then 4x4 maps) and a wider teacher (width 8, 4x4 then 2x2)."""
    return CountingNet(4), CountingNet(8, stride1=2)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


# ---------------------------------------------------------------- loss values by hand


def _softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def test_kd_loss_matches_hand_computed_kl() -> None:
    s = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    t = [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]]
    temp = 2.0
    kl_sum = 0.0
    for s_row, t_row in zip(s, t, strict=True):
        p_s = _softmax([v / temp for v in s_row])
        p_t = _softmax([v / temp for v in t_row])
        kl_sum += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s, strict=True))
    expected = kl_sum / len(s) * temp * temp
    got = kd_loss(torch.tensor(s), torch.tensor(t), temp)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(torch.tensor(t), torch.tensor(t), temp).item() == pytest.approx(0.0, abs=1e-6)


def test_fitnet_loss_pools_larger_map_and_averages_squares() -> None:
    student = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]]])  # 2x2, mean 3
    teacher = torch.tensor([[[[5.0]]]])  # 1x1
    assert fitnet_loss(student, teacher).item() == pytest.approx((3.0 - 5.0) ** 2)
    vec_s, vec_t = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 4.0], [1.0, 0.0]])
    expected = ((1 - 0) ** 2 + (2 - 4) ** 2 + (0 - 1) ** 2 + 0) / 4
    assert fitnet_loss(vec_s, vec_t).item() == pytest.approx(expected)


def _hand_attention(fmap: list[list[list[float]]], p: float) -> list[float]:
    """Channel mean of |f|^p per position (row-major), L2-normalised. fmap is [C][H][W]."""
    h, w = len(fmap[0]), len(fmap[0][0])
    raw = [sum(abs(ch[i][j]) ** p for ch in fmap) / len(fmap) for i in range(h) for j in range(w)]
    norm = math.sqrt(sum(v * v for v in raw))
    return [v / norm for v in raw]


def test_at_loss_matches_hand_computed_maps() -> None:
    fs = [[[1.0, -2.0], [0.0, 1.0]], [[3.0, 0.0], [1.0, -1.0]]]  # C=2, 2x2
    ft = [[[0.5, 1.0], [2.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]], [[0.0, 2.0], [0.0, 1.0]]]  # C=3
    for p in (2.0, 1.0):
        a_s, a_t = _hand_attention(fs, p), _hand_attention(ft, p)
        expected = sum((x - y) ** 2 for x, y in zip(a_s, a_t, strict=True)) / 4  # N=1, HW=4
        got = at_loss(torch.tensor([fs]), torch.tensor([ft]), p)
        assert got.item() == pytest.approx(expected, rel=1e-5)
    raw = attention_map(torch.tensor([fs]), 2.0)
    assert raw.shape == (1, 1, 2, 2)
    assert raw[0, 0, 0, 0].item() == pytest.approx((1 + 9) / 2)


def test_at_loss_pools_attention_to_the_smaller_map() -> None:
    fs = torch.arange(16.0).reshape(1, 1, 4, 4)
    ft = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    sq = [[v * v for v in row] for row in fs[0, 0].tolist()]
    pooled = [
        sum(sq[2 * i + a][2 * j + b] for a in range(2) for b in range(2)) / 4
        for i in range(2)
        for j in range(2)
    ]
    norm_s = math.sqrt(sum(v * v for v in pooled))
    a_t = _hand_attention([ft[0, 0].tolist()], 2.0)
    expected = sum((x / norm_s - y) ** 2 for x, y in zip(pooled, a_t, strict=True)) / 4
    assert at_loss(fs, ft).item() == pytest.approx(expected, rel=1e-5)


def test_ce_term_applies_label_smoothing(nets, batch) -> None:
    student, _ = nets
    images, targets = batch
    eps = 0.2
    terms = [{"method": "ce", "weight": 1.0, "label_smoothing": eps}]
    with build_objective(terms, student=student, teacher=None, example_input=images) as obj:
        out = obj(images, targets)
    total = 0.0
    for row, y in zip(out.logits.tolist(), targets.tolist(), strict=True):
        logp = [math.log(q) for q in _softmax(row)]
        total += (1 - eps) * -logp[y] + eps * sum(-v for v in logp) / len(logp)
    assert out.loss.item() == pytest.approx(total / len(targets), rel=1e-5)


# ---------------------------------------------------------------- taps


def test_taps_capture_remove_and_context_manager(nets, batch) -> None:
    student, _ = nets
    images, _ = batch
    with FeatureTaps(student, ["stage1", "stage2.0"]) as taps:
        student.eval()
        student(images)
        assert taps.features["stage1"].shape == (4, 4, 8, 8)
        expected = student.stage2[0](student.stage1(images))
        assert torch.equal(taps.features["stage2.0"], expected)
        taps.clear()
        assert taps.features == {}
        assert _hook_count(student) == 2
    assert _hook_count(student) == 0
    student(images)
    assert taps.features == {}


def test_taps_unknown_path_names_it_and_suggests_neighbours(nets) -> None:
    student, _ = nets
    with pytest.raises(ValueError, match=r"'stage2\.7'.*stage2\.0.*stage2\.2"):
        FeatureTaps(student, ["stage2.7"])
    with pytest.raises(ValueError, match=r"'layer3'.*stage1.*fc"):
        FeatureTaps(student, ["layer3"])
    many = nn.Sequential(*[nn.Identity() for _ in range(20)])
    with pytest.raises(ValueError, match=r"'30'.*: 0, 1, 2, 3, 4, \.\.\., 18, 19 \("):
        FeatureTaps(many, ["30"])
    with pytest.raises(ValueError, match="fc.weight"):
        FeatureTaps(student, ["fc.weight"])
    assert _hook_count(student) == 0


def test_taps_resolve_paths_inside_wrappers(nets, batch) -> None:
    student, _ = nets
    with FeatureTaps(nn.DataParallel(student), ["stage1"]) as taps:
        student(batch[0])
        assert taps.features["stage1"].shape[1] == 4


# ---------------------------------------------------------------- objective


def test_objective_parts_are_weighted_and_sum_to_loss(nets, batch) -> None:
    student, teacher = nets
    images, targets = batch
    obj = build_objective(ALL_TERMS, student=student, teacher=teacher, example_input=images)
    with obj:
        out = obj(images, targets)
        assert list(out.parts) == ["ce", "kd", "fitnet", "at"]
        assert out.loss.item() == pytest.approx(sum(out.parts.values()), rel=1e-5)
        with torch.no_grad():
            t_logits = teacher(images)
        kd = kd_loss(out.logits.detach(), t_logits, 4.0).item()
        assert out.parts["kd"] == pytest.approx(0.9 * kd, rel=1e-5)
        assert out.logits.shape == (4, CLASSES)
        assert all(v > 0 for v in out.parts.values())


def test_student_and_teacher_run_once_per_step(nets, batch) -> None:
    student, teacher = nets
    images, targets = batch
    with build_objective(ALL_TERMS, student=student, teacher=teacher, example_input=images) as obj:
        student.calls = teacher.calls = 0
        for _ in range(3):
            obj(images, targets)
    assert (student.calls, teacher.calls) == (3, 3)
    assert student.grad_enabled and teacher.grad_enabled is False


def test_gradients_reach_student_and_adapters_not_teacher(nets, batch) -> None:
    student, teacher = nets
    images, targets = batch
    with build_objective(ALL_TERMS, student=student, teacher=teacher, example_input=images) as obj:
        student.train()
        obj.train()
        obj(images, targets).loss.backward()
    adapter_params = list(obj.parameters())
    assert adapter_params, "fitnet with 8 vs 16 channels must create a regressor"
    for name, param in [*student.named_parameters(), *obj.named_parameters()]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_state_dict_holds_only_adapters(nets, batch) -> None:
    student, teacher = nets
    images, _ = batch
    with build_objective(ALL_TERMS, student=student, teacher=teacher, example_input=images) as obj:
        keys = list(obj.state_dict())
        # 1x1 conv 8->16 without bias, then BN(16)
        assert obj.terms[2].regressor[0].weight.shape == (16, 8, 1, 1)
        assert sum(p.numel() for p in obj.parameters()) == 16 * 8 + 2 * 16
    assert keys and all(k.startswith("terms.2.regressor.") for k in keys)
    assert student not in list(obj.modules()) and teacher not in list(obj.modules())


def test_zero_loss_when_teacher_equals_student(nets, batch) -> None:
    student, _ = nets
    images, _ = batch
    student.eval()
    teacher = copy.deepcopy(student)
    terms = [
        {"method": "kd", "weight": 1.0, "temperature": 3.0},
        {"method": "fitnet", "weight": 1.0, "student": "stage2", "teacher": "stage2"},
        {"method": "fitnet", "weight": 1.0, "student": "flat", "teacher": "flat"},
        {"method": "at", "weight": 1.0, "student": "stage1", "teacher": "stage1"},
    ]
    with build_objective(terms, student=student, teacher=teacher, example_input=images) as obj:
        assert list(obj.parameters()) == []  # equal channels: no regressor
        out = obj(images, None)
    assert list(out.parts) == ["kd", "fitnet", "fitnet_2", "at"]
    assert out.loss.item() == pytest.approx(0.0, abs=1e-6)


def test_ce_only_objective_never_runs_teacher(nets, batch) -> None:
    student, _ = nets
    images, targets = batch
    teacher = ExplodingNet()
    terms = [{"method": "ce", "weight": 1.0}]
    with build_objective(terms, student=student, teacher=teacher, example_input=images) as obj:
        assert not obj.needs_teacher and obj.teacher is None
        out = obj(images, targets)
    assert out.loss.item() > 0
    assert all(p.requires_grad for p in teacher.parameters())  # unused teacher is not frozen


def test_close_removes_hooks_and_blocks_feature_forward(nets, batch) -> None:
    student, teacher = nets
    images, targets = batch
    obj = build_objective(ALL_TERMS, student=student, teacher=teacher, example_input=images)
    assert _hook_count(student) == 2 and _hook_count(teacher) == 2
    obj.close()
    obj.close()
    assert _hook_count(student) == 0 and _hook_count(teacher) == 0
    with pytest.raises(RuntimeError, match="closed"):
        obj(images, targets)
    with build_objective(ALL_TERMS, student=student, teacher=teacher, example_input=images):
        assert _hook_count(student) == 2
    assert _hook_count(student) == 0 and _hook_count(teacher) == 0


def test_dry_run_keeps_bn_stats_and_modes_teacher_frozen(nets, batch) -> None:
    student, teacher = nets
    images, targets = batch
    student.train()
    before = student.stage1[1].running_mean.clone()
    obj = build_objective(ALL_TERMS, student=student, teacher=teacher, example_input=images)
    assert torch.equal(student.stage1[1].running_mean, before)
    assert student.training and all(m.training for m in student.modules())
    assert not teacher.training
    teacher.train()
    t_mean = teacher.stage1[1].running_mean.clone()
    with obj:
        obj(images, targets)
    assert not teacher.training
    assert torch.equal(teacher.stage1[1].running_mean, t_mean)


def test_channels_last_and_autocast(nets, batch) -> None:
    student, teacher = nets
    images, targets = batch
    student.eval()
    with build_objective(ALL_TERMS, student=student, teacher=teacher, example_input=images) as obj:
        obj.eval()
        ref = obj(images, targets).loss.item()
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
        out = obj(images.contiguous(memory_format=torch.channels_last), targets)
        assert out.loss.item() == pytest.approx(ref, rel=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = obj(images, targets)
        assert out.loss.dtype == torch.float32 and math.isfinite(out.loss.item())
        assert out.loss.item() == pytest.approx(ref, rel=0.1)
        out.loss.backward()
        assert student.fc.weight.grad is not None


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("terms", "pattern"),
    [
        ([{"method": "kdd", "weight": 1.0}], r"unknown method 'kdd'.*ce, kd, dkd, dist"),
        ([{"weight": 1.0}], r"terms\[0\] has no 'method'"),
        ([{"method": "kd", "weight": 1.0, "temp": 2}], r"unknown option.*'temp'.*temperature"),
        ([{"method": "fitnet", "weight": 1.0, "student": "stage1"}], r"missing.*'teacher'"),
        ([{"method": "kd", "weight": -1.0}], r"kd.weight must be >= 0"),
        ([{"method": "kd", "weight": 1.0, "temperature": 0}], r"temperature must be > 0"),
        ([{"method": "ce", "weight": 1.0, "label_smoothing": 1.0}], r"label_smoothing must be < 1"),
        ([], r"at least one"),
    ],
)
def test_bad_terms_raise_clear_errors(nets, batch, terms, pattern) -> None:
    student, teacher = nets
    with pytest.raises(ValueError, match=pattern):
        build_objective(terms, student=student, teacher=teacher, example_input=batch[0])
    assert _hook_count(student) == 0 and _hook_count(teacher) == 0


def test_none_options_fall_back_to_defaults(nets, batch) -> None:
    student, teacher = nets
    terms = [{"method": "kd", "weight": 1.0, "temperature": None}]
    with build_objective(terms, student=student, teacher=teacher, example_input=batch[0]) as obj:
        assert obj.terms[0].temperature == 4.0


def test_teacher_required_for_teacher_terms(nets, batch) -> None:
    student, _ = nets
    for term in ALL_TERMS[1:]:
        with pytest.raises(ValueError, match=rf"\['{term['method']}'\] need a teacher"):
            build_objective([term], student=student, teacher=None, example_input=batch[0])
    with pytest.raises(ValueError, match="same module"):
        build_objective(ALL_TERMS[1:2], student=student, teacher=student, example_input=batch[0])


@pytest.mark.parametrize(
    ("term", "pattern"),
    [
        ({"method": "at", "student": "stage9", "teacher": "stage1"}, r"student has no.*'stage9'"),
        ({"method": "at", "student": "stage1", "teacher": "layer1"}, r"teacher has no.*'layer1'"),
        (
            {"method": "fitnet", "student": "flat", "teacher": "stage2"},
            r"student 'flat' \(4, 8\) with teacher 'stage2' \(4, 16, 2, 2\)",
        ),
        (
            {"method": "at", "student": "flat", "teacher": "flat"},
            r"at cannot pair student 'flat' \(4, 8\).*\(N, C, H, W\)",
        ),
    ],
)
def test_bad_paths_and_unpairable_features(nets, batch, term, pattern) -> None:
    student, teacher = nets
    with pytest.raises(ValueError, match=pattern):
        build_objective(
            [{**term, "weight": 1.0}], student=student, teacher=teacher, example_input=batch[0]
        )
    assert _hook_count(student) == 0 and _hook_count(teacher) == 0
    assert all(p.requires_grad for p in teacher.parameters())


def test_kd_rejects_mismatched_classes_and_bad_input(nets, batch) -> None:
    student, _ = nets
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, CLASSES + 1))
    kd = [{"method": "kd", "weight": 1.0}]
    with pytest.raises(ValueError, match=r"student \(4, 5\) and teacher \(4, 6\)"):
        build_objective(kd, student=student, teacher=teacher, example_input=batch[0])
    with pytest.raises(ValueError, match=r"example_input of shape \(4, 1, 8, 8\)"):
        build_objective(kd, student=student, teacher=teacher, example_input=torch.ones(4, 1, 8, 8))
    with pytest.raises(ValueError, match="teacher on meta"):
        build_objective(kd, student=student, teacher=teacher.to("meta"), example_input=batch[0])


def test_methods_lists_the_core_terms() -> None:
    listed = dict(methods())
    assert {"ce", "kd", "fitnet", "at"} <= set(listed)
    assert all(isinstance(d, str) and d for d in listed.values())
