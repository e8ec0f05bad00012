"""Tests of the logit-based distillation terms (dkd, dist, ensemble, cskd).

Expected values are computed independently in numpy from the papers' formulas (probabilities
divided out explicitly, correlations by `np.corrcoef`, partners found by explicit loops).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from compresskit.distill import build_objective, kd_loss
from compresskit.distill.logit import (
    TERMS,
    cskd_loss,
    dist_loss,
    dkd_loss,
    ensemble_kd_loss,
    same_class_partners,
)
from compresskit.teacher.ensemble import TeacherEnsemble

CLASSES = 5


class TinyNet(nn.Module):
    """Conv + BN + pooled linear head: a few hundred parameters."""

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class WrongHead(TinyNet):
    """A teacher with 3 classes instead of 5."""

    def __init__(self) -> None:
        super().__init__()
        self.head[2] = nn.Linear(3, 3)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 0, 3])


def _np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _np_kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sum(p * (np.log(p) - np.log(q))))


def _student_grads(student: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in student.parameters()]


def _assert_all_grads(student: nn.Module) -> None:
    grads = _student_grads(student)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


S = np.array([[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 0.5], [2.0, 2.0, -2.0, 1.0]])
T = np.array([[2.0, 0.0, 1.0, 0.0], [1.0, 1.0, -2.0, 3.0], [0.5, 3.0, -1.0, 1.0]])
Y = np.array([1, 2, 0])


def test_terms_dict_order() -> None:
    assert list(TERMS) == ["dkd", "dist", "ensemble", "cskd"]
    assert all(cls.method == name for name, cls in TERMS.items())


# ---------------------------------------------------------------- dkd


def _np_dkd(s: np.ndarray, t: np.ndarray, y: np.ndarray, alpha: float, beta: float, temp: float) -> float:
    """DKD by the paper's definitions: binary target/non-target split, p̂ = p / (1 - p_target)."""
    total = 0.0
    for s_row, t_row, label in zip(s, t, y, strict=True):
        p_s, p_t = _np_softmax(s_row / temp), _np_softmax(t_row / temp)
        b_s = np.array([p_s[label], 1 - p_s[label]])
        b_t = np.array([p_t[label], 1 - p_t[label]])
        other = [c for c in range(len(s_row)) if c != label]
        hat_s = p_s[other] / (1 - p_s[label])
        hat_t = p_t[other] / (1 - p_t[label])
        total += alpha * _np_kl(b_t, b_s) + beta * _np_kl(hat_t, hat_s)
    return total / len(s) * temp * temp


