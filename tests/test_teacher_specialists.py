"""Tests of compresskit.teacher.specialists: the generalist + specialists teacher (Hinton et al. 2015, s. 5).

Expected values are worked out by hand or recomputed here with explicit loops (numpy / math), not
with the module's own functions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from compresskit.config import TrainConfig
from compresskit.distill import build_objective
from compresskit.nets import build_model
from compresskit.teacher.specialists import (
    GeneralistSpecialists,
    SpecialistAsClassifier,
    SpecialistObjective,
    confusion_matrix,
    group_confused_classes,
    init_from_generalist,
    specialist_spec,
    train_specialist,
)

SPEC = {"arch": "resnet", "blocks": [1], "width": 4, "stem_stride": 2, "num_classes": 6, "in_channels": 1}


class Fixed(nn.Module):
    """A 'model' that returns preset logits whatever the input (for hand-computed cases)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: x.shape[0]]


def _softmax(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _generalist(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(SPEC)
    with torch.no_grad():  # a non-trivial classifier (the default init is nearly zero)
        model.fc.weight.normal_(0, 1.0)
        model.fc.bias.normal_(0, 1.0)
    return model.eval()


# ------------------------------------------------------------------ confusion matrix and groups

def test_confusion_matrix_counts_a_hand_case():
    model = nn.Identity()  # the images are the logits
    model.train()
    batches = [
        (torch.tensor([[3.0, 1, 0], [0, 2, 1], [0, 0, 5]]), torch.tensor([0, 2, 2])),  # preds 0, 1, 2
        (torch.tensor([[1.0, 4, 0], [9, 0, 0]]), torch.tensor([1, 1])),  # preds 1, 0
    ]
    conf = confusion_matrix(model, batches, 3, device="cpu")
    expected = torch.tensor([[1, 0, 0],   # true 0: predicted 0 once
                             [1, 1, 0],   # true 1: predicted 0 once, 1 once
                             [0, 1, 1]])  # true 2: predicted 1 once, 2 once
    assert conf.dtype == torch.int64 and torch.equal(conf, expected)
    assert model.training  # mode restored


def test_confusion_matrix_rejects_wrong_logits_shape():
    with pytest.raises(ValueError, match=r"expected \(N, 4\) logits"):
        confusion_matrix(nn.Identity(), [(torch.zeros(2, 3), torch.tensor([0, 1]))], 4, device="cpu")


def test_group_confused_classes_hand_case():
    c = np.diag([50.0] * 6)  # the diagonal (correct predictions) is ignored
    c[2, 4], c[4, 2] = 7, 3      # S[2,4] = 10: the most confused pair
    c[0, 2], c[4, 0] = 4, 3      # class 0: 4 + 3 = 7 with {2, 4}
    c[5, 2] = 6                  # class 5: 6 with {2, 4}
    c[1, 3] = 8                  # one direction only: S[1,3] = 8
    c[5, 1], c[3, 5] = 1, 2      # S[1,5] = 1, S[3,5] = 2
    # group 1: (2, 4), then 0 (7 > 6 for class 5); group 2 among {1, 3, 5}: (1, 3), then 5 (1 + 2 = 3)
    assert group_confused_classes(torch.tensor(c), count=2, size=3) == [[2, 4, 0], [1, 3, 5]]
    # one group of 4: (2, 4), 0 (7), then 5: 6 + 0 + 0 = 6 beats 1 (0) and 3 (0)
    assert group_confused_classes(c, count=1, size=4) == [[2, 4, 0, 5]]


def test_group_confused_classes_breaks_ties_by_index():
    assert group_confused_classes(np.zeros((7, 7)), count=2, size=3) == [[0, 1, 2], [3, 4, 5]]
    c = np.zeros((5, 5))
    c[3, 4] = 2  # S[3,4] = 2 first, then classes 0, 1, 2 all score 0: the lowest joins
    c[1, 3] = 1  # ...unless one scores more: 1 has S[1,3] = 1
    assert group_confused_classes(c, count=1, size=3) == [[3, 4, 1]]


def test_group_confused_classes_errors():
    with pytest.raises(ValueError, match=r"count \* size = 2 \* 3 = 6 classes, but the dataset has only 5"):
        group_confused_classes(np.zeros((5, 5)), count=2, size=3)
    with pytest.raises(ValueError, match="no class for the dustbin"):
        group_confused_classes(np.zeros((4, 4)), count=1, size=4)
    with pytest.raises(ValueError, match="square"):
        group_confused_classes(np.zeros((4, 5)), count=1, size=2)


def test_specialist_spec():
    out = specialist_spec(SPEC, [4, 1])
    assert out["num_classes"] == 3 and SPEC["num_classes"] == 6
    assert {k: v for k, v in out.items() if k != "num_classes"} == {k: v for k, v in SPEC.items()
                                                                       if k != "num_classes"}
    with pytest.raises(ValueError, match="outside"):
        specialist_spec(SPEC, [1, 6])
    with pytest.raises(ValueError, match="distinct"):
        specialist_spec(SPEC, [1, 1])


# ------------------------------------------------------------------ initialisation

def test_init_from_generalist_copies_weights_and_maps_the_classifier():
    generalist = _generalist()
    group = [4, 1]
    specialist = build_model(specialist_spec(SPEC, group)).eval()
    keys = init_from_generalist(specialist, generalist, SPEC, group)
    assert sorted(keys) == ["fc.bias", "fc.weight"]
    g_state, s_state = generalist.state_dict(), specialist.state_dict()
    for k in g_state:
        if k not in keys:
            assert torch.equal(g_state[k], s_state[k]), k
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        zg, zs = generalist(x).double().numpy(), specialist(x).double().numpy()
    others = [0, 2, 3, 5]
    for n in range(3):
        # group logits are the generalist's; the dustbin logit is mean(others) + log(4)
        assert np.allclose(zs[n, :2], zg[n, group], atol=1e-5)
        assert math.isclose(zs[n, 2], sum(zg[n, c] for c in others) / 4 + math.log(4), abs_tol=1e-5)
        pg, ps = _softmax(zg[n]), _softmax(zs[n])
        assert math.isclose(ps[0] / ps[1], pg[4] / pg[1], rel_tol=1e-4)  # odds kept
        assert ps[0] >= pg[4] - 1e-6 and ps[1] >= pg[1] - 1e-6  # Jensen: dustbin <= sum of others
        assert ps[2] <= sum(pg[c] for c in others) + 1e-6


def test_init_is_exact_when_the_other_classes_have_equal_logits():
    generalist = _generalist(1)
    with torch.no_grad():  # every other class gets the same classifier row
        generalist.fc.weight[[0, 2, 3, 5]] = generalist.fc.weight[0].clone()
        generalist.fc.bias[[0, 2, 3, 5]] = 0.3
    specialist = build_model(specialist_spec(SPEC, [4, 1])).eval()
    init_from_generalist(specialist, generalist, SPEC, [4, 1])
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        pg, ps = _softmax(generalist(x).numpy()), _softmax(specialist(x).numpy())
    assert np.allclose(ps[:, 0], pg[:, 4], atol=1e-5) and np.allclose(ps[:, 1], pg[:, 1], atol=1e-5)
    assert np.allclose(ps[:, 2], pg[:, [0, 2, 3, 5]].sum(1), atol=1e-5)


def test_init_finds_the_classifier_when_group_plus_dustbin_has_as_many_classes():
    generalist = _generalist(2)
    group = [5, 0, 3, 2, 1]  # 5 classes + dustbin = 6 outputs, like the generalist: found by a probe
    specialist = build_model(specialist_spec(SPEC, group)).eval()
    assert sorted(init_from_generalist(specialist, generalist, SPEC, group)) == ["fc.bias", "fc.weight"]
    assert torch.equal(specialist.fc.weight[:5], generalist.fc.weight[group])
    assert torch.allclose(specialist.fc.bias[5], generalist.fc.bias[4])  # mean of one + log(1)


def test_init_errors_on_unfindable_or_odd_classifier():
    spec = {"arch": "custom", "num_classes": 6, "in_channels": 1}
    with pytest.raises(ValueError, match="cannot find the classifier"):
        init_from_generalist(nn.Linear(4, 6), nn.Linear(4, 6), spec, [0, 1])
    with pytest.raises(ValueError, match=r"other than its first \(class\) dimension"):
        # the weight changes shape on its input dimension too
        init_from_generalist(nn.Linear(5, 3), nn.Linear(4, 6), spec, [0, 1])
    with pytest.raises(ValueError, match="does not match"):
        init_from_generalist(nn.Sequential(nn.Linear(4, 3)), nn.Linear(4, 6), spec, [0, 1])


# ------------------------------------------------------------------ training

def test_specialist_as_classifier_spreads_the_dustbin():
    s = torch.tensor([[1.0, 2.0, 0.5], [-1.0, 0.0, 3.0]])  # group [3, 1] + dustbin, 5 classes
    wrap = SpecialistAsClassifier(nn.Identity(), [3, 1], 5)
    full = wrap(s).numpy()
    for n in range(2):
        ps, pf = _softmax(s[n].numpy()), _softmax(full[n])
        assert math.isclose(pf[3], ps[0], rel_tol=1e-5) and math.isclose(pf[1], ps[1], rel_tol=1e-5)
        for c in (0, 2, 4):
            assert math.isclose(pf[c], ps[2] / 3, rel_tol=1e-5)
    assert full.argmax(1).tolist() == [1, 0]  # a group class when preferred; else the first other class


def test_specialist_objective_value_by_hand():
    group, classes, t, w = [2, 0], 4, 2.0, 0.3
    s = torch.tensor([[1.0, -1.0, 0.5], [0.2, 0.4, -0.3], [2.0, 0.0, 1.0]])
    z = torch.tensor([[0.5, 1.0, 2.0, -1.0], [1.5, 0.0, 0.3, 0.2], [-0.5, 2.5, 1.0, 0.0]])
    y = torch.tensor([2, 3, 0])  # local labels 0, dustbin (2), 1
    objective = SpecialistObjective(SpecialistAsClassifier(Fixed(s), group, classes), Fixed(z),
                                    temperature=t, soft_weight=w)
    out = objective(torch.zeros(3, 1), y)
    local = [0, 2, 1]
    weights = [1 / (2 * 2), 1 / (2 * 1), 1 / (2 * 2)]  # 2 group samples, 1 dustbin sample
    ce = sum(weights[n] * -math.log(_softmax(s[n].numpy())[local[n]]) for n in range(3))
    kl = 0.0
    for n in range(3):
        p = _softmax(z[n].numpy() / t)
        target = [p[2], p[0], p[1] + p[3]]
        q = _softmax(s[n].numpy() / t)
        kl += sum(target[j] * math.log(target[j] / q[j]) for j in range(3))
    expected = (1 - w) * ce + w * t * t * kl / 3
    assert math.isclose(out.loss.item(), expected, rel_tol=1e-5)
    assert math.isclose(out.parts["ce"], (1 - w) * ce, rel_tol=1e-5)
    assert out.logits.shape == (3, classes)
    # a batch with no dustbin sample: the group samples carry the whole weight
    only = SpecialistObjective(SpecialistAsClassifier(Fixed(s[:2]), group, classes), Fixed(z[:2]),
                               temperature=t, soft_weight=0.0)(torch.zeros(2, 1), torch.tensor([2, 0]))
    ce2 = (-math.log(_softmax(s[0].numpy())[0]) - math.log(_softmax(s[1].numpy())[1])) / 2
    assert math.isclose(only.loss.item(), ce2, rel_tol=1e-5)


def test_specialist_objective_rejects_bad_options():
    wrap = SpecialistAsClassifier(nn.Identity(), [0, 1], 4)
    with pytest.raises(ValueError, match="specialists.temperature must be > 0"):
        SpecialistObjective(wrap, nn.Identity(), temperature=0.0, soft_weight=0.5)
    with pytest.raises(ValueError, match="specialists.soft_weight must be <= 1"):
        SpecialistObjective(wrap, nn.Identity(), temperature=2.0, soft_weight=1.5)


def test_train_specialist_short_run(synthetic_data):
    spec = dict(SPEC, num_classes=4)
    torch.manual_seed(0)
    generalist = build_model(spec).eval()
    before = {k: v.clone() for k, v in generalist.state_dict().items()}
    group = [2, 0]
    cfg = TrainConfig(epochs=1, lr=0.05, batch_size=32, max_batches_per_epoch=2, channels_last=False)
    logs: list[str] = []
    specialist = train_specialist(generalist, spec, group, synthetic_data, cfg, temperature=2.0,
                                  soft_weight=0.5, device="cpu", seed=3, quiet=True, log=logs.append)
    reference = build_model(specialist_spec(spec, group))
    init_from_generalist(reference, generalist, spec, group)
    with torch.no_grad():
        out = specialist.eval()(torch.zeros(2, 1, 16, 16))
    assert out.shape == (2, 3)
    changed = [k for k, v in specialist.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, reference.state_dict()[k])]
    assert "fc.weight" in changed and len(changed) > 2
    assert all(torch.equal(v, before[k]) for k, v in generalist.state_dict().items())  # only read
    assert not generalist.training
    assert any("best val accuracy" in line for line in logs)


# ------------------------------------------------------------------ combination

def _f(q: np.ndarray, pg: np.ndarray, pms: list[np.ndarray], groups: list[list[int]], active: list[bool]) -> float:
    """The paper's objective for one image, with explicit loops."""
    value = sum(pg[c] * math.log(pg[c] / q[c]) for c in range(len(q)))
    for pm, group, on in zip(pms, groups, active, strict=True):
        if not on:
            continue
        qm = [q[c] for c in group] + [sum(q[c] for c in range(len(q)) if c not in group)]
        value += sum(pm[j] * math.log(pm[j] / qm[j]) for j in range(len(qm)))
    return value


def _combined(zg: torch.Tensor, zs: list[torch.Tensor], groups, *, top_k: int = 2, steps: int = 30):
    teacher = GeneralistSpecialists(Fixed(zg), [Fixed(z) for z in zs], groups, top_k=top_k, steps=steps)
    return teacher(torch.zeros(zg.shape[0], 1))


def test_agreeing_specialist_leaves_the_generalist_distribution():
    zg = torch.tensor([[2.0, 1.5, 0.0, -1.0, 0.5]])
    pg = torch.softmax(zg, 1)
    group = [0, 1]
    mapped = torch.stack([pg[0, 0], pg[0, 1], pg[0, 2:].sum()]).log().unsqueeze(0)
    u = _combined(zg, [mapped], [group])
    assert torch.allclose(torch.softmax(u, 1), pg, atol=1e-6)


def test_confident_specialist_moves_probability_inside_its_group():
    zg = torch.tensor([[1.0, 0.9, 0.0, -0.5, 0.2]])  # generalist: class 0 slightly above class 1
    pg = torch.softmax(zg, 1)[0]
    zs = torch.tensor([[0.0, 4.0, 0.0]])  # specialist for [0, 1]: clearly class 1
    q = torch.softmax(_combined(zg, [zs], [[0, 1]]), 1)[0]
    assert q[1] > q[0] and q[1] > pg[1] and q[0] < pg[0]
    assert q[1] / q[0] > pg[1] / pg[0]
    assert torch.isclose(q.sum(), torch.tensor(1.0))


def test_combination_objective_decreases_and_reaches_a_minimum():
    groups = [[1, 2, 3], [4, 0]]
    zg = torch.tensor([[0.0, 2.0, 1.8, -1.0, 1.0, 0.5], [3.0, 0.0, 0.0, 0.0, 2.5, 1.0],
                       [1.0, 2.0, 0.0, 0.0, 1.9, 0.0]])
    zs = [torch.tensor([[-1.0, 3.0, 0.0, 0.5], [0.0, 0.0, 0.0, 2.0], [0.0, -1.0, 2.0, 1.0]]),
          torch.tensor([[2.0, -1.0, 0.0], [1.0, 0.0, -1.0], [-1.0, 3.0, 0.0]])]
    pg = _softmax(zg.numpy())
    pms = [_softmax(z.numpy()) for z in zs]
    # active by the generalist's top 2: image 0: {1, 2} -> specialist 0; image 1: {0, 4} -> specialist 1;
    # image 2: {1, 4} -> both
    active = [[True, False], [False, True], [True, True]]
    values = []
    for steps in range(6):
        q = _softmax(_combined(zg, zs, groups, steps=steps).numpy())
        values.append([_f(q[n], pg[n], [pm[n] for pm in pms], groups, active[n]) for n in range(3)])
    values = np.array(values)
    assert (np.diff(values, axis=0) <= 1e-6).all() and (values[-1] < values[0] - 1e-2).all()
    # the result after 30 steps is a stationary point of f in u (the gradient, by autograd, ~ 0)
    u = _combined(zg, zs, groups, steps=30).double().requires_grad_(True)
    total = 0
    for n in range(3):
        log_q = u[n].log_softmax(0)
        total = total - (torch.tensor(pg[n]) * log_q).sum()
        for pm, group, on in zip(pms, groups, active[n], strict=True):
            if on:
                others = [c for c in range(6) if c not in group]
                log_qm = torch.cat([log_q[group], log_q[others].logsumexp(0, keepdim=True)])
                total = total - (torch.tensor(pm[n]) * log_qm).sum()
    total.backward()
    assert u.grad.abs().max() < 1e-4


def test_inactive_images_keep_the_generalist_distribution_exactly():
    zg = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 2.0]])  # image 1's top 2 = {2, 3}: no specialist
    zs = [torch.tensor([[0.0, 5.0, 0.0], [0.0, 5.0, 0.0]])]
    teacher = GeneralistSpecialists(Fixed(zg), [Fixed(zs[0])], [[0, 1]], top_k=2, steps=10)
    assert teacher.active(zg).tolist() == [[True], [False]]
    u = teacher(torch.zeros(2, 1))
    assert torch.equal(u[1], zg[1].log_softmax(0))
    assert not torch.allclose(u[0], zg[0].log_softmax(0))


