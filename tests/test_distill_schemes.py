"""Tests of the scheme terms (dml, byot, ddgsd, dafl): values from the papers' formulas written out
by hand, gradients through `build_objective`, the extra networks kept out of the student, hooks
removed, and clear errors on bad configs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from compresskit.distill import build_objective
from compresskit.distill.schemes import (
    DAFLGenerator,
    dafl_generator_loss,
    distort_batch,
    linear_mmd,
)

CLASSES = 5


class TwoStageNet(nn.Module):
    """Tiny two-stage conv classifier; `width` and `stride1` make student/teacher differ."""

    def __init__(self, width: int, stride1: int = 1, classes: int = CLASSES) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, width, 3, stride=stride1, padding=1, bias=False),
                                    nn.BatchNorm2d(width), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                    nn.BatchNorm2d(2 * width), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.pool(self.stage2(self.stage1(x)))))


class TailNet(TwoStageNet):
    """TwoStageNet with a module run after its classifier."""

    def __init__(self) -> None:
        super().__init__(4)
        self.tail = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(super().forward(x))


class ConvOnlyNet(nn.Module):
    """A classifier without nn.Linear (1x1 conv head), which byot cannot use."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Conv2d(3, CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage1(x).mean(dim=(2, 3))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def student() -> TwoStageNet:
    return TwoStageNet(4)


@pytest.fixture
def teacher() -> TwoStageNet:
    return TwoStageNet(8, stride1=2)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _grad_ok(module: nn.Module) -> bool:
    """Every trainable parameter got a gradient and some gradient is non-zero."""
    params = [p for p in module.parameters() if p.requires_grad]
    return bool(params) and all(p.grad is not None for p in params) and any(p.grad.abs().sum() > 0 for p in params)


