"""End to end: the tiny pipeline through every stage, caching, and the shipped GPU recipe."""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest

from compresskit.config import load_config
from compresskit.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path: Path, path: Path, extra: list[str] | None = None):
    return load_config(path, [f"models_dir={tmp_path / 'models'}", f"reports_dir={tmp_path / 'reports'}",
                              *(extra or [])])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = _cfg(tmp, ROOT / "pipelines" / "tiny_synthetic.yaml")
    logs: list[str] = []
    outcomes, report = run_pipeline(cfg, quiet=True, log=logs.append)
    return tmp, cfg, outcomes, report, logs


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A private copy of the tiny run (artifacts and report), for tests that re-run or edit it:
    the shared run stays as it was made, whatever order tests run in."""
    import shutil

    src, cfg, _, _, _ = tiny_run
    for part in ("models", "reports"):
        shutil.copytree(src / part, tmp_path / part)
    return tmp_path, _cfg(tmp_path, ROOT / "pipelines" / "tiny_synthetic.yaml")


def _status(outcomes) -> dict[str, str]:
    return {o.name: o.status for o in outcomes}


def test_every_stage_ran_and_wrote_artifacts(tiny_run):
    tmp, cfg, outcomes, report, _ = tiny_run
    assert [o.name for o in outcomes] == ["teacher", "distill", "prune", "quantize", "export", "bench", "report"]
    assert all(o.status == "ran" for o in outcomes)
    run_dir = tmp / "models" / cfg.name
    for stage in ("teacher", "distill", "prune", "quantize", "export", "bench", "report"):
        record = json.loads((run_dir / stage / "stage.json").read_text())
        assert record["config_hash"] and record["wall_s"] >= 0
    for name in ("teacher", "student", "student_baseline", "pruned", "ptq", "qat"):
        model = onnx.load(run_dir / "export" / f"{name}.onnx")
        props = {p.key: p.value for p in model.metadata_props}
        pre = json.loads(props["compresskit.preprocess"])
        assert pre["layout"] == "NCHW" and len(pre["mean"]) == 1
        assert json.loads(props["compresskit.labels"]) == [f"class_{i}" for i in range(4)]
    assert not list(run_dir.rglob("resume-*.pt"))


def test_report_rows_and_verdict(tiny_run):
    tmp, cfg, _, report, _ = tiny_run
    names = [r["name"] for r in report["rows"]]
    assert names == ["teacher", "student_baseline", "student", "pruned", "ptq", "qat"]
    rows = {r["name"]: r for r in report["rows"]}
    # the task is learnable: trained models beat chance (0.25) clearly
    assert rows["teacher"]["accuracy"] > 0.6 and rows["student"]["accuracy"] > 0.5
    assert rows["pruned"]["macs"] < rows["student"]["macs"]
    assert rows["pruned"]["params"] < rows["student"]["params"]
    assert rows["ptq"]["size_bytes"] < rows["pruned"]["size_bytes"]
    assert all(lat["p50_ms"] > 0 for r in rows.values() for lat in r["latency"])
    # INT8 models and their float source compete; the fastest that meets every budget ships
    verdict = report["verdict"]
    assert verdict["model"] in ("ptq", "qat", "pruned")
    if verdict["passed"]:
        def p50(name: str) -> float:
            return next(e["p50_ms"] for e in rows[name]["latency"] if e["batch_size"] == 1)

        passing = [c["model"] for c in verdict["checks"] if c["passed"]]
        assert p50(verdict["model"]) == min(p50(n) for n in passing)
    md = (tmp / "reports" / cfg.name / "report.md").read_text()
    assert md.count("|") > 20
    assert report["environment"]["cpu"]
    # the evidence behind the numbers: every INT8 candidate, pruning latency, training rates
    search = report["evidence"]["int8_search"]
    assert len(search["candidates"]) >= 4 and search["chosen"] in [r["name"] for r in search["candidates"]]
    assert "## INT8 format chosen by measurement" in md and search["chosen"] in md
    assert "## Pruning: MACs vs measured latency" in md and "## Training throughput" in md
    assert {r["stage"] for r in report["evidence"]["training"]} == {"teacher", "distill", "prune", "quantize"}
    # QAT trains in the format the PTQ search measured fastest (quantize.qat: auto)
    q = json.loads((tmp / "models" / cfg.name / "quantize" / "metrics.json").read_text())
    winner = q["ptq"]["search"]["winner_settings"]
    assert q["qat_format"] == {"activation_type": winner["activation_type"], "per_channel": winner["per_channel"]}


def test_rerun_is_cached_and_force_reruns(run_copy):
    tmp, cfg = run_copy
    outcomes, _ = run_pipeline(cfg, quiet=True, log=lambda m: None)
    # the copy writes its report elsewhere: only the report is made again
    assert {n for n, s in _status(outcomes).items() if s != "cached"} == {"report"}
    outcomes, _ = run_pipeline(cfg, quiet=True, log=lambda m: None)
    assert all(o.status == "cached" for o in outcomes)
    outcomes, _ = run_pipeline(cfg, quiet=True, log=lambda m: None, force={"bench"})
    status = _status(outcomes)
    assert status["bench"] == "ran" and status["export"] == "cached"


def test_edited_artifact_is_not_trusted(run_copy):
    tmp, cfg = run_copy
    onnx_path = tmp / "models" / cfg.name / "export" / "student.onnx"
    with open(onnx_path, "ab") as f:
        f.write(b"\0")
    outcomes, _ = run_pipeline(cfg, quiet=True, log=lambda m: None)
    status = {o.name: o.status for o in outcomes}
    assert status["teacher"] == "cached" and status["export"] == "ran"


def test_changing_a_budget_reruns_the_format_search_not_training(run_copy):
    tmp, _ = run_copy
    cfg = _cfg(tmp, ROOT / "pipelines" / "tiny_synthetic.yaml", ["budgets.latency_batch_size=8"])
    status = _status(run_pipeline(cfg, quiet=True, log=lambda m: None)[0])
    assert status["teacher"] == status["distill"] == "cached"
    assert status["prune"] == "ran" and status["quantize"] == "ran"  # both choose by latency at that batch


def test_unrelated_edit_does_not_retrain(run_copy):
    tmp, _ = run_copy
    cfg = _cfg(tmp, ROOT / "pipelines" / "tiny_synthetic.yaml", ["bench.warmup=3", "export.parity_samples=32"])
    status = _status(run_pipeline(cfg, quiet=True, log=lambda m: None)[0])
    assert status["teacher"] == status["distill"] == "cached"
    assert status["export"] == "ran"


def test_another_machine_remeasures(run_copy, monkeypatch):
    from compresskit import envinfo

    tmp, cfg = run_copy
    real = envinfo.machine_key
    monkeypatch.setattr(envinfo, "machine_key", lambda threads: {**real(threads), "cpu": "another CPU"})
    status = _status(run_pipeline(cfg, quiet=True, log=lambda m: None)[0])
    assert status["teacher"] == status["distill"] == "cached"
    assert status["prune"] == status["quantize"] == status["bench"] == "ran"


def test_disabled_distillation_compresses_the_teacher(run_copy):
    tmp, _ = run_copy
    cfg = _cfg(tmp, ROOT / "pipelines" / "tiny_synthetic.yaml",
               ["distill.enabled=false", "prune.enabled=false", "quantize.qat.enabled=false"])
    outcomes, report = run_pipeline(cfg, quiet=True, log=lambda m: None)
    status = _status(outcomes)
    assert status == {"teacher": "cached", "distill": "skipped", "prune": "skipped", "quantize": "ran",
                      "export": "ran", "bench": "ran", "report": "ran"}
    assert [r["name"] for r in report["rows"]] == ["teacher", "ptq"]
    assert {s["name"]: s["status"] for s in report["stages"]}["distill"] == "skipped"
    assert report["verdict"]["model"] in ("ptq", "teacher")


def test_gpu_recipe_runs_with_tiny_overrides(tmp_path):
    """The full-scale CIFAR-10 recipe, shrunk: same stages and methods on synthetic data."""
    overrides = ["data.dataset=synthetic", "data.synthetic.channels=3", "data.synthetic.image_size=16",
                 "data.synthetic.num_train=192", "data.synthetic.num_test=64", "data.calib_size=32",
                 "data.batch_size=32", "device=cpu", "teacher.train.epochs=1", "distill.train.epochs=1",
                 "prune.finetune.train.epochs=1", "quantize.qat.train.epochs=1",
                 "export.parity_samples=32", "bench.batch_sizes=[1]", "bench.max_seconds=0.1",
                 "bench.min_runs=3", "bench.warmup=1", "budgets.latency_batch_size=1",
                 "teacher.model.width=8", "data.num_workers=0"]
    cfg = _cfg(tmp_path, ROOT / "pipelines" / "cifar10_mobilenetv2.yaml", overrides)
    outcomes, report = run_pipeline(cfg, quiet=True, log=lambda m: None)
    assert {o.status for o in outcomes} == {"ran"}
    assert {r["name"] for r in report["rows"]} >= {"teacher", "student", "ptq"}


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="needs dataset-fashion-mnist")
@pytest.mark.slow
def test_default_pipeline_smoke(tmp_path):
    """The shipped default on real Fashion-MNIST, shortened: 6000 training images, few epochs."""
    overrides = ["data.limit_train=6000", "data.limit_test=1000", "teacher.train.epochs=2",
                 "distill.train.epochs=2", "quantize.qat.train.epochs=1", "bench.max_seconds=0.2"]
    cfg = _cfg(tmp_path, ROOT / "pipelines" / "mobilenet_edge.yaml", overrides)
    outcomes, report = run_pipeline(cfg, quiet=True, log=lambda m: None)
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == {"teacher", "student", "ptq", "qat"}  # the searched student is not pruned
    assert rows["teacher"]["accuracy"] > 0.7 and rows["ptq"]["accuracy"] > 0.5
    assert rows["student"]["params"] < rows["teacher"]["params"] / 9
    assert rows["ptq"]["size_bytes"] < rows["student"]["size_bytes"] / 2.5  # INT8 weights, plus QDQ scales


def test_check_command_rechecks_budgets(tiny_run):
    from typer.testing import CliRunner

    from compresskit.cli import app

    tmp, cfg, _, _, _ = tiny_run
    report_dir = tmp / "reports" / cfg.name
    runner = CliRunner()
    ok = runner.invoke(app, ["check", str(report_dir), "--min-accuracy", "0.1"])
    assert ok.exit_code == 0, ok.output
    fail = runner.invoke(app, ["check", str(report_dir / "report.json"), "--max-latency-ms", "0.000001"])
    assert fail.exit_code == 1 and "max_latency_ms" in fail.output


def test_deployed_model_carries_its_figures(tiny_run):
    tmp, cfg, _, _, _ = tiny_run
    report = json.loads((tmp / "reports" / cfg.name / "report.json").read_text())
    model = onnx.load(tmp / "models" / cfg.name / "report" / "deployed.onnx")
    props = {p.key: p.value for p in model.metadata_props}
    figures = json.loads(props["compresskit.metrics"])
    assert figures["model"] == report["verdict"]["model"]
    row = next(r for r in report["rows"] if r["name"] == figures["model"])
    assert figures["accuracy"] == row["accuracy"] and "compresskit.preprocess" in props


def test_teacher_from_checkpoint(tiny_run, tmp_path):
    """A compresskit checkpoint and a plain state dict both load as the teacher."""
    import torch

    src_tmp, cfg, _, _, _ = tiny_run
    ckpt = src_tmp / "models" / cfg.name / "teacher" / "model.pt"
    plain = tmp_path / "plain.pt"
    torch.save(torch.load(ckpt, weights_only=True)["state_dict"], plain)
    for i, path in enumerate((ckpt, plain)):
        run_cfg = _cfg(tmp_path / str(i), ROOT / "pipelines" / "tiny_synthetic.yaml", [f"teacher.checkpoint={path}"])
        outcomes, _ = run_pipeline(run_cfg, quiet=True, log=lambda m: None, until="teacher")
        assert [o.name for o in outcomes] == ["teacher"]
        metrics = outcomes[0].metrics
        assert metrics["loaded_from"] == str(path) and metrics["test_accuracy"] > 0.6


def test_bad_teacher_checkpoint_is_refused_before_anything_is_written(tmp_path):
    from compresskit.config import ConfigError

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    cfg = _cfg(tmp_path, ROOT / "pipelines" / "tiny_synthetic.yaml", [f"teacher.checkpoint={bad}"])
    with pytest.raises(ConfigError, match="bad.pt"):
        run_pipeline(cfg, quiet=True, log=lambda m: None, until="teacher")
    assert not (tmp_path / "models").exists()


def test_magnitude_pruning_reuses_upstream_stages(tiny_run, tmp_path):
    """Switching the pruner re-runs prune and what follows; teacher and distill come from cache."""
    import shutil

    src_tmp, cfg, _, _, _ = tiny_run
    # the whole run, so a stale qat.onnx from the earlier config lies in export/
    shutil.copytree(src_tmp / "models" / cfg.name, tmp_path / "models" / cfg.name)
    assert (tmp_path / "models" / cfg.name / "export" / "qat.onnx").is_file()
    run_cfg = _cfg(tmp_path, ROOT / "pipelines" / "tiny_synthetic.yaml",
                   ["prune.pruner={method: magnitude, sparsity: 0.6}", "quantize.qat.enabled=false"])
    outcomes, report = run_pipeline(run_cfg, quiet=True, log=lambda m: None)
    status = {o.name: o.status for o in outcomes}
    assert status["teacher"] == "cached" and status["distill"] == "cached" and status["prune"] == "ran"
    prune_metrics = next(o for o in outcomes if o.name == "prune").metrics
    assert 0.55 < prune_metrics["prune"]["sparsity"] < 0.65
    rows = {r["name"]: r for r in report["rows"]}
    # same dense shapes, but the exported weights really are sparse
    assert 0.9 * rows["student"]["params"] <= rows["pruned"]["params"] <= rows["student"]["params"]
    assert rows["pruned"]["nonzero_params"] < 0.6 * rows["pruned"]["params"]
    # the stale QAT model is neither measured nor deployable
    assert "qat" not in rows and report["verdict"]["model"] in ("ptq", "pruned")
    assert [c["model"] for c in report["verdict"]["checks"]] == ["ptq", "pruned"]
    assert not (tmp_path / "models" / cfg.name / "export" / "qat.onnx").exists()


def test_cli_run_prints_stage_table_and_verdict(run_copy):
    from typer.testing import CliRunner

    from compresskit.cli import app

    tmp, cfg = run_copy
    result = CliRunner().invoke(app, ["run", str(ROOT / "pipelines" / "tiny_synthetic.yaml"), "-q",
                                      "--set", f"models_dir={tmp / 'models'}",
                                      "--set", f"reports_dir={tmp / 'reports'}"])
    assert result.exit_code == 0, result.output
    assert "up to date, skipped" in result.output and "verdict: PASS" in result.output
    failing = CliRunner().invoke(app, ["run", str(ROOT / "pipelines" / "tiny_synthetic.yaml"), "-q",
                                       "--set", f"models_dir={tmp / 'models'}",
                                       "--set", f"reports_dir={tmp / 'reports'}",
                                       "--set", "budgets.min_accuracy=1.0"])
    assert failing.exit_code == 1 and "verdict: FAIL" in failing.output
    assert (tmp / "reports" / cfg.name / "report.json").is_file()


def test_prune_reports_measured_latency_and_picks_a_ratio_by_target(tiny_run, tmp_path):
    import shutil

    tmp, cfg, _, _, _ = tiny_run
    fixed = json.loads((tmp / "models" / cfg.name / "prune" / "metrics.json").read_text())["latency"]
    row = fixed["tried"][0]
    assert row["ratio"] == 0.5 and 0 < row["mac_ratio"] < 1 and row["latency_ms"] > 0
    assert row["latency_ratio"] == pytest.approx(row["latency_ms"] / fixed["base_latency_ms"])
    # target mode, on a copy of the run: the smallest ratio that is fast enough (or the largest)
    shutil.copytree(tmp / "models", tmp_path / "models")
    cfg2 = _cfg(tmp_path, ROOT / "pipelines" / "tiny_synthetic.yaml",
                ["prune.pruner.target_speedup=1.05", "prune.pruner.search_ratios=[0.2,0.4,0.6]"])
    outcomes, _ = run_pipeline(cfg2, from_stage="prune", until="prune", quiet=True, log=lambda _: None)
    assert [o.status for o in outcomes if o.name == "prune"] == ["ran"]
    info = json.loads((tmp_path / "models" / cfg.name / "prune" / "metrics.json").read_text())["latency"]
    ratios = [r["ratio"] for r in info["tried"]]
    assert ratios == [0.2, 0.4, 0.6][:len(ratios)]
    assert info["chosen_ratio"] == ratios[-1]
    assert info["met_target"] == info["tried"][-1]["meets_target"]
    assert all(not r["meets_target"] for r in info["tried"][:-1])


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_benchmark_scripts_run_on_the_tiny_run(tiny_run, tmp_path):
    """The benchmark scripts work end to end (tiny models; their numbers mean nothing here)."""
    tmp, cfg, _, _, _ = tiny_run
    run = tmp / "models" / cfg.name
    tiny = str(ROOT / "pipelines" / "tiny_synthetic.yaml")
    out = tmp_path / "ptq.md"
    assert _script("ptq_compare").main(["--config", tiny, "--model", str(run / "quantize" / "float.onnx"),
                                        "--rounds", "1", "--max-seconds", "0.02", "--out", str(out)]) == 0
    table = out.read_text()
    assert "| FP32 |" in table and "compresskit search (" in table and "quantize_static defaults" in table
    out = tmp_path / "prune.md"
    assert _script("prune_ratios").main(["--config", tiny, "--run", str(run), "--ratios", "0.5", "--epochs", "1",
                                         "--rounds", "1", "--max-seconds", "0.02", "--out", str(out)]) == 0
    assert "| 0 (unpruned) |" in out.read_text() and "| 0.5 |" in out.read_text()
    out = tmp_path / "throughput.md"
    assert _script("distill_throughput").main(["--config", tiny, "--teacher", str(run / "teacher" / "model.pt"),
                                               "--steps", "3", "--rounds", "1", "--out", str(out)]) == 0
    assert "cache hit rate 100%" in out.read_text()


def test_tracked_run_logs_every_stage(run_copy):
    mlflow = pytest.importorskip("mlflow")
    tmp, _ = run_copy
    cfg = _cfg(tmp, ROOT / "pipelines" / "tiny_synthetic.yaml", [f"tracking.mlflow_uri={tmp / 'mlruns'}"])
    outcomes, report = run_pipeline(cfg, quiet=True, log=lambda m: None)
    assert _status(outcomes)["distill"] == "cached"  # tracking is no stage's input
    client = mlflow.MlflowClient((tmp / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("compresskit").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["name"] == cfg.name
    assert run.data.metrics["teacher/test_accuracy"] == pytest.approx(report["rows"][0]["accuracy"], abs=0.05)
    assert len(client.get_metric_history(run.info.run_id, "distill/student/epoch/val_accuracy")) == 3
    assert "report.json" in [a.path for a in client.list_artifacts(run.info.run_id)]