def test_combination_runs_under_no_grad_and_as_a_teacher():
    torch.manual_seed(0)
    generalist = _generalist()
    specialists = [build_model(specialist_spec(SPEC, g)) for g in ([0, 1], [2, 3])]
    for s, g in zip(specialists, ([0, 1], [2, 3]), strict=True):
        init_from_generalist(s, generalist, SPEC, g)
    teacher = GeneralistSpecialists(generalist, specialists, [[0, 1], [2, 3]], top_k=3, steps=5).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        u = teacher(x)
    with torch.inference_mode():
        u2 = teacher(x)
    assert u.shape == (4, 6) and not u.requires_grad and torch.allclose(u, u2)
    assert torch.allclose(u.logsumexp(1), torch.zeros(4), atol=1e-5)  # log-probabilities
    student = build_model(dict(SPEC, width=2))
    objective = build_objective([{"method": "kd", "weight": 1.0, "temperature": 2.0}], student=student,
                                teacher=teacher, example_input=x[:2])
    objective(x, torch.tensor([0, 1, 2, 3])).loss.backward()
    assert student.fc.weight.grad is not None and student.fc.weight.grad.abs().sum() > 0


def test_combination_rejects_mismatched_specialist_outputs():
    teacher = GeneralistSpecialists(Fixed(torch.zeros(1, 5)), [Fixed(torch.zeros(1, 4))], [[0, 1]],
                                    top_k=2, steps=3)
    with pytest.raises(ValueError, match=r"expected \(N, 3\) for its group \[0, 1\] \+ dustbin"):
        teacher(torch.zeros(1, 1))
    with pytest.raises(ValueError, match="2 specialists but 1 groups"):
        GeneralistSpecialists(nn.Identity(), [nn.Identity(), nn.Identity()], [[0, 1]], top_k=1, steps=1)


@pytest.mark.gpu
def test_specialist_training_and_combination_on_cuda_with_amp(synthetic_data):
    spec = dict(SPEC, num_classes=4)
    dev = torch.device("cuda")
    generalist = build_model(spec).to(dev).eval()
    cfg = TrainConfig(epochs=1, lr=0.05, batch_size=32, max_batches_per_epoch=2, amp="auto")
    specialist = train_specialist(generalist, spec, [1, 3], synthetic_data, cfg, temperature=2.0,
                                  soft_weight=0.5, device=dev, seed=0, quiet=True, log=None)
    teacher = GeneralistSpecialists(generalist, [specialist], [[1, 3]], top_k=2, steps=5).eval()
    x = torch.randn(4, 1, 16, 16, device=dev)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        u = teacher(x)
    assert u.dtype == torch.float32 and u.is_cuda and torch.isfinite(u).all()
