"""Tests for compresskit.quantize.search: candidate formats, selection, fallback, sensitivity.

Latency and (where the test is about the selection logic) accuracy are monkeypatched to
deterministic per-file values: real timings on a shared machine would make them flaky.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tinynets import TinyNet

from compresskit import bench
from compresskit.export import export_onnx
from compresskit.quantize import search
from compresskit.quantize.calibrate import CalibrationRanges
from compresskit.quantize.ptq import quantize_ptq
from compresskit.quantize.search import (
    candidate_name,
    format_candidates,
    graph_summary,
    node_sensitivity,
    search_ptq,
)

ROW_KEYS = {"name", "settings", "val_accuracy", "latency_p50_ms", "speedup_vs_fp32", "size_bytes", "graph",
            "meets_floor", "excluded_nodes"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An untrained TinyNet as float ONNX, 32 calibration and 64 validation samples of random
    data labelled with the float model's own predictions (FP32 val accuracy is 1.0)."""
    torch.manual_seed(0)
    net = TinyNet().eval()
    path = tmp_path_factory.mktemp("search") / "fp32.onnx"
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((32, 3, 16, 16)).astype(np.float32)
    val_x = rng.standard_normal((64, 3, 16, 16)).astype(np.float32)
    export_onnx(net, path, torch.from_numpy(calib[:1]))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    val_y = sess.run(None, {"input": val_x})[0].argmax(1).astype(np.int64)
    return path, calib, val_x, val_y


def _fake_latency(table: dict[str, float], calls: list | None = None):
    """measure_latency stand-in: p50 = table[file stem] * batch size (default 1 ms)."""

    def fake(path_or_session, batch_size, *, threads=1, max_seconds=3.0, **_kw):
        stem = Path(path_or_session).stem
        if calls is not None:
            calls.append((stem, batch_size, threads, max_seconds))
        return {"p50_ms": table.get(stem, 1.0) * batch_size}

    return fake


def _fake_accuracy(fn):
    """evaluate stand-in: accuracy = fn(file stem)."""

    def fake(path_or_session, x, y, *, batch_size=256, threads=0):
        return {"accuracy": fn(Path(path_or_session).stem)}

    return fake


# --------------------------------------------------------------------------------------------
# candidates and names
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("int8_dot", [True, None])
def test_candidates_with_dot_product_or_unknown(int8_dot):
    cands = format_candidates(int8_dot=int8_dot)
    assert [candidate_name(c) for c in cands] == ["u8s8-pc-minmax", "u8s8-pt-minmax", "s8s8-pc-minmax",
                                                  "s8s8-pt-minmax"]
    assert all(set(c) == set(search.REQUIRED_KEYS) and c["reduce_range"] is False for c in cands)
    assert all(c["weight_type"] == "int8" for c in cands)


def test_candidates_without_dot_product_add_reduce_range():
    cands = format_candidates(int8_dot=False, calibrate_methods=("minmax", "entropy"))
    names = [candidate_name(c) for c in cands]
    assert names == [
        "u8s8-pc-minmax", "u8s8-pc-minmax-rr", "u8s8-pc-entropy", "u8s8-pc-entropy-rr",
        "u8s8-pt-minmax", "u8s8-pt-minmax-rr", "u8s8-pt-entropy", "u8s8-pt-entropy-rr",
        "s8s8-pc-minmax", "s8s8-pc-entropy", "s8s8-pt-minmax", "s8s8-pt-entropy",
    ]
    assert len(set(names)) == len(names)
    assert all(c["reduce_range"] == n.endswith("-rr") for c, n in zip(cands, names, strict=True))
    # U8U8 does not take the saturating U8S8 kernel path: no reduce_range variant
    u8u8 = format_candidates(int8_dot=False, activation_types=("uint8",), weight_type="uint8")
    assert [candidate_name(c) for c in u8u8] == ["u8u8-pc-minmax", "u8u8-pt-minmax"]


