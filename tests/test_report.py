"""Tests of compresskit.report: derived fields, JSON/Markdown files, loading, console table."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from compresskit import bench, budget, report

MIB = 2**20


def _lat(batch, p50, threads=1):
    return {
        "batch_size": batch,
        "threads": threads,
        "threads_setting": threads,
        "p50_ms": p50,
        "p90_ms": p50 * 1.1,
        "mean_ms": p50 * 1.05,
        "throughput": batch * 1000 / p50,
    }


def _rows():
    return [
        {
            "name": "teacher",
            "stage": "teacher",
            "precision": "fp32",
            "accuracy": 0.92,
            "size_bytes": 8 * MIB,
            "macs": 30_000_000,
            "params": 2_000_000,
            "nonzero_params": 2_000_000,
            "latency": [_lat(1, 10.0), _lat(64, 400.0)],
            "stage_wall_s": 216.0,
            "notes": "",
        },
        {
            "name": "student",
            "stage": "distill",
            "precision": "fp32",
            "accuracy": 0.915,
            "size_bytes": 1 * MIB,
            "macs": 3_000_000,
            "params": 280_000,
            "nonzero_params": 280_000,
            "latency": [_lat(1, 2.0), _lat(64, 50.0)],
            "stage_wall_s": 30.0,
            "notes": "KD T=4",
        },
        {
            "name": "ptq",
            "stage": "quantize",
            "precision": "int8",
            "accuracy": 0.913,
            "size_bytes": 300 * 1024,
            "macs": 3_000_000,
            "params": 280_000,
            "nonzero_params": 140_000,
            "latency": [_lat(1, 1.6), _lat(64, 25.0)],
            "stage_wall_s": 4.2,
            "notes": "U8S8 | per-channel",
        },
    ]


ENV = {
    "cpu": {
        "model": "Example CPU",
        "architecture": "x86_64",
        "logical_cores": 2,
        "usable_cores": 2,
        "isa_flags": ["avx2", "avx512_vnni"],
        "int8_dot": True,
    },
    "platform": "Linux-x86_64",
    "python": "3.11.7",
    "versions": {"onnxruntime": "1.32.0", "numpy": "2.4.6"},
    "onnxruntime_providers": ["CPUExecutionProvider"],
}
STAGES = [
    {"name": "teacher", "wall_s": 216.0, "cached": True, "status": "ok"},
    {"name": "quantize", "wall_s": 4.2, "cached": False, "status": "ok"},
]
BUDGETS = {"min_accuracy": 0.91, "max_size_mb": 0.5}


def _report(rows=None, budgets=BUDGETS):
    rows = rows or _rows()
    verdict = budget.select_and_verdict(rows, ["student", "ptq"], budgets, "teacher")
    return report.build_report(
        run="demo",
        config={"run": "demo", "budgets": budgets},
        rows=rows,
        verdict=verdict,
        environment=ENV,
        stages=STAGES,
    )


def test_derived_fields():
    rep = _report()
    assert rep["schema"] == "compresskit.report" and rep["schema_version"] == 1
    rows = {r["name"]: r for r in rep["rows"]}
    ptq = rows["ptq"]
    assert ptq["delta_accuracy_vs_teacher"] == pytest.approx(-0.7)
    assert ptq["size_ratio_vs_teacher"] == pytest.approx(300 * 1024 / (8 * MIB))
    assert ptq["macs_ratio_vs_teacher"] == pytest.approx(0.1)
    assert [e["speedup_vs_teacher"] for e in ptq["latency"]] == pytest.approx([6.25, 16.0])
    assert rows["teacher"]["delta_accuracy_vs_teacher"] == 0
    assert rows["teacher"]["latency"][0]["speedup_vs_teacher"] == 1.0
    assert rep["verdict"]["model"] == "ptq" and rep["verdict"]["passed"]
    json.dumps(rep)


def test_build_report_does_not_modify_inputs():
    rows = _rows()
    _report(rows)
    assert "delta_accuracy_vs_teacher" not in rows[0]
    assert "speedup_vs_teacher" not in rows[2]["latency"][0]


def test_speedup_only_at_matching_threads_and_missing_reference():
    rows = _rows()
    rows[2]["latency"].append(_lat(1, 1.0, threads=2))
    rep = _report(rows)
    assert rep["rows"][2]["latency"][-1]["speedup_vs_teacher"] is None
    no_ref = report.build_report(
        run="r", config={}, rows=_rows()[1:], verdict={}, environment={}, stages=[]
    )
    assert all(r["delta_accuracy_vs_teacher"] is None for r in no_ref["rows"])
    assert all(r["size_ratio_vs_teacher"] is None for r in no_ref["rows"])
    with pytest.raises(ValueError, match="duplicate"):
        report.build_report(
            run="r", config={}, rows=_rows() + _rows()[:1], verdict={}, environment={}, stages=[]
        )


def test_write_and_load_report(tmp_path):
    rep = _report()
    json_path, md_path = report.write_report(tmp_path / "reports" / "demo", rep)
    assert json_path.name == "report.json" and md_path.name == "report.md"
    loaded = report.load_report(json_path)
    assert loaded == json.loads(json.dumps(rep))
    md = md_path.read_text()
    assert md.startswith("# compresskit report: demo")
    assert "**Verdict: PASS**, deploy `ptq`" in md
    header = next(line for line in md.splitlines() if line.startswith("| model | precision"))
    assert "p50 b64 (ms)" in header and "speed-up b64" in header
    ptq = next(line for line in md.splitlines() if line.startswith("| ptq *"))
    cells = [c.strip() for c in ptq.strip("|").split("|")]
    assert cells[:4] == ["ptq *", "int8", "91.30%", "-0.70 pt"]
    assert cells[4:8] == ["1.600", "25.000", "6.25x", "16.00x"]
    assert cells[8:] == ["300.0 KiB", "3.00M", "280.00k (50% nz)", "4.2 s"]
    assert "U8S8 \\| per-channel" in md  # a pipe in a note must not break the table
    assert "| teacher | 8.00 MiB" not in md and "8.00 MiB" in md
    assert "3.6 min" in md  # teacher wall time
    assert "Example CPU" in md and "avx2, avx512_vnni" in md and "onnxruntime 1.32.0" in md
    assert "| min_accuracy | 91.00% |" in md and "| max_size_mb | 0.500 MiB |" in md
    assert "latency measured at" not in md
    assert "| student | max_size_mb | 0.500 MiB | 1.000 MiB | FAIL |" in md
    assert "| teacher | ok | yes | 3.6 min |" in md


CPU = {
    "model": "Example CPU",
    "vendor": "GenuineIntel",
    "architecture": "x86_64",
    "usable_cores": 2,
    "isa_flags": ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"],
    "clock_ghz": 2.0,
    "clock_source": "cpufreq max",
}


def _rows_with_peak():
    rows = _rows()
    for row in rows:
        for entry in row["latency"]:
            entry.update(bench.achieved_vs_peak(entry, row["macs"], row["precision"], CPU))
    return rows


def test_markdown_and_json_show_gmacs_and_peak(tmp_path):
    rep = _report(_rows_with_peak())
    json_path, md_path = report.write_report(tmp_path, rep)
    md = md_path.read_text()
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| model | batch"))
    assert header.endswith("| speed-up | GMAC/s | % of peak |")
    # ptq (int8): 3M MACs in 1.6 ms = 1.875 GMAC/s; int8 peak 1 x 2.0 GHz x 128 = 256 -> 0.73%
    assert "| ptq | 1 | 1 | 1.600 | - | 1.760 | 1.680 | - | 625.0 | 6.25x | 1.88 | 0.73% |" in lines
    # at batch 64: 64 x 3M / 25 ms = 7.68 GMAC/s = 3.00% of 256
    assert "| ptq | 64 | 1 | 25.000 | - | 27.500 | 26.250 | - | 2560.0 | 16.00x | 7.68 | 3.00% |" in lines
    # teacher (fp32): 30M / 10 ms = 3 GMAC/s; fp32 peak 1 x 2.0 x 32 = 64 -> 4.69%
    assert "| teacher | 1 | 1 | 10.000 | - | 11.000 | 10.500 | - | 100.0 | 1.00x | 3.00 | 4.69% |" in lines
    assert "| clock (for the peak) | 2.00 GHz (cpufreq max) |" in lines
    assert "| peak formula | peak GMAC/s = cores x clock GHz x MACs/cycle/core |" in lines
    fp32 = next(line for line in lines if line.startswith("| peak fp32, 1 core(s) |"))
    assert "1 x 2.00 GHz x 32 = 64.0 GMAC/s" in fp32 and "AVX-512 FMA" in fp32
    int8 = next(line for line in lines if line.startswith("| peak int8, 1 core(s) |"))
    assert "1 x 2.00 GHz x 128 = 256.0 GMAC/s" in int8 and "AVX-512 VNNI" in int8
    assert md.index("## Environment") < md.index("| peak formula |")
    entry = report.load_report(json_path)["rows"][2]["latency"][0]
    assert entry["gmacs"] == pytest.approx(1.875)
    assert entry["peak_fraction"] == pytest.approx(1.875 / 256)
    assert entry["peak"]["peak_gmacs"] == pytest.approx(256.0)


def test_peak_above_100_percent_is_explained():
    rows = _rows_with_peak()
    assert "Above 100%" not in report.render_markdown(_report(rows))
    rows[0]["latency"][0]["peak_fraction"] = 1.3  # a clock below the real one makes this possible
    md = report.render_markdown(_report(rows))
    assert f"Above 100% ({rows[0]['name']})" in md and "upper bound" in md


def test_evidence_sections_render():
    evidence = {
        "int8_search": {"fp32": {"val_accuracy": 0.9, "latency_p50_ms": {"1": 0.2}}, "floor": 0.89,
                        "rank_batch_size": 1, "chosen": "u8s8-pt-minmax", "met_budget": True, "excluded_nodes": [],
                        "candidates": [
                            {"name": "u8s8-pt-minmax", "val_accuracy": 0.9, "latency_p50_ms": {"1": 0.1},
                             "speedup_vs_fp32": {"1": 2.0}, "graph": {"int8_kernels": 5, "nodes": 7}},
                            {"name": "s8s8-pt-minmax", "val_accuracy": 0.9, "latency_p50_ms": {"1": 0.4},
                             "speedup_vs_fp32": {"1": 0.5}, "graph": {"int8_kernels": 2, "nodes": 20}}]},
        "pruning": {"base_latency_ms": 0.2, "tried": [{"ratio": 0.5, "macs": 1_000_000, "mac_ratio": 0.5,
                                                       "latency_ms": 0.16, "latency_ratio": 0.8}]},
        "training": [{"stage": "distill", "what": "student", "images_per_s": 1500.0, "wall_s": 60.0,
                      "teacher_cache": "10/5"}],
    }
    rep = report.build_report(run="r", config={}, rows=_rows(), verdict={}, environment=ENV, stages=[],
                              evidence=evidence)
    md = report.render_markdown(rep)
    # the stages' own passes are shown as ratios within those passes, never as absolute ms
    assert "| u8s8-pt-minmax | 90.00% | 2.00x | 5 / 7 | 0 | yes |" in md
    assert "| s8s8-pt-minmax | 90.00% | 0.50x | 2 / 20 | 0 |  |" in md
    assert "speed-up vs FP32 b1 (search pass)" in md and "relative to FP32 in that pass" in md
    assert "| 0.5 | 1.00M | 0.50 | 0.80 |" in md and "latency ratio (probe pass)" in md
    for absolute in ("0.100", "0.400", "0.160", "p50 (ms)"):
        assert absolute not in md.split("## INT8 format")[1].split("## Training")[0]
    assert "| distill | student | 1500 | 60.0 s | 10/5 |" in md
    # the chosen model slower than FP32 would be said plainly, as a figure of that pass
    evidence["int8_search"]["chosen"] = "s8s8-pt-minmax"
    md = report.render_markdown(report.build_report(run="r", config={}, rows=_rows(), verdict={}, environment=ENV,
                                                    stages=[], evidence=evidence))
    assert ("**INT8 was slower than FP32 during the format search for s8s8-pt-minmax at batch 1 (0.50x), relative "
            "to FP32 in that pass") in md


def test_markdown_without_peak_fields_still_renders(tmp_path):
    """Reports written before the peak existed have no gmacs/peak: cells show '-'."""
    rep = _report()
    md = report.render_markdown(rep)
    ptq = next(line for line in md.splitlines() if line.startswith("| ptq | 1 |"))
    assert ptq.endswith("| 6.25x | - | - |")
    assert "peak formula" not in md and "clock (for the peak)" not in md
    env_clock = {**ENV, "cpu": {**ENV["cpu"], "clock_ghz": 3.1, "clock_source": "cpufreq max"}}
    rep = report.build_report(run="r", config={}, rows=_rows(), verdict={}, environment=env_clock, stages=[])
    assert "| clock (for the peak) | 3.10 GHz (cpufreq max) |" in report.render_markdown(rep)


def test_fmt_peak_fraction():
    assert report.fmt_peak_fraction(None) == "-"
    assert report.fmt_peak_fraction(0.00732) == "0.73%"
    assert report.fmt_peak_fraction(0.185) == "18.5%"


def test_failed_verdict_in_markdown(tmp_path):
    rep = _report(budgets={"min_accuracy": 0.99})
    _, md_path = report.write_report(tmp_path, rep)
    assert "**Verdict: FAIL**, best candidate `student`" in md_path.read_text()


def test_load_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no report"):
        report.load_report(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        report.load_report(bad)
    bad.write_text(json.dumps({"schema": "other", "schema_version": 1}))
    with pytest.raises(ValueError, match="not a compresskit report"):
        report.load_report(bad)
    bad.write_text(json.dumps({"schema": "compresskit.report", "schema_version": 2}))
    with pytest.raises(ValueError, match="schema_version 2"):
        report.load_report(bad)


def test_console_table():
    rep = _report()
    table = report.render_console_table(rep)
    assert table.row_count == 3
    assert [c.header for c in table.columns][:3] == ["model", "precision", "accuracy"]
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(table)
    text = out.getvalue()
    assert "ptq *" in text and "91.50%" in text and "Verdict: PASS, deploy 'ptq'" in text


def test_formatters():
    assert report.fmt_size(1536) == "1.5 KiB"
    assert report.fmt_size(3 * MIB) == "3.00 MiB"
    assert report.fmt_count(2_800_000) == "2.80M" and report.fmt_count(950) == "950"
    assert report.fmt_seconds(30) == "30.0 s" and report.fmt_seconds(600) == "10.0 min"
    assert report.fmt_size(None) == report.fmt_count(None) == "-"


def test_report_from_real_measurements(tmp_path):
    """bench_model output plus the pipeline's fields is a valid report row."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 12)).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"]),
        helper.make_node("Gemm", ["f", "w"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    x = rng.standard_normal((8, 3, 2, 2)).astype(np.float32)
    y = np.argmax(x.reshape(8, -1) @ w.T, axis=1)
    rows = []
    for name in ("teacher", "student"):
        row = bench.bench_model(
            path, batch_sizes=(1, 2), x=x, y=y, warmup=1, min_runs=2, max_seconds=0.01
        )
        row.update(name=name, stage=name, path="m.onnx", stage_wall_s=1.0, notes="")
        rows.append(row)
    verdict = budget.select_and_verdict(rows, ["student"], {"min_accuracy": 0.99}, "teacher")
    rep = report.build_report(
        run="real", config={}, rows=rows, verdict=verdict, environment={}, stages=[]
    )
    assert rep["rows"][1]["accuracy"] == 1.0 and verdict["passed"]
    assert rep["rows"][1]["macs_ratio_vs_teacher"] == 1.0
    assert rep["rows"][1]["latency"][0]["speedup_vs_teacher"] > 0
    json_path, md_path = report.write_report(tmp_path / "out", rep)
    assert report.load_report(json_path)["rows"][0]["macs"] == 48
    md = md_path.read_text()
    assert "| student * | fp32 | 100.00% | +0.00 pt |" in md
    entry = rep["rows"][1]["latency"][0]
    assert entry["gmacs"] == pytest.approx(48 / (entry["p50_ms"] / 1e3) / 1e9)
    assert f"| {entry['gmacs']:.2f} |" in md


# ------------------------------------------------------------------ accuracy-loss warnings


def _loss_metrics(prune_loss: float, qat_loss: float) -> dict:
    """Stage metrics as the prune and quantize stages write them, judged at the default 2 pt."""
    prune = budget.accuracy_loss_check("pruning", "student", 0.90 - prune_loss, 0.90, 0.02,
                                       "prune.finetune.max_accuracy_loss")
    qat = budget.accuracy_loss_check("QAT", "float model", 0.88 - qat_loss, 0.88, 0.02,
                                     "quantize.qat.max_accuracy_loss")
    return {"prune": {"accuracy_check": prune}, "quantize": {"qat": {"accuracy_check": qat}}}


def test_accuracy_loss_check_judges_the_margin():
    ok = budget.accuracy_loss_check("QAT", "float model", 0.87, 0.88, 0.02, "quantize.qat.max_accuracy_loss")
    assert ok["loss"] == pytest.approx(0.01) and not ok["exceeded"] and "warning" not in ok
    edge = budget.accuracy_loss_check("QAT", "float model", 0.86, 0.88, 0.02, "quantize.qat.max_accuracy_loss")
    assert not edge["exceeded"]  # exactly the margin is allowed
    bad = budget.accuracy_loss_check("QAT", "float model", 0.78, 0.88, 0.02, "quantize.qat.max_accuracy_loss")
    assert bad["exceeded"] and bad["loss"] == pytest.approx(0.10)
    assert bad["warning"] == ("QAT lost 10.0 pt test accuracy against the float model (88.00% -> 78.00%), "
                              "more than quantize.qat.max_accuracy_loss=0.02 (2.0 pt)")
    unknown = budget.accuracy_loss_check("pruning", "student", 0.5, None, 0.02, "prune.finetune.max_accuracy_loss")
    assert unknown["loss"] is None and not unknown["exceeded"]


def test_accuracy_loss_warnings_in_markdown_and_console():
    metrics = _loss_metrics(prune_loss=0.05, qat_loss=0.10)
    warnings = report.accuracy_warnings(metrics)
    assert len(warnings) == 2
    assert warnings[0].startswith("pruning lost 5.0 pt test accuracy against the student")
    assert warnings[1].startswith("QAT lost 10.0 pt test accuracy against the float model")
    rep = report.build_report(run="r", config={}, rows=_rows(), verdict={}, environment=ENV, stages=[],
                              evidence=report.evidence(metrics))
    md = report.render_markdown(rep)
    assert "## Warnings" in md
    for w in warnings:
        assert f"- **Warning:** {w}" in md
    out = io.StringIO()
    Console(file=out, width=400, color_system=None).print(report.render_console_table(rep))
    text = out.getvalue()
    for w in warnings:
        assert f"Warning: {w}" in text


def test_no_warning_within_the_margin():
    metrics = _loss_metrics(prune_loss=0.01, qat_loss=0.0)
    assert report.accuracy_warnings(metrics) == []
    assert "warnings" not in report.evidence(metrics)
    rep = report.build_report(run="r", config={}, rows=_rows(), verdict={}, environment=ENV, stages=[],
                              evidence=report.evidence(metrics))
    assert "Warning" not in report.render_markdown(rep)
