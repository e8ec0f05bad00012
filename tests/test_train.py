import dataclasses
import math

import pytest
import torch
from legacy_fit import legacy_fit
from tinynets import TinyNet, make_data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compresskit.config import TrainConfig
from compresskit.train import TrainingDiverged, evaluate, fit, loaders_for, make_optimizer

CPU = torch.device("cpu")


class CE(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.__dict__["model"] = model  # unregistered, like the distill Objective

    def forward(self, x, y):
        from types import SimpleNamespace

        logits = self.model(x)
        return SimpleNamespace(loss=nn.functional.cross_entropy(logits, y), logits=logits, parts={})


def _model(dropout: float = 0.0):
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(8, 4))


def _tensor_loaders(seed: int = 0, batch: int = 16):
    x, y = make_data(96, seed=1)
    xv, yv = make_data(32, seed=2)
    train = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    return train, DataLoader(TensorDataset(xv, yv), batch_size=32)


def test_fit_learns_and_keeps_best(synthetic_data):
    torch.manual_seed(0)
    model = _model()
    before = evaluate(model, synthetic_data.loader("val"))["accuracy"]
    cfg = TrainConfig(epochs=4, lr=0.05, schedule="onecycle")
    res = fit(model, CE(model), *loaders_for(synthetic_data, cfg, device=CPU), cfg=cfg, device=CPU, quiet=True)
    after = evaluate(model, synthetic_data.loader("val"))["accuracy"]
    assert len(res.history) == 4 and res.images_per_s > 0
    assert after == res.best_val_accuracy
    assert after > max(before, 0.5)


@pytest.mark.parametrize("seed", [0, 3])
def test_loaders_for_is_bit_identical_to_the_old_fit(synthetic_data, seed):
    """The old fit(model, objective, data, cfg) and fit(..., *loaders_for(data, cfg)) train alike,
    with augmentation, dropout, gradient clipping and a warm-up schedule drawing randomness."""
    data = dataclasses.replace(synthetic_data, hflip=True, crop_padding=2)
    cfg = TrainConfig(epochs=2, lr=0.05, schedule="cosine", warmup_epochs=0.5, grad_clip=1.0,
                      batch_size=24, max_batches_per_epoch=5)
    torch.manual_seed(7)
    old = _model(dropout=0.3)
    new = _model(dropout=0.3)
    new.load_state_dict(old.state_dict())
    old_history = legacy_fit(old, CE(old), data, cfg, device=CPU, seed=seed)
    res = fit(new, CE(new), *loaders_for(data, cfg, device=CPU, seed=seed), cfg=cfg, device=CPU, seed=seed,
              quiet=True)
    assert [(h["val_accuracy"], h["val_loss"], h["lr"]) for h in old_history] == \
        [(h["val_accuracy"], h["val_loss"], h["lr"]) for h in res.history]
    for (k, a), b in zip(old.state_dict().items(), new.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_resume_continues_after_last_epoch(synthetic_data, tmp_path):
    cfg2 = TrainConfig(epochs=2, lr=0.05, schedule="constant")
    model = _model()
    resume = tmp_path / "resume.pt"
    fit(model, CE(model), *loaders_for(synthetic_data, cfg2, device=CPU), epochs=1, cfg=cfg2, device=CPU,
        quiet=True, resume_file=resume, resume_key="a")
    assert resume.is_file()
    state = torch.load(resume, weights_only=True)
    assert state["epoch"] == 0
    # a different key ignores the file; the same key resumes from epoch 2
    model2 = _model()
    res = fit(model2, CE(model2), *loaders_for(synthetic_data, cfg2, device=CPU), cfg=cfg2, device=CPU,
              quiet=True, resume_file=resume, resume_key="a")
    assert res.resumed_from == 1 and [h["epoch"] for h in res.history] == [1, 2]


@pytest.mark.parametrize("seeded", [True, False])
def test_resume_with_a_dataloader_is_bit_identical(tmp_path, seeded):
    """An interrupted run resumed from its file ends with the weights of an uninterrupted one
    (an unseeded DataLoader shuffles with torch's RNG, which the resume file restores)."""
    cfg = TrainConfig(epochs=3, lr=0.05, schedule="cosine")

    def run(resume_file, stop_at=None):
        torch.manual_seed(0)
        model = TinyNet(dropout=0.2)
        train, val = _tensor_loaders()
        if not seeded:
            train = DataLoader(train.dataset, batch_size=16, shuffle=True)

        def stop(epoch, _model):
            if epoch == stop_at:
                raise KeyboardInterrupt

        fit(model, nn.functional.cross_entropy, train, val, cfg=cfg, quiet=True,
            resume_file=resume_file, resume_key="k", epoch_callback=stop)
        return model

    straight = run(None)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "r.pt", stop_at=2)
    resumed = run(tmp_path / "r.pt")
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


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
    cuda = torch.device("cuda")
    res = fit(model, CE(model), *loaders_for(synthetic_data, cfg, device=cuda), cfg=cfg, device=cuda, quiet=True)
    assert res.history[0]["train_loss"] > 0 and next(model.parameters()).is_cuda