def _record(model: nn.Module, paths: list[str], x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and the outputs of `paths` (plus the fc input under key 'fc_in'), without grad."""
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(p).register_forward_hook(
        lambda _m, _a, out, p=p: seen.__setitem__(p, out)) for p in paths]
    handles.append(model.fc.register_forward_pre_hook(lambda _m, args: seen.__setitem__("fc_in", args[0])))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return logits, seen


# ---------------------------------------------------------------- plain-python formulas


def _softmax(row: list[float], temp: float = 1.0) -> list[float]:
    exps = [math.exp(v / temp) for v in row]
    return [e / sum(exps) for e in exps]


def _ce(rows: list[list[float]], labels: list[int]) -> float:
    return sum(-math.log(_softmax(r)[c]) for r, c in zip(rows, labels, strict=True)) / len(rows)


def _kd(student: list[list[float]], target: list[list[float]], temp: float) -> float:
    """T^2 * mean_n KL(softmax(target/T) || softmax(student/T))."""
    total = 0.0
    for s_row, t_row in zip(student, target, strict=True):
        p_s, p_t = _softmax(s_row, temp), _softmax(t_row, temp)
        total += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s, strict=True))
    return total / len(student) * temp * temp


def _mean_vec(rows: list[list[float]]) -> list[float]:
    return [sum(col) / len(rows) for col in zip(*rows, strict=True)]


# ---------------------------------------------------------------- functional pieces


def test_linear_mmd_is_squared_distance_of_batch_means() -> None:
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 0.0], [2.0, 2.0], [1.0, 1.0]])
    # means (2, 3) and (1, 1): (2-1)^2 + (3-1)^2 = 5
    assert linear_mmd(a, b).item() == pytest.approx(5.0)


def test_distort_batch_crops_zero_padded_images_per_sample() -> None:
    images = torch.arange(16 * 2 * 16, dtype=torch.float32).view(16, 2, 4, 4) + 1.0
    out = distort_batch(images, padding=1, noise_std=0.0)
    assert out.shape == images.shape
    offsets = set()
    for n in range(images.shape[0]):
        padded = torch.zeros(2, 6, 6)
        padded[:, 1:5, 1:5] = images[n]
        matches = [(dy, dx) for dy in range(3) for dx in range(3)
                   if torch.equal(out[n], padded[:, dy:dy + 4, dx:dx + 4])]
        assert len(matches) == 1, n
        offsets.add(matches[0])
    assert len(offsets) > 1  # drawn independently per sample
    noisy = distort_batch(torch.zeros(8, 3, 16, 16), padding=0, noise_std=0.5)
    assert 0.45 < noisy.std().item() < 0.55


def test_dafl_generator_loss_matches_hand_computed() -> None:
    t = [[2.0, 0.0, 1.0], [0.0, 3.0, 0.0]]
    f = [[1.0, -2.0], [0.5, 0.0]]
    onehot = _ce(t, [0, 1])
    activation = (1.0 + 2.0 + 0.5 + 0.0) / 4
    mean_p = _mean_vec([_softmax(r) for r in t])
    entropy = -sum(p * math.log(p) for p in mean_p)
    expected = 2.0 * onehot - 0.5 * activation - 3.0 * entropy
    got = dafl_generator_loss(torch.tensor(t), torch.tensor(f), onehot_weight=2.0, activation_weight=0.5,
                              entropy_weight=3.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    without = dafl_generator_loss(torch.tensor(t), None, onehot_weight=2.0, activation_weight=0.5,
                                  entropy_weight=3.0)
    assert without.item() == pytest.approx(expected + 0.5 * activation, rel=1e-5)


def test_dafl_generator_makes_images_of_any_size() -> None:
    gen = DAFLGenerator(8, 3, 10, 6)
    out = gen(torch.randn(4, 8))
    assert out.shape == (4, 3, 10, 6)
    # the last BatchNorm (train mode, no affine) normalises each channel over the batch
    assert out.mean(dim=(0, 2, 3)).abs().max().item() < 1e-4


# ---------------------------------------------------------------- dml


def test_dml_value_matches_formula(student, batch) -> None:
    x, y = batch
    obj = build_objective([{"method": "dml", "weight": 0.5, "peers": 2, "temperature": 2.0}],
                          student=student, teacher=None, example_input=x)
    obj.eval()
    student.eval()
    got = obj(x, y).parts["dml"] / 0.5
    with torch.no_grad():
        rows = [m(x).tolist() for m in (student, *obj.terms[0].peers)]
    labels = y.tolist()
    expected = sum(_ce(r, labels) for r in rows[1:])
    for m, z_m in enumerate(rows):
        expected += sum(_kd(z_m, z_n, 2.0) for n, z_n in enumerate(rows) if n != m) / (len(rows) - 1)
    assert got == pytest.approx(expected, rel=1e-4)


def test_dml_peers_start_different_get_gradients_and_stay_out_of_the_student(student, batch) -> None:
    x, y = batch
    keys = set(student.state_dict())
    terms = [{"method": "ce", "weight": 1.0},
             {"method": "ddgsd", "weight": 1.0, "student": "stage2"},  # taps a student module
             {"method": "dml", "weight": 1.0, "peers": 2}]
    obj = build_objective(terms, student=student, teacher=None, example_input=x)
    peers = obj.terms[2].peers
    assert len(peers) == 2
    for peer in peers:
        assert not torch.equal(peer.stage1[0].weight, student.stage1[0].weight)
        assert not torch.equal(peer.fc.weight, student.fc.weight)
        assert _hook_count(peer) == 0  # the student's feature tap is not copied
    assert not torch.equal(peers[0].fc.weight, peers[1].fc.weight)
    assert _hook_count(student) > 0
    obj.train()
    obj(x, y).loss.backward()
    assert _grad_ok(student)
    assert all(_grad_ok(peer) for peer in peers)
    obj.close()
    assert set(student.state_dict()) == keys  # exported weights have no peer keys
    assert any(k.startswith("terms.2.peers.1.") for k in obj.state_dict())


def test_dml_peers_are_reproducible(batch) -> None:
    x, _ = batch
    weights = []
    for _ in range(2):
        torch.manual_seed(3)
        obj = build_objective([{"method": "dml", "weight": 1.0}], student=TwoStageNet(4), teacher=None,
                              example_input=x)
        weights.append(obj.terms[0].peers[0].fc.weight.clone())
    assert torch.equal(weights[0], weights[1])


def test_dml_rejects_bad_options(student, batch) -> None:
    x, _ = batch
    with pytest.raises(ValueError, match="dml.peers"):
        build_objective([{"method": "dml", "weight": 1.0, "peers": 0}], student=student, teacher=None,
                        example_input=x)
    with pytest.raises(ValueError, match="dml.temperature"):
        build_objective([{"method": "dml", "weight": 1.0, "temperature": 0.0}], student=student, teacher=None,
                        example_input=x)


# ---------------------------------------------------------------- byot


def test_byot_value_matches_formula_despite_extra_student_forwards(student, batch) -> None:
    x, y = batch
    # ddgsd runs the student a second time (on a distorted view) before byot reads F_C
    terms = [{"method": "ddgsd", "weight": 1.0, "noise_std": 1.0},
             {"method": "byot", "weight": 2.0, "student": ["stage1", "stage2"], "temperature": 3.0,
              "alpha": 0.3, "feature_weight": 0.5}]
    obj = build_objective(terms, student=student, teacher=None, example_input=x)
    obj.eval()
    student.eval()
    got = obj(x, y).parts["byot"] / 2.0
    term = obj.terms[1]
    logits, seen = _record(student, ["stage1", "stage2"], x)
    z_c, f_c, labels = logits.tolist(), seen["fc_in"].tolist(), y.tolist()
    expected = 0.0
    with torch.no_grad():
        for i, path in enumerate(["stage1", "stage2"]):
            f_i = term.bottlenecks[i](seen[path])
            q_i = term.classifiers[i](f_i).tolist()
            f_i = f_i.tolist()
            sq = [(a - b) ** 2 for r_i, r_c in zip(f_i, f_c, strict=True) for a, b in zip(r_i, r_c, strict=True)]
            expected += 0.7 * _ce(q_i, labels) + 0.3 * _kd(q_i, z_c, 3.0) + 0.5 * sum(sq) / len(sq)
    assert term.bottlenecks[0][0].out_channels == 8  # D = the fc's input size
    assert got == pytest.approx(expected, rel=1e-4)


def test_byot_trains_student_and_heads_and_close_removes_its_hooks(student, batch) -> None:
    x, y = batch
    before = _hook_count(student)
    terms = [{"method": "ce", "weight": 1.0}, {"method": "byot", "weight": 1.0, "student": ["stage1"]}]
    obj = build_objective(terms, student=student, teacher=None, example_input=x)
    term = obj.terms[1]
    obj.train()
    obj(x, y).loss.backward()
    assert _grad_ok(student)
    assert _grad_ok(term.bottlenecks) and _grad_ok(term.classifiers)
    assert not any(k.startswith(("bottlenecks", "classifiers")) for k in student.state_dict())
    obj.close()
    term.close()  # byot's own hooks; Objective.close() must call this for terms that have one
    assert _hook_count(student) == before
    with pytest.raises(RuntimeError, match="byot was closed"):
        term(obj._run(student, x, y))


def test_byot_rejects_students_and_options_it_cannot_use(student, batch) -> None:
    x, _ = batch
    with pytest.raises(ValueError, match="no nn.Linear"):
        build_objective([{"method": "byot", "weight": 1.0, "student": ["stage1"]}], student=ConvOnlyNet(),
                        teacher=None, example_input=x)
    with pytest.raises(ValueError, match="student has no module 'stage9'"):
        build_objective([{"method": "byot", "weight": 1.0, "student": ["stage9"]}], student=student,
                        teacher=None, example_input=x)
    with pytest.raises(ValueError, match="byot.alpha"):
        build_objective([{"method": "byot", "weight": 1.0, "student": ["stage1"], "alpha": 1.5}],
                        student=student, teacher=None, example_input=x)
    # a stage run after the classifier cannot be matched with the classifier's input
    tail = TailNet()
    with pytest.raises(ValueError, match="'fc' to be called after 'tail'"):
        build_objective([{"method": "byot", "weight": 1.0, "student": ["tail"]}], student=tail,
                        teacher=None, example_input=x)
    assert _hook_count(student) == 0 and _hook_count(tail) == 0  # nothing left behind by failed builds


# ---------------------------------------------------------------- ddgsd


def test_ddgsd_value_matches_formula(student, batch, monkeypatch) -> None:
    x, y = batch
    view = torch.randn_like(x)
    obj = build_objective([{"method": "ddgsd", "weight": 1.0, "student": "stage2", "temperature": 2.0,
                            "mmd_weight": 0.5}], student=student, teacher=None, example_input=x)
    monkeypatch.setattr(obj.terms[0], "distort", lambda images: view)
    obj.eval()
    student.eval()
    got = obj(x, y).parts["ddgsd"]
    z1, seen1 = _record(student, ["stage2"], x)
    z2, seen2 = _record(student, ["stage2"], view)
    z1, z2 = z1.tolist(), z2.tolist()
    m1 = _mean_vec(seen1["stage2"].mean(dim=(2, 3)).tolist())
    m2 = _mean_vec(seen2["stage2"].mean(dim=(2, 3)).tolist())
    mmd = sum((a - b) ** 2 for a, b in zip(m1, m2, strict=True))
    expected = _ce(z2, y.tolist()) + _kd(z2, z1, 2.0) + _kd(z1, z2, 2.0) + 0.5 * mmd
    assert got == pytest.approx(expected, rel=1e-4)


def test_ddgsd_trains_student_and_leaves_no_hook(student, batch) -> None:
    x, y = batch
    obj = build_objective([{"method": "ce", "weight": 1.0}, {"method": "ddgsd", "weight": 1.0, "student": "stage1"}],
                          student=student, teacher=None, example_input=x)
    hooks = _hook_count(student)
    obj.train()
    out = obj(x, y)
    out.loss.backward()
    assert out.parts["ddgsd"] > 0
    assert _grad_ok(student)
    assert _hook_count(student) == hooks
    obj.close()
    assert _hook_count(student) == 0


def test_ddgsd_rejects_non_image_batches_and_bad_options(student, batch) -> None:
    x, _ = batch
    mlp = nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, CLASSES))
    with pytest.raises(ValueError, match=r"ddgsd needs \(N, C, H, W\) images"):
        build_objective([{"method": "ddgsd", "weight": 1.0}], student=mlp, teacher=None,
                        example_input=torch.randn(2, 12))
    with pytest.raises(ValueError, match="ddgsd.crop_padding"):
        build_objective([{"method": "ddgsd", "weight": 1.0, "crop_padding": -1}], student=student,
                        teacher=None, example_input=x)


# ---------------------------------------------------------------- dafl


def test_dafl_eval_value_is_kd_on_a_generated_batch(student, teacher, batch) -> None:
    x, y = batch
    obj = build_objective([{"method": "dafl", "weight": 1.0, "teacher": "stage2", "latent_dim": 6,
                            "temperature": 2.0}], student=student, teacher=teacher, example_input=x)
    obj.eval()
    student.eval()
    torch.manual_seed(5)
    got = obj(x, y).parts["dafl"]
    torch.manual_seed(5)
    with torch.no_grad():
        g = obj.terms[0].generator(torch.randn(4, 6))
        s, t = student(g).tolist(), teacher(g).tolist()
    assert got == pytest.approx(_kd(s, t, 2.0), rel=1e-4)


def test_dafl_trains_generator_itself_and_student_through_the_objective(student, teacher, batch) -> None:
    x, y = batch
    spec = [{"method": "dafl", "weight": 1.0, "teacher": "stage2", "latent_dim": 6}]
    obj = build_objective(spec, student=student, teacher=teacher, example_input=x)
    gen = obj.terms[0].generator
    start = [p.detach().clone() for p in gen.parameters()]
    obj.train()
    out = obj(x, None)  # labels are not used
    assert any(not torch.equal(a, p) for a, p in zip(start, gen.parameters(), strict=True))
    assert all(p.grad is None for p in gen.parameters())
    out.loss.backward()
    assert _grad_ok(student)
    assert all(p.grad is None for p in gen.parameters())  # the main optimizer never moves G
    assert all(p.grad is None for p in teacher.parameters())
    assert _hook_count(teacher) == 0
    assert not any("generator" in k for k in student.state_dict())
    # the generator's Adam state travels with the objective's state (resume)
    state = obj.state_dict()
    again = build_objective(spec, student=student, teacher=teacher, example_input=x)
    again.load_state_dict(state)
    again.train()
    again(x, None)
    assert again.terms[0]._optimizer.state_dict()["state"][0]["step"].item() == 2


def test_dafl_rejects_missing_or_mismatched_teacher_and_bad_options(student, teacher, batch) -> None:
    x, _ = batch
    spec = {"method": "dafl", "weight": 1.0}
    with pytest.raises(ValueError, match=r"need a teacher"):
        build_objective([spec], student=student, teacher=None, example_input=x)
    with pytest.raises(ValueError, match="dafl needs a teacher whose logits"):
        build_objective([spec], student=student, teacher=TwoStageNet(4, classes=3), example_input=x)
    with pytest.raises(ValueError, match="teacher has no module 'stage9'"):
        build_objective([{**spec, "teacher": "stage9"}], student=student, teacher=teacher, example_input=x)
    with pytest.raises(ValueError, match="dafl.latent_dim"):
        build_objective([{**spec, "latent_dim": 0}], student=student, teacher=teacher, example_input=x)
