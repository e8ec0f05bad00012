"""Tests of onnxutil, bench and envinfo on tiny ONNX graphs built with onnx.helper (no torch)."""

from __future__ import annotations

import json
import platform
import socket
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compresskit import bench, envinfo, onnxutil, report

OPSET = [helper.make_opsetid("", 17)]
CIN, COUT, K, HW, CLASSES = 3, 8, 3, 8, 10
# Independent arithmetic for the conv net below.
CONV_MACS = (COUT * HW * HW) * (CIN * K * K)
GEMM_MACS = COUT * CLASSES
PARAMS = COUT * CIN * K * K + COUT + CLASSES * COUT + CLASSES


def _save(graph: onnx.GraphProto, path: Path, metadata: dict | None = None) -> Path:
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _conv_weights(seed: int, zeros: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((COUT, CIN, K, K)).astype(np.float32)
    w.reshape(-1)[:zeros] = 0.0
    return {
        "w": w,
        "b": rng.standard_normal(COUT).astype(np.float32),
        "w2": rng.standard_normal((CLASSES, COUT)).astype(np.float32),
        "b2": rng.standard_normal(CLASSES).astype(np.float32),
    }


def _head_nodes(conv_in: str, w: str, b: str, w2: str, b2: str) -> list[onnx.NodeProto]:
    return [
        helper.make_node("Conv", [conv_in, w, b], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", w2, b2], ["logits"], transB=1),
    ]


def conv_net(path: Path, *, batch: int | str = "N", zeros: int = 0, seed: int = 0, hw=(HW, HW)):
    """Conv(3->8, 3x3, pad 1) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(8->10)."""
    weights = _conv_weights(seed, zeros)
    inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, CIN, *hw])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, CLASSES])
    graph = helper.make_graph(_head_nodes("x", "w", "b", "w2", "b2"), "net", [x], [y], inits)
    return _save(graph, path, {"labels": "a,b,c", "task": "classification"})


def qdq_conv_net(path: Path, *, zeros: int = 0) -> tuple[Path, int]:
    """The same net in QDQ form: int8 weights (per-channel), int32 bias behind DequantizeLinear.

    Returns the path and the number of non-zero weight elements."""
    weights = _conv_weights(0)
    rng = np.random.default_rng(1)
    wq = rng.integers(-127, 128, size=(COUT, CIN, K, K)).astype(np.int8)
    wq.reshape(-1)[:zeros] = 0
    bq = rng.integers(-1000, 1000, size=COUT).astype(np.int32)
    w2q = rng.integers(-127, 128, size=(CLASSES, COUT)).astype(np.int8)
    arrays = {
        "wq": wq,
        "w_scale": np.full(COUT, 0.01, np.float32),
        "w_zp": np.zeros(COUT, np.int8),
        "bq": bq,
        "b_scale": np.full(COUT, 1e-4, np.float32),
        "w2q": w2q,
        "w2_scale": np.float32(0.02),
        "b2": weights["b2"],
        "x_scale": np.float32(0.05),
        "x_zp": np.uint8(128),
    }
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in arrays.items()]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "w_scale", "w_zp"], ["w"], axis=0),
        helper.make_node("DequantizeLinear", ["bq", "b_scale"], ["b"], axis=0),
        helper.make_node("DequantizeLinear", ["w2q", "w2_scale"], ["w2"]),
        *_head_nodes("xd", "w", "b", "w2", "b2"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", CIN, HW, HW])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])
    graph = helper.make_graph(nodes, "qdq", [x], [y], inits)
    nonzero = int(np.count_nonzero(wq) + np.count_nonzero(bq) + np.count_nonzero(w2q))
    nonzero += int(np.count_nonzero(weights["b2"]))
    return _save(graph, path), nonzero


def residual_net(path: Path) -> tuple[Path, int]:
    """Conv -> Relu -> Conv -> Add(residual) -> Conv -> GlobalAveragePool -> Flatten -> Gemm.

    The Add becomes a contrib QLinearAdd in QOperator form, which onnx cannot shape-infer.
    Returns the path and the expected MACs."""
    rng = np.random.default_rng(0)
    arrays = {
        "w1": rng.standard_normal((COUT, CIN, K, K)),
        "w2": rng.standard_normal((COUT, COUT, K, K)),
        "w3": rng.standard_normal((COUT, COUT, K, K)),
        "wg": rng.standard_normal((CLASSES, COUT)),
        "bg": rng.standard_normal(CLASSES),
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["r1", "c2"], ["a"]),
        helper.make_node("Conv", ["a", "w3"], ["c3"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c3"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["logits"], transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", CIN, HW, HW])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])
    graph = helper.make_graph(nodes, "res", [x], [y], inits)
    macs = CONV_MACS + 2 * (COUT * HW * HW) * (COUT * K * K) + GEMM_MACS
    return _save(graph, path), macs