@pytest.mark.gpu
def test_fit_moves_cpu_batches_to_cuda():
    model = TinyNet()
    res = fit(model, nn.CrossEntropyLoss(), *_tensor_loaders(), epochs=1, device="cuda", amp=True, quiet=True)
    assert res.history[0]["train_loss"] > 0 and next(model.parameters()).is_cuda


def test_max_batches_per_epoch_limits_the_steps(synthetic_data):
    model = _model()
    cfg = TrainConfig(epochs=2, lr=0.05, batch_size=16, max_batches_per_epoch=3)
    res = fit(model, CE(model), *loaders_for(synthetic_data, cfg, device=CPU), cfg=cfg, device=CPU, quiet=True)
    # 144 training images, batch 16: 9 batches an epoch, limited to 3
    assert [h["images"] for h in res.history] == [48, 48]


@pytest.mark.parametrize("loss_fn", [nn.functional.cross_entropy, nn.CrossEntropyLoss(label_smoothing=0.1)],
                         ids=["function", "torch-loss"])
def test_fit_with_dataloaders_and_a_criterion(loss_fn):
    torch.manual_seed(0)
    model = TinyNet()
    train, val = _tensor_loaders()
    before = evaluate(model, val)["accuracy"]
    res = fit(model, loss_fn, train, val, epochs=6, cfg=TrainConfig(lr=0.05), quiet=True)
    assert res.best_val_accuracy == evaluate(model, val)["accuracy"] > max(before, 0.6)
    assert [h["images"] for h in res.history] == [96] * 6


def test_own_optimizer_and_scheduler_without_cfg_and_without_val():
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=6, gamma=0.5)
    train, _ = _tensor_loaders()  # 6 batches an epoch
    res = fit(model, nn.functional.cross_entropy, train, epochs=2, optimizer=opt, scheduler=sched, quiet=True)
    assert res.best_val_accuracy is None and res.best_epoch == 2
    assert [h["lr"] for h in res.history] == [0.01, 0.005]  # stepped once per batch
    # an optimizer without a scheduler or cfg keeps its learning rate
    opt2 = torch.optim.SGD(model.parameters(), lr=0.02)
    res = fit(model, nn.functional.cross_entropy, train, epochs=1, optimizer=opt2, quiet=True)
    assert res.history[0]["lr"] == 0.02


def test_non_finite_loss_raises():
    model = TinyNet()
    train, val = _tensor_loaders()
    with pytest.raises(FloatingPointError, match="loss became nan"):
        fit(model, lambda logits, y: logits.sum() * float("nan"), train, val, epochs=1, quiet=True)


