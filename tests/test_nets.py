import pytest
import torch

from compresskit.nets import build_model, count_params, model_from_checkpoint, read_checkpoint, save_checkpoint

SPECS = [
    {"arch": "resnet", "blocks": [1, 1], "width": 8, "stem_stride": 2},
    {"arch": "mobilenetv2", "width_mult": 0.25, "last_channel": 32},
    {"arch": "mobilenetv3", "size": "small", "width_mult": 0.5},
    {"arch": "torchvision", "name": "resnet18"},
    {"arch": "custom", "factory": "torch.nn:Flatten"},
]


@pytest.mark.parametrize("spec", SPECS[:4], ids=lambda s: s["arch"])
def test_build_shapes(spec):
    model = build_model(spec | {"num_classes": 7, "in_channels": 1}).eval()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)


def test_mobilenetv2_width_and_stride_change_size():
    small = build_model({"arch": "mobilenetv2", "width_mult": 0.35, "last_channel": 256,
                         "num_classes": 10, "in_channels": 1})
    big = build_model({"arch": "mobilenetv2", "width_mult": 1.0, "last_channel": 256,
                       "num_classes": 10, "in_channels": 1})
    assert count_params(small) < count_params(big) / 4
    assert small.features[0][0].stride == (2, 2)


def test_custom_factory_gets_supported_kwargs_only():
    model = build_model({"arch": "custom", "factory": "torch.nn:Identity", "kwargs": {},
                         "num_classes": 3, "in_channels": 1})
    assert isinstance(model, torch.nn.Identity)


@pytest.mark.parametrize("factory", ["nomodule_xyz:f", "torch.nn:NoSuch", "torch:__version__"])
def test_custom_factory_errors(factory):
    with pytest.raises(ValueError):
        build_model({"arch": "custom", "factory": factory, "num_classes": 3, "in_channels": 1})


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