def linear_net(path: Path, *, batch: int | str = "N", seed: int = 0) -> tuple[Path, np.ndarray]:
    """Flatten -> Gemm(48 -> 10): logits are exactly x.reshape(N, -1) @ W.T + b."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((CLASSES, CIN * 4 * 4)).astype(np.float32)
    b = rng.standard_normal(CLASSES).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"]),
        helper.make_node("Gemm", ["f", "w", "b"], ["logits"], transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, CIN, 4, 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, CLASSES])
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    graph = helper.make_graph(nodes, "linear", [x], [y], inits)
    return _save(graph, path), np.concatenate([w, b[:, None]], axis=1)


FAST = {"warmup": 1, "min_runs": 3, "max_runs": 50, "max_seconds": 0.02}


# --------------------------------------------------------------------------- onnxutil


def test_model_stats_fp32(tmp_path):
    path = conv_net(tmp_path / "m.onnx")
    stats = onnxutil.model_stats(path)
    assert stats["size_bytes"] == path.stat().st_size
    assert stats["params"] == PARAMS
    assert stats["nonzero_params"] == PARAMS
    assert stats["macs"] == CONV_MACS + GEMM_MACS
    assert stats["macs_unresolved"] == 0
    assert stats["op_counts"] == {
        "Conv": 1,
        "Flatten": 1,
        "Gemm": 1,
        "GlobalAveragePool": 1,
        "Relu": 1,
    }
    assert stats["input"] == {"name": "x", "shape": ["N", CIN, HW, HW], "dtype": "float32"}
    assert stats["output"]["shape"] == ["N", CLASSES]
    assert stats["metadata"] == {"labels": "a,b,c", "task": "classification"}
    assert stats["int8"] is False
    assert stats["opset"] == 17
    json.dumps(stats)


def test_model_stats_counts_zero_weights(tmp_path):
    path = conv_net(tmp_path / "sparse.onnx", zeros=100)
    stats = onnxutil.model_stats(path)
    assert stats["params"] == PARAMS
    assert stats["nonzero_params"] == PARAMS - 100


def test_model_stats_fixed_batch_is_per_sample(tmp_path):
    dynamic = onnxutil.model_stats(conv_net(tmp_path / "d.onnx"))
    fixed = onnxutil.model_stats(conv_net(tmp_path / "f.onnx", batch=4))
    assert fixed["input"]["shape"][0] == 4
    assert fixed["macs"] == dynamic["macs"]


def test_model_stats_macs_scale_with_resolution(tmp_path):
    small = onnxutil.model_stats(conv_net(tmp_path / "s.onnx", hw=(8, 8)))
    big = onnxutil.model_stats(conv_net(tmp_path / "b.onnx", hw=(16, 16)))
    assert big["macs"] - GEMM_MACS == 4 * (small["macs"] - GEMM_MACS)


def test_model_stats_qdq(tmp_path):
    path, nonzero = qdq_conv_net(tmp_path / "qdq.onnx", zeros=30)
    stats = onnxutil.model_stats(path)
    assert stats["params"] == PARAMS  # scales and zero points are not weights
    assert stats["nonzero_params"] == nonzero
    assert stats["macs"] == CONV_MACS + GEMM_MACS
    assert stats["int8"] is True
    assert stats["op_counts"]["DequantizeLinear"] == 4


def test_nonzero_respects_zero_points():
    values = np.array([[3, 3, 5], [0, 7, 7]], dtype=np.uint8)
    assert onnxutil._nonzero(values, np.array([3, 7], np.uint8), 0) == 2
    assert onnxutil._nonzero(values, np.array(3, np.uint8), None) == 4
    assert onnxutil._nonzero(values, None, None) == 5


class _Reader:
    """Calibration data for onnxruntime.quantization: a few random batches."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.batches = iter(
            [{"x": rng.standard_normal((2, CIN, HW, HW)).astype(np.float32)} for _ in range(3)]
        )

    def get_next(self):
        return next(self.batches, None)


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_model_stats_onnxruntime_quantized(tmp_path, fmt):
    from onnxruntime.quantization import QuantFormat, quantize_static

    fp32 = conv_net(tmp_path / "fp32.onnx")
    out = tmp_path / f"{fmt}.onnx"
    quantize_static(fp32, out, _Reader(), quant_format=getattr(QuantFormat, fmt), per_channel=True)
    stats = onnxutil.model_stats(out)
    assert stats["int8"] is True
    assert stats["params"] == PARAMS
    assert stats["macs"] == CONV_MACS + GEMM_MACS
    assert stats["macs_unresolved"] == 0
    if fmt == "QOperator":
        assert "QLinearConv" in stats["op_counts"]


