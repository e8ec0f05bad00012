"""Health of a run: training that diverges or collapses stops with one clear line, and a stage
whose model lost more accuracy than the config allows says so."""

from __future__ import annotations

import math

import pytest

from compresskit.budget import accuracy_loss_check
from compresskit.config import ExportConfig, FinetuneConfig, QATConfig, TrainConfig
from compresskit.train import TrainingDiverged, health_problem


def _epoch(epoch: int, loss: float, val: float | None, train: float = 0.25) -> dict:
    return {"epoch": epoch, "train_loss": loss, "train_accuracy": train, "val_accuracy": val}


def _judge(history, initial=1.4, classes=4, **kw):
    return health_problem(history, initial_loss=initial, num_classes=classes, **kw)


def test_defaults():
    t = TrainConfig()
    assert (t.max_loss_growth, t.chance_epochs, t.chance_margin) == (100.0, 3, 0.02)
    e = ExportConfig()
    assert (e.max_abs_diff, e.max_rel_diff, e.min_top1_agreement, e.max_abs_logit) == (1e-3, 1e-4, 0.99, 1e3)
    assert QATConfig().max_accuracy_loss == 0.02 and FinetuneConfig().max_accuracy_loss == 0.02


def test_healthy_runs_pass():
    learning = [_epoch(1, 1.3, 0.40), _epoch(2, 0.9, 0.60), _epoch(3, 0.6, 0.75), _epoch(4, 0.5, 0.80)]
    for n in range(1, 5):
        assert _judge(learning[:n]) is None
    # a slow start: at chance for 4 epochs, but the loss is falling
    slow = [_epoch(i, 1.40 - 0.03 * i, 0.25) for i in range(1, 6)]
    assert _judge(slow) is None
    # fine-tuning starts near zero: a rise to 30x the first batch is still far below 100 x ln(classes)
    assert _judge([_epoch(1, 0.3, 0.9)], initial=0.01) is None


def test_exploding_loss_is_divergence():
    history = [_epoch(1, 1.2, 0.3), _epoch(2, 5e3, 0.25)]
    problem = _judge(history)
    assert problem.startswith("training diverged in epoch 2: its mean train loss 5e+03 is ")
    assert "above train.max_loss_growth=100" in problem
    # exploding within the first epoch: judged against the first batch's loss
    assert _judge([_epoch(1, 1e9, 0.25)]).startswith("training diverged in epoch 1")
    assert _judge(history, max_loss_growth=None) is None
    # the reference is ln(classes) when the first batch's loss is smaller
    assert _judge([_epoch(1, 100 * math.log(4) * 1.01, 0.9)], initial=0.01) is not None


def test_collapse_needs_enough_evidence():
    flat = [_epoch(i, 1.386, 0.25) for i in range(1, 6)]
    assert _judge(flat[:3]) is None  # 3 epochs (the tiny pipelines): not enough
    problem = _judge(flat[:4])
    assert problem.startswith("training collapsed: val accuracy stayed at chance (1/4 = 25.0%, "
                              "+ train.chance_margin=0.02) in epochs 2-4")
    assert "train.chance_epochs: null" in problem
    assert _judge(flat[:4], chance_epochs=None) is None
    assert _judge(flat[:4], chance_epochs=4) is None
    above = [_epoch(i, 1.386, 0.30) for i in range(1, 5)]  # above chance + margin
    assert _judge(above) is None
    # without a val loader the train accuracy is judged
    no_val = [_epoch(i, 1.386, None, train=0.26) for i in range(1, 5)]
    assert _judge(no_val).startswith("training collapsed: train accuracy")
    # a spike in the first epoch, then stuck: the window slides past it
    spiky = [_epoch(1, 9.0, 0.25)] + [_epoch(i, 1.386, 0.25) for i in range(2, 6)]
    assert _judge(spiky[:4]) is None and _judge(spiky) is not None


def test_training_diverged_is_a_runtime_error():
    assert issubclass(TrainingDiverged, RuntimeError) and issubclass(TrainingDiverged, FloatingPointError)


def test_qat_loss_beyond_the_margin_is_in_the_stage_summary():
    from compresskit.quantize.stage import _summary

    check = accuracy_loss_check("QAT", "float model", 0.80, 0.90, 0.02, "quantize.qat.max_accuracy_loss")
    summary = _summary(None, {"qat": {"test_accuracy_torch": 0.80, "accuracy_check": check}})
    assert summary == ("QAT test 80.00% (fake-quant, torch); WARNING: QAT lost 10.0 pt test accuracy against "
                       "the float model (90.00% -> 80.00%), more than quantize.qat.max_accuracy_loss=0.02 (2.0 pt)")
    fine = accuracy_loss_check("QAT", "float model", 0.89, 0.90, 0.02, "quantize.qat.max_accuracy_loss")
    assert "WARNING" not in _summary(None, {"qat": {"test_accuracy_torch": 0.89, "accuracy_check": fine}})


def test_pipeline_reports_an_unhealthy_run_in_one_line(tmp_path, tiny_pipeline, monkeypatch):
    """The stage error names the stage and the run, on one line, and nothing after it runs."""
    from compresskit import train
    from compresskit.config import load_config
    from compresskit.pipeline import StageError, run_pipeline

    monkeypatch.setattr(train, "health_problem", lambda history, **kw: "training collapsed: (test)")
    cfg = load_config(tiny_pipeline, [f"models_dir={tmp_path / 'models'}", f"reports_dir={tmp_path / 'reports'}",
                                      "teacher.train.epochs=1", "data.synthetic.num_train=64"])
    with pytest.raises(StageError) as info:
        run_pipeline(cfg, quiet=True, until="teacher", log=lambda m: None)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("teacher: TrainingDiverged: teacher: training collapsed: (test); try a lower train.lr")
