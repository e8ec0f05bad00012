"""Tests for compresskit.export: ONNX export, parity check, metadata and ORT format."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tinynets import TinyNet
from torch import nn

from compresskit.export import (
    LABELS_KEY,
    PREPROCESS_KEY,
    export_onnx,
    export_ort_format,
    labels_metadata,
    parity_check,
    preprocess_metadata,
)
from compresskit.onnxutil import op_counts, read_metadata


def _net() -> TinyNet:
    """A TinyNet with non-trivial BN statistics, so folding BN actually changes weights."""
    torch.manual_seed(0)
    net = TinyNet()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net


def _inputs(n: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 16, 16, generator=g)


def test_export_graph_names_dynamic_batch_and_bn_folded(tmp_path):
    net = _net().eval()
    path = export_onnx(net, tmp_path / "m.onnx", _inputs(1))
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    ops = op_counts(model)
    assert ops["Conv"] == 3
    for clutter in ("BatchNormalization", "Identity", "Constant", "Cast", "Transpose"):
        assert clutter not in ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        x = _inputs(n)
        out = sess.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(out, net(x).numpy(), atol=1e-5, rtol=1e-4)


def test_export_restores_modes_and_ignores_hooks(tmp_path):
    net = _net().train()
    net.stem[1].eval()  # a module kept in eval on purpose must stay so
    calls = []
    handle = net.dw.register_forward_hook(lambda mod, inp, out: calls.append(1) or out * 0)
    path = export_onnx(net, tmp_path / "m.onnx", _inputs(2))
    assert net.training and not net.stem[1].training and net.dw.training
    assert calls == []  # the hook did not run while tracing ...
    assert len(net.dw._forward_hooks) == 1  # ... and is still registered
    handle.remove()
    report = parity_check(net, path, _inputs(8))
    assert report["max_abs_diff"] < 1e-4 and report["top1_agreement"] == 1.0
    assert net.training


def test_export_writes_metadata_atomically(tmp_path):
    meta = {**preprocess_metadata([0.5, 0.4, 0.3], [0.2, 0.2, 0.25], (16, 16)),
            **labels_metadata(["a", "b", "c", "d"])}  # fmt: skip
    path = export_onnx(_net(), tmp_path / "sub" / "m.onnx", _inputs(1), metadata=meta)
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.onnx"]  # no temp files left
    props = read_metadata(path)
    pre = json.loads(props[PREPROCESS_KEY])
    assert pre == {"scale": 1 / 255, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.25],
                   "layout": "NCHW", "channels": 3, "size": [16, 16]}  # fmt: skip
    assert json.loads(props[LABELS_KEY]) == ["a", "b", "c", "d"]


def test_parity_check_reports_real_differences(tmp_path):
    net = _net().eval()
    path = export_onnx(net, tmp_path / "m.onnx", _inputs(1))
    same = parity_check(net, path, _inputs(10), batch_size=3)
    assert same["n"] == 10 and same["top1_agreement"] == 1.0
    assert same["max_abs_diff"] < 1e-4
    with torch.no_grad():
        net.fc.bias.add_(torch.tensor([5.0, 0.0, 0.0, 0.0]))  # now torch always picks class 0
    moved = parity_check(net, path, _inputs(10))
    assert moved["max_abs_diff"] == pytest.approx(5.0, abs=1e-3)
    assert moved["top1_agreement"] < 1.0


def test_export_ort_format_loads(tmp_path):
    net = _net().eval()
    path = export_onnx(net, tmp_path / "m.onnx", _inputs(1))
    ort_path = export_ort_format(path, tmp_path / "mobile")
    assert ort_path.suffix == ".ort" and ort_path.is_file()
    sess = ort.InferenceSession(str(ort_path), providers=["CPUExecutionProvider"])
    x = _inputs(3)
    with torch.no_grad():
        np.testing.assert_allclose(
            sess.run(None, {"input": x.numpy()})[0], net(x).numpy(), atol=1e-4
        )


@pytest.mark.slow
def test_export_dynamo_matches(tmp_path):
    net = _net().eval()
    path = export_onnx(net, tmp_path / "m.onnx", _inputs(1), dynamo=True)
    model = onnx.load(str(path))
    assert model.graph.input[0].name == "input" and model.graph.output[0].name == "logits"
    assert parity_check(net, path, _inputs(8))["max_abs_diff"] < 1e-4


def test_export_errors(tmp_path):
    net = _net()
    with pytest.raises(ValueError, match="shape"):
        export_onnx(net, tmp_path / "m.onnx", torch.rand(1, 4, 16, 16))
    with pytest.raises(ValueError, match="batch"):
        export_onnx(net, tmp_path / "m.onnx", torch.rand(16))

    class TwoOut(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(ValueError, match="single tensor"):
        export_onnx(TwoOut(), tmp_path / "m.onnx", torch.rand(1, 3))
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(FileNotFoundError):
        parity_check(net, tmp_path / "missing.onnx", _inputs(2))
    path = export_onnx(net, tmp_path / "ok.onnx", _inputs(1))
    with pytest.raises(ValueError, match="per-sample shape"):
        parity_check(net, path, torch.rand(2, 3, 8, 8))


def test_metadata_validation():
    with pytest.raises(ValueError, match="channels"):
        preprocess_metadata([0.5, 0.5], [0.2, 0.2, 0.2], (8, 8))
    with pytest.raises(ValueError, match="std"):
        preprocess_metadata([0.5], [0.0], (8, 8))
    with pytest.raises(ValueError, match="layout"):
        preprocess_metadata([0.5], [0.2], (8, 8), layout="CHW")
    with pytest.raises(ValueError, match="size"):
        preprocess_metadata([0.5], [0.2], (8,))
    with pytest.raises(ValueError, match="empty"):
        labels_metadata([])
    gray = json.loads(preprocess_metadata([0.28], [0.35], (28, 28), scale=1.0)[PREPROCESS_KEY])
    assert gray["channels"] == 1 and gray["scale"] == 1.0 and gray["size"] == [28, 28]