def test_model_stats_qoperator_residual(tmp_path):
    from onnxruntime.quantization import QuantFormat, quantize_static

    fp32, macs = residual_net(tmp_path / "res.onnx")
    assert onnxutil.model_stats(fp32)["macs"] == macs
    out = tmp_path / "res_q.onnx"
    quantize_static(fp32, out, _Reader(), quant_format=QuantFormat.QOperator)
    stats = onnxutil.model_stats(out)
    assert stats["op_counts"].get("QLinearAdd") == 1
    assert stats["macs"] == macs
    assert stats["macs_unresolved"] == 0


def test_metadata_roundtrip(tmp_path):
    path = conv_net(tmp_path / "m.onnx")
    onnxutil.write_metadata(path, {"accuracy": "0.91", "task": "cls"})
    meta = onnxutil.read_metadata(path)
    assert meta == {"labels": "a,b,c", "task": "cls", "accuracy": "0.91"}
    out = onnxutil.write_metadata(path, {"x": "1"}, out=tmp_path / "sub" / "copy.onnx")
    assert onnxutil.read_metadata(out)["x"] == "1"
    assert "x" not in onnxutil.read_metadata(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "sub"]
    with pytest.raises(TypeError, match="must be str"):
        onnxutil.write_metadata(path, {"acc": 0.9})


def test_metadata_with_external_weights(tmp_path):
    src = conv_net(tmp_path / "m.onnx")
    ext_dir = tmp_path / "ext"
    ext_dir.mkdir()
    model = onnx.load(src)
    onnx.save_model(
        model, ext_dir / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0
    )
    onnxutil.write_metadata(ext_dir / "m.onnx", {"k": "v"})
    assert sorted(p.name for p in ext_dir.iterdir()) == ["m.data", "m.onnx"]
    assert onnxutil.model_stats(ext_dir / "m.onnx")["metadata"]["k"] == "v"
    moved = onnxutil.write_metadata(ext_dir / "m.onnx", {"k": "w"}, out=tmp_path / "inl.onnx")
    stats = onnxutil.model_stats(moved)  # weights now inside the file
    assert stats["metadata"]["k"] == "w" and stats["nonzero_params"] == PARAMS