def test_dkd_value_matches_paper_formula() -> None:
    for alpha, beta, temp in ((1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (0.0, 1.0, 2.0)):
        got = dkd_loss(torch.tensor(S), torch.tensor(T), torch.tensor(Y), alpha=alpha, beta=beta, temperature=temp)
        assert got.item() == pytest.approx(_np_dkd(S, T, Y, alpha, beta, temp), rel=1e-5)


def test_dkd_with_alpha_one_and_beta_weighted_recovers_kd() -> None:
    """The paper's decomposition: KD = TCKD + (1 - p_t^target) NCKD, per sample."""
    temp = 2.0
    s, t, y = torch.tensor(S[:1]), torch.tensor(T[:1]), torch.tensor(Y[:1])
    p_t_target = float(_np_softmax(T[0] / temp)[Y[0]])
    got = dkd_loss(s, t, y, alpha=1.0, beta=1.0 - p_t_target, temperature=temp)
    assert got.item() == pytest.approx(kd_loss(s, t, temp).item(), rel=1e-5)


def test_dkd_is_finite_for_huge_logits() -> None:
    s = torch.tensor([[3e4, -2e4, 0.0], [0.0, 1e4, -1e4]], requires_grad=True)
    t = torch.tensor([[-3e4, 2e4, 1.0], [5e3, 0.0, -1e4]])
    loss = dkd_loss(s, t, torch.tensor([0, 2]), alpha=1.0, beta=8.0, temperature=4.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_dkd_objective_value_warmup_and_gradients(batch) -> None:
    images, targets = batch
    student, teacher = TinyNet(3), TinyNet(4)
    terms = [{"method": "dkd", "weight": 1.0, "alpha": 1.0, "beta": 2.0, "temperature": 2.0, "warmup_epochs": 2.0}]
    with build_objective(terms, student=student, teacher=teacher, example_input=images) as obj:
        teacher_logits = teacher(images).detach().double().numpy()
        obj.set_epoch(0.5)
        out = obj(images, targets)
        full = _np_dkd(out.logits.detach().double().numpy(), teacher_logits, targets.numpy(), 1.0, 2.0, 2.0)
        assert out.loss.item() == pytest.approx(0.25 * full, rel=1e-4)
        out.loss.backward()
        _assert_all_grads(student)
        assert all(p.grad is None for p in teacher.parameters())
        obj.set_epoch(3.0)
        assert obj(images, targets).loss.item() == pytest.approx(full, rel=1e-4)


def test_dkd_build_errors(batch) -> None:
    images, _ = batch
    with pytest.raises(ValueError, match=r"dkd needs student and teacher logits of equal"):
        build_objective([{"method": "dkd", "weight": 1.0}], student=TinyNet(), teacher=WrongHead(),
                        example_input=images)
    with pytest.raises(ValueError, match=r"need a teacher"):
        build_objective([{"method": "dkd", "weight": 1.0}], student=TinyNet(), teacher=None, example_input=images)
    with pytest.raises(ValueError, match=r"dkd\.warmup_epochs must be >= 0"):
        build_objective([{"method": "dkd", "weight": 1.0, "warmup_epochs": -1}], student=TinyNet(),
                        teacher=TinyNet(), example_input=images)


def test_dkd_forward_without_targets_is_a_clear_error(batch) -> None:
    images, _ = batch
    with build_objective([{"method": "dkd", "weight": 1.0}], student=TinyNet(), teacher=TinyNet(),
                         example_input=images) as obj, pytest.raises(ValueError, match="dkd needs targets"):
        obj(images, None)


# ---------------------------------------------------------------- dist


def _np_dist(s: np.ndarray, t: np.ndarray, beta: float, gamma: float, temp: float) -> float:
    p_s, p_t = _np_softmax(s / temp), _np_softmax(t / temp)
    inter = 1 - np.mean([np.corrcoef(p_s[i], p_t[i])[0, 1] for i in range(p_s.shape[0])])
    intra = 1 - np.mean([np.corrcoef(p_s[:, c], p_t[:, c])[0, 1] for c in range(p_s.shape[1])])
    return temp * temp * (beta * inter + gamma * intra)


def test_dist_value_matches_paper_formula() -> None:
    for beta, gamma, temp in ((1.0, 1.0, 1.0), (2.0, 0.5, 4.0)):
        got = dist_loss(torch.tensor(S), torch.tensor(T), beta=beta, gamma=gamma, temperature=temp)
        assert got.item() == pytest.approx(_np_dist(S, T, beta, gamma, temp), rel=1e-5)
    # identical predictions correlate perfectly: zero loss
    same = dist_loss(torch.tensor(S), torch.tensor(S), beta=1.0, gamma=1.0, temperature=1.0)
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_dist_single_sample_batch_is_finite() -> None:
    s = torch.tensor(S[:1], requires_grad=True)
    loss = dist_loss(s, torch.tensor(T[:1]), beta=1.0, gamma=1.0, temperature=1.0)
    loss.backward()
    inter = 1 - np.corrcoef(_np_softmax(S[0]), _np_softmax(T[0]))[0, 1]
    assert loss.item() == pytest.approx(inter + 1.0, rel=1e-5)  # intra: no correlation in one sample
    assert torch.isfinite(s.grad).all()


def test_dist_objective_value_and_gradients(batch) -> None:
    images, targets = batch
    student, teacher = TinyNet(3), TinyNet(4)
    terms = [{"method": "dist", "weight": 2.0, "beta": 1.0, "gamma": 2.0, "temperature": 2.0}]
    with build_objective(terms, student=student, teacher=teacher, example_input=images) as obj:
        out = obj(images, targets)
        expected = _np_dist(out.logits.detach().double().numpy(), teacher(images).detach().double().numpy(),
                            1.0, 2.0, 2.0)
        assert out.loss.item() == pytest.approx(2.0 * expected, rel=1e-4)
        out.loss.backward()
    _assert_all_grads(student)


def test_dist_build_errors(batch) -> None:
    images, _ = batch
    with pytest.raises(ValueError, match=r"dist needs student and teacher logits of equal .*\(4, 5\).*\(4, 3\)"):
        build_objective([{"method": "dist", "weight": 1.0}], student=TinyNet(), teacher=WrongHead(),
                        example_input=images)
    with pytest.raises(ValueError, match=r"dist\.gamma must be >= 0"):
        build_objective([{"method": "dist", "weight": 1.0, "gamma": -0.1}], student=TinyNet(),
                        teacher=TinyNet(), example_input=images)


# ---------------------------------------------------------------- ensemble


def _np_ensemble(s: np.ndarray, members: list[np.ndarray], temp: float) -> float:
    total = 0.0
    for i in range(s.shape[0]):
        target = sum(_np_softmax(m[i] / temp) for m in members) / len(members)
        total += _np_kl(target, _np_softmax(s[i] / temp))
    return total / s.shape[0] * temp * temp


def test_ensemble_value_matches_formula() -> None:
    m2 = T[::-1].copy()
    got = ensemble_kd_loss(torch.tensor(S), (torch.tensor(T), torch.tensor(m2)), 3.0)
    assert got.item() == pytest.approx(_np_ensemble(S, [T, m2], 3.0), rel=1e-5)


def test_ensemble_objective_passes_members_value_and_gradients(batch) -> None:
    images, targets = batch
    student = TinyNet(3)
    members = [TinyNet(4), TinyNet(2)]
    teacher = TeacherEnsemble(members)
    seen = []
    with build_objective([{"method": "ensemble", "weight": 0.5, "temperature": 2.0}], student=student,
                         teacher=teacher, example_input=images) as obj:
        obj.terms[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].teacher_members))
        out = obj(images, targets)
        member_logits = [m(images).detach() for m in members]
        assert len(seen[0]) == 2
        for passed, direct in zip(seen[0], member_logits, strict=True):
            torch.testing.assert_close(passed, direct)
        expected = _np_ensemble(out.logits.detach().double().numpy(),
                                [m.double().numpy() for m in member_logits], 2.0)
        assert out.loss.item() == pytest.approx(0.5 * expected, rel=1e-4)
        out.loss.backward()
    _assert_all_grads(student)
    assert all(p.grad is None for p in teacher.parameters())