def test_candidate_name_options():
    base = {"activation_type": "int8", "weight_type": "int8", "per_channel": False,
            "calibrate_method": "entropy", "reduce_range": False}
    assert candidate_name(base) == "s8s8-pt-entropy"
    pct = {**base, "calibrate_method": "percentile", "percentile": 99.99, "symmetric_activation": True}
    assert candidate_name(pct) == "s8s8-pt-percentile-p99.99-sym"
    assert candidate_name({**base, "symmetric_activation": False, "reduce_range": True}) == "s8s8-pt-entropy-asym-rr"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"activation_types": ("uint4",)}, "activation_types"),
        ({"activation_types": "uint8"}, "activation_types"),
        ({"activation_types": ()}, "activation_types"),
        ({"activation_types": ("uint8", "uint8")}, "activation_types"),
        ({"per_channel": (1,)}, "per_channel"),
        ({"per_channel": ()}, "per_channel"),
        ({"calibrate_methods": ("kl",)}, "calibrate_methods"),
        ({"weight_type": "int4"}, "weight_type"),
        ({"int8_dot": "yes"}, "int8_dot"),
    ],
)
def test_format_candidates_bad_arguments(kwargs, match):
    kwargs = {"int8_dot": True, **kwargs}
    with pytest.raises(ValueError, match=match):
        format_candidates(**kwargs)


def test_candidate_name_bad_settings():
    good = format_candidates(int8_dot=True)[0]
    with pytest.raises(ValueError, match="missing keys"):
        candidate_name({k: v for k, v in good.items() if k != "per_channel"})
    with pytest.raises(ValueError, match="unknown keys"):
        candidate_name({**good, "format": "QDQ"})
    with pytest.raises(ValueError, match="calibrate_method"):
        candidate_name({**good, "calibrate_method": "kl"})
    with pytest.raises(ValueError, match="reduce_range"):
        candidate_name({**good, "reduce_range": "yes"})


def test_exclusion_steps():
    assert search._exclusion_steps(16, 7) == [1, 2, 4, 7]
    assert search._exclusion_steps(12, 100) == [1, 2, 4, 8, 12]
    assert search._exclusion_steps(1, 5) == [1]
    assert search._exclusion_steps(0, 5) == []
    assert search._exclusion_steps(4, 0) == []


def test_graph_summary():
    ops = {"QLinearConv": 3, "QLinearAdd": 1, "QGemm": 1, "QLinearGlobalAveragePool": 1, "Conv": 1,
           "FusedConv": 1, "QuantizeLinear": 2, "DequantizeLinear": 3, "Flatten": 1}
    g = graph_summary(ops)
    assert g["nodes"] == 14 and g["qlinear_conv"] == 3 and g["qlinear_add"] == 1 and g["qgemm"] == 1
    assert g["int8_kernels"] == 6 and g["float_compute"] == 2
    assert g["quantize_linear"] == 2 and g["dequantize_linear"] == 3


# --------------------------------------------------------------------------------------------
# search
# --------------------------------------------------------------------------------------------


def test_search_writes_a_model_and_a_row_per_candidate(tiny, tmp_path):
    fp32, calib, val_x, val_y = tiny
    cands = format_candidates(int8_dot=False, per_channel=(True,))
    messages: list[str] = []
    res = search_ptq(fp32, tmp_path / "out", calib, val_x, val_y, candidates=cands, max_accuracy_drop=1.0,
                     batch_sizes=(1, 4), max_seconds=0.01, progress=messages.append)
    names = ["u8s8-pc-minmax", "u8s8-pc-minmax-rr", "s8s8-pc-minmax"]
    assert [r["name"] for r in res["candidates"]] == names
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted([*(f"{n}.onnx" for n in names), "ranges-minmax.json"])
    assert res["calibrations"] == 1
    assert res["ranges"] == {"ranges-minmax.json": str(tmp_path / "out" / "ranges-minmax.json")}
    assert {r["ranges"] for r in res["candidates"]} == {"ranges-minmax.json"}
    assert res["fp32"]["val_accuracy"] == 1.0 and res["floor"] == 0.0
    assert res["fp32"]["graph"]["qlinear_conv"] == 0 and res["fp32"]["graph"]["float_compute"] == 4
    for row, settings in zip(res["candidates"], cands, strict=True):
        assert ROW_KEYS <= set(row)
        assert row["settings"] == settings and row["excluded_nodes"] == [] and row["meets_floor"]
        assert Path(row["path"]).is_file() and row["size_bytes"] == Path(row["path"]).stat().st_size
        assert 0.0 <= row["val_accuracy"] <= 1.0
        assert set(row["latency_p50_ms"]) == {"1", "4"}
        for b, ms in row["latency_p50_ms"].items():
            assert ms > 0
            assert row["speedup_vs_fp32"][b] == pytest.approx(res["fp32"]["latency_p50_ms"][b] / ms)
        assert row["graph"]["qlinear_conv"] == row["graph"]["ops"].get("QLinearConv", 0) >= 1
        if settings["activation_type"] == "uint8":  # U8S8: every conv runs as an int8 kernel
            assert row["graph"]["qlinear_conv"] == 3 and row["graph"]["float_compute"] == 0
    assert res["chosen"] in names and res["met_budget"] and res["sensitivity"] is None
    assert res["chosen_path"] == str(tmp_path / "out" / f"{res['chosen']}.onnx")
    assert json.loads(json.dumps(res)) == res  # JSON-able, unchanged by a round trip
    assert messages and all("\n" not in m for m in messages)


