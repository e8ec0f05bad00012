"""Tests of compresskit.checkpoint: save, read and rebuild models."""

import pytest
import torch

from compresskit.checkpoint import load_model, model_from_checkpoint, read_checkpoint, save_checkpoint
from compresskit.nets import build_model


def test_checkpoint_roundtrip_weights_only(tmp_path):
    spec = {"arch": "mobilenetv2", "width_mult": 0.25, "last_channel": 32, "num_classes": 4, "in_channels": 1}
    model = build_model(spec).eval()
    path = save_checkpoint(tmp_path / "m.pt", model, spec, meta={"note": "x"})
    raw = torch.load(path, weights_only=True)  # must not need pickled classes
    assert raw["spec"] == spec
    rebuilt = model_from_checkpoint(read_checkpoint(path)).eval()
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(model(x), rebuilt(x))


def test_plain_state_dict_needs_spec(tmp_path):
    spec = {"arch": "resnet", "blocks": [1], "width": 4, "num_classes": 2, "in_channels": 1}
    model = build_model(spec)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    ckpt = read_checkpoint(tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="spec"):
        model_from_checkpoint(ckpt)
    assert isinstance(model_from_checkpoint(ckpt, spec), torch.nn.Module)
    wrong = spec | {"width": 8}
    with pytest.raises(ValueError, match="does not fit"):
        model_from_checkpoint(ckpt, wrong)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "none.pt")


def test_load_model_reads_and_rebuilds(tmp_path):
    spec = {"arch": "resnet", "blocks": [1], "width": 4, "num_classes": 3, "in_channels": 1}
    model = build_model(spec).eval()
    save_checkpoint(tmp_path / "m.pt", model, spec, meta={"stage": "x"})
    rebuilt, ckpt = load_model(tmp_path / "m.pt")
    assert ckpt["meta"] == {"stage": "x"} and ckpt["spec"] == spec
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(model(x), rebuilt.eval()(x))
    torch.save(model.state_dict(), tmp_path / "sd.pt")  # a plain state dict needs the spec
    assert isinstance(load_model(tmp_path / "sd.pt", spec)[0], torch.nn.Module)
