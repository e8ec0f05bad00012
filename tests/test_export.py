"""Tests for compresskit.export: ONNX export, parity check, metadata and ORT format."""

from __future__ import annotations

import json
import math

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
    divergence_problem,
    export_onnx,
    export_ort_format,
    labels_metadata,
    logit_stats,
    parity_check,
    parity_problem,
    preprocess_metadata,
)
from compresskit.export.stage import run as export_run
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


# ------------------------------------------------------------------ parity judged relative to the logits' scale


def _scaled(factor: float) -> TinyNet:
    """The test net with its logits multiplied by `factor` (a student whose training diverged)."""
    net = _net().eval()
    with torch.no_grad():
        net.fc.weight.mul_(factor)
        net.fc.bias.mul_(factor)
    return net


def test_parity_check_reports_relative_difference_and_scale(tmp_path):
    net = _scaled(1e4)
    path = export_onnx(net, tmp_path / "m.onnx", _inputs(1))
    figures = parity_check(net, path, _inputs(32))
    with torch.no_grad():
        scale = float(net(_inputs(32)).abs().max())
    assert figures["max_abs_logit"] == pytest.approx(scale, rel=1e-6)
    assert figures["max_rel_diff"] == pytest.approx(figures["max_abs_diff"] / scale)
    assert figures["max_rel_diff"] < 1e-5 and figures["top1_agreement"] == 1.0


def test_rounding_error_of_huge_logits_passes_parity(tmp_path):
    """Logits ~1e4: float32 rounding alone differs by more than the old fixed absolute tolerance
    (1e-3), but relative to the logits it is ~1e-7, and the top-1 classes agree."""
    net = _scaled(1e5)
    path = export_onnx(net, tmp_path / "m.onnx", _inputs(1))
    figures = parity_check(net, path, _inputs(64))
    assert figures["max_abs_diff"] > 1e-3  # the old check failed this export on rounding alone
    assert parity_problem(figures, max_abs_diff=1e-3, max_rel_diff=1e-4, min_top1_agreement=0.99) is None


def test_parity_problem_names_the_threshold():
    base = {"n": 100, "max_abs_diff": 5e-3, "max_rel_diff": 5e-3 / 10.0, "max_abs_logit": 10.0,
            "top1_agreement": 1.0}
    problem = parity_problem(base, max_abs_diff=1e-3, max_rel_diff=1e-4, min_top1_agreement=0.99)
    assert "export.max_rel_diff=0.0001" in problem and "export.max_abs_diff=0.001" in problem
    # below the absolute floor a difference passes whatever its relative size (near-zero logits)
    tiny = {**base, "max_abs_diff": 5e-4, "max_rel_diff": 0.5, "max_abs_logit": 1e-3}
    assert parity_problem(tiny, max_abs_diff=1e-3, max_rel_diff=1e-4, min_top1_agreement=0.99) is None
    assert "max_rel_diff" in parity_problem(tiny, max_abs_diff=None, max_rel_diff=1e-4, min_top1_agreement=0.99)
    flipped = {**base, "max_abs_diff": 1e-6, "max_rel_diff": 1e-7, "top1_agreement": 0.95}
    problem = parity_problem(flipped, max_abs_diff=1e-3, max_rel_diff=1e-4, min_top1_agreement=0.99)
    assert problem == "top-1 class agrees on 95.00% of 100 images < export.min_top1_agreement=0.99"
    nan = {**base, "max_abs_diff": float("nan"), "max_rel_diff": float("nan")}
    assert parity_problem(nan, max_abs_diff=1e-3, max_rel_diff=1e-4, min_top1_agreement=0.99) is not None


def test_parity_check_does_not_hide_nan(tmp_path):
    net = _net().eval()
    path = export_onnx(net, tmp_path / "m.onnx", _inputs(1))
    with torch.no_grad():
        net.fc.bias[0] = float("nan")
    figures = parity_check(net, path, _inputs(8))
    assert math.isnan(figures["max_abs_diff"])


def test_diverged_models_are_recognised():
    assert divergence_problem(logit_stats(_net(), _inputs(8))) is None
    huge = logit_stats(_scaled(1e4), _inputs(8))
    assert huge["finite"] and huge["max_abs_logit"] > 1e3
    assert "export.max_abs_logit=1000" in divergence_problem(huge, 1e3)
    assert divergence_problem(huge, None) is None
    broken = _net()
    with torch.no_grad():
        broken.fc.bias[1] = float("inf")
    assert divergence_problem(logit_stats(broken, _inputs(8)), None) == "its logits are not finite (NaN or inf)"


