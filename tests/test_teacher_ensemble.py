"""Combined teachers (ensemble, generalist + specialists) behind the objective: feature terms tap
the primary model, logit terms read the combined prediction."""

from __future__ import annotations

import torch
from torch import nn

from compresskit.distill import build_objective
from compresskit.teacher.ensemble import TeacherEnsemble, average_probabilities
from compresskit.teacher.specialists import GeneralistSpecialists


def _net(width: int, classes: int = 4) -> nn.Module:
    torch.manual_seed(width)
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, classes))


def test_ensemble_teacher_feature_taps_read_the_first_member() -> None:
    student, a, b = _net(3), _net(5), _net(6)
    teacher = TeacherEnsemble([a, b])
    images = torch.randn(4, 1, 6, 6)
    terms = [{"method": "fitnet", "weight": 1.0, "student": "3", "teacher": "3"},
             {"method": "kd", "weight": 1.0, "temperature": 1.0}]
    seen = {}

    def hook(_module, _inputs, output) -> None:
        seen.setdefault("a", output.detach().clone())

    a[3].register_forward_hook(hook)
    with build_objective(terms, student=student, teacher=teacher, example_input=images[:2]) as obj:
        out = obj(images, torch.zeros(4, dtype=torch.long))
        out.loss.backward()
    assert torch.equal(seen["a"][:2], a[3](a[2](a[1](a[0](images[:2])))).detach())
    with torch.no_grad():
        combined = teacher(images)
        expected = average_probabilities([a(images), b(images)])
    torch.testing.assert_close(combined.softmax(1), expected)
    assert student[4].weight.grad is not None


def test_specialists_teacher_taps_the_generalist() -> None:
    generalist, student = _net(5), _net(3)
    specialists = [_net(4, classes=3)]
    teacher = GeneralistSpecialists(generalist, specialists, [[0, 1]], top_k=2, steps=5)
    images = torch.randn(4, 1, 6, 6)
    terms = [{"method": "at", "weight": 1.0, "student": "1", "teacher": "1"}]
    with build_objective(terms, student=student, teacher=teacher, example_input=images[:2]) as obj:
        obj(images, None).loss.backward()
    assert student[0].weight.grad is not None
