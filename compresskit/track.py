"""Experiment tracking (optional): a run's parameters, every stage's figures, the per-epoch
training curves and the report artifacts, to MLflow and/or TensorBoard.

Tracking reads what the stages recorded (their metrics, as written to ``metrics.json``) after
each stage, so it changes no stage's work and no cache key; up-to-date stages are logged too,
so every tracked run is complete. Needs ``pip install 'compresskit[track]'`` (mlflow-skinny,
tensorboard); TensorBoard logging also needs torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from compresskit.stage import StageOutcome

# metric keys that are not figures (large nested records or text)
_SKIP = {"report", "summary", "history", "candidates", "sensitivity", "tried", "verdict", "groups"}


def flatten_numbers(data: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Every numeric leaf of a nested metrics dict as `a/b/c -> value` (booleans and lists left out)."""
    out: dict[str, float] = {}
    for key, value in data.items():
        if key in _SKIP:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten_numbers(value, f"{name}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def training_curves(metrics: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, int, dict[str, float]]]:
    """(name, epoch, numeric fields) for every epoch of every training run in a stage's metrics
    (each `fit` record holds a per-epoch `history`)."""
    for key, value in metrics.items():
        if not isinstance(value, Mapping):
            continue
        history = value.get("history") if key == "fit" else None
        if isinstance(history, list):
            for record in history:
                fields = {k: float(v) for k, v in record.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"}
                yield prefix.rstrip("/") or "fit", int(record.get("epoch", 0)), fields
        else:
            yield from training_curves(value, f"{prefix}{key}/")


class RunTracker:
    """One tracked pipeline run. `mlflow_uri` is a server URI or a local path (a file store);
    `tensorboard_dir` receives one event file per run."""

    def __init__(self, run_name: str, params: Mapping[str, Any], *, mlflow_uri: str | None = None,
                 mlflow_experiment: str = "compresskit", tensorboard_dir: Path | None = None) -> None:
        self.mlflow = self.writer = None
        flat = {k: str(v) for k, v in _flatten_any(params).items()}
        if mlflow_uri:
            import mlflow

            if "://" not in mlflow_uri:  # a local file store: MLflow asks to opt in to it
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                mlflow_uri = Path(mlflow_uri).resolve().as_uri()
            self.mlflow = mlflow.MlflowClient(mlflow_uri)
            experiment = self.mlflow.get_experiment_by_name(mlflow_experiment)
            exp_id = experiment.experiment_id if experiment else self.mlflow.create_experiment(mlflow_experiment)
            self.run_id = self.mlflow.create_run(exp_id, run_name=run_name).info.run_id
            for key, value in flat.items():
                self.mlflow.log_param(self.run_id, key[:250], value[:6000])
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(tensorboard_dir) / run_name))
            self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in flat.items()))

    def stage(self, outcome: StageOutcome) -> None:
        """Log one stage's figures, training curves and (for the report) its files."""
        if outcome.status == "skipped":
            return
        for key, value in flatten_numbers(outcome.metrics, f"{outcome.name}/").items():
            self._scalar(key, value, 0)
        for name, epoch, fields in training_curves(outcome.metrics, f"{outcome.name}/"):
            for field, value in fields.items():
                self._scalar(f"{name}/epoch/{field}", value, epoch)
        if self.mlflow is not None:
            for key in ("report_json", "report_md", "report_html", "deployed"):
                path = outcome.metrics.get(key)
                if path and Path(path).is_file():
                    self.mlflow.log_artifact(self.run_id, str(path))

    def _scalar(self, key: str, value: float, step: int) -> None:
        if self.mlflow is not None:
            self.mlflow.log_metric(self.run_id, key, value, step=step)
        if self.writer is not None:
            self.writer.add_scalar(key, value, step)

    def close(self, ok: bool) -> None:
        if self.mlflow is not None:
            self.mlflow.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")
        if self.writer is not None:
            self.writer.close()


def _flatten_any(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out |= _flatten_any(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out
