"""Tests of compresskit.teacher.train.train_teacher: plain loaders, and the stage's results kept."""

import dataclasses

import pytest
import torch
from legacy_fit import legacy_fit
from tinynets import TinyNet, make_data
from torch.utils.data import DataLoader, TensorDataset

from compresskit.config import TrainConfig
from compresskit.distill import build_objective
from compresskit.nets import build_model
from compresskit.teacher.train import cross_entropy, train_teacher
from compresskit.train import evaluate, loaders_for

CPU = torch.device("cpu")
SPEC = {"arch": "resnet", "blocks": [1, 1], "width": 4, "stem_stride": 1, "num_classes": 4, "in_channels": 1}


def test_train_teacher_with_dataloaders_learns():
    x, y = make_data(128, seed=1)
    xv, yv = make_data(64, seed=2)
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(TensorDataset(xv, yv), batch_size=64)
    torch.manual_seed(0)
    model = TinyNet()
    res = train_teacher(model, train, val, cfg=TrainConfig(lr=0.05, label_smoothing=0.1), epochs=5, quiet=True)
    assert len(res.history) == 5
    assert res.best_val_accuracy == evaluate(model, val)["accuracy"] > 0.7


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_train_teacher_is_bit_identical_to_the_stage_objective(synthetic_data, smoothing):
    """The teacher stage trained through build_objective([ce]) and the old fit; train_teacher
    with the pipeline's loaders gives the same weights."""
    data = dataclasses.replace(synthetic_data, hflip=True, crop_padding=1)
    cfg = TrainConfig(epochs=2, lr=0.05, batch_size=32, label_smoothing=smoothing)
    torch.manual_seed(5)
    old = build_model(SPEC)
    new = build_model(SPEC)
    new.load_state_dict(old.state_dict())
    terms = [{"method": "ce", "weight": 1.0, "label_smoothing": smoothing}]
    with build_objective(terms, student=old, teacher=None, example_input=data.example_input(2)) as objective:
        legacy_fit(old, objective, data, cfg, device=CPU, seed=11)
    train_teacher(new, *loaders_for(data, cfg, device=CPU, seed=11), cfg=cfg, device=CPU, seed=11, quiet=True)
    for (k, a), b in zip(old.state_dict().items(), new.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_cross_entropy_checks_label_smoothing():
    logits, y = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    assert cross_entropy(0.0)(logits, y).item() == pytest.approx(-torch.log_softmax(logits, 1)[0, 0].item())
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(1.0)
