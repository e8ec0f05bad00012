"""`validate` checks what `run` would check before training (the data folder, every checkpoint
against its architecture and the data), one line per problem, and `run` refuses the same input
without writing anything; a teacher checkpoint's recorded preprocessing is refused, converted or
ignored as `teacher.preprocess_mismatch` says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from compresskit.checkpoint import save_checkpoint
from compresskit.cli import app
from compresskit.config import load_config
from compresskit.nets import build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "pipelines" / "tiny_synthetic.yaml"
runner = CliRunner()
TINY_DATA = {"scale": 1 / 255, "mean": [0.5], "std": [0.25], "layout": "NCHW", "channels": 1, "size": [16, 16],
             "class_names": [f"class_{i}" for i in range(4)]}


def _dirs(tmp_path: Path) -> list[str]:
    return ["--set", f"models_dir={tmp_path / 'models'}", "--set", f"reports_dir={tmp_path / 'reports'}"]


def _validate(tmp_path: Path, *sets: str):
    args = [a for s in sets for a in ("--set", s)]
    return runner.invoke(app, ["validate", str(TINY), *_dirs(tmp_path), *args])


def _teacher_spec(**over) -> dict:
    cfg = load_config(TINY)
    return cfg.teacher.model.model_dump(mode="json") | {"num_classes": 4, "in_channels": 1} | over


def _teacher_file(tmp_path: Path, name: str = "t.pt", preprocess: dict | None = TINY_DATA, **over) -> Path:
    spec = _teacher_spec(**over)
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / name, build_model(spec), spec, preprocess=preprocess)


def _lines(result) -> list[str]:
    return [line.removeprefix("error ") for line in result.output.splitlines() if line.startswith("error ")]


# ------------------------------------------------------------------ image folders


def _image_folder(root: Path) -> Path:
    """train/ with cat, dog, emu (emu empty); test/ with cat, dog, fox; one corrupt image."""
    from PIL import Image

    for split, classes in (("train", ("cat", "dog")), ("test", ("cat", "dog", "fox"))):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(root / split / cls / f"{i}.png")
    (root / "train" / "emu").mkdir()
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def test_validate_reports_every_image_folder_problem(tmp_path):
    root = _image_folder(tmp_path / "images")
    result = _validate(tmp_path, "data.dataset=imagefolder", f"data.root={root}", "data.image_size=16",
                       "data.channels=1", "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.2, 0.2, 0.2]",
                       "data.class_names=[a, b]")
    assert result.exit_code == 2, result.output
    lines = _lines(result)
    expected = [f"data.root: class emu in {root / 'train'} but not in {root / 'test'}",
                f"data.root: class fox in {root / 'test'} but not in {root / 'train'}",
                f"data.root: {root / 'train' / 'emu'} has no images",
                f"data.root: 1 unreadable image in {root}: train/dog/broken.jpg (",
                "data.mean: 3 values but the images have 1 channel",
                "data.std: 3 values but the images have 1 channel",
                f"data.class_names: 2 names but {root / 'train'} has 3 classes (cat, dog, emu)"]
    for start in expected:
        assert any(line.startswith(start) for line in lines), (start, lines)
    assert "Traceback" not in result.output


def test_validate_accepts_a_good_image_folder(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((20, 20, 3), 50 * i, np.uint8)).save(root / split / cls / f"{i}.png")
    result = _validate(tmp_path, "data.dataset=imagefolder", f"data.root={root}", "data.image_size=16",
                       "data.channels=1")
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------ checkpoints


def test_validate_reads_the_teacher_checkpoint(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not weights\n")
    result = _validate(tmp_path, f"teacher.checkpoint={text}")
    assert result.exit_code == 2
    assert _lines(result) == [f"teacher.checkpoint: {text}: a text file, not a checkpoint "
                              "(it starts with 'not weights')"]


def test_validate_checks_every_ensemble_member(tmp_path):
    good = _teacher_file(tmp_path)
    folder = tmp_path / "a_folder.pt"
    folder.mkdir()
    result = _validate(tmp_path, f"teacher.checkpoint={good}",
                       f"teacher.ensemble=[{{checkpoint: {good}}}, {{checkpoint: {folder}}}]")
    assert result.exit_code == 2, result.output
    assert _lines(result) == [f"teacher.ensemble.1.checkpoint: {folder}: is a directory, not a checkpoint file"]


def test_validate_matches_a_state_dict_to_the_architecture(tmp_path):
    other = build_model(_teacher_spec(width=8))
    torch.save(other.state_dict(), tmp_path / "sd.pt")
    result = _validate(tmp_path, f"teacher.checkpoint={tmp_path / 'sd.pt'}")
    assert result.exit_code == 2
    (line,) = _lines(result)
    assert line.startswith(f"teacher.checkpoint: {tmp_path / 'sd.pt'}: checkpoint does not fit the architecture "
                           "'resnet': ") and "of another shape (stem.0.weight 8x1x3x3 in the file, 16x1x3x3" in line


def test_validate_matches_a_checkpoint_to_the_data(tmp_path):
    path = _teacher_file(tmp_path, num_classes=10)
    result = _validate(tmp_path, f"teacher.checkpoint={path}")
    assert result.exit_code == 2
    assert _lines(result) == [f"teacher.checkpoint: {path}: the checkpoint is for 10 classes and 1 input channel(s); "
                              "the data has 4 and 1"]


def test_a_data_parallel_state_dict_validates_and_loads(tmp_path):
    from compresskit.pipeline import run_pipeline

    model = build_model(_teacher_spec())
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "ddp.pt")
    result = _validate(tmp_path, f"teacher.checkpoint={tmp_path / 'ddp.pt'}")
    assert result.exit_code == 0, result.output
    cfg = load_config(TINY, [f"models_dir={tmp_path / 'models'}", f"reports_dir={tmp_path / 'reports'}",
                             f"teacher.checkpoint={tmp_path / 'ddp.pt'}"])
    outcomes, _ = run_pipeline(cfg, quiet=True, log=lambda m: None, until="teacher")
    assert outcomes[0].metrics["loaded_from"] == str(tmp_path / "ddp.pt")


def test_validate_refuses_other_preprocessing_naming_both(tmp_path):
    path = _teacher_file(tmp_path, preprocess=TINY_DATA | {"mean": [0.1307], "std": [0.3081]})
    result = _validate(tmp_path, f"teacher.checkpoint={path}")
    assert result.exit_code == 2
    (line,) = _lines(result)
    assert line.startswith(f"teacher.checkpoint: {path}: trained on other preprocessing than the data's: "
                           "mean [0.1307] in the checkpoint vs [0.5] in the data; "
                           "std [0.3081] in the checkpoint vs [0.25] in the data")
    for policy in ("convert", "ignore"):
        result = _validate(tmp_path, f"teacher.checkpoint={path}", f"teacher.preprocess_mismatch={policy}")
        assert result.exit_code == 0, result.output


# ------------------------------------------------------------------ run: refuses the same, converts when asked


def test_run_refuses_a_bad_checkpoint_and_writes_nothing(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 8)
    result = runner.invoke(app, ["run", str(TINY), *_dirs(tmp_path), "--set", f"teacher.checkpoint={junk}"])
    assert result.exit_code == 2, result.output
    assert f"teacher.checkpoint: {junk}: " in result.output and "Traceback" not in result.output
    assert not (tmp_path / "models").exists() and not (tmp_path / "reports").exists()


def test_teacher_stage_converts_and_records_the_data_preprocessing(tmp_path):
    from compresskit.pipeline import run_pipeline

    path = _teacher_file(tmp_path, preprocess=TINY_DATA | {"mean": [0.2], "std": [0.4]})
    plain = tmp_path / "plain.pt"
    torch.save(torch.load(path, weights_only=True)["state_dict"], plain)
    for i, (ckpt, policy) in enumerate(((path, "convert"), (plain, "refuse"))):
        cfg = load_config(TINY, [f"models_dir={tmp_path / str(i)}", f"reports_dir={tmp_path / 'r'}",
                                 f"teacher.checkpoint={ckpt}", f"teacher.preprocess_mismatch={policy}"])
        outcomes, _ = run_pipeline(cfg, quiet=True, log=lambda m: None, until="teacher")
        metrics = outcomes[0].metrics
        saved = torch.load(tmp_path / str(i) / cfg.name / "teacher" / "model.pt", weights_only=True)
        assert saved["preprocess"] == TINY_DATA  # the saved teacher works on this data's input
        if policy == "convert":
            assert metrics["preprocess"].startswith("differs from the data's, converted: mean [0.2] in the checkpoint")
            assert metrics["preprocess_converted"]["into"] == "stem.0"
        else:
            assert metrics["preprocess"].startswith("not recorded")


def test_teacher_stage_refuses_other_preprocessing(tmp_path):
    """The stage checks too (preflight normally refuses first): one line naming both."""
    from compresskit.config import PipelineConfig
    from compresskit.stage import StageContext, StageError
    from compresskit.stages import STAGES
    from compresskit.teacher.stage import run

    path = _teacher_file(tmp_path, preprocess=TINY_DATA | {"std": [0.3]})
    cfg = load_config(TINY, [f"teacher.checkpoint={path}"])
    assert isinstance(cfg, PipelineConfig)
    job = STAGES[0].select(cfg)
    ctx = StageContext(name="teacher", dir=tmp_path / "teacher", inputs={}, key="k", quiet=True)
    with pytest.raises(StageError, match=r"^teacher.checkpoint: .*t\.pt: trained on other preprocessing than the "
                                         r"data's: std \[0.3\] in the checkpoint vs \[0.25\] in the data"):
        run(ctx, job)