def test_ensemble_build_errors(batch) -> None:
    images, _ = batch
    with pytest.raises(ValueError, match=r"ensemble needs several teachers \(teacher\.ensemble\)"):
        build_objective([{"method": "ensemble", "weight": 1.0}], student=TinyNet(), teacher=TinyNet(),
                        example_input=images)
    with pytest.raises(ValueError, match=r"ensemble needs student and teacher member 0 logits of equal"):
        build_objective([{"method": "ensemble", "weight": 1.0}], student=TinyNet(),
                        teacher=TeacherEnsemble([WrongHead(), WrongHead()]), example_input=images)
    with pytest.raises(ValueError, match=r"ensemble\.temperature must be > 0"):
        build_objective([{"method": "ensemble", "weight": 1.0, "temperature": 0}], student=TinyNet(),
                        teacher=TeacherEnsemble([TinyNet(), TinyNet()]), example_input=images)


# ---------------------------------------------------------------- cskd


def _np_partners(labels: list[int]) -> list[int | None]:
    """Next index with the same label in batch order, wrapping around; None when alone."""
    n = len(labels)
    out: list[int | None] = []
    for i in range(n):
        nxt = next((j % n for j in range(i + 1, i + n) if labels[j % n] == labels[i]), None)
        out.append(nxt)
    return out


def test_same_class_partners_next_same_label_cyclically() -> None:
    labels = [0, 1, 0, 2, 1, 0, 3, 3]
    partner, has = same_class_partners(torch.tensor(labels))
    expected = _np_partners(labels)
    assert expected == [2, 4, 5, None, 1, 0, 7, 6]
    assert has.tolist() == [e is not None for e in expected]
    assert [p if h else None for p, h in zip(partner.tolist(), has.tolist(), strict=True)] == expected


def _np_cskd(z: np.ndarray, labels: list[int], temp: float) -> float:
    kls = [_np_kl(_np_softmax(z[j] / temp), _np_softmax(z[i] / temp))
           for i, j in enumerate(_np_partners(labels)) if j is not None]
    return temp * temp * sum(kls) / len(kls)


def test_cskd_value_and_detached_partner() -> None:
    labels, temp = [1, 2, 1], 2.0
    z = torch.tensor(S, requires_grad=True)
    loss = cskd_loss(z, torch.tensor(labels), temp)
    assert loss.item() == pytest.approx(_np_cskd(S, labels, temp), rel=1e-5)
    loss.backward()
    # partner predictions are constants: d/dz_i = T * (softmax(z_i/T) - softmax(z_j/T)) / count
    grad = np.zeros_like(S)
    for i, j in ((0, 2), (2, 0)):
        grad[i] = temp * (_np_softmax(S[i] / temp) - _np_softmax(S[j] / temp)) / 2
    np.testing.assert_allclose(z.grad.numpy(), grad, rtol=1e-5, atol=1e-7)


def test_cskd_without_partners_is_an_attached_zero() -> None:
    z = torch.tensor(S, requires_grad=True)
    loss = cskd_loss(z, torch.tensor([0, 1, 2]), 4.0)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_cskd_objective_value_and_gradients(batch) -> None:
    images, targets = batch
    student = TinyNet(3)
    terms = [{"method": "cskd", "weight": 1.0, "temperature": 4.0}]
    with build_objective(terms, student=student, teacher=None, example_input=images) as obj:
        assert obj.teacher is None
        out = obj(images, targets)
        expected = _np_cskd(out.logits.detach().double().numpy(), targets.tolist(), 4.0)
        assert out.loss.item() == pytest.approx(expected, rel=1e-4)
        out.loss.backward()
    _assert_all_grads(student)


def test_cskd_errors(batch) -> None:
    images, _ = batch
    with pytest.raises(ValueError, match=r"cskd\.temperature must be > 0"):
        build_objective([{"method": "cskd", "weight": 1.0, "temperature": -1.0}], student=TinyNet(),
                        teacher=None, example_input=images)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['alpha'\]"):
        build_objective([{"method": "cskd", "weight": 1.0, "alpha": 1.0}], student=TinyNet(),
                        teacher=None, example_input=images)
    with build_objective([{"method": "cskd", "weight": 1.0}], student=TinyNet(), teacher=None,
                         example_input=images) as obj, pytest.raises(ValueError, match=r"cskd needs \(N,\)"):
        obj(images, torch.zeros(4, CLASSES))
