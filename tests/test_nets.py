import pytest
import torch

from compresskit.nets import build_model, count_params

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