def test_fastest_eligible_wins_at_rank_batch(tiny, tmp_path, monkeypatch):
    fp32, calib, val_x, val_y = tiny
    # per-sample ms at batch 1; at batch 8 u8s8-pc-minmax is the slowest (its b8 entry below)
    table = {"fp32": 1.0, "u8s8-pc-minmax": 0.1, "u8s8-pt-minmax": 0.4, "s8s8-pc-minmax": 0.3, "s8s8-pt-minmax": 2.0}
    calls: list = []
    fake = _fake_latency(table, calls)

    def latency(path_or_session, batch_size, **kw):
        out = fake(path_or_session, batch_size, **kw)
        if Path(path_or_session).stem == "u8s8-pc-minmax" and batch_size == 8:
            out["p50_ms"] = 50.0
        return out

    monkeypatch.setattr(bench, "measure_latency", latency)
    monkeypatch.setattr(bench, "evaluate", _fake_accuracy(lambda s: 0.9 if s == "s8s8-pc-minmax" else 1.0))
    res = search_ptq(fp32, tmp_path, calib, val_x, val_y, candidates=format_candidates(int8_dot=True),
                     batch_sizes=(1, 8), rank_batch_size=8, threads=2, max_seconds=0.25)
    rows = {r["name"]: r for r in res["candidates"]}
    assert res["floor"] == pytest.approx(0.995)
    assert not rows["s8s8-pc-minmax"]["meets_floor"]  # faster than the winner, but too inaccurate
    assert res["chosen"] == "u8s8-pt-minmax" and res["met_budget"] and len(rows) == 4
    assert res["rank_batch_size"] == 8 and res["excluded_nodes"] == []
    assert rows["u8s8-pt-minmax"]["speedup_vs_fp32"] == {"1": pytest.approx(2.5), "8": pytest.approx(2.5)}
    assert rows["s8s8-pt-minmax"]["speedup_vs_fp32"]["8"] == pytest.approx(0.5)  # slower than FP32, shown
    assert rows["u8s8-pc-minmax"]["latency_p50_ms"] == {"1": pytest.approx(0.1), "8": pytest.approx(50.0)}
    # every model, FP32 included, timed at every batch size with the same settings
    assert sorted((s, b) for s, b, _, _ in calls) == sorted((s, b) for s in table for b in (1, 8))
    assert {(t, m) for _, _, t, m in calls} == {(2, 0.25)}

    # rank at batch 1 instead: u8s8-pc-minmax is now the fastest eligible
    res1 = search_ptq(fp32, tmp_path, calib, val_x, val_y, candidates=format_candidates(int8_dot=True),
                      batch_sizes=(1, 8), rank_batch_size=1)
    assert res1["chosen"] == "u8s8-pc-minmax"