def test_missing_and_invalid_files(tmp_path):
    missing = tmp_path / "nope.onnx"
    for call in (onnxutil.model_stats, onnxutil.read_metadata, bench.bench_model):
        with pytest.raises(FileNotFoundError, match="nope.onnx"):
            call(missing)
    with pytest.raises(ValueError, match="nope.onnx"):
        bench.make_session(missing, 1)
    junk = tmp_path / "junk.onnx"
    junk.write_text("this is not a model\n")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    for bad in (junk, empty):
        with pytest.raises(ValueError, match=bad.name):
            onnxutil.model_stats(bad)
        with pytest.raises(ValueError, match=bad.name):
            bench.make_session(bad, 1)


# --------------------------------------------------------------------------- bench


def test_make_session_threads_and_levels(tmp_path):
    path = conv_net(tmp_path / "m.onnx")
    sess = bench.make_session(path, 0)
    assert sess.get_session_options().intra_op_num_threads == bench.usable_cores()
    sess = bench.make_session(path, 1, "none")
    assert sess.get_session_options().intra_op_num_threads == 1
    with pytest.raises(ValueError, match="optimization"):
        bench.make_session(path, 1, "max")
    with pytest.raises(ValueError, match="threads"):
        bench.make_session(path, -1)


def test_measure_latency(tmp_path):
    path = conv_net(tmp_path / "m.onnx")
    res = bench.measure_latency(path, 4, threads=1, **FAST)
    assert res["batch_size"] == 4 and res["threads"] == 1 and res["threads_setting"] == 1
    assert FAST["min_runs"] <= res["runs"] <= FAST["max_runs"]
    assert 0 < res["min_ms"] <= res["p50_ms"] <= res["p90_ms"] <= res["p99_ms"] <= res["max_ms"]
    assert res["per_sample_ms"] == pytest.approx(res["p50_ms"] / 4)
    assert res["throughput"] == pytest.approx(4000 / res["p50_ms"])
    assert res["std_ms"] >= 0
    assert res["iqr_ms"] >= 0 and res["spread"] >= 0
    assert res["stopped_by"] in {"time", "runs"} and res["target_rel_ci"] is None
    if res["runs"] >= 8:
        lo, hi = res["ci95_ms"]
        assert res["min_ms"] <= lo <= res["p50_ms"] <= hi <= res["max_ms"]
    json.dumps(res)


def test_measure_latency_run_limits(tmp_path):
    sess = bench.make_session(conv_net(tmp_path / "m.onnx"), 1)
    capped = bench.measure_latency(sess, 1, warmup=0, min_runs=2, max_runs=5, max_seconds=60)
    assert capped["runs"] == 5 and capped["stopped_by"] == "runs"
    assert capped["threads_setting"] is None
    minimum = bench.measure_latency(sess, 1, warmup=0, min_runs=7, max_runs=100, max_seconds=0)
    assert minimum["runs"] == 7 and minimum["stopped_by"] == "time"
    with pytest.raises(ValueError, match="min_runs"):
        bench.measure_latency(sess, 1, min_runs=10, max_runs=5)


def test_median_ci95_ranks():
    """Ranks floor(n/2 - 0.98 sqrt n) and ceil(n/2 + 1 + 0.98 sqrt n), 1-based."""
    assert bench.median_ci95(list(range(1, 21))) == (5, 16)  # 10 -+ 4.38
    assert bench.median_ci95(list(range(1, 101))) == (40, 61)  # 50 -+ 9.8
    assert bench.median_ci95(list(range(1, 9))) == (1, 8)
    assert bench.median_ci95(list(range(1, 8))) is None  # too few runs for a 95% interval
    assert bench.median_ci95([]) is None


class FakeClock:
    """Stands in for time.perf_counter_ns: every call advances by the next step (ns), so each
    timed run lasts exactly the step drawn for its closing clock read."""

    def __init__(self, steps) -> None:
        self.steps = iter(steps)
        self.now = 0

    def __call__(self) -> int:
        self.now += int(next(self.steps))
        return self.now


def _steady(ms: float = 1.0):
    while True:
        yield ms * 1e6


def _noisy(seed: int = 0):
    """Half the runs 1 ms, half 5 ms: the median's interval never gets narrow."""
    rng = np.random.default_rng(seed)
    while True:
        yield rng.choice([1e6, 5e6])


