"""Tests for compresskit.quantize.qat: fake-quant QAT and its QDQ ONNX export."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import torchvision
from tinynets import TinyNet, make_data
from torch import nn

from compresskit.export import export_onnx, parity_check
from compresskit.onnxutil import read_metadata
from compresskit.quantize.ptq import optimized_op_counts
from compresskit.quantize.qat import (
    ActFakeQuant,
    QuantConv2d,
    QuantLinear,
    act_quantizers,
    epoch_callback,
    export_qat_onnx,
    freeze,
    prepare_qat,
    qat_state,
    rebuild_qat,
)


def train(model: nn.Module, steps: int, lr: float, seed: int = 0) -> nn.Module:
    """The plain loop the pipeline uses: forward, loss, backward, step."""
    x, y = make_data(512, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        idx = torch.arange(step * 64, (step + 1) * 64) % len(x)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def float_net() -> TinyNet:
    torch.manual_seed(0)
    return train(TinyNet(dropout=0.2), steps=60, lr=1e-2)


def _calib(n: int = 64) -> list[torch.Tensor]:
    x = make_data(n, seed=7)[0]
    return list(x.split(32))


def test_prepare_returns_new_model_with_bn_folded(float_net):
    before = {k: v.clone() for k, v in float_net.state_dict().items()}
    qat = prepare_qat(float_net, make_data(1, 0)[0], observer_batches=_calib())
    after = float_net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # float model untouched
    assert isinstance(float_net.stem[0], nn.Conv2d) and not isinstance(
        float_net.stem[0], QuantConv2d
    )
    modules = list(qat.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in modules)
    assert sum(isinstance(m, QuantConv2d) for m in modules) == 3
    assert sum(isinstance(m, QuantLinear) for m in modules) == 1
    # input, stem out (after ReLU), dw out (after ReLU6), pw out, add out (after ReLU), pool out
    fqs = act_quantizers(qat)
    assert len(fqs) == 6 and all(fq.initialized for fq in fqs)
    assert all(float(fq.min_val) >= 0 for fq in fqs if fq is not fqs[0] and fq is not fqs[3])
    x = make_data(64, seed=3)[0]
    with torch.no_grad():
        ref, got = float_net(x), qat.eval()(x)
    assert (ref.argmax(1) == got.argmax(1)).float().mean() >= 0.95
    assert (ref - got).abs().mean() < 0.05 * ref.abs().mean()


def test_training_updates_weights_and_ranges_until_frozen(float_net):
    qat = prepare_qat(float_net, make_data(1, 0)[0], observer_batches=_calib())
    fq = act_quantizers(qat)[1]
    start = float(fq.max_val)
    w0 = qat.get_submodule("stem.0").weight.detach().clone()
    x, y = make_data(64, seed=11)
    qat.train()
    loss = F.cross_entropy(qat(x * 3), y)  # wider inputs: the EMA range must grow
    loss.backward()
    assert qat.get_submodule("stem.0").weight.grad.abs().sum() > 0
    assert float(fq.max_val) > start
    torch.optim.SGD(qat.parameters(), lr=0.1).step()
    assert not torch.equal(qat.get_submodule("stem.0").weight, w0)

    qat.eval()
    held = float(fq.max_val)
    with torch.no_grad():
        qat(x * 5)
    assert float(fq.max_val) == held  # eval never observes
    freeze(qat).train()
    with torch.no_grad():
        qat(x * 5)
    assert float(fq.max_val) == held  # frozen ranges stay put in training
    freeze(qat, frozen=False)
    with torch.no_grad():
        qat(x * 5)
    assert float(fq.max_val) > held


def test_export_runs_int8_and_matches_torch(float_net, tmp_path):
    qat = prepare_qat(float_net, make_data(1, 0)[0], observer_batches=_calib())
    train(qat, steps=20, lr=1e-3, seed=1)
    freeze(qat)
    path = export_qat_onnx(qat, tmp_path / "qat.onnx", make_data(1, 0)[0], metadata={"k": "v"})
    assert read_metadata(path) == {"k": "v"}
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    types = {t.data_type for t in model.graph.initializer if len(t.dims) == 4}
    assert types == {onnx.TensorProto.INT8}  # weights stored as int8, no float copies
    int32 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT32]
    assert len([t for t in int32 if t.name.endswith("_bias_quantized")]) == 4  # 3 convs + gemm
    optimized = optimized_op_counts(path, tmp_path / "opt.onnx")
    assert optimized["QLinearConv"] == 3 and optimized["QLinearAdd"] == 1
    assert optimized.get("QGemm", 0) == 1 and "Conv" not in optimized

    x, y = make_data(200, seed=5)
    vs_qat = parity_check(qat, path, x)
    vs_float = parity_check(float_net, path, x)
    assert vs_qat["top1_agreement"] >= 0.99
    with torch.no_grad():
        scale = qat(x).abs().mean().item()
    assert vs_qat["mean_abs_diff"] < 0.01 * scale
    assert vs_float["top1_agreement"] >= 0.95
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    acc = (sess.run(None, {"input": x.numpy()})[0].argmax(1) == y.numpy()).mean()
    assert acc >= 0.9


def test_state_round_trip_with_weights_only_load(float_net, tmp_path):
    example = make_data(1, 0)[0]
    qat = prepare_qat(float_net, example, observer_batches=_calib(), per_channel=False)
    train(qat, steps=5, lr=1e-3, seed=2)
    freeze(qat)
    settings = qat_state(qat)
    assert settings == {
        "per_channel": False,
        "activation_dtype": "uint8",
        "ema_momentum": 0.01,
        "example_shape": [1, 3, 16, 16],
    }
    torch.save({"settings": json.dumps(settings), "state": qat.state_dict()}, tmp_path / "qat.pt")

    ckpt = torch.load(tmp_path / "qat.pt", weights_only=True)
    x = make_data(32, seed=9)[0]
    with torch.no_grad():
        want = qat.eval()(x)
    for how in ("prepare", "rebuild"):
        torch.manual_seed(123)
        fresh = TinyNet(dropout=0.2)  # fresh weights: everything must come from the checkpoint
        state = json.loads(ckpt["settings"])
        rebuilt = (
            prepare_qat(fresh, example, **state) if how == "prepare" else rebuild_qat(fresh, state)
        )
        assert not any(fq.initialized for fq in act_quantizers(rebuilt))
        rebuilt.load_state_dict(ckpt["state"])
        assert all(fq.initialized and fq.frozen for fq in act_quantizers(rebuilt))
        with torch.no_grad():
            torch.testing.assert_close(rebuilt.eval()(x), want, rtol=0, atol=0)


def test_epoch_callback_freezes_late_epochs(float_net):
    qat = prepare_qat(float_net, make_data(1, 0)[0], observer_batches=_calib())
    callback = epoch_callback(4, freeze_after=0.5)
    frozen = []
    for epoch in range(4):
        callback(epoch, qat)
        frozen.append(all(fq.frozen for fq in act_quantizers(qat)))
    assert frozen == [False, False, True, True]
    epoch_callback(1)(0, qat)  # one epoch: ranges keep tracking
    assert not any(fq.frozen for fq in act_quantizers(qat))


def test_mobilenet_v2_exports_to_fused_int8(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=10).eval()
    x = torch.rand(8, 3, 32, 32)
    qat = prepare_qat(net, x[:1], observer_batches=[x])
    path = export_qat_onnx(qat, tmp_path / "mbv2.onnx", x[:1])
    optimized = optimized_op_counts(path)
    assert optimized["QLinearConv"] == 52 and optimized["QLinearAdd"] == 10
    assert optimized["QGemm"] == 1 and optimized["QLinearGlobalAveragePool"] == 1
    assert "Conv" not in optimized and optimized.get("DequantizeLinear", 0) == 0
    fp32 = export_onnx(net, tmp_path / "fp32.onnx", x[:1])
    assert path.stat().st_size < 0.4 * fp32.stat().st_size


def test_int8_activations_and_other_ops(tmp_path):
    """Hardswish, a squeeze-excite multiply, max pool and concat: all export and run."""

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(3, 8, 1)
            self.act = nn.Hardswish()
            self.se = nn.Conv2d(16, 16, 1)
            self.pool = nn.MaxPool2d(2)
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            y = torch.cat([self.act(self.a(x)), F.relu(self.b(x))], dim=1)
            y = y * torch.sigmoid(self.se(F.adaptive_avg_pool2d(y, 1)))
            return self.fc(self.pool(y).mean((2, 3)))

    torch.manual_seed(0)
    net = Odd().eval()
    x = torch.randn(16, 3, 8, 8)
    qat = prepare_qat(net, x[:1], observer_batches=[x], activation_dtype="int8")
    assert all(fq.dtype == "int8" for fq in act_quantizers(qat))
    path = export_qat_onnx(qat, tmp_path / "odd.onnx", x[:1])
    zps = [
        t for t in onnx.load(str(path)).graph.initializer if t.data_type == onnx.TensorProto.UINT8
    ]
    assert not zps
    report = parity_check(qat, path, x)
    with torch.no_grad():
        scale = qat(x).abs().mean().item()
    assert report["mean_abs_diff"] < 0.02 * scale


def test_errors(float_net, tmp_path):
    example = make_data(1, 0)[0]
    with pytest.raises(ValueError, match="activation_dtype"):
        prepare_qat(float_net, example, activation_dtype="int4")
    unset = prepare_qat(float_net, example)
    with pytest.raises(ValueError, match="not set"):
        export_qat_onnx(unset, tmp_path / "x.onnx", example)
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(ValueError, match="shape"):
        prepare_qat(float_net, torch.rand(1, 5, 16, 16))
    with pytest.raises(ValueError, match="empty"):
        prepare_qat(float_net, example, observer_batches=[])
    with pytest.raises(ValueError, match="not a QAT model"):
        qat_state(float_net)

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="torch.fx"):
        prepare_qat(Branchy(), example)


def test_act_fake_quant_matches_onnxruntime_formula():
    fq = ActFakeQuant("uint8")
    fq.train()
    x = torch.tensor([-1.0, 0.0, 0.5, 3.0])
    out = fq(x)
    scale = 4.0 / 255
    zp = round(1.0 / scale)
    assert float(fq.scale) == pytest.approx(scale) and int(fq.zero_point) == zp
    expected = (torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale
    torch.testing.assert_close(out, expected)


def test_bias_that_would_overflow_int32_keeps_its_value(tmp_path):
    """A channel with ~zero weights and a large bias (a dead BN channel after folding)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten())
    with torch.no_grad():
        net[0].weight[1].fill_(1e-9)
        net[0].bias.copy_(torch.tensor([0.1, 1000.0]))
    x = torch.rand(8, 3, 2, 2)
    qat = prepare_qat(net.eval(), x[:1], observer_batches=[x])
    path = export_qat_onnx(qat, tmp_path / "b.onnx", x[:1])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0].reshape(8, 2, 4)
    with torch.no_grad():
        ref = qat(x).reshape(8, 2, 4).numpy()
    step = float(act_quantizers(qat)[-1].scale)  # the output quantizer's step (range ~1000)
    np.testing.assert_allclose(got[:, 1], 1000.0, atol=step)
    np.testing.assert_allclose(got, ref, atol=1e-3)