def test_a_module_that_returns_a_tensor_is_explained():
    class MyLoss(nn.Module):
        def forward(self, x, y):
            return x.mean()

    train, val = _tensor_loaders()
    with pytest.raises(TypeError, match="_Loss"):
        fit(TinyNet(), MyLoss(), train, val, epochs=1, quiet=True)


# ------------------------------------------------------------------ training health


def test_non_finite_loss_is_a_training_diverged_error_naming_the_run():
    model = TinyNet()
    train, val = _tensor_loaders()
    with pytest.raises(TrainingDiverged, match=r"^qat: loss became nan in epoch 1; try a lower train.lr") as info:
        fit(model, lambda logits, y: logits.sum() * float("nan"), train, val, epochs=1, desc="qat", quiet=True)
    assert isinstance(info.value, RuntimeError)  # the pipeline makes a one-line stage error of it


def test_exploding_finite_loss_stops_with_a_clear_error():
    """Losses of 1e3..1e12 (gradient clipping keeps the weights finite) are divergence, not 'done'."""
    torch.manual_seed(0)
    model = TinyNet()
    train, val = _tensor_loaders()  # 6 batches an epoch
    calls = [0]

    def exploding(logits, y):
        calls[0] += 1
        return nn.functional.cross_entropy(logits, y) * 10.0 ** min(calls[0] - 1, 12)

    cfg = TrainConfig(epochs=3, lr=0.01, schedule="constant", grad_clip=1.0)
    with pytest.raises(TrainingDiverged, match=r"^student: training diverged in epoch 1: .*max_loss_growth=100.*"
                                               r"train.grad_clip.*normalisation"):
        fit(model, exploding, train, val, cfg=cfg, desc="student", quiet=True)
    assert calls[0] == 6  # stopped after the first epoch
    calls[0] = 0
    cfg_off = cfg.model_copy(update={"max_loss_growth": None, "epochs": 1})
    fit(TinyNet(), exploding, train, val, cfg=cfg_off, quiet=True)  # the check can be turned off


def _dead_model():
    """Every ReLU is off (a huge negative bias), so the logits are the classifier's bias alone:
    the model cannot learn, and on balanced labels it stays at chance with a flat loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4))
    with torch.no_grad():
        model[0].bias.fill_(-1e4)
        model[4].bias.zero_()
    return model


def test_accuracy_at_chance_with_a_flat_loss_is_a_collapse(tmp_path):
    model = _dead_model()
    train, val = _tensor_loaders()  # balanced labels: chance is 25%
    cfg = TrainConfig(epochs=6, lr=0.05, schedule="constant")
    resume = tmp_path / "resume.pt"
    with pytest.raises(TrainingDiverged, match=r"^teacher: training collapsed: val accuracy stayed at chance "
                                               r"\(1/4 = 25.0%.*epochs 2-4.*train.lr"):
        fit(model, nn.functional.cross_entropy, train, val, cfg=cfg, desc="teacher", quiet=True,
            resume_file=resume, resume_key="k")
    state = torch.load(resume, weights_only=True)
    assert state["epoch"] == 2  # the collapsed epoch 4 was not saved: a re-run starts from epoch 3 again


def test_short_runs_at_chance_do_not_trip():
    """A 3-epoch run (the tiny pipelines) is not enough evidence of a collapse."""
    model = _dead_model()
    train, val = _tensor_loaders()
    res = fit(model, nn.functional.cross_entropy, train, val, cfg=TrainConfig(epochs=3, lr=0.05), quiet=True)
    assert len(res.history) == 3 and res.best_val_accuracy == pytest.approx(0.25)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 7])
def test_onecycle_schedule_works_for_very_short_runs(steps):
    from compresskit.config import TrainConfig
    from compresskit.train import make_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = make_scheduler(opt, TrainConfig(epochs=1, lr=0.1), steps_per_epoch=steps)
    for _ in range(steps):
        opt.step()
        sched.step()
    assert all(math.isfinite(g["lr"]) for g in opt.param_groups)