def test_min_accuracy_raises_the_floor(tiny, tmp_path, monkeypatch):
    fp32, calib, val_x, val_y = tiny
    monkeypatch.setattr(bench, "measure_latency", _fake_latency({"u8s8-pt-minmax": 0.1}))
    monkeypatch.setattr(bench, "evaluate", _fake_accuracy(lambda s: {"fp32": 1.0, "u8s8-pt-minmax": 0.95}.get(s, 0.99)))
    cands = format_candidates(int8_dot=True, activation_types=("uint8",))
    res = search_ptq(fp32, tmp_path, calib, val_x, val_y, candidates=cands, max_accuracy_drop=0.1)
    assert res["floor"] == pytest.approx(0.9) and res["chosen"] == "u8s8-pt-minmax"
    res = search_ptq(fp32, tmp_path, calib, val_x, val_y, candidates=cands, max_accuracy_drop=0.1,
                     min_accuracy=0.97)
    assert res["floor"] == 0.97 and res["chosen"] == "u8s8-pc-minmax"


def test_fallback_keeps_sensitive_nodes_float(tiny, tmp_path, monkeypatch):
    fp32, calib, val_x, val_y = tiny

    def accuracy(stem: str) -> float:
        if "-float" in stem:  # rises as nodes are kept in float: 0.97, 0.99, 1.0, ...
            return min(1.0, 0.95 + 0.02 * int(stem.rsplit("float", 1)[1]))
        return {"fp32": 1.0, "u8s8-pt-minmax": 0.95}.get(stem, 0.9)

    monkeypatch.setattr(bench, "measure_latency", _fake_latency({}))
    monkeypatch.setattr(bench, "evaluate", _fake_accuracy(accuracy))
    messages: list[str] = []
    res = search_ptq(fp32, tmp_path, calib, val_x, val_y, candidates=format_candidates(int8_dot=True),
                     progress=messages.append)
    names = [r["name"] for r in res["candidates"]]
    base = "u8s8-pt-minmax"  # the most accurate candidate
    assert names[4:] == [f"{base}-float1", f"{base}-float2", f"{base}-float4"]
    assert res["chosen"] == f"{base}-float4" and res["met_budget"]
    ranked = [e["node"] for e in res["sensitivity"]]
    assert res["excluded_nodes"] == ranked[:4]
    rows = {r["name"]: r for r in res["candidates"]}
    for k in (1, 2, 4):
        row = rows[f"{base}-float{k}"]
        assert row["excluded_nodes"] == ranked[:k] and row["settings"] == rows[base]["settings"]
        assert Path(row["path"]).is_file()
        assert row["meets_floor"] == (k == 4)
    # the float nodes really are float in the graph onnxruntime runs
    assert rows[f"{base}-float4"]["graph"]["int8_kernels"] < rows[base]["graph"]["int8_kernels"]
    assert any("sensitivity" in m for m in messages)
    json.dumps(res)


def test_nothing_meets_floor_keeps_most_accurate(tiny, tmp_path, monkeypatch):
    fp32, calib, val_x, val_y = tiny
    acc = {"fp32": 1.0, "u8s8-pc-minmax": 0.8, "u8s8-pt-minmax": 0.85, "s8s8-pc-minmax": 0.7,
           "s8s8-pt-minmax": 0.6, "u8s8-pt-minmax-float1": 0.5, "u8s8-pt-minmax-float2": 0.9}
    monkeypatch.setattr(bench, "measure_latency", _fake_latency({}))
    monkeypatch.setattr(bench, "evaluate", _fake_accuracy(acc.__getitem__))
    cands = format_candidates(int8_dot=True)
    res = search_ptq(fp32, tmp_path / "a", calib, val_x, val_y, candidates=cands, max_excluded=2)
    assert [r["name"] for r in res["candidates"]][4:] == ["u8s8-pt-minmax-float1", "u8s8-pt-minmax-float2"]
    assert not res["met_budget"] and not any(r["meets_floor"] for r in res["candidates"])
    assert res["chosen"] == "u8s8-pt-minmax-float2" and len(res["excluded_nodes"]) == 2
    assert Path(res["chosen_path"]).is_file()

    res = search_ptq(fp32, tmp_path / "b", calib, val_x, val_y, candidates=cands, fallback=False)
    assert len(res["candidates"]) == 4 and res["sensitivity"] is None
    assert res["chosen"] == "u8s8-pt-minmax" and not res["met_budget"] and res["excluded_nodes"] == []