def test_measure_latency_stops_on_precision(tmp_path, monkeypatch):
    sess = bench.make_session(conv_net(tmp_path / "m.onnx"), 1)
    monkeypatch.setattr(time, "perf_counter_ns", FakeClock(_steady(2.0)))
    res = bench.measure_latency(
        sess, 1, warmup=0, min_runs=10, max_runs=500, max_seconds=60, target_rel_ci=0.01
    )
    assert res["stopped_by"] == "precision" and res["runs"] == 10
    assert res["p50_ms"] == 2.0 and res["ci95_ms"] == [2.0, 2.0] and res["ci95_rel"] == 0
    assert res["iqr_ms"] == 0 and res["spread"] == 0 and res["target_rel_ci"] == 0.01
    # Small jitter (+-0.2%) still meets a 1% target as soon as the interval exists.
    rng = np.random.default_rng(1)
    monkeypatch.setattr(time, "perf_counter_ns", FakeClock(1e6 * (1 + rng.uniform(-2e-3, 2e-3, 1000))))
    res = bench.measure_latency(
        sess, 1, warmup=0, min_runs=3, max_runs=500, max_seconds=60, target_rel_ci=0.01
    )
    assert res["stopped_by"] == "precision" and res["runs"] == 8
    lo, hi = res["ci95_ms"]
    assert res["p50_ms"] * 0.99 <= lo <= hi <= res["p50_ms"] * 1.01


def test_measure_latency_noisy_stops_on_time_or_runs(tmp_path, monkeypatch):
    sess = bench.make_session(conv_net(tmp_path / "m.onnx"), 1)
    monkeypatch.setattr(time, "perf_counter_ns", FakeClock(_noisy()))
    by_runs = bench.measure_latency(
        sess, 1, warmup=0, min_runs=10, max_runs=200, max_seconds=60, target_rel_ci=0.01
    )
    assert by_runs["stopped_by"] == "runs" and by_runs["runs"] == 200
    lo, hi = by_runs["ci95_ms"]
    assert lo == 1.0 and hi == 5.0 and by_runs["ci95_rel"] >= 0.5
    assert by_runs["spread"] == pytest.approx(4.0 / by_runs["p50_ms"])
    monkeypatch.setattr(time, "perf_counter_ns", FakeClock(_noisy()))
    by_time = bench.measure_latency(
        sess, 1, warmup=0, min_runs=10, max_runs=200, max_seconds=0.2, target_rel_ci=0.01
    )
    # Each run costs two clock steps of 1 or 5 ms: 0.2 s pass after about 33 runs.
    assert by_time["stopped_by"] == "time" and 20 <= by_time["runs"] <= 100
    with pytest.raises(ValueError, match="target_rel_ci"):
        bench.measure_latency(sess, 1, target_rel_ci=0)


def test_measure_latency_input_checks(tmp_path):
    sym = conv_net(tmp_path / "sym.onnx", hw=("H", "W"))
    with pytest.raises(ValueError, match="'H'.*'W'|'W'.*'H'"):
        bench.measure_latency(sym, 1, **FAST)
    data = np.zeros((2, CIN, 5, 7), np.float32)
    res = bench.measure_latency(sym, 2, input_data=data, **FAST)
    assert res["batch_size"] == 2
    with pytest.raises(ValueError, match="expected batch 3"):
        bench.measure_latency(sym, 3, input_data=data, **FAST)
    fixed = conv_net(tmp_path / "fixed.onnx", batch=1)
    with pytest.raises(ValueError, match="fixed batch of 1"):
        bench.measure_latency(fixed, 8, **FAST)


