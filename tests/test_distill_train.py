"""Tests of compresskit.distill.train.distill: plain loaders, and the stage's results kept."""

import dataclasses

import pytest
import torch
from legacy_fit import legacy_fit
from tinynets import TinyNet, make_data
from torch.utils.data import DataLoader, TensorDataset

from compresskit.config import TrainConfig
from compresskit.config_terms import CETerm, KDTerm
from compresskit.distill import build_objective, distill
from compresskit.nets import build_model
from compresskit.teacher.train import train_teacher
from compresskit.train import evaluate, loaders_for

CPU = torch.device("cpu")


def _loaders(channels_seed: int = 0):
    x, y = make_data(128, seed=1)
    xv, yv = make_data(64, seed=2)
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True,
                       generator=torch.Generator().manual_seed(channels_seed))
    return train, DataLoader(TensorDataset(xv, yv), batch_size=64)


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_distill_with_dataloaders_learns_and_removes_hooks():
    train, val = _loaders()
    torch.manual_seed(0)
    teacher = TinyNet()
    train_teacher(teacher, train, val, epochs=4, cfg=TrainConfig(lr=0.05), quiet=True)
    torch.manual_seed(1)
    student = TinyNet()
    terms = [CETerm(method="ce", weight=0.5), KDTerm(method="kd", weight=0.5, temperature=2.0),
             {"method": "fitnet", "weight": 0.1, "student": "stem", "teacher": "stem"}]
    res = distill(student, teacher, train, val, terms=terms, epochs=5, cfg=TrainConfig(lr=0.05), quiet=True)
    assert res.best_val_accuracy == evaluate(student, val)["accuracy"] > 0.7
    assert _hooks(student) == 0 and _hooks(teacher) == 0


def test_distill_rejects_an_optimizer_without_the_adapters():
    train, val = _loaders()
    student = TinyNet()
    teacher = build_model({"arch": "resnet", "blocks": [1], "width": 16, "num_classes": 4, "in_channels": 3})
    opt = torch.optim.SGD(student.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="adapters"):
        distill(student, teacher, train, val, terms=[{"method": "fitnet", "weight": 1.0, "student": "stem",
                                                      "teacher": "stem"}], epochs=1, optimizer=opt, quiet=True)
    assert _hooks(student) == 0 and _hooks(teacher) == 0
    # without adapters the caller's optimizer is used as it is
    res = distill(student, teacher, train, val, terms=[{"method": "kd", "weight": 1.0}], epochs=1,
                  optimizer=opt, quiet=True)
    assert res.history[0]["lr"] == 0.01


def test_distill_is_bit_identical_to_the_stage_objective(synthetic_data):
    """The distill stage built the objective (with a FitNet regressor, whose initialisation
    draws from torch's RNG) and called the old fit; distill() with the pipeline's loaders, and
    the example input taken from the val loader, gives the same weights."""
    data = dataclasses.replace(synthetic_data, hflip=True, crop_padding=1)
    cfg = TrainConfig(epochs=2, lr=0.05, batch_size=32, schedule="cosine")
    spec = {"arch": "resnet", "blocks": [1], "num_classes": 4, "in_channels": 1}
    torch.manual_seed(3)
    teacher = build_model(spec | {"width": 8}).eval()
    old = build_model(spec | {"width": 4})
    new = build_model(spec | {"width": 4})
    new.load_state_dict(old.state_dict())
    terms = [{"method": "ce", "weight": 0.1}, {"method": "kd", "weight": 0.9, "temperature": 4.0},
             {"method": "fitnet", "weight": 0.5, "student": "layers.0", "teacher": "layers.0"}]
    torch.manual_seed(9)
    with build_objective(terms, student=old, teacher=teacher, example_input=data.example_input(2)) as objective:
        legacy_fit(old, objective, data, cfg, device=CPU, seed=4)
    torch.manual_seed(9)
    distill(new, teacher, *loaders_for(data, cfg, device=CPU, seed=4), terms=terms, cfg=cfg, device=CPU, seed=4,
            quiet=True)
    for (k, a), b in zip(old.state_dict().items(), new.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