def test_search_bad_arguments(tiny, tmp_path):
    fp32, calib, val_x, val_y = tiny
    cands = format_candidates(int8_dot=True)
    args = (fp32, tmp_path, calib, val_x, val_y)
    for kwargs, match in [
        ({"candidates": []}, "candidates"),
        ({"candidates": cands[:1] * 2}, "duplicate"),
        ({"candidates": [{**cands[0], "format": "QDQ"}]}, "unknown keys"),
        ({"candidates": cands, "min_accuracy": 1.5}, "min_accuracy"),
        ({"candidates": cands, "max_accuracy_drop": -0.1}, "max_accuracy_drop"),
        ({"candidates": cands, "rank_batch_size": 32}, "rank_batch_size"),
        ({"candidates": cands, "batch_sizes": (0,), "rank_batch_size": 0}, "batch_sizes"),
        ({"candidates": cands, "max_excluded": -1}, "max_excluded"),
        ({"candidates": cands, "max_seconds": 0}, "max_seconds"),
    ]:
        with pytest.raises(ValueError, match=match):
            search_ptq(*args, **kwargs)
    with pytest.raises(FileNotFoundError):
        search_ptq(tmp_path / "missing.onnx", *args[1:], candidates=cands)
    assert list(tmp_path.iterdir()) == []


def _count_calibrations(monkeypatch) -> list[tuple[str, float | None, bool]]:
    """Wrap the search's calibrate so each call is recorded as (method, percentile, symmetric)."""
    calls: list = []
    real = search.calibrate

    def counting(path, calib, **kw):
        ranges = real(path, calib, **kw)
        calls.append((ranges.method, ranges.percentile, ranges.symmetric))
        return ranges

    monkeypatch.setattr(search, "calibrate", counting)
    return calls


def test_search_calibrates_once_per_method(tiny, tmp_path, monkeypatch):
    """Eight candidates, two calibration methods: two calibrations, each saved and reused."""
    fp32, calib, val_x, val_y = tiny
    calls = _count_calibrations(monkeypatch)
    monkeypatch.setattr(bench, "measure_latency", _fake_latency({}))
    monkeypatch.setattr(bench, "evaluate", _fake_accuracy(lambda s: 1.0))
    cands = format_candidates(int8_dot=True, calibrate_methods=("minmax", "entropy"))
    res = search_ptq(fp32, tmp_path, calib, val_x, val_y, candidates=cands)
    assert len(res["candidates"]) == 8
    assert sorted(calls) == [("entropy", None, False), ("minmax", None, False)]
    assert res["calibrations"] == 2 and sorted(res["ranges"]) == ["ranges-entropy.json", "ranges-minmax.json"]
    for row in res["candidates"]:
        saved = CalibrationRanges.load(res["ranges"][row["ranges"]])
        assert saved.method == row["settings"]["calibrate_method"]
    # the shared ranges give the very model a calibration of its own would have given
    row = res["candidates"][-1]
    alone = tmp_path / "alone.onnx"
    quantize_ptq(fp32, alone, calib, **row["settings"])
    assert _initializers(alone) == _initializers(Path(row["path"]))


def test_fallback_reuses_the_ranges(tiny, tmp_path, monkeypatch):
    fp32, calib, val_x, val_y = tiny
    calls = _count_calibrations(monkeypatch)
    monkeypatch.setattr(bench, "measure_latency", _fake_latency({}))
    monkeypatch.setattr(bench, "evaluate", _fake_accuracy(lambda s: 1.0 if s == "fp32" else 0.5))
    cands = format_candidates(int8_dot=True, activation_types=("uint8",))
    res = search_ptq(fp32, tmp_path, calib, val_x, val_y, candidates=cands, max_excluded=2)
    assert [r["name"] for r in res["candidates"]][2:] == ["u8s8-pc-minmax-float1", "u8s8-pc-minmax-float2"]
    assert calls == [("minmax", None, False)] and res["calibrations"] == 1


