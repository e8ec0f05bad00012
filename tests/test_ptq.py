"""Tests for compresskit.quantize.ptq (the module itself imports no torch; these tests may)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from tinynets import TinyNet, make_data

from compresskit.export import export_onnx, labels_metadata
from compresskit.onnxutil import read_metadata, write_metadata
from compresskit.quantize.calibrate import ArrayCalibrationReader, CalibrationRanges, calibrate
from compresskit.quantize.ptq import (
    QUANTIZATION_KEY,
    optimized_op_counts,
    quantize_ptq,
)


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory):
    """A briefly trained TinyNet and its float ONNX export (with labels metadata)."""
    torch.manual_seed(0)
    net = TinyNet()
    x, y = make_data(512, seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for step in range(60):
        idx = torch.arange(step * 64, (step + 1) * 64) % len(x)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    path = tmp_path_factory.mktemp("ptq") / "fp32.onnx"
    export_onnx(net, path, x[:1], metadata=labels_metadata(["a", "b", "c", "d"]))
    return net, path


def _run(path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.astype(np.float32)})[0]


def test_quantize_ptq_u8s8_close_to_fp32(fp32_model, tmp_path):
    net, fp32 = fp32_model
    calib = make_data(96, seed=1)[0].numpy()
    report = quantize_ptq(fp32, tmp_path / "int8.onnx", calib, calib_batch_size=16)
    out = tmp_path / "int8.onnx"
    assert report["output"] == str(out) and out.is_file()
    json.dumps(report)  # JSON-able
    assert report["calib_samples"] == 96 and report["calib_batches"] == 6
    assert report["ops_int8"]["QuantizeLinear"] > 0 and report["ops_int8"]["DequantizeLinear"] > 0
    assert report["ops_fp32"]["Conv"] == 3
    # onnxruntime runs every conv, the add, the pool and the gemm as int8 kernels
    optimized = report["ops_int8_optimized"]
    assert optimized["QLinearConv"] == 3 and optimized["QLinearAdd"] == 1
    assert "Conv" not in optimized
    assert report["size_int8_bytes"] > 0 and report["size_fp32_bytes"] > 0
    assert report["settings"]["activation_type"] == "uint8" and report["settings"]["per_channel"]
    model = onnx.load(str(out))
    by_type = {}
    for t in model.graph.initializer:
        by_type.setdefault(t.data_type, []).append(tuple(t.dims))
    assert len([d for d in by_type[onnx.TensorProto.INT8] if len(d) == 4]) == 3  # conv weights
    assert by_type[onnx.TensorProto.UINT8], "uint8 activation zero points expected"

    x_test, y_test = make_data(200, seed=2)
    ref = _run(fp32, x_test.numpy())
    got = _run(out, x_test.numpy())
    assert (ref.argmax(1) == y_test.numpy()).mean() > 0.9  # the float model learned the task
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.93
    assert np.abs(got - ref).mean() < 0.05 * np.abs(ref).mean()


def test_metadata_carried_over(fp32_model, tmp_path):
    _, fp32 = fp32_model
    quantize_ptq(fp32, tmp_path / "int8.onnx", make_data(32, seed=1)[0].numpy())
    props = read_metadata(tmp_path / "int8.onnx")
    assert json.loads(props["compresskit.labels"]) == ["a", "b", "c", "d"]
    assert json.loads(props[QUANTIZATION_KEY])["method"] == "ptq"


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile", "distribution"])
def test_all_calibration_methods_run(fp32_model, tmp_path, method):
    _, fp32 = fp32_model
    x = make_data(64, seed=3)[0].numpy()
    report = quantize_ptq(fp32, tmp_path / f"{method}.onnx", x, calibrate_method=method)
    assert report["settings"]["calibrate_method"] == method
    agree = (_run(tmp_path / f"{method}.onnx", x).argmax(1) == _run(fp32, x).argmax(1)).mean()
    assert agree >= 0.9


def test_batched_calibration_equals_single_batch(fp32_model, tmp_path):
    """Calibrating batch by batch merges ranges: the scales equal a one-batch calibration."""
    _, fp32 = fp32_model
    calib = make_data(70, seed=4)[0].numpy()
    quantize_ptq(fp32, tmp_path / "a.onnx", calib, calib_batch_size=7)
    quantize_ptq(fp32, tmp_path / "b.onnx", calib, calib_batch_size=70)
    a = {
        t.name: numpy_helper.to_array(t)
        for t in onnx.load(str(tmp_path / "a.onnx")).graph.initializer
    }
    b = {
        t.name: numpy_helper.to_array(t)
        for t in onnx.load(str(tmp_path / "b.onnx")).graph.initializer
    }
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_nodes_to_exclude_keeps_node_float(fp32_model, tmp_path):
    _, fp32 = fp32_model
    calib = make_data(32, seed=5)[0].numpy()
    conv = next(n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Conv")
    report = quantize_ptq(fp32, tmp_path / "ex.onnx", calib, nodes_to_exclude=[conv])
    assert report["settings"]["nodes_to_exclude"] == [conv]
    assert report["ops_int8_optimized"]["QLinearConv"] == 2
    assert report["ops_int8_optimized"]["Conv"] == 1


def test_int8_activations(fp32_model, tmp_path):
    _, fp32 = fp32_model
    x = make_data(64, seed=5)[0].numpy()
    quantize_ptq(fp32, tmp_path / "s8.onnx", x, activation_type="int8")
    model = onnx.load(str(tmp_path / "s8.onnx"))
    dtypes = {t.data_type for t in model.graph.initializer}
    assert onnx.TensorProto.UINT8 not in dtypes and onnx.TensorProto.INT8 in dtypes
    agree = (_run(tmp_path / "s8.onnx", x).argmax(1) == _run(fp32, x).argmax(1)).mean()
    assert agree >= 0.9


def test_bad_arguments(fp32_model, tmp_path):
    _, fp32 = fp32_model
    good = make_data(8, seed=6)[0].numpy()
    out = tmp_path / "x.onnx"
    with pytest.raises(ValueError, match="calibrate_method"):
        quantize_ptq(fp32, out, good, calibrate_method="kl")
    with pytest.raises(ValueError, match="activation_type"):
        quantize_ptq(fp32, out, good, activation_type="int4")
    with pytest.raises(ValueError, match="percentile"):
        quantize_ptq(fp32, out, good, calibrate_method="percentile", percentile=0.0)
    with pytest.raises(ValueError, match="empty"):
        quantize_ptq(fp32, out, good[:0])
    with pytest.raises(ValueError, match="rank"):
        quantize_ptq(fp32, out, good[0])
    with pytest.raises(ValueError, match="axis 2"):
        quantize_ptq(fp32, out, np.zeros((4, 3, 8, 16), np.float32))
    with pytest.raises(ValueError, match="floating"):
        quantize_ptq(fp32, out, good.astype(np.uint8))
    with pytest.raises(ValueError, match="nodes_to_exclude"):
        quantize_ptq(fp32, out, good, nodes_to_exclude=["no_such_node"])
    with pytest.raises(FileNotFoundError):
        quantize_ptq(tmp_path / "missing.onnx", out, good)
    assert not out.exists()


def test_reader_batches_and_ranges():
    data = np.arange(10 * 2, dtype=np.float64).reshape(10, 2)
    reader = ArrayCalibrationReader(data, "input", batch_size=4)
    assert len(reader) == 3
    batches = list(iter(reader.get_next, None))
    assert [b["input"].shape[0] for b in batches] == [4, 4, 2]
    assert all(b["input"].dtype == np.float32 for b in batches)
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in batches]), data)
    reader.set_range(1, 2)
    assert reader.get_next()["input"][0, 0] == 8.0 and reader.get_next() is None
    with pytest.raises(ValueError):
        ArrayCalibrationReader(data, "input", batch_size=0)


def test_optimized_op_counts_of_float_model(fp32_model):
    _, fp32 = fp32_model
    counts = optimized_op_counts(fp32)
    assert counts.get("Conv", 0) + counts.get("FusedConv", 0) == 3
    assert "QLinearConv" not in counts


def test_ptq_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import compresskit.quantize.ptq as p\n"
        "assert 'torch' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n"
        "print(p.quantize_ptq.__name__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "quantize_ptq"


# --------------------------------------------------------------------------------------------
# calibrate once, quantize many times
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_ranges_round_trip_through_json(fp32_model, tmp_path, method):
    _, fp32 = fp32_model
    ranges = calibrate(fp32, make_data(40, seed=7)[0].numpy(), method=method, batch_size=16)
    assert ranges.samples == 40 and ranges.batches == 3 and ranges.preprocess and ranges.dtypes == {}
    assert ranges.percentile == (99.999 if method == "percentile" else None)
    assert len(ranges.ranges) > 5 and all(lo <= hi for lo, hi in ranges.ranges.values())
    path = ranges.save(tmp_path / "ranges.json")
    doc = json.loads(path.read_text())  # plain JSON
    assert doc["method"] == method and doc["model_sha256"] == ranges.model_sha256
    loaded = CalibrationRanges.load(path)
    assert loaded == ranges
    assert all(np.float32(lo) == lo and np.float32(hi) == hi for lo, hi in loaded.ranges.values())


def _old_path(fp32, out, calib, act: str, per_channel: bool, method: str) -> None:
    """What quantize_ptq did before ranges existed: quantize_static calibrating on its own."""
    pre = out.with_name("pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    extra = {"CalibStridedMinMax": 1}
    if method == "percentile":
        extra.update(CalibPercentile=99.999, CalibTensorRangeSymmetric=False)
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    quantize_static(str(pre), str(out), ArrayCalibrationReader(calib, "input", 32), quant_format=QuantFormat.QDQ,
                    per_channel=per_channel, activation_type=types[act], weight_type=QuantType.QInt8,
                    calibrate_method=methods[method], extra_options=extra)


def _graph(path) -> tuple[dict[str, bytes], list[bytes]]:
    model = onnx.load(str(path))
    return ({t.name: t.SerializeToString() for t in model.graph.initializer},
            [n.SerializeToString() for n in model.graph.node])


@pytest.mark.parametrize(("act", "per_channel", "method"), [
    ("uint8", True, "minmax"), ("uint8", False, "minmax"), ("int8", True, "minmax"), ("int8", False, "minmax"),
    ("uint8", True, "percentile"),
])
def test_quantize_with_ranges_equals_calibrating(fp32_model, tmp_path, act, per_channel, method):
    _, fp32 = fp32_model
    calib = make_data(80, seed=8)[0].numpy()
    kw = {"activation_type": act, "per_channel": per_channel, "calibrate_method": method}
    ranges = calibrate(fp32, calib, method=method)
    report = quantize_ptq(fp32, tmp_path / "ranges.onnx", ranges=ranges, **kw)
    assert not report["calibrated"] and report["calibration_s"] == 0.0 and report["calib_samples"] == 80
    quantize_ptq(fp32, tmp_path / "calib.onnx", calib, **kw)
    _old_path(fp32, tmp_path / "old.onnx", calib, act, per_channel, method)
    # the same file as calibrating in quantize_ptq, the same graph as quantize_static on its own
    assert (tmp_path / "ranges.onnx").read_bytes() == (tmp_path / "calib.onnx").read_bytes()
    assert _graph(tmp_path / "ranges.onnx") == _graph(tmp_path / "old.onnx")
    x = make_data(64, seed=9)[0].numpy()
    assert np.array_equal(_run(tmp_path / "ranges.onnx", x), _run(tmp_path / "old.onnx", x))


def test_ranges_must_match_model_and_settings(fp32_model, tmp_path):
    _, fp32 = fp32_model
    calib = make_data(16, seed=10)[0].numpy()
    ranges = calibrate(fp32, calib)
    out = tmp_path / "x.onnx"
    with pytest.raises(ValueError, match="exactly one"):
        quantize_ptq(fp32, out, calib, ranges=ranges)
    with pytest.raises(ValueError, match="exactly one"):
        quantize_ptq(fp32, out)
    with pytest.raises(ValueError, match="calibrated with"):
        quantize_ptq(fp32, out, ranges=ranges, calibrate_method="entropy")
    with pytest.raises(ValueError, match="preprocess"):
        quantize_ptq(fp32, out, ranges=ranges, preprocess=False)
    other = write_metadata(fp32, {"k": "v"}, out=tmp_path / "other.onnx")
    with pytest.raises(ValueError, match="another model"):
        quantize_ptq(other, out, ranges=ranges)
    assert not out.exists()


def test_quantize_goes_on_when_preprocessing_fails(fp32_model, tmp_path, monkeypatch):
    """onnxruntime's quant_pre_process asserts on some graphs (a ViT's Reshape): quantize without
    it, say so in the result, and calibrate-once ranges still fit."""
    import compresskit.quantize.calibrate as cal
    from compresskit.quantize.calibrate import calibrate

    def broken(src, dst, *args, **kwargs):
        raise AssertionError("symbolic shape inference failed")

    monkeypatch.setattr(cal, "quant_pre_process", broken)
    _, fp32 = fp32_model
    calib = make_data(32, seed=1)[0].numpy()
    info = quantize_ptq(fp32, tmp_path / "q.onnx", calib)
    assert "AssertionError" in info["preprocess_skipped"]
    ranges = calibrate(fp32, calib)
    again = quantize_ptq(fp32, tmp_path / "q2.onnx", ranges=ranges)
    assert again["preprocess_skipped"]
    assert (tmp_path / "q2.onnx").read_bytes() == (tmp_path / "q.onnx").read_bytes()