def _export_stage(tmp_path, model, **export_cfg):
    """Run the export stage on one float checkpoint of `model` (a resnet on 1-channel 16x16 data)."""
    from compresskit.checkpoint import save_checkpoint
    from compresskit.config import DataConfig, ExportConfig, SyntheticConfig
    from compresskit.stage import StageContext
    from compresskit.stages import ExportJob

    spec = {"arch": "resnet", "num_classes": 4, "in_channels": 1, "blocks": [1], "width": 8}
    ckpt = save_checkpoint(tmp_path / "student.pt", model, spec)
    data = DataConfig(dataset="synthetic", batch_size=32, calib_size=16,
                      synthetic=SyntheticConfig(num_train=64, num_test=32, num_classes=4, image_size=16, channels=1))
    job = ExportJob(export=ExportConfig(parity_samples=32, **export_cfg), data=data, seed=0)
    out = tmp_path / "export"
    out.mkdir()
    ctx = StageContext(name="export", dir=out, inputs={"student": ckpt}, key="k", quiet=True)
    return export_run(ctx, job)


def _resnet(logit_scale: float = 1.0):
    from compresskit.nets import build_model

    torch.manual_seed(0)
    model = build_model({"arch": "resnet", "num_classes": 4, "in_channels": 1, "blocks": [1], "width": 8}).eval()
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(logit_scale)
        last.bias.mul_(logit_scale)
    return model


def test_export_stage_reports_a_diverged_model_in_one_line(tmp_path):
    from compresskit.stage import StageError

    with pytest.raises(StageError) as info:
        _export_stage(tmp_path, _resnet(5e6))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("export: the student model looks diverged on 32 test images, not exported: "
                              "its max |logit|")
    assert "export.max_abs_logit=1000" in message
    assert not (tmp_path / "export" / "student.onnx").exists()
    # with the bound lifted, the same model exports: its parity is judged relative to its logits
    (tmp_path / "lifted").mkdir()
    result = _export_stage(tmp_path / "lifted", _resnet(5e6), max_abs_logit=None)
    figures = result.metrics["parity"]["student"]
    assert figures["max_abs_logit"] > 1e3 and figures["max_rel_diff"] < 1e-4
    assert figures["max_abs_diff"] > 1e-3  # the old fixed absolute tolerance failed it on rounding alone
    assert "top-1 agreement >= 100.0%" in result.summary


def test_export_stage_names_the_parity_threshold(tmp_path):
    from compresskit.stage import StageError

    with pytest.raises(StageError, match=r"^export: student.onnx does not match its PyTorch model: max \|logit "
                                         r"difference\| .* > export.max_rel_diff=1e-12 "
                                         r"and > export.max_abs_diff=1e-12$"):
        _export_stage(tmp_path, _resnet(), max_rel_diff=1e-12, max_abs_diff=1e-12)


def test_export_stage_refuses_a_qat_export_that_does_not_reproduce_qat(tmp_path, monkeypatch):
    """An INT8 export that picks other classes than its fake-quant model fails in one line."""
    from compresskit.checkpoint import save_checkpoint
    from compresskit.config import DataConfig, ExportConfig, SyntheticConfig
    from compresskit.export import stage as export_stage
    from compresskit.stage import StageContext, StageError
    from compresskit.stages import ExportJob

    spec = {"arch": "resnet", "num_classes": 4, "in_channels": 1, "blocks": [1], "width": 8}
    ckpt = save_checkpoint(tmp_path / "qat.pt", _resnet(), spec)
    torch.manual_seed(7)
    from compresskit.nets import build_model

    other = build_model(spec).eval()

    def wrong_export(model, path, example, **kwargs):  # stands in for an export that drifts
        return export_onnx(other, path, example, opset=kwargs.get("opset", 17), metadata=kwargs.get("metadata"))

    monkeypatch.setattr(export_stage.qat, "export_qat_onnx", wrong_export)
    data = DataConfig(dataset="synthetic", batch_size=32, calib_size=16,
                      synthetic=SyntheticConfig(num_train=64, num_test=64, num_classes=4, image_size=16, channels=1))
    job = ExportJob(export=ExportConfig(parity_samples=64), data=data, seed=0)
    (tmp_path / "export").mkdir()
    ctx = StageContext(name="export", dir=tmp_path / "export", inputs={"qat": ckpt}, key="k", quiet=True)
    with pytest.raises(StageError, match=r"min_qat_top1_agreement=0.9\): the INT8 export does not reproduce QAT"):
        export_run(ctx, job)
