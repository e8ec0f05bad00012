"""Tests of compresskit.checkpoint: save, read and rebuild models."""

import random
import re

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


# ------------------------------------------------------------------ unreadable files: one line, never a traceback

def _junk(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "text":
        path.write_text("epoch 3 accuracy 0.91\nthis is a log, not weights\n")
    elif kind.startswith("random"):
        rng = random.Random(int(kind[6:]))
        path.write_bytes(bytes(rng.getrandbits(8) for _ in range(4096)))
    elif kind == "truncated":
        torch.save({"w": torch.zeros(100)}, tmp_path / "full.pt")
        data = (tmp_path / "full.pt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "directory":
        path.mkdir()
    elif kind == "objects":
        torch.save({"model": torch.nn.Linear(2, 2)}, path)  # a pickled module, not a state dict
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "no-weights":
        torch.save({"epoch": 3, "lr": 0.1}, path)
    return path


JUNK = {"text": "a text file", **{f"random{i}": "not a" for i in range(8)},
        "truncated": "damaged or truncated", "directory": "is a directory", "objects": "holds Python objects",
        "empty": "empty file", "tensor": "holds a Tensor", "no-weights": "without weights (keys: epoch, lr)"}


@pytest.mark.parametrize("kind", JUNK)
def test_unreadable_checkpoint_is_one_line_value_error(tmp_path, kind):
    path = _junk(tmp_path, kind)
    with pytest.raises(ValueError) as info:
        read_checkpoint(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and JUNK[kind] in msg and "\n" not in msg, msg
    with pytest.raises(ValueError, match=re.escape(JUNK[kind])):
        load_model(path)


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"none\.pt: file not found"):
        read_checkpoint(tmp_path / "none.pt")


# ------------------------------------------------------------------ wrapped state dicts and what does not fit

SPEC = {"arch": "resnet", "blocks": [1], "width": 4, "num_classes": 3, "in_channels": 1}


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module.", "module.module."])
def test_wrapper_prefixes_are_stripped(tmp_path, prefix):
    model = build_model(SPEC).eval()
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, tmp_path / "sd.pt")
    rebuilt, _ = load_model(tmp_path / "sd.pt", SPEC)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(model(x), rebuilt.eval()(x))


def test_compiled_submodule_and_real_module_prefix():
    from compresskit.checkpoint import strip_wrapper_prefixes

    sd = {"stem._orig_mod.0.weight": 1, "fc.weight": 2}
    assert strip_wrapper_prefixes(sd) == {"stem.0.weight": 1, "fc.weight": 2}
    # a model whose only child is called `module` keeps its keys
    own = ["module.weight", "module.bias"]
    assert strip_wrapper_prefixes({"module.weight": 1, "module.bias": 2}, own) == {"module.weight": 1, "module.bias": 2}
    assert strip_wrapper_prefixes({"module.module.weight": 1}, ["module.weight"]) == {"module.weight": 1}


def test_misfit_lists_missing_unexpected_and_shapes(tmp_path):
    sd = build_model(SPEC).state_dict()
    sd.pop("fc.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["fc.weight"] = torch.zeros(5, 4)
    torch.save(sd, tmp_path / "sd.pt")
    with pytest.raises(ValueError) as info:
        load_model(tmp_path / "sd.pt", SPEC)
    msg = str(info.value)
    assert "1 missing (fc.bias)" in msg and "1 unexpected (extra.weight)" in msg
    assert "fc.weight 5x4 in the file, 3x4 in the model" in msg and "\n" not in msg


# ------------------------------------------------------------------ recorded preprocessing

def _pre(**over):
    base = {"scale": 1 / 255, "mean": [0.5], "std": [0.25], "layout": "NCHW", "channels": 1, "size": [8, 8],
            "class_names": ["a", "b", "c"]}
    return base | over


def test_checkpoint_records_preprocess(tmp_path):
    from compresskit.checkpoint import load_for_data

    path = save_checkpoint(tmp_path / "m.pt", build_model(SPEC), SPEC, preprocess=_pre(size=(8, 8)))
    raw = torch.load(path, weights_only=True)
    assert raw["preprocess"] == _pre()
    _, _, notes = load_for_data(path, None, _pre())
    assert notes["preprocess"] == "recorded, the same as the data's"


def test_other_normalisation_is_refused_naming_both(tmp_path):
    from compresskit.checkpoint import load_for_data

    path = save_checkpoint(tmp_path / "m.pt", build_model(SPEC), SPEC, preprocess=_pre(mean=[0.1307], std=[0.3081]))
    with pytest.raises(ValueError) as info:
        load_for_data(path, None, _pre())
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg
    assert "mean [0.1307] in the checkpoint vs [0.5] in the data" in msg and "std [0.3081]" in msg
    assert "preprocess_mismatch: convert" in msg


def test_other_classes_or_size_are_refused_even_when_converting(tmp_path):
    from compresskit.checkpoint import load_for_data

    path = save_checkpoint(tmp_path / "m.pt", build_model(SPEC), SPEC,
                           preprocess=_pre(class_names=["a", "c", "b"], mean=[0.1]))
    for policy in ("refuse", "convert"):
        with pytest.raises(ValueError, match="class 1 is 'c' in the checkpoint vs 'b' in the data"):
            load_for_data(path, None, _pre(), policy)
    _, _, notes = load_for_data(path, None, _pre(), "ignore")
    assert notes["preprocess"].startswith("differs from the data's, ignored")


def test_other_classes_count_or_channels_are_refused(tmp_path):
    from compresskit.checkpoint import load_for_data

    path = save_checkpoint(tmp_path / "m.pt", build_model(SPEC), SPEC, preprocess=_pre())
    with pytest.raises(ValueError, match="for 3 classes and 1 input channel.*the data has 4 and 1"):
        load_for_data(path, None, _pre(class_names=list("abcd")), "ignore")


def test_convert_folds_the_normalisation_into_the_first_conv(tmp_path):
    from compresskit.checkpoint import load_for_data

    torch.manual_seed(0)
    model = build_model(SPEC).eval()
    for m in model.modules():  # non-trivial BN statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.weight.data.normal_()
    old, new = _pre(mean=[0.2], std=[0.3]), _pre()
    path = save_checkpoint(tmp_path / "m.pt", model, SPEC, preprocess=old)
    converted, _, notes = load_for_data(path, None, new, "convert")
    assert notes["preprocess_converted"]["into"] == "stem.0" and "converted" in notes["preprocess"]
    pixels = torch.randint(0, 256, (4, 1, 8, 8)).float()

    def norm(pre):
        return (pixels * pre["scale"] - pre["mean"][0]) / pre["std"][0]

    reference = model(norm(old))
    gap_converted = (converted.eval()(norm(new)) - reference).abs()
    gap_as_is = (model(norm(new)) - reference).abs()
    assert gap_converted.max() < gap_as_is.max() / 10  # exact but for the zero-padded border


def test_plain_state_dict_is_accepted_with_a_note(tmp_path):
    from compresskit.checkpoint import load_for_data

    torch.save(build_model(SPEC).state_dict(), tmp_path / "sd.pt")
    _, _, notes = load_for_data(tmp_path / "sd.pt", SPEC, _pre())
    assert notes["preprocess"].startswith("not recorded")
