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


# ------------------------------------------------------------------ user factories: from the pipeline's folder

FACTORY = '''
import torch.nn as nn


def build(num_classes, in_channels, width=4):
    return nn.Sequential(nn.Conv2d(in_channels, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))
'''


def _project(tmp_path, module: str, source: str = FACTORY):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / f"{module}.py").write_text(source)
    (proj / "pipe.yaml").write_text(f"name: t\nteacher:\n  model: {{arch: custom, factory: '{module}:build'}}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return proj, elsewhere


def test_factory_next_to_the_pipeline_file_from_another_cwd(tmp_path, monkeypatch):
    import sys

    from compresskit.config import load_config

    proj, elsewhere = _project(tmp_path, "ck_factory_beside_pipeline")
    monkeypatch.chdir(elsewhere)
    before = list(sys.path)
    cfg = load_config(proj / "pipe.yaml")
    assert cfg.teacher.model.search_path == [str(proj.resolve())]
    spec = cfg.teacher.model.model_dump(mode="json") | {"num_classes": 3, "in_channels": 1}
    assert build_model(spec)(torch.zeros(2, 1, 8, 8)).shape == (2, 3)
    assert sys.path == before  # searched for the import only, no global change


def test_factory_on_pythonpath(tmp_path):
    import os
    import subprocess
    import sys

    proj, elsewhere = _project(tmp_path, "ck_factory_on_pythonpath")
    code = ("from compresskit.nets import build_model; "
            "print(type(build_model({'arch': 'custom', 'factory': 'ck_factory_on_pythonpath:build', "
            "'num_classes': 2, 'in_channels': 1})).__name__)")
    env = os.environ | {"PYTHONPATH": str(proj)}
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "Sequential", out.stderr


def test_factory_not_found_names_where_it_looked(tmp_path, monkeypatch):
    proj, elsewhere = _project(tmp_path, "ck_factory_other_name")
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ValueError, match=f"not found in {proj}, PYTHONPATH, the current directory"):
        build_model({"arch": "custom", "factory": "ck_factory_nowhere:build", "search_path": [str(proj)],
                     "num_classes": 2, "in_channels": 1})


BROKEN = {
    "missing dependency": ("import ck_no_such_dependency\n", "failed: No module named 'ck_no_such_dependency'"),
    "syntax error": ("def build(:\n", "failed: SyntaxError"),
    "factory raises": ("def build(**kw):\n    raise RuntimeError('no GPU here')\n",
                       ":build' failed: RuntimeError: no GPU here"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_factory_is_one_line_value_error(tmp_path, case):
    source, expected = BROKEN[case]
    module = "ck_factory_broken_" + case.replace(" ", "_")
    proj, _ = _project(tmp_path, module, source)
    with pytest.raises(ValueError, match=expected) as info:
        build_model({"arch": "custom", "factory": f"{module}:build", "search_path": [str(proj)],
                     "num_classes": 2, "in_channels": 1})
    assert "\n" not in str(info.value) and module in str(info.value)


# ------------------------------------------------------------------ folding another normalisation into the first conv

def test_fold_input_affine_is_exact_without_padding():
    from compresskit.nets import fold_input_affine

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, groups=2), torch.nn.ReLU(), torch.nn.Flatten())
    folded = __import__("copy").deepcopy(model)
    scale, shift = [2.0, 0.5], [0.3, -1.0]
    assert fold_input_affine(folded, scale, shift, torch.zeros(1, 2, 6, 6)) == ("0", True)
    x = torch.randn(3, 2, 6, 6)
    affine = x * torch.tensor(scale).view(1, 2, 1, 1) + torch.tensor(shift).view(1, 2, 1, 1)
    torch.testing.assert_close(folded(x), model(affine))


def test_fold_input_affine_uses_the_batchnorm_when_the_conv_has_no_bias():
    from compresskit.nets import fold_input_affine

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1, bias=False), torch.nn.BatchNorm2d(3)).eval()
    model[1].running_mean.normal_()
    folded = __import__("copy").deepcopy(model)
    fold_input_affine(folded, [3.0], [0.5], torch.zeros(1, 1, 4, 4))
    assert folded[0].bias is None  # the state dict keeps its keys: the spec still rebuilds it
    x = torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(folded(x), model(x * 3 + 0.5))


def test_fold_input_affine_refuses_what_it_cannot_fold():
    from compresskit.nets import fold_input_affine

    pre = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    with pytest.raises(ValueError, match="does not go straight into a convolution"):
        fold_input_affine(pre, [1.0], [0.0], torch.zeros(1, 1, 4, 4))
    bare = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1, bias=False), torch.nn.ReLU())
    with pytest.raises(ValueError, match="no bias and no BatchNorm"):
        fold_input_affine(bare, [1.0], [0.0], torch.zeros(1, 1, 4, 4))