def test_random_inputs_are_deterministic(tmp_path):
    sess = bench.make_session(conv_net(tmp_path / "m.onnx"), 1)
    a = bench.random_inputs(sess, 2, seed=3)["x"]
    b = bench.random_inputs(sess, 2, seed=3)["x"]
    c = bench.random_inputs(sess, 2, seed=4)["x"]
    assert a.shape == (2, CIN, HW, HW) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def _labelled_data(wb: np.ndarray, n: int = 40):
    """Inputs and labels with a known top-1 and top-5 accuracy for the linear net."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((n, CIN, 4, 4)).astype(np.float32)
    logits = x.reshape(n, -1) @ wb[:, :-1].T + wb[:, -1]
    order = np.argsort(-logits, axis=1)
    y = order[:, 0].copy()  # first half: correct
    y[n // 2 : 3 * n // 4] = order[n // 2 : 3 * n // 4, 1]  # second best: top-5 only
    y[3 * n // 4 :] = order[3 * n // 4 :, -1]  # worst: wrong in both
    return x, y, 0.5, 0.75


@pytest.mark.parametrize("batch", ["N", 4])
def test_evaluate_accuracy(tmp_path, batch):
    path, wb = linear_net(tmp_path / "lin.onnx", batch=batch)
    x, y, top1, top5 = _labelled_data(wb, n=42)
    res = bench.evaluate(path, x, y, batch_size=16, threads=1)
    assert res["accuracy"] == pytest.approx(top1, abs=1 / 42)
    assert res["n"] == 42 and res["classes"] == CLASSES
    x, y, top1, top5 = _labelled_data(wb, n=40)
    res = bench.evaluate(path, x, y, batch_size=16, threads=1)
    assert res["accuracy"] == top1
    assert res["top5"] == top5
    json.dumps(res)


def test_evaluate_rejects_bad_data(tmp_path):
    path, wb = linear_net(tmp_path / "lin.onnx")
    x, y, _, _ = _labelled_data(wb, n=8)
    with pytest.raises(ValueError, match="sample shape"):
        bench.evaluate(path, np.zeros((8, CIN, 5, 5), np.float32), y)
    with pytest.raises(ValueError, match="y must be"):
        bench.evaluate(path, x, y[:4])
    with pytest.raises(ValueError, match="labels must lie"):
        bench.evaluate(path, x, np.full(8, CLASSES))


def test_bench_model(tmp_path):
    path, wb = linear_net(tmp_path / "lin.onnx")
    x, y, top1, top5 = _labelled_data(wb, n=20)
    messages: list[str] = []
    res = bench.bench_model(
        path, batch_sizes=(1, 4), threads=(1, 0), x=x, y=y, progress=messages.append, **FAST
    )
    assert [(e["batch_size"], e["threads_setting"]) for e in res["latency"]] == [
        (1, 1),
        (4, 1),
        (1, 0),
        (4, 0),
    ]
    assert res["latency"][2]["threads"] == bench.usable_cores()
    assert res["accuracy"] == top1 and res["top5"] == top5
    assert res["params"] == CLASSES * CIN * 16 + CLASSES
    assert res["precision"] == "fp32"
    assert len(messages) == 2 * 4 + 1  # a start and a result line per measurement, then accuracy
    json.dumps(res)


CPU_AVX2 = {
    "model": "Example AVX2 CPU",
    "architecture": "x86_64",
    "usable_cores": 2,
    "isa_flags": ["avx2", "fma"],
    "clock_ghz": 2.0,
    "clock_source": "cpufreq max",
}


def test_bench_model_gmacs_and_peak_fraction(tmp_path, monkeypatch):
    """With every run lasting exactly 2 ms, GMAC/s and the peak fraction are known numbers."""
    fp32 = conv_net(tmp_path / "fp32.onnx")
    int8, _ = qdq_conv_net(tmp_path / "int8.onnx")
    macs = CONV_MACS + GEMM_MACS
    monkeypatch.setattr(time, "perf_counter_ns", FakeClock(_steady(2.0)))
    opts = {"warmup": 0, "min_runs": 3, "max_runs": 3, "max_seconds": 60, "cpu": CPU_AVX2}
    res = bench.bench_model(fp32, batch_sizes=(1, 4), threads=(1,), **opts)
    b1, b4 = res["latency"]
    assert b1["p50_ms"] == b4["p50_ms"] == 2.0
    assert b1["gmacs"] == pytest.approx(macs / 2e-3 / 1e9)
    assert b4["gmacs"] == pytest.approx(4 * macs / 2e-3 / 1e9)
    # fp32 with AVX2 FMA: 1 core x 2.0 GHz x 16 MACs/cycle = 32 GMAC/s
    assert b1["peak"]["peak_gmacs"] == pytest.approx(32.0) and b1["peak"]["precision"] == "fp32"
    assert b4["peak_fraction"] == pytest.approx(4 * macs / 2e-3 / 1e9 / 32.0)
    res8 = bench.bench_model(int8, batch_sizes=(4,), threads=(1,), **opts)
    # int8 with AVX2 (VPMADDUBSW + VPMADDWD): 1 x 2.0 x 32 = 64 GMAC/s
    assert res8["latency"][0]["peak"]["peak_gmacs"] == pytest.approx(64.0)
    assert res8["latency"][0]["peak_fraction"] == pytest.approx(4 * macs / 2e-3 / 1e9 / 64.0)
    unknown = bench.bench_model(fp32, batch_sizes=(1,), **{**opts, "cpu": {**CPU_AVX2, "clock_ghz": None}})
    entry = unknown["latency"][0]
    assert entry["gmacs"] == pytest.approx(macs / 2e-3 / 1e9) and entry["peak_fraction"] is None
    json.dumps(res)


def test_bench_model_real_timing_gmacs_consistent(tmp_path):
    path = conv_net(tmp_path / "m.onnx")
    res = bench.bench_model(path, batch_sizes=(2,), target_rel_ci=0.5, cpu=CPU_AVX2, **FAST)
    entry = res["latency"][0]
    assert entry["gmacs"] == pytest.approx(res["macs"] * 2 / (entry["p50_ms"] / 1e3) / 1e9)
    assert entry["peak_fraction"] == pytest.approx(entry["gmacs"] / 32.0)
    assert entry["target_rel_ci"] == 0.5


def test_cli_bench_prints_gmacs_and_peak(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from compresskit.cli import app

    path = conv_net(tmp_path / "m.onnx")
    monkeypatch.setattr(bench, "cpu_info", lambda: CPU_AVX2)
    out = tmp_path / "b.json"
    result = CliRunner().invoke(
        app,
        ["bench", str(path), "--batch-sizes", "1,4", "--max-seconds", "0.01", "--warmup", "1",
         "--target-rel-ci", "0.5", "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    text = result.output
    assert "GMAC/s" in text and "% of peak" in text and "95% CI" in text
    assert text.count("peak GMAC/s = cores x clock GHz x MACs/cycle/core") == 1
    assert "clock 2.00 GHz (cpufreq max)" in text and "AVX2 FMA" in text
    assert "peak fp32, 1 core(s): 1 x 2.00 GHz x 16 = 32.0 GMAC/s" in text
    saved = json.loads(out.read_text())
    for entry in saved["latency"]:
        assert f"{entry['gmacs']:.2f}" in text
        assert report.fmt_peak_fraction(entry["peak_fraction"]) in text
        assert entry["stopped_by"] in {"precision", "time", "runs"}


def test_bench_model_ort_format(tmp_path):
    import onnxruntime as ort

    path, wb = linear_net(tmp_path / "lin.onnx")
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.save_model_format", "ORT")
    opts.optimized_model_filepath = str(tmp_path / "lin.ort")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x, y, top1, _ = _labelled_data(wb, n=8)
    res = bench.bench_model(tmp_path / "lin.ort", batch_sizes=(2,), x=x, y=y, **FAST)
    assert res["format"] == "ort" and res["size_bytes"] == (tmp_path / "lin.ort").stat().st_size
    assert res["latency"][0]["batch_size"] == 2 and res["accuracy"] == top1
    assert res["latency"][0]["gmacs"] is None and res["latency"][0]["peak_fraction"] is None


def test_bench_model_skips_other_batches_of_fixed_batch_model(tmp_path):
    path = conv_net(tmp_path / "fixed.onnx", batch=1)
    res = bench.bench_model(path, batch_sizes=(1, 8), **FAST)
    assert [e["batch_size"] for e in res["latency"]] == [1]
    assert res["latency_skipped"][0]["batch_size"] == 8
    assert res["accuracy"] is None
    with pytest.raises(ValueError, match="both x and y"):
        bench.bench_model(path, x=np.zeros((1, CIN, HW, HW), np.float32))


def test_bench_model_and_models_record_machine_load(tmp_path, monkeypatch):
    """Other processes' CPU use while timing: per entry and for the whole result."""
    clock = {"wall": 0.0, "busy": 0.0, "own": 0.0}

    def snapshot():  # every window: 1 s wall, 0.5 s own CPU, 0.7 s busy in all -> others 0.2 core
        out = (clock["wall"], clock["busy"], clock["own"])
        clock.update(wall=clock["wall"] + 1.0, busy=clock["busy"] + 0.7, own=clock["own"] + 0.5)
        return out

    monkeypatch.setattr(bench, "_cpu_snapshot", snapshot)
    path = conv_net(tmp_path / "m.onnx")
    res = bench.bench_model(path, batch_sizes=(1, 2), **FAST)
    assert [e["busy_fraction"] for e in res["latency"]] == pytest.approx([0.2, 0.2])
    assert res["busy_fraction"] == pytest.approx(0.2) and res["load"]["busy"]
    both = bench.bench_models({"a": path, "b": conv_net(tmp_path / "b.onnx", seed=1)}, batch_sizes=(1,), **FAST)
    assert both["a"]["busy_fraction"] == both["b"]["busy_fraction"] == pytest.approx(0.2)
    assert both["a"]["latency"][0]["interleaved_with"] == ["b"]


