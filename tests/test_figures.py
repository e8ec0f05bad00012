"""One set of figures: every latency of a report from one interleaved pass (`bench.bench_models`),
confidence intervals shown, the accuracy-drop references named, one parameter count, the deployed
file's sha256, a busy machine noticed, and `.npz` inputs checked against the model's preprocessing.
Tiny ONNX models built with onnx.helper; the timing logic on simulated sessions and clocks."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compresskit import bench, budget, report
from compresskit.report import rows as report_rows

FAST = {"warmup": 1, "min_runs": 3, "max_runs": 40, "max_seconds": 0.02}
PREPROCESS = {"scale": 1 / 255, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "layout": "NCHW",
              "channels": 3, "size": [2, 2]}


def linear_model(path: Path, *, out: int = 4, batch: int | str = "N", seed: int = 0, preprocess: bool = True) -> Path:
    """Flatten -> Gemm (12 -> out) on (N, 3, 2, 2) input, with compresskit.preprocess metadata."""
    w = np.random.default_rng(seed).standard_normal((out, 12)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, out])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if preprocess:
        model.metadata_props.add(key=bench.PREPROCESS_KEY, value=json.dumps(PREPROCESS))
    onnx.save(model, path)
    return path


# --------------------------------------------------------------------------- simulated timing


class SimClock:
    """A nanosecond clock that only the simulated sessions advance; slower by `factor` after `slow_at`."""

    def __init__(self, slow_at_s: float = float("inf"), factor: float = 1.0):
        self.now = 0
        self.slow_at, self.factor = slow_at_s * 1e9, factor

    def __call__(self) -> int:
        return self.now


class SimSession:
    """Enough of an InferenceSession for `_interleaved_runs`: each run costs `ms` on the SimClock."""

    def __init__(self, name: str, ms: float, clock: SimClock, log: list[str]):
        self.name, self.ms, self.clock, self.log = name, ms, clock, log

    def get_inputs(self):
        return [SimpleNamespace(name="x", type="tensor(float)", shape=["N", 2])]

    def get_outputs(self):
        return [SimpleNamespace(name="y")]

    def run(self, outputs, feeds):
        self.log.append(self.name)
        factor = self.clock.factor if self.clock.now >= self.clock.slow_at else 1.0
        self.clock.now += int(self.ms * 1e6 * factor)


def test_interleaved_runs_alternate_in_bursts_until_precise(monkeypatch):
    clock, log = SimClock(), []
    monkeypatch.setattr(time, "perf_counter_ns", clock)
    sessions = {"a": SimSession("a", 1.0, clock, log), "b": SimSession("b", 4.0, clock, log)}
    times, stopped = bench._interleaved_runs(sessions, 1, warmup=2, min_runs=10, max_runs=10_000, max_seconds=60,
                                             target_rel_ci=0.01, burst_ms=20.0)
    assert stopped == {"a": "precision", "b": "precision"}
    assert set(times["a"]) == {1_000_000} and set(times["b"]) == {4_000_000}
    assert len(times["a"]) >= 10 and len(times["b"]) >= 10
    # warm-up of each, then turns: a rewarm run plus a burst of about 20 ms of each model
    assert log[:4] == ["a", "a", "b", "b"]
    turns = [(k, len(list(g))) for k, g in itertools.groupby(log[4:])]
    assert [k for k, _ in turns[:4]] == ["a", "b", "a", "b"]
    assert turns[0][1] == 2 and turns[1][1] == 2  # first turns: rewarm + 1 timed run
    assert turns[2][1] == 1 + 20  # then bursts of ~burst_ms: 20 runs of a
    assert turns[3][0] == "b" and turns[3][1] % (1 + 5) == 0  # 5 of b (alone once a is precise)


def test_interleaving_keeps_ratios_under_drift(monkeypatch):
    """The machine slows down by 1.5x after 0.3 s: timed one after the other, the second model
    looks 4.5x slower than the first; timed in alternation, the true 3x."""
    opts = {"min_runs": 10, "max_runs": 10**6, "target_rel_ci": None}
    clock = SimClock(slow_at_s=0.3, factor=1.5)
    monkeypatch.setattr(time, "perf_counter_ns", clock)
    log: list[str] = []
    a, b = SimSession("a", 1.0, clock, log), SimSession("b", 3.0, clock, log)
    seq_a, _ = bench._timed_runs(a.run, ([], {}), max_seconds=0.5, **opts)
    seq_b, _ = bench._timed_runs(b.run, ([], {}), max_seconds=0.5, **opts)
    assert np.median(seq_b) / np.median(seq_a) == pytest.approx(4.5)
    clock.now = 0
    times, stopped = bench._interleaved_runs({"a": a, "b": b}, 1, warmup=0, max_seconds=0.5, burst_ms=20.0,
                                             **opts)
    assert set(stopped.values()) == {"time"}
    assert np.median(times["b"]) / np.median(times["a"]) == pytest.approx(3.0)


def test_interleaved_runs_limits(monkeypatch):
    clock, log = SimClock(), []
    monkeypatch.setattr(time, "perf_counter_ns", clock)
    sessions = {"a": SimSession("a", 1.0, clock, log), "slow": SimSession("slow", 50.0, clock, log)}
    times, stopped = bench._interleaved_runs(sessions, 1, warmup=0, min_runs=3, max_runs=30, max_seconds=1.0,
                                             target_rel_ci=None, burst_ms=5.0)
    assert stopped == {"a": "runs", "slow": "time"}
    assert len(times["a"]) == 30 and clock.now >= 2e9  # the pass's budget: 1 s per model
    clock.now = 0
    times, stopped = bench._interleaved_runs(sessions, 1, warmup=0, min_runs=5, max_runs=30, max_seconds=0.001,
                                             target_rel_ci=None, burst_ms=5.0)
    assert stopped == {"a": "time", "slow": "time"}
    assert len(times["slow"]) == 5  # min_runs even past the time budget


# --------------------------------------------------------------------------- bench_models


def test_bench_models_one_pass_shaped_like_bench_model(tmp_path, monkeypatch):
    small = linear_model(tmp_path / "small.onnx")
    big = linear_model(tmp_path / "big.onnx", out=64, seed=1)
    fixed = linear_model(tmp_path / "fixed.onnx", batch=1)
    evaluated: list[str] = []
    real_evaluate = bench.evaluate

    def counting_evaluate(session, x, y, **kw):
        evaluated.append(session)
        return real_evaluate(session, x, y, **kw)

    monkeypatch.setattr(bench, "evaluate", counting_evaluate)
    x = np.random.default_rng(0).standard_normal((6, 3, 2, 2)).astype(np.float32)
    y = np.zeros(6, np.int64)
    messages: list[str] = []
    res = bench.bench_models({"small": small, "big": big, "fixed": fixed}, batch_sizes=(1, 2), threads=(1,),
                             target_rel_ci=0.5, x=x, y=y, progress=messages.append, **FAST)
    single = bench.bench_model(small, batch_sizes=(1, 2), **FAST)
    assert set(single) <= set(res["small"])
    assert len(evaluated) == 3  # accuracy once per model, after timing
    assert [e["batch_size"] for e in res["small"]["latency"]] == [1, 2]
    b1 = res["small"]["latency"][0]
    assert b1["interleaved_with"] == ["big", "fixed"] and res["small"]["latency"][1]["interleaved_with"] == ["big"]
    assert set(b1) >= set(single["latency"][0])
    assert b1["stopped_by"] in {"precision", "time", "runs"} and b1["runs"] >= 3
    assert res["fixed"]["latency_skipped"] == [{"batch_size": 2, "threads": 1, "reason": "model input has fixed "
                                                                                        "batch 1"}]
    assert res["small"]["accuracy"] is not None and res["small"]["eval"]["n"] == 6
    assert "busy_fraction" in res["small"] and res["small"]["load"]["threshold"] == bench.BUSY_WARN_FRACTION
    # progress: one line as each pass starts, one with its results
    assert any("in alternation at batch 1" in m for m in messages)
    assert any(m.startswith("batch 2, 1 thread(s): small ") for m in messages)
    json.dumps(res)
    with pytest.raises(ValueError, match="no models"):
        bench.bench_models({})


def test_bench_stage_uses_one_pass(tmp_path, monkeypatch):
    from compresskit.bench import run
    from compresskit.stage import StageContext

    calls = []
    monkeypatch.setattr(bench, "bench_models", lambda paths, **kw: calls.append(dict(paths)) or {
        n: {"accuracy": None, "load": {"busy_fraction": 0.5, "busy": True, "threshold": 0.1}} for n in paths})
    job = SimpleNamespace(bench=SimpleNamespace(accuracy=False, batch_sizes=[1], threads=[1], warmup=1, min_runs=3,
                                                max_seconds=0.1, target_rel_ci=None), data=None, seed=0)
    ctx = StageContext(name="bench", dir=tmp_path, inputs={"a": tmp_path / "a.onnx", "b": tmp_path / "b.onnx"},
                       key="k", log=lambda m: None)
    result = run(ctx, job)
    assert calls == [{"a": tmp_path / "a.onnx", "b": tmp_path / "b.onnx"}]
    assert result.metrics["busy_fraction"] == 0.5 and "busy" in result.metrics["warning"]
    assert "WARNING: the machine was busy" in result.summary


# --------------------------------------------------------------------------- busy machine


def _fake_snapshots(per_window_other: float, own: float = 0.5):
    """Each call: +1 s wall; the CPUs' busy time grows by own + other, this process's by own."""
    state = {"wall": 0.0, "busy": 100.0, "own": 10.0}

    def snapshot():
        out = (state["wall"], state["busy"], state["own"])
        state["wall"] += 1.0
        state["busy"] += own + per_window_other
        state["own"] += own
        return out

    return snapshot


def test_cpu_load_measures_other_processes(monkeypatch):
    monkeypatch.setattr(bench, "_cpu_snapshot", _fake_snapshots(0.3))
    load = bench.CpuLoad()
    load.start()
    assert load.stop() == pytest.approx(0.3)
    summary = load.summary()
    assert summary["busy_fraction"] == pytest.approx(0.3) and summary["busy"]
    assert "other processes used 30% of a CPU core" in bench.busy_warning(summary)
    monkeypatch.setattr(bench, "_cpu_snapshot", _fake_snapshots(0.05))
    quiet = bench.CpuLoad()
    quiet.start()
    quiet.stop()
    assert not quiet.summary()["busy"] and bench.busy_warning(quiet.summary()) is None
    # off Linux (no /proc/stat): unknown, never a warning
    monkeypatch.setattr(bench, "_cpu_snapshot", lambda: (time.monotonic(), None, 0.0))
    unknown = bench.CpuLoad()
    unknown.start()
    assert unknown.stop() is None and unknown.summary()["busy_fraction"] is None


def test_proc_stat_reader():
    total = bench._proc_stat_busy_s()
    if total is None:
        pytest.skip("no /proc/stat here")
    assert total > 0
    first = bench._proc_stat_busy_s({0})
    assert first is not None and first <= total + 0.05


def test_bench_models_records_busy_fraction(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "_cpu_snapshot", _fake_snapshots(0.4))
    res = bench.bench_models({"m": linear_model(tmp_path / "m.onnx")}, batch_sizes=(1,), **FAST)
    assert res["m"]["busy_fraction"] == pytest.approx(0.4) and res["m"]["load"]["busy"]
    assert res["m"]["latency"][0]["busy_fraction"] == pytest.approx(0.4)


# --------------------------------------------------------------------------- the npz check


def test_check_preprocessed():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 3, 2, 2))
    right = ((pixels / 255 - 0.5) / 0.25).astype(np.float32)
    assert bench.check_preprocessed(right, PREPROCESS) is None
    assert bench.check_preprocessed(right, json.dumps(PREPROCESS)) is None
    raw = bench.check_preprocessed(pixels.astype(np.float32), PREPROCESS)
    assert raw.startswith("x looks like raw 0-255 pixels (min 0, max 255)") and "compresskit npz" in raw
    assert "uint8 (raw pixels?)" in bench.check_preprocessed(pixels.astype(np.uint8), PREPROCESS)
    scaled = bench.check_preprocessed((pixels / 255).astype(np.float32), PREPROCESS)
    assert "far from the ~0 and ~1" in scaled and "not normalised" in scaled
    # nothing recorded, or a shape the metadata does not describe: no judgement
    assert bench.check_preprocessed(pixels.astype(np.float32), None) is None
    assert bench.check_preprocessed(pixels[:, :1].astype(np.float32), PREPROCESS) is None


def test_write_eval_npz_matches_the_check(tmp_path):
    from compresskit.config import DataConfig, SyntheticConfig
    from compresskit.data import write_eval_npz

    cfg = DataConfig(dataset="synthetic", synthetic=SyntheticConfig(num_train=64, num_test=40, num_classes=3,
                                                                     image_size=8, channels=3))
    info = write_eval_npz(cfg, tmp_path / "sub" / "test.npz", limit=25)
    with np.load(tmp_path / "sub" / "test.npz") as npz:
        x, y = npz["x"], npz["y"]
    assert x.dtype == np.float32 and x.shape == (25, 3, 8, 8) and y.dtype == np.int64 and len(y) == 25
    assert info["n"] == 25 and info["shape"] == [25, 3, 8, 8] and info["preprocess"]["std"] == [0.25] * 3
    assert bench.check_preprocessed(x, info["preprocess"]) is None
    with pytest.raises(ValueError, match="split"):
        write_eval_npz(cfg, tmp_path / "x.npz", split="holdout")


# --------------------------------------------------------------------------- the CLI


def _cli(args):
    from typer.testing import CliRunner

    from compresskit.cli import app

    return CliRunner().invoke(app, args)


def test_cli_bench_several_models_progress_and_busy(tmp_path, monkeypatch):
    a, b = linear_model(tmp_path / "a.onnx"), linear_model(tmp_path / "b.onnx", out=32)
    monkeypatch.setattr(bench, "_cpu_snapshot", _fake_snapshots(0.6))
    out = tmp_path / "r.json"
    args = ["bench", str(a), str(b), "--batch-sizes", "1,2", "--max-seconds", "0.01", "--warmup", "1",
            "--json", str(out)]
    result = _cli(args)
    assert result.exit_code == 0, result.output
    assert "timing a, b in alternation at batch 1, 1 thread(s)" in result.stderr
    assert "batch 2, 1 thread(s): a " in result.stderr
    assert "warning" in result.stderr and "other processes used 60% of a CPU core" in result.stderr
    assert "Timed together" in result.stdout and str(a) in result.stdout and str(b) in result.stdout
    saved = json.loads(out.read_text())
    assert set(saved["models"]) == {"a", "b"}
    assert saved["models"]["a"]["latency"][0]["interleaved_with"] == ["b"]
    quiet = _cli([*args, "-q"])
    assert quiet.exit_code == 0, quiet.output
    assert "in alternation" not in quiet.stderr and "other processes used 60%" in quiet.stderr


def test_cli_bench_warns_on_raw_pixels(tmp_path):
    model = linear_model(tmp_path / "m.onnx")
    pixels = np.random.default_rng(0).integers(0, 256, (8, 3, 2, 2))
    np.savez(tmp_path / "raw.npz", x=pixels.astype(np.float32), y=np.zeros(8, np.int64))
    np.savez(tmp_path / "ok.npz", x=((pixels / 255 - 0.5) / 0.25).astype(np.float32), y=np.zeros(8, np.int64))
    base = ["bench", str(model), "--batch-sizes", "1", "--max-seconds", "0.01", "--warmup", "1", "-q"]
    raw = _cli([*base, "--data", str(tmp_path / "raw.npz")])
    assert raw.exit_code == 0, raw.output
    warnings = [line for line in raw.stderr.splitlines() if "raw 0-255 pixels" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning --data")
    ok = _cli([*base, "--data", str(tmp_path / "ok.npz")])
    assert ok.exit_code == 0 and "raw 0-255" not in ok.stderr and "accuracy" in ok.stdout


def test_cli_npz(tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("name: t\ndata:\n  dataset: synthetic\n  synthetic: {num_train: 64, num_test: 30, num_classes: 3,"
                   " image_size: 8}\n")
    result = _cli(["npz", str(cfg), "-o", str(tmp_path / "t.npz"), "--limit", "10"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stdout and "10 test samples" in result.stdout
    with np.load(tmp_path / "t.npz") as npz:
        assert npz["x"].shape == (10, 1, 8, 8)
    bad = _cli(["npz", str(cfg), "-o", str(tmp_path / "t.npz"), "--split", "holdout"])
    assert bad.exit_code == 2


# --------------------------------------------------------------------------- the report


def _lat(batch, p50, rel=0.02):
    return {"batch_size": batch, "threads": 1, "threads_setting": 1, "p50_ms": p50, "p90_ms": p50 * 1.1,
            "mean_ms": p50, "runs": 200, "throughput": batch * 1000 / p50,
            "ci95_ms": [p50 * (1 - rel), p50 * (1 + rel)], "ci95_rel": rel, "interleaved_with": ["others"]}


def _rows():
    def row(name, stage, precision, acc, p50):
        return {"name": name, "stage": stage, "precision": precision, "accuracy": acc, "size_bytes": 1000,
                "macs": 1000, "params": 500, "latency": [_lat(1, p50), _lat(8, p50 * 6)]}

    return [row("teacher", "teacher", "fp32", 0.93, 2.0), row("student", "distill", "fp32", 0.92, 1.0),
            row("pruned", "prune", "fp32", 0.915, 1.12), row("ptq", "quantize", "int8", 0.91, 0.94)]


EVIDENCE = {
    "int8_search": {"fp32": {"val_accuracy": 0.9, "latency_p50_ms": {"1": 0.2}}, "floor": 0.89, "rank_batch_size": 1,
                    "chosen": "u8s8", "met_budget": True, "excluded_nodes": [],
                    "candidates": [{"name": "u8s8", "val_accuracy": 0.9, "latency_p50_ms": {"1": 0.206},
                                    "speedup_vs_fp32": {"1": 0.97}, "graph": {}}]},
    "pruning": {"base_latency_ms": 0.2, "target_latency_ms": 0.19, "met_target": True,
                "tried": [{"ratio": 0.5, "macs": 500, "mac_ratio": 0.5, "latency_ms": 0.196, "latency_ratio": 0.98}]},
}


def _report(budgets=None):
    rows = _rows()
    verdict = budget.decide(rows, budget.resolve_budgets(budgets or {"max_accuracy_drop": 0.02}, [1]))
    return report.build_report(run="r", config={}, rows=rows, verdict=verdict, environment={}, stages=[],
                               evidence=json.loads(json.dumps(EVIDENCE)))


def test_report_names_both_accuracy_references_and_shows_cis():
    rep = _report()
    md = report.render_markdown(rep)
    header = next(line for line in md.splitlines() if line.startswith("| model | precision"))
    assert "| Δ vs teacher | drop vs student (budget ≤ 2.00 pt) |" in header and "params (ONNX)" in header
    ptq = next(line for line in md.splitlines() if line.startswith("| ptq *"))
    cells = [c.strip() for c in ptq.strip("|").split("|")]
    assert cells[3:6] == ["-2.00 pt", "1.00 pt", "0.940 ±2.0%"]
    assert "| max_accuracy_drop (vs student) | 2.00 pt |" in md
    assert "drop 1.00 pt vs student (92.00% -> 91.00%)" in json.dumps(rep["verdict"])
    assert "the max_accuracy_drop budget compares with `student`" in md
    lat = next(line for line in md.splitlines() if line.startswith("| ptq | 1 |"))
    assert "| 0.940 | 0.921-0.959 |" in lat and "95% CI of p50 (ms)" in md
    assert "from one pass that timed all models in alternation" in md
    html = report.render_html(rep)
    assert "drop vs student (budget ≤ 2.00 pt)" in html and "0.921-0.959" in html and "params (ONNX)" in html


def test_other_passes_only_as_ratios_beside_the_bench_pass():
    md = report.render_markdown(_report())
    int8 = md.split("## INT8 format")[1].split("## Pruning")[0]
    assert "relative to FP32 in that pass" in int8 and "0.97x" in int8
    assert "0.200" not in int8 and "0.206" not in int8  # no absolute ms of the search pass
    # the same pair in the bench pass, said beside it: pruned 1.12 ms / ptq 0.94 ms
    assert "In the bench pass (Models table), ptq runs at 1.19x the speed of pruned at batch 1" in int8
    pruning = md.split("## Pruning")[1].split("## Stages")[0]
    assert "prune stage's probe" in pruning and "| 0.5 | 500 | 0.50 | 0.98 |" in pruning
    assert "0.196" not in pruning and "target latency ratio <= 0.95 (met in that pass)" in pruning
    assert "In the bench pass (Models table), pruned / student p50 = 1.12 at batch 1" in pruning
    html = report.render_html(_report())
    assert "speed-up vs FP32 in the search pass" in html and "0.206" not in html


def test_selection_under_noise_in_the_report():
    rows = _rows()
    rows[3]["latency"][0].update(p50_ms=1.11, ci95_ms=[1.08, 1.14])  # ptq within pruned's CI
    verdict = budget.decide(rows, budget.resolve_budgets({}, [1]))
    assert verdict["model"] == "pruned" and verdict["latency_ties"] == ["ptq", "pruned"]
    rep = report.build_report(run="r", config={}, rows=rows, verdict=verdict, environment={}, stages=[])
    md = report.render_markdown(rep)
    assert "ranked by accuracy, then file size" in md and "Equally fast here: ptq, pruned." in md


def test_stage_summaries_say_which_params():
    text = report_rows.stage_summary("ratio 0.5: MACs 3.02M -> 2.62M (x0.87), FP32 latency x0.98, params 276k -> "
                                     "242k, test 91.61%")
    assert "params (torch count) 276k -> 242k" in text
    assert "FP32 latency x0.98 (prune stage's probe, not the bench pass)" in text
    assert report_rows.stage_summary("student test 91.76%, 0.276M params") == \
        "student test 91.76%, 0.276M params (torch count)"
    assert report_rows.stage_summary(report_rows.stage_summary("x params")) == "x params (torch count)"


def test_report_stage_writes_sha256_busy_and_annotated_summaries(tmp_path):
    from compresskit.artifacts import sha256_file, write_metrics
    from compresskit.budget import resolve_budgets
    from compresskit.report.stage import run
    from compresskit.stage import StageContext, StageOutcome
    from compresskit.stages import ReportJob

    models = {n: linear_model(tmp_path / f"{n}.onnx", seed=i) for i, n in enumerate(("student", "ptq"))}
    x = np.random.default_rng(0).standard_normal((6, 3, 2, 2)).astype(np.float32)
    measured = bench.bench_models(models, batch_sizes=(1,), x=x, y=np.zeros(6, np.int64), **FAST)
    load = {"busy_fraction": 0.35, "busy": True, "threshold": 0.1, "wall_s": 2.0, "other_cpu_s": 0.7}
    write_metrics(tmp_path / "bench", {"models": measured, "load": load, "busy_fraction": 0.35,
                                       "warning": bench.busy_warning(load)})
    (tmp_path / "report").mkdir()
    ctx = StageContext(name="report", dir=tmp_path / "report", key="k",
                       inputs={"bench_metrics": tmp_path / "bench" / "metrics.json", **models},
                       history=(StageOutcome("distill", "ran", 1.0, "student test 91.76%, 0.276M params"),))
    job = ReportJob(run="r", config={}, budgets=resolve_budgets({}, [1]), report_dir=str(tmp_path / "out"))
    result = run(ctx, job)
    rep = result.metrics["report"]
    deployed = Path(rep["deployed"]["path"])
    assert deployed == tmp_path / "report" / "deployed.onnx"
    assert rep["deployed"]["sha256"] == sha256_file(deployed) == result.metrics["deployed_sha256"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["deployed"]["sha256"] == rep["deployed"]["sha256"]
    assert saved["environment"]["busy_fraction"] == 0.35
    md = (tmp_path / "out" / "report.md").read_text()
    html = (tmp_path / "out" / "report.html").read_text()
    for text in (md, html):
        assert rep["deployed"]["sha256"] in text
        assert "35% of one core on average: BUSY" in text
        assert "the machine was busy" in text
    distill = next(s for s in saved["stages"] if s["name"] == "distill")
    assert distill["summary"] == "student test 91.76%, 0.276M params (torch count)"
    assert "BatchNorm included" in html
    assert rep["deployed"]["sha256"][:12] in result.summary


def test_stage_summary_with_other_parentheses():
    assert report_rows.stage_summary("student test 100.00%, 0.136M params (no-KD baseline 100.00%)") == \
        "student test 100.00%, 0.136M params (torch count) (no-KD baseline 100.00%)"
