import pytest
import torch
from torch import nn

from compresskit.config import TrainConfig
from compresskit.train import evaluate, fit, make_optimizer


class CE(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.__dict__["model"] = model  # unregistered, like the distill Objective

    def forward(self, x, y):
        from types import SimpleNamespace

        logits = self.model(x)
        return SimpleNamespace(loss=nn.functional.cross_entropy(logits, y), logits=logits, parts={})


def _model():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_fit_learns_and_keeps_best(synthetic_data):
    model = _model()
    before = evaluate(model, synthetic_data.loader("val"))["accuracy"]
    cfg = TrainConfig(epochs=4, lr=0.05, schedule="onecycle")
    res = fit(model, CE(model), synthetic_data, cfg, device=torch.device("cpu"), quiet=True)
    after = evaluate(model, synthetic_data.loader("val"))["accuracy"]
    assert len(res.history) == 4 and res.images_per_s > 0
    assert after == res.best_val_accuracy
    assert after > max(before, 0.5)


def test_resume_continues_after_last_epoch(synthetic_data, tmp_path):
    cfg2 = TrainConfig(epochs=2, lr=0.05, schedule="constant")
    model = _model()
    resume = tmp_path / "resume.pt"
    fit(model, CE(model), synthetic_data, cfg2.model_copy(update={"epochs": 1}), device=torch.device("cpu"),
        quiet=True, resume_file=resume, resume_key="a")
    assert resume.is_file()
    state = torch.load(resume, weights_only=True)
    assert state["epoch"] == 0
    # a different key ignores the file; the same key resumes from epoch 2
    model2 = _model()
    res = fit(model2, CE(model2), synthetic_data, cfg2, device=torch.device("cpu"), quiet=True,
              resume_file=resume, resume_key="a")
    assert res.resumed_from == 1 and [h["epoch"] for h in res.history] == [1, 2]


def test_no_weight_decay_on_norms_and_biases():
    model = _model()
    opt = make_optimizer(model.parameters(), TrainConfig(weight_decay=0.1))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert id(model[0].weight) in decayed and id(model[0].bias) not in decayed
    assert id(model[1].weight) not in decayed


@pytest.mark.gpu
def test_fit_on_cuda_with_amp(synthetic_data):
    model = _model()
    cfg = TrainConfig(epochs=1, lr=0.05, amp="auto")
    res = fit(model, CE(model), synthetic_data, cfg, device=torch.device("cuda"), quiet=True)
    assert res.history[0]["train_loss"] > 0 and next(model.parameters()).is_cuda


def test_max_batches_per_epoch_limits_the_steps(synthetic_data):
    model = _model()
    cfg = TrainConfig(epochs=2, lr=0.05, batch_size=16, max_batches_per_epoch=3)
    res = fit(model, CE(model), synthetic_data, cfg, device=torch.device("cpu"), quiet=True)
    # 144 training images, batch 16: 9 batches an epoch, limited to 3
    assert [h["images"] for h in res.history] == [48, 48]
