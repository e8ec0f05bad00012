"""Structured pruning works or is refused up front in one line, never a Torch-Pruning traceback:
channel shuffles and wrongly sized channel splits are kept whole, a group whose pruning breaks
the forward pass is kept whole, and what cannot be pruned at all is a `PruneRefused` (a
ValueError) that `validate` reports as a `prune.pruner` problem."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
import torchvision
from torch import nn
from typer.testing import CliRunner

from compresskit import prune as P

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "pipelines" / "tiny_synthetic.yaml"


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def _roundtrip(fresh: nn.Module, result: P.PruneResult, x: torch.Tensor) -> None:
    """The pruned model rebuilds from its pruning state and computes the same."""
    rebuilt = P.rebuild_pruned(fresh, P.pruning_state(result.model))
    rebuilt.load_state_dict(result.model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), result.model.eval()(x))


def shufflenet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.shufflenet_v2_x0_5(num_classes=3).eval()


def test_shufflenet_prunes_keeping_the_shuffled_channels_whole() -> None:
    model, x = shufflenet(), _x(1, 3, 32, 32)
    assert P.check_prunable(model, x) == []
    res = P.prune_structured(model, x, ratio=0.5)
    kept = res.settings["kept_layers"]
    # every block's output feeds a channel shuffle: those layers stay, the branch interiors shrink
    assert "stage2.0.branch2.5" in kept and "stage4.3.branch2.5" in kept
    assert all("channel shuffle" in why and "Torch-Pruning cannot map" in why for why in kept.values())
    assert res.history["stage3.1.branch2.5"]["out_after"] == res.history["stage3.1.branch2.5"]["out_before"]
    assert res.history["stage3.1.branch2.0"]["out_after"] < res.history["stage3.1.branch2.0"]["out_before"]
    assert res.params_after < res.params_before
    assert res.model(x).shape == (1, 3)
    _roundtrip(shufflenet(), res, _x(2, 3, 32, 32))


def test_a_graph_torch_pruning_cannot_build_is_refused_in_one_line(monkeypatch) -> None:
    def crash(self, *args, **kwargs):
        raise ZeroDivisionError("integer division or modulo by zero")

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", crash)
    model, x = shufflenet(), _x(1, 3, 32, 32)
    problems = P.check_prunable(model, x)
    assert len(problems) == 1 and "\n" not in problems[0]
    assert "ShuffleNetV2" in problems[0] and "ZeroDivisionError: integer division" in problems[0]
    assert "prune.pruner.method: magnitude" in problems[0]
    with pytest.raises(P.PruneRefused) as info:
        P.prune_structured(model, x, ratio=0.5)
    assert isinstance(info.value, ValueError)
    assert str(info.value) == problems[0]


def test_any_other_torch_pruning_error_is_one_line_with_the_model_and_error(monkeypatch) -> None:
    def crash(self, *args, **kwargs):
        raise RuntimeError("boom\n  second line")
        yield  # pragma: no cover - a generator, like the real step

    monkeypatch.setattr(tp.pruner.BasePruner, "step", crash)
    with pytest.raises(P.PruneRefused, match=r"^structured pruning of ShuffleNetV2 failed in Torch-Pruning: "
                                             r"RuntimeError: boom second line$"):
        P.prune_structured(shufflenet(), _x(1, 3, 32, 32), ratio=0.5)


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=3).eval()


def test_a_group_whose_pruning_breaks_the_forward_pass_is_kept_whole() -> None:
    # torchvision's ViT reshapes with its stored hidden_dim: pruning the embedding width breaks it
    model, x = tiny_vit(), _x(1, 3, 32, 32)
    res = P.prune_structured(model, x, ratio=0.5)
    (layer, why), = res.settings["kept_layers"].items()
    assert layer.startswith("encoder.layers.") and "breaks the forward pass (RuntimeError: shape" in why
    assert res.model.conv_proj.out_channels == 32
    assert res.history["encoder.layers.encoder_layer_0.mlp.0"]["out_after"] == 32
    assert res.model(x).shape == (1, 3)
    _roundtrip(tiny_vit(), res, x)


class SplitNet(nn.Module):
    """`chunk` into two convolutions (Torch-Pruning sizes it right), or with `joined` one part
    straight into a concatenation (it infers the sizes wrongly)."""

    def __init__(self, joined: bool) -> None:
        super().__init__()
        self.joined = joined
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.mix = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = self.stem(x).chunk(2, dim=1)
        y = torch.cat([p if self.joined else self.a(p), self.b(q)], dim=1)
        return self.fc(self.mix(F.relu(y)).mean((2, 3)))


def test_channel_splits_prune_unless_torch_pruning_sizes_them_wrongly() -> None:
    x = _x(1, 3, 16, 16)
    torch.manual_seed(0)
    plain = P.prune_structured(SplitNet(joined=False), x, ratio=0.5)
    assert plain.settings["kept_layers"] == {}
    assert plain.history["stem"]["out_after"] == 8 and plain.history["a"]["out_after"] == 4

    torch.manual_seed(0)
    model = SplitNet(joined=True)
    graph = P.inspect_graph(model, x, [model.fc])
    assert any("chunk" in op and "wrongly inferred sizes" in op for op in graph.opaque)
    joined = P.prune_structured(model, x, ratio=0.5)
    assert {"stem", "b"} <= set(joined.settings["kept_layers"])
    assert "channel split of wrongly inferred sizes (chunk" in joined.settings["kept_layers"]["stem"]
    assert joined.history["stem"]["out_after"] == 16
    assert joined.history["mix"]["out_after"] == 8  # the rest still prunes
    _roundtrip(SplitNet(joined=True), joined, x)


class PixelShuffleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Conv2d(4, 16, 3, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(F.pixel_shuffle(self.up(x), 2)).mean((2, 3)))


def test_pixel_shuffle_keeps_its_input_layer_whole() -> None:
    x = _x(1, 3, 8, 8)
    res = P.prune_structured(PixelShuffleNet(), x, ratio=0.5)
    assert "pixel shuffle" in res.settings["kept_layers"]["up"]
    assert res.history["up"]["out_after"] == 16 and res.history["body"]["out_after"] == 8


class AttentionNet(nn.Module):
    """Conv tokens through `nn.MultiheadAttention` (no stored width anywhere)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return self.fc(t.mean(1))


