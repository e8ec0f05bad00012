"""Experiment tracking: a run's parameters, figures, training curves and report files reach a
local MLflow file store and TensorBoard event files."""

from __future__ import annotations

from pathlib import Path

import pytest

from compresskit.stage import StageOutcome
from compresskit.track import RunTracker, flatten_numbers, training_curves

mlflow = pytest.importorskip("mlflow")

HISTORY = [{"epoch": 1, "train_loss": 1.0, "val_accuracy": 0.5}, {"epoch": 2, "train_loss": 0.5, "val_accuracy": 0.8}]
DISTILL = {"student": {"fit": {"history": HISTORY, "wall_s": 3.0}, "test_accuracy": 0.8}, "summary": "x",
           "wall_s": 4.0}


def test_flatten_and_curves():
    assert flatten_numbers(DISTILL) == {"student/fit/wall_s": 3.0, "student/test_accuracy": 0.8, "wall_s": 4.0}
    curves = list(training_curves(DISTILL, "distill/"))
    assert curves == [("distill/student", 1, {"train_loss": 1.0, "val_accuracy": 0.5}),
                      ("distill/student", 2, {"train_loss": 0.5, "val_accuracy": 0.8})]


def test_mlflow_file_store_gets_params_curves_and_artifacts(tmp_path):
    report = tmp_path / "report.md"
    report.write_text("# report")
    tracker = RunTracker("demo", {"seed": 0, "distill": {"train": {"epochs": 2}}}, mlflow_uri=str(tmp_path / "mlruns"))
    tracker.stage(StageOutcome("distill", "ran", 4.0, "x", DISTILL))
    tracker.stage(StageOutcome("prune", "skipped"))
    tracker.stage(StageOutcome("report", "ran", 0.1, "PASS", {"report_md": str(report)}))
    tracker.close(ok=True)
    client = mlflow.MlflowClient(Path(tmp_path / "mlruns").resolve().as_uri())
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params["distill.train.epochs"] == "2"
    assert run.data.metrics["distill/student/test_accuracy"] == 0.8
    curve = client.get_metric_history(tracker.run_id, "distill/student/epoch/val_accuracy")
    assert [(m.step, m.value) for m in curve] == [(1, 0.5), (2, 0.8)]
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["report.md"]


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = RunTracker("demo", {"seed": 0}, tensorboard_dir=tmp_path / "tb")
    tracker.stage(StageOutcome("distill", "ran", 4.0, "x", DISTILL))
    tracker.close(ok=True)
    events = EventAccumulator(str(tmp_path / "tb" / "demo"))
    events.Reload()
    curve = events.Scalars("distill/student/epoch/val_accuracy")
    assert [(e.step, round(e.value, 6)) for e in curve] == [(1, 0.5), (2, 0.8)]