def test_percentile_settings_get_their_own_ranges(tiny, tmp_path, monkeypatch):
    fp32, calib, val_x, val_y = tiny
    calls = _count_calibrations(monkeypatch)
    monkeypatch.setattr(bench, "measure_latency", _fake_latency({}))
    monkeypatch.setattr(bench, "evaluate", _fake_accuracy(lambda s: 1.0))
    base = {"activation_type": "uint8", "weight_type": "int8", "per_channel": True,
            "calibrate_method": "percentile", "reduce_range": False}
    cands = [base, {**base, "activation_type": "int8"}, {**base, "percentile": 99.9},
             {**base, "symmetric_activation": True}, {**base, "symmetric_activation": False}]
    res = search_ptq(fp32, tmp_path, calib, val_x, val_y, candidates=cands)
    # symmetric_activation=False calibrates as the default does: same ranges
    assert sorted(calls) == [("percentile", 99.9, False), ("percentile", 99.999, False),
                             ("percentile", 99.999, True)]
    assert sorted(res["ranges"]) == ["ranges-percentile-p99.9.json", "ranges-percentile-p99.999-sym.json",
                                     "ranges-percentile-p99.999.json"]


def _initializers(path: Path) -> dict[str, bytes]:
    return {t.name: t.SerializeToString() for t in onnx.load(str(path)).graph.initializer}


# --------------------------------------------------------------------------------------------
# sensitivity
# --------------------------------------------------------------------------------------------


def _quantized_producers(int8_path: Path) -> set[str]:
    """Nodes that compute a tensor the INT8 model quantizes (graph inputs have none)."""
    model = onnx.load(str(int8_path))
    producer = {out: n.name for n in model.graph.node for out in n.output}
    return {producer[n.input[0]] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in producer}


def test_node_sensitivity_ranks_every_quantized_node(tiny, tmp_path, monkeypatch):
    fp32, calib, _, _ = tiny
    models = tmp_path / "models"
    models.mkdir()
    int8 = models / "int8.onnx"
    quantize_ptq(fp32, int8, calib)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    before = sorted(p.name for p in models.iterdir())

    ranked = node_sensitivity(fp32, int8, calib, max_samples=16)

    assert sorted(p.name for p in models.iterdir()) == before and list(scratch.iterdir()) == []
    nodes = [e["node"] for e in ranked]
    assert len(nodes) == len(set(nodes))
    assert set(nodes) == _quantized_producers(int8)
    assert {"/stem/stem.0/Conv", "/dw/dw.0/Conv", "/pw/pw.0/Conv", "/Add", "/fc/Gemm"} <= set(nodes)
    for e in ranked:
        assert set(e) >= {"node", "op_type", "tensor", "qdq_sqnr_db", "xmodel_sqnr_db"}
        assert math.isfinite(e["qdq_sqnr_db"]) and math.isfinite(e["xmodel_sqnr_db"])
    sqnr = [e["qdq_sqnr_db"] for e in ranked]
    assert sqnr == sorted(sqnr)
    # the quantizer folds the stem's ReLU into its conv: the entry names the conv, and the
    # tensor's own QDQ error is not the clipped pre-activation that onnxruntime's qdq_err sees
    stem = next(e for e in ranked if e["node"] == "/stem/stem.0/Conv")
    assert stem["op_type"] == "Conv" and stem["float_producer"] == "/stem/stem.2/Relu"
    assert stem["qdq_sqnr_db"] > stem["ort_qdq_sqnr_db"] + 10
    # every name is one quantize_ptq accepts as nodes_to_exclude (the pre-processed graph's)
    report = quantize_ptq(fp32, tmp_path / "all_float.onnx", calib, nodes_to_exclude=nodes)
    assert "QLinearConv" not in report["ops_int8_optimized"]


def test_node_sensitivity_without_preprocessing(tiny, tmp_path):
    fp32, calib, _, _ = tiny
    int8 = tmp_path / "raw.onnx"
    quantize_ptq(fp32, int8, calib, preprocess=False)
    ranked = node_sensitivity(fp32, int8, calib, max_samples=8)  # preprocess read from the metadata
    assert set(e["node"] for e in ranked) == _quantized_producers(int8)
    with pytest.raises(ValueError, match="max_samples"):
        node_sensitivity(fp32, int8, calib, max_samples=0)
    with pytest.raises(FileNotFoundError):
        node_sensitivity(tmp_path / "missing.onnx", int8, calib)
