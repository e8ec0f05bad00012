"""Tests for compresskit.prune: tiny nets, torchvision nets at small inputs, CPU only."""

from __future__ import annotations

import copy
import io
import math
import warnings

import numpy as np
import pytest
import torch
import torch_pruning as tp
import torchvision
from torch import nn

from compresskit import prune as P


class TinyNet(nn.Module):
    """Conv stem, a residual block (couples channels across layers) and a classifier."""

    def __init__(self, in_channels: int = 1, num_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Give BatchNorm layers distinct scales and statistics, as a trained model has (an
    untrained one has all scales 1, which makes BN-scale importance a tie)."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=gen) * 0.9 + 0.1)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return _randomize_bn(TinyNet()).eval()


def mbv2_gray() -> nn.Module:
    """MobileNetV2-0.35 for 1-channel 28x28 inputs: first conv replaced, stride as torchvision."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(width_mult=0.35, num_classes=10)
    old = model.features[0][0]
    model.features[0][0] = nn.Conv2d(1, old.out_channels, 3, old.stride, 1, bias=False)
    return _randomize_bn(model).eval()


def mbv3_small() -> nn.Module:
    torch.manual_seed(0)
    return _randomize_bn(torchvision.models.mobilenet_v3_small(num_classes=10)).eval()


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return _randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()


TORCHVISION = {
    "mobilenet_v2_gray": (mbv2_gray, (1, 1, 28, 28)),
    "mobilenet_v3_small": (mbv3_small, (1, 3, 32, 32)),
    "resnet18": (resnet18, (1, 3, 32, 32)),
}


def _example(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def _roundtrip(state: dict, weights: dict) -> dict:
    buf = io.BytesIO()
    torch.save({"state": state, "weights": weights}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---------------------------------------------------------------- counting


def test_count_macs_by_hand() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    macs, params = P.count_macs_params(model, torch.zeros(3, 2, 8, 8))
    conv = 6 * 6 * 4 * 2 * 9
    linear = 4 * 6 * 6 * 5
    assert macs == conv + linear  # per sample, batch 3 divided out
    assert params == 4 * 2 * 9 + 144 * 5 + 5


def test_count_macs_depthwise_and_torch_pruning_ops() -> None:
    dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False))
    assert P.count_macs_params(dw, torch.zeros(1, 8, 5, 5))[0] == 8 * 25 * 9
    # Without BN/activation/bias, Torch-Pruning's "ops" equal MACs; with them, ops exceed MACs.
    plain = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.Conv2d(4, 4, 1, bias=False))
    x = torch.zeros(1, 1, 10, 10)
    assert P.count_macs_params(plain, x)[0] == int(tp.utils.count_ops_and_params(plain, x)[0])
    model = mbv2_gray()
    x = _example((1, 1, 28, 28))
    ops, tp_params = tp.utils.count_ops_and_params(model, x)
    macs, params = P.count_macs_params(model, x)
    assert params == tp_params
    assert macs < ops


def test_count_does_not_touch_batchnorm_stats() -> None:
    model = TinyNet().train()
    before = _snapshot(model)
    P.count_macs_params(model, torch.randn(2, 1, 8, 8))
    _assert_unchanged(model, before)
    assert model.training


# ---------------------------------------------------------------- structured


def test_structured_tiny_shrinks_and_keeps_caller_model() -> None:
    model = tiny_net()
    before = _snapshot(model)
    x = _example((1, 1, 16, 16))
    res = P.prune_structured(model, x, ratio=0.5)
    _assert_unchanged(model, before)
    pruned = res.model
    assert pruned is not model
    assert pruned.conv1.out_channels == 8 and pruned.conv1.weight.shape == (8, 1, 3, 3)
    assert pruned.conv3.weight.shape == (16, 8, 3, 3)
    assert pruned.fc.weight.shape == (3, 16)  # classifier keeps its outputs
    assert res.params_after < res.params_before
    assert res.params_after == sum(p.numel() for p in pruned.parameters())
    assert res.macs_after < res.macs_before
    assert res.history["conv1"] == {"out_before": 16, "out_after": 8}
    assert res.history["fc"] == {"out_before": 3, "out_after": 3}
    assert res.settings["classifier"] == "fc"
    assert pruned(x).shape == (1, 3)
    doc = res.to_json()
    assert doc["method"] == "structured"
    assert doc["macs_ratio"] == pytest.approx(res.macs_after / res.macs_before)


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_structured_torchvision_exports_to_onnx(name: str, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    factory, shape = TORCHVISION[name]
    x = _example(shape)
    res = P.prune_structured(factory(), x, ratio=0.5)
    assert res.params_after < 0.5 * res.params_before
    assert res.macs_after < 0.5 * res.macs_before
    model = res.model.eval()
    with torch.no_grad():
        expected = model(x).numpy()
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == expected.shape == (1, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("importance", P.IMPORTANCES)
@pytest.mark.parametrize("global_pruning", [False, True])
def test_every_importance_prunes(importance: str, global_pruning: bool) -> None:
    x = _example((1, 1, 28, 28))
    batches = [(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)))]
    res = P.prune_structured(
        mbv2_gray(),
        x,
        importance=importance,
        ratio=0.5,
        global_pruning=global_pruning,
        taylor_batches=batches if importance == "taylor" else None,
    )
    assert res.params_after < 0.8 * res.params_before
    assert res.model(x).shape == (1, 10)
    assert all(p.grad is None for p in res.model.parameters())


def test_taylor_needs_batches() -> None:
    x = _example((1, 1, 16, 16))
    with pytest.raises(ValueError, match="taylor_batches"):
        P.prune_structured(tiny_net(), x, importance="taylor")
    with pytest.raises(ValueError, match="empty"):
        P.prune_structured(tiny_net(), x, importance="taylor", taylor_batches=iter([]))


def test_taylor_uses_the_loss() -> None:
    """Taylor scores are |w * dL/dw|: a loss that only sees logit 0 changes which channels go."""
    x = _example((1, 1, 16, 16))
    batches = [
        (
            torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(3)),
            torch.zeros(8, dtype=torch.long),
        )
    ]
    kept = []
    for loss in (nn.functional.cross_entropy, lambda out, _t: out[:, 1].pow(2).sum()):
        res = P.prune_structured(
            tiny_net(), x, importance="taylor", ratio=0.5, taylor_batches=batches, loss_fn=loss
        )
        kept.append(res.model.conv3.bias.detach().clone())
    assert kept[0].shape == kept[1].shape == (16,)
    assert not torch.equal(kept[0], kept[1])


def test_ignored_layers_validated_and_respected() -> None:
    x = _example((1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"'conv9'.*Valid paths: conv1"):
        P.prune_structured(tiny_net(), x, ignored_layers=["conv9"])
    with pytest.raises(ValueError, match="did you mean .*conv3"):
        P.prune_structured(tiny_net(), x, ignored_layers=["conv33"])
    res = P.prune_structured(tiny_net(), x, ratio=0.5, ignored_layers=["conv3"])
    assert res.model.conv3.out_channels == 32
    assert res.model.conv1.out_channels == 8


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ratio": 1.0},
        {"ratio": -0.1},
        {"importance": "l3"},
        {"iterative_steps": 0},
        {"round_to": 0},
        {"max_layer_ratio": 0.0},
    ],
)
def test_structured_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        P.prune_structured(tiny_net(), _example((1, 1, 16, 16)), **kwargs)


def test_bad_example_inputs() -> None:
    with pytest.raises(ValueError, match="example_inputs"):
        P.prune_structured(tiny_net(), [1, 2, 3])


def test_round_to_and_iterative_steps() -> None:
    x = _example((1, 1, 28, 28))
    model = mbv2_gray()
    one = P.prune_structured(model, x, ratio=0.5)
    three = P.prune_structured(model, x, ratio=0.5, iterative_steps=3)
    assert three.history == one.history  # the linear schedule ends at the same widths
    rounded = P.prune_structured(model, x, ratio=0.3, round_to=8)
    changed = [v for v in rounded.history.values() if v["out_after"] != v["out_before"]]
    assert changed
    assert all(v["out_after"] % 8 == 0 for v in changed)


def test_max_layer_ratio_caps_every_layer_in_global_pruning() -> None:
    x = _example((1, 1, 28, 28))
    model = mbv2_gray()

    def worst(res: P.PruneResult) -> float:
        return max(1 - v["out_after"] / v["out_before"] for v in res.history.values())

    loose = P.prune_structured(model, x, ratio=0.5, global_pruning=True, max_layer_ratio=1.0)
    capped = P.prune_structured(model, x, ratio=0.5, global_pruning=True, max_layer_ratio=0.6)
    assert worst(loose) > 0.6  # global ranking empties some layers more than others
    assert worst(capped) <= 0.6
    for name, v in capped.history.items():
        assert v["out_after"] >= math.ceil(v["out_before"] * 0.4), name


def test_train_mode_model_keeps_mode_and_statistics() -> None:
    torch.manual_seed(0)
    model = TinyNet().train()
    res = P.prune_structured(model, _example((2, 1, 16, 16)), ratio=0.5)
    assert res.model.training and model.training
    for m in res.model.modules():
        if isinstance(m, nn.BatchNorm2d):  # no forward pass ran in train mode
            assert int(m.num_batches_tracked) == 0
            assert torch.all(m.running_mean == 0) and torch.all(m.running_var == 1)


def test_warns_when_nothing_is_removed() -> None:
    torch.manual_seed(0)
    model = TinyNet().eval()  # untrained: every BN scale is 1, a perfect tie
    with pytest.warns(UserWarning, match="removed no channel"):
        res = P.prune_structured(
            model, _example((1, 1, 16, 16)), importance="bn_scale", global_pruning=True
        )
    assert res.params_after == res.params_before


# ---------------------------------------------------------------- magnitude


def test_magnitude_sparsity_masks_and_finalize() -> None:
    model = mbv2_gray()
    before = _snapshot(model)
    x = _example((1, 1, 28, 28))
    res = P.prune_magnitude(model, sparsity=0.5, example_inputs=x)
    _assert_unchanged(model, before)
    pruned = res.model
    total = sum(v["numel"] for v in res.history.values())
    zeros = sum(v["zeros"] for v in res.history.values())
    assert res.sparsity == pytest.approx(zeros / total)
    assert abs(zeros - round(0.5 * total)) <= 1
    assert "features.0.0" not in res.history and "classifier.1" not in res.history
    assert torch.count_nonzero(pruned.features[0][0].weight) == pruned.features[0][0].weight.numel()
    assert res.params_after == res.params_before  # dense shapes
    assert res.macs_after == res.macs_before
    baked = P.finalize_magnitude(copy.deepcopy(pruned))
    assert res.nonzero_params_after == sum(int(torch.count_nonzero(p)) for p in baked.parameters())
    assert res.nonzero_params_after <= res.params_before - zeros

    # Masks stay active: an optimizer step keeps the pruned weights at zero.
    layer = pruned.features[1].conv[1]
    mask = layer.weight_mask.clone()
    opt = torch.optim.SGD(pruned.parameters(), lr=0.1)
    pruned.train()
    pruned(torch.randn(2, 1, 28, 28)).sum().backward()
    opt.step()
    pruned.eval()
    pruned(x)
    assert torch.all(layer.weight[mask == 0] == 0)

    final = P.finalize_magnitude(pruned)
    keys = final.state_dict().keys()
    assert not any(k.endswith(("_orig", "_mask")) for k in keys)
    assert torch.all(final.features[1].conv[1].weight[mask == 0] == 0)


def test_magnitude_conv_only_and_registration_order() -> None:
    res = P.prune_magnitude(tiny_net(), sparsity=0.3, layers="conv")
    assert set(res.history) == {"conv2", "conv3"}  # first conv kept, Linear not a target
    assert not hasattr(res.model.fc, "weight_mask")
    res = P.prune_magnitude(tiny_net(), sparsity=0.3, keep_first_conv=False)
    assert set(res.history) == {"conv1", "conv2", "conv3"}  # classifier fc kept
    assert res.macs_before is None and res.to_json()["macs_ratio"] is None


def test_magnitude_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="sparsity"):
        P.prune_magnitude(tiny_net(), sparsity=1.0)
    with pytest.raises(ValueError, match="layers"):
        P.prune_magnitude(tiny_net(), sparsity=0.5, layers="linear")
    with pytest.raises(ValueError, match="'stem'"):
        P.prune_magnitude(tiny_net(), sparsity=0.5, ignored_layers=["stem"])


# ---------------------------------------------------------------- rebuild from checkpoints


@pytest.mark.parametrize("name", ["mobilenet_v2_gray", "mobilenet_v3_small"])
def test_rebuild_structured_roundtrip(name: str) -> None:
    factory, shape = TORCHVISION[name]
    x = _example(shape)
    res = P.prune_structured(factory(), x, ratio=0.4, global_pruning=True)
    loaded = _roundtrip(P.pruning_state(res.model), res.model.state_dict())
    fresh = factory()
    rebuilt = P.rebuild_pruned(fresh, loaded["state"])
    assert rebuilt is fresh
    rebuilt.load_state_dict(loaded["weights"])
    rebuilt.eval()
    res.model.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), res.model(x))
    assert sum(p.numel() for p in rebuilt.parameters()) == res.params_after


def test_rebuild_keeps_magnitude_masks() -> None:
    x = _example((1, 1, 16, 16))
    res = P.prune_magnitude(tiny_net(), sparsity=0.6)
    loaded = _roundtrip(P.pruning_state(res.model), res.model.state_dict())
    assert loaded["state"]["masked"] == ["conv2.weight", "conv3.weight"]
    rebuilt = P.rebuild_pruned(TinyNet(), loaded["state"])
    rebuilt.load_state_dict(loaded["weights"])
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), res.model(x))
    assert torch.equal(rebuilt.conv2.weight_mask, res.model.conv2.weight_mask)


def test_rebuild_rejects_other_architecture_and_bad_state() -> None:
    res = P.prune_structured(tiny_net(), _example((1, 1, 16, 16)), ratio=0.5)
    state = P.pruning_state(res.model)
    with pytest.raises(ValueError, match="same architecture"):
        P.rebuild_pruned(mbv2_gray(), state)
    with pytest.raises(ValueError, match="pruning state"):
        P.rebuild_pruned(TinyNet(), {"modules": {}})


# ---------------------------------------------------------------- compresskit.nets models

NET_SPECS = [
    {
        "arch": "mobilenetv2",
        "num_classes": 10,
        "in_channels": 1,
        "width_mult": 0.35,
        "last_channel": 128,
    },
    {
        "arch": "resnet",
        "num_classes": 10,
        "in_channels": 1,
        "blocks": [1, 1],
        "width": 8,
        "stem_stride": 2,
    },
]


@pytest.mark.parametrize("spec", NET_SPECS, ids=lambda s: s["arch"])
def test_nets_models_prune_and_rebuild_from_checkpoint(spec: dict) -> None:
    nets = pytest.importorskip("compresskit.nets")
    checkpoint = pytest.importorskip("compresskit.checkpoint")
    torch.manual_seed(0)
    model = _randomize_bn(nets.build_model(spec)).eval()
    x = _example((1, 1, 28, 28))
    res = P.prune_structured(model, x, ratio=0.5)
    assert res.params_after < 0.5 * res.params_before
    buf = io.BytesIO()
    torch.save(
        {"spec": spec, "pruning": P.pruning_state(res.model), "state_dict": res.model.state_dict()},
        buf,
    )
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    rebuilt = checkpoint.model_from_checkpoint(ckpt).eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), res.model.eval()(x))


# ---------------------------------------------------------------- ratio by measured latency


def _mac_clock(model: nn.Module) -> float:
    """A stand-in latency: 1 ms fixed overhead + 1 ms per 10k MACs (deterministic, no timing)."""
    macs, _ = P.count_macs_params(model, (_example((1, 1, 16, 16)),))
    return 1.0 + macs / 10_000


def test_search_ratio_picks_the_smallest_ratio_meeting_the_target() -> None:
    net = tiny_net()
    base = _mac_clock(net)
    chosen, info = P.search_ratio(net, _example((1, 1, 16, 16)), _mac_clock,
                                  ratios=[0.7, 0.25, 0.5], target_speedup=1.3)
    rows = info["tried"]
    assert [r["ratio"] for r in rows] == sorted(r["ratio"] for r in rows)  # tried smallest first
    assert info["met_target"] and rows[-1]["meets_target"]
    assert all(not r["meets_target"] for r in rows[:-1])
    assert rows[-1]["latency_ms"] <= base / 1.3 and info["chosen_ratio"] == rows[-1]["ratio"]
    assert chosen.macs_after == rows[-1]["macs"]
    for r in rows:  # the MAC ratio is reported beside the measured ratio
        assert r["mac_ratio"] == pytest.approx(r["macs"] / chosen.macs_before)
        assert r["latency_ratio"] == pytest.approx(r["latency_ms"] / base)


def test_search_ratio_unreachable_target_uses_the_largest() -> None:
    net = tiny_net()
    _, info = P.search_ratio(net, _example((1, 1, 16, 16)), _mac_clock, ratios=[0.25, 0.5],
                             target_latency_ms=0.001)
    assert not info["met_target"] and info["chosen_ratio"] == 0.5 and len(info["tried"]) == 2


def test_search_ratio_rejects_bad_arguments() -> None:
    net = tiny_net()
    ex = _example((1, 1, 16, 16))
    with pytest.raises(ValueError, match="exactly one"):
        P.search_ratio(net, ex, _mac_clock, ratios=[0.5])
    with pytest.raises(ValueError, match="exactly one"):
        P.search_ratio(net, ex, _mac_clock, ratios=[0.5], target_latency_ms=1.0, target_speedup=2.0)
    with pytest.raises(ValueError, match="fractions"):
        P.search_ratio(net, ex, _mac_clock, ratios=[1.5], target_speedup=2.0)