def test_attention_width_prunes_and_rebuilds() -> None:
    x = _x(1, 3, 16, 16)
    torch.manual_seed(0)
    res = P.prune_structured(AttentionNet(), x, ratio=0.5)
    assert res.model.attn.embed_dim == res.model.embed.out_channels < 16
    assert res.model.attn.embed_dim % res.model.attn.num_heads == 0
    torch.manual_seed(0)
    _roundtrip(AttentionNet(), res, _x(2, 3, 16, 16))


def test_convnext_layer_scale_rebuilds() -> None:
    from torchvision.models.convnext import CNBlockConfig

    def convnext() -> nn.Module:
        torch.manual_seed(0)
        blocks = [CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)]
        return torchvision.models.ConvNeXt(blocks, num_classes=3).eval()

    x = _x(1, 3, 32, 32)
    res = P.prune_structured(convnext(), x, ratio=0.5)
    assert res.model.features[1][0].layer_scale.shape[0] < 16  # a bare parameter of a CNBlock
    _roundtrip(convnext(), res, _x(2, 3, 32, 32))


def test_a_model_with_nothing_to_prune_is_refused() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = _x(1, 3, 2, 2)
    (problem,) = P.check_prunable(model, x)
    assert problem.startswith("structured pruning of Sequential has nothing to prune")
    with pytest.raises(P.PruneRefused, match="nothing to prune"):
        P.prune_structured(model, x, ratio=0.5)
    assert P.check_prunable(model, x, ignored_layers=["nope"])[0].startswith("ignored_layers: no module named 'nope'")


def test_check_prunable_leaves_the_model_alone() -> None:
    model = shufflenet().train()
    before = copy.deepcopy(model.state_dict())
    assert P.check_prunable(model, _x(2, 3, 32, 32), ignored_layers=["conv1.*"]) == []
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def _validate(tmp_path: Path, *sets: str):
    from compresskit.cli import app

    args = ["validate", str(TINY), "--set", f"models_dir={tmp_path / 'm'}", "--set", f"reports_dir={tmp_path / 'r'}",
            "--set", "distill.student={arch: torchvision, name: shufflenet_v2_x0_5}",
            "--set", "distill.loss=[{method: ce, weight: 0.1}, {method: kd, weight: 0.9}]"]
    for s in sets:
        args += ["--set", s]
    return CliRunner().invoke(app, args)


def test_validate_accepts_a_shufflenet_student(tmp_path) -> None:
    result = _validate(tmp_path)
    assert result.exit_code == 0, result.output


def test_validate_reports_an_unprunable_student(tmp_path, monkeypatch) -> None:
    def crash(self, *args, **kwargs):
        raise ZeroDivisionError("integer division or modulo by zero")

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", crash)
    result = _validate(tmp_path)
    assert result.exit_code == 2, result.output
    assert ("prune.pruner: Torch-Pruning cannot build the dependency graph of ShuffleNetV2: ZeroDivisionError"
            in " ".join(result.output.split()))
    assert "Traceback" not in result.output
    assert _validate(tmp_path, "prune.pruner={method: magnitude, sparsity: 0.5}").exit_code == 0