# --------------------------------------------------------------------------- envinfo

X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Example CPU @ 2.0GHz
flags\t\t: fpu sse avx2 fma avx512f avx512_vnni amx_tile amx_int8

processor\t: 1
model name\t: Example CPU @ 2.0GHz
flags\t\t: fpu sse avx2 fma avx512f avx512_vnni amx_tile amx_int8
"""

PI4_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU part\t: 0xd08

Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""

PI5_CPUINFO = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU part\t: 0xd0b
"""  # noqa: E501


def test_parse_cpuinfo_x86():
    info = envinfo.parse_cpuinfo(X86_CPUINFO, "x86_64")
    assert info["model"] == "Example CPU @ 2.0GHz"
    assert info["isa"]["avx512_vnni"] and info["isa"]["amx_int8"]
    assert not info["isa"]["avx_vnni"]
    assert info["isa_flags"] == ["avx2", "fma", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"]
    assert info["int8_dot"] is True


def test_parse_cpuinfo_arm():
    pi4 = envinfo.parse_cpuinfo(PI4_CPUINFO, "aarch64")
    assert pi4["model"] == "Raspberry Pi 4 Model B Rev 1.4"
    assert pi4["isa_flags"] == ["asimd"]
    assert pi4["int8_dot"] is False
    pi5 = envinfo.parse_cpuinfo(PI5_CPUINFO, "aarch64")
    assert pi5["model"] == "implementer 0x41 part 0xd0b"
    assert pi5["isa"]["asimddp"] and not pi5["isa"]["i8mm"]
    assert pi5["int8_dot"] is True
    assert envinfo.parse_cpuinfo("", "riscv64") == {
        "model": None,
        "vendor": None,
        "isa": {},
        "isa_flags": [],
        "int8_dot": False,
    }


def test_environment_is_complete_and_anonymous():
    env = envinfo.environment()
    assert env["cpu"]["architecture"] == platform.machine()
    assert env["cpu"]["logical_cores"] >= 1
    assert env["python"] == platform.python_version()
    assert "numpy" in env["versions"] and "onnxruntime" in env["versions"]
    assert "CPUExecutionProvider" in env["onnxruntime_providers"]
    host = socket.gethostname()
    text = json.dumps(env)
    if len(host) >= 6:
        assert host not in text
