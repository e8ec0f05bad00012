"""Tests of compresskit.artifacts: hashing, atomic writes, run layout, stage records, metrics."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import numpy as np
import pytest

from compresskit import artifacts as art


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------- hashing


def test_sha256_known_vector_and_file(tmp_path):
    # FIPS 180-2 test vector for "abc".
    abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert art.sha256_bytes(b"abc") == abc
    data = np.random.default_rng(0).bytes(3 * 2**20 + 17)  # spans several read chunks
    (tmp_path / "f.bin").write_bytes(data)
    assert art.sha256_file(tmp_path / "f.bin") == hashlib.sha256(data).hexdigest()
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        art.sha256_file(tmp_path / "missing.bin")


def test_config_hash_is_canonical():
    a = {"lr": 0.1, "stages": ["a", "b"], "out": Path("models") / "x", "n": np.int64(3)}
    b = {"n": 3, "out": "models/x", "stages": ["a", "b"], "lr": 0.1}
    assert art.config_hash(a) == art.config_hash(b)
    assert art.config_hash(a) != art.config_hash({**b, "lr": 0.2})
    assert art.config_hash({"a": [1, 2]}) != art.config_hash({"a": [2, 1]})
    assert len(art.config_hash({})) == 64
    assert art.canonical_json({"b": 1, "a": {"d": 2, "c": 3}}) == '{"a":{"c":3,"d":2},"b":1}'


# --------------------------------------------------------------------------- atomic writes


def test_atomic_writes(tmp_path):
    target = tmp_path / "sub" / "out.json"
    art.atomic_write_json(target, {"b": np.float32(0.5), "a": np.arange(3), "p": Path("x/y")})
    assert json.loads(target.read_text()) == {"a": [0, 1, 2], "b": 0.5, "p": "x/y"}
    art.atomic_write_text(target, "replaced")
    assert target.read_text() == "replaced"
    art.atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert _files(tmp_path / "sub") == ["out.json"]


def test_atomic_write_failure_keeps_old_content(tmp_path):
    target = tmp_path / "out.json"
    art.atomic_write_json(target, {"ok": 1})
    with pytest.raises(TypeError):
        art.atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert json.loads(target.read_text()) == {"ok": 1}
    assert _files(tmp_path) == ["out.json"]


def test_atomic_path_success_and_failure(tmp_path):
    target = tmp_path / "model.onnx"
    with art.atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".onnx" and tmp != target
        tmp.write_bytes(b"new")
        assert not target.exists()
    assert target.read_bytes() == b"new"

    with pytest.raises(RuntimeError, match="boom"):
        with art.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"new"
    assert _files(tmp_path) == ["model.onnx"]

    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with art.atomic_path(target) as tmp:
            tmp.unlink()
    assert target.read_bytes() == b"new"


# --------------------------------------------------------------------------- layout


def test_run_layout(tmp_path):
    layout = art.RunLayout(tmp_path / "models", tmp_path / "reports", "exp1")
    assert layout.run_dir == tmp_path / "models" / "exp1"
    assert layout.report_dir == tmp_path / "reports" / "exp1"
    assert layout.stage_dir("prune") == layout.run_dir / "prune"
    assert not layout.run_dir.exists()
    made = layout.ensure_stage_dir("prune")
    assert made.is_dir() and made == layout.stage_dir("prune")
    assert layout.ensure_report_dir().is_dir()
    for bad in ("", "..", "a/b"):
        with pytest.raises(ValueError, match="invalid run name"):
            art.RunLayout(tmp_path, tmp_path, bad)
    with pytest.raises(ValueError, match="invalid stage name"):
        layout.stage_dir("../escape")


# --------------------------------------------------------------------------- stage records


@pytest.fixture
def finished_stage(tmp_path):
    """A 'prune' stage that read distill/student.pt and wrote prune/pruned.pt."""
    layout = art.RunLayout(tmp_path / "models", tmp_path / "reports", "r")
    src = layout.ensure_stage_dir("distill") / "student.pt"
    src.write_bytes(b"student weights")
    stage = layout.ensure_stage_dir("prune")
    out = stage / "pruned.pt"
    out.write_bytes(b"pruned weights")
    h = art.config_hash({"ratio": 0.5})
    art.write_stage_record(
        stage,
        stage="prune",
        config_hash=h,
        inputs={"student": src},
        outputs={"model": out},
        wall_s=1.5,
        extra={"kept": 0.5},
    )
    return stage, h, src, out


def test_stage_record_contents(finished_stage):
    stage, h, src, out = finished_stage
    record = art.read_stage_record(stage)
    assert record["stage"] == "prune" and record["config_hash"] == h
    assert record["inputs"]["student"] == {
        "path": "../distill/student.pt",
        "sha256": art.sha256_bytes(b"student weights"),
        "size_bytes": len(b"student weights"),
    }
    assert record["outputs"]["model"]["path"] == "pruned.pt"
    assert record["wall_s"] == 1.5 and record["extra"] == {"kept": 0.5}
    assert record["versions"]["python"] == platform.python_version()
    assert "numpy" in record["versions"] and "onnx" in record["versions"]
    assert record["started_utc"] < record["finished_utc"]
    assert art.read_stage_record(stage.parent / "distill") is None


def test_stage_up_to_date(finished_stage):
    stage, h, src, out = finished_stage
    assert art.stage_up_to_date(stage, h, {"student": src})
    assert not art.stage_up_to_date(stage, art.config_hash({"ratio": 0.6}), {"student": src})
    assert not art.stage_up_to_date(stage, h, {"teacher": src})
    assert not art.stage_up_to_date(stage, h, {"student": src, "extra": src})


def test_stage_stale_after_input_change(finished_stage):
    stage, h, src, out = finished_stage
    src.write_bytes(b"retrained student")
    assert not art.stage_up_to_date(stage, h, {"student": src})
    src.unlink()
    assert not art.stage_up_to_date(stage, h, {"student": src})


def test_stage_stale_after_output_edit_or_loss(finished_stage):
    stage, h, src, out = finished_stage
    out.write_bytes(b"pruned weights, truncated")
    assert not art.stage_up_to_date(stage, h, {"student": src})
    out.unlink()
    assert not art.stage_up_to_date(stage, h, {"student": src})


def test_stage_stale_on_corrupt_record(finished_stage):
    stage, h, src, out = finished_stage
    (stage / art.STAGE_RECORD).write_text('{"stage": "prune", ')
    assert not art.stage_up_to_date(stage, h, {"student": src})
    with pytest.raises(ValueError, match="not valid JSON"):
        art.read_stage_record(stage)


def test_record_survives_moving_the_models_root(finished_stage, tmp_path):
    stage, h, src, out = finished_stage
    moved = tmp_path / "elsewhere"
    (tmp_path / "models").rename(moved)
    stage = moved / "r" / "prune"
    assert art.stage_up_to_date(stage, h, {"student": moved / "r" / "distill" / "student.pt"})


def test_write_stage_record_requires_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="output 'model'"):
        art.write_stage_record(
            tmp_path,
            stage="s",
            config_hash="x",
            inputs={},
            outputs={"model": tmp_path / "m"},
            wall_s=0.0,
        )
    assert not (tmp_path / art.STAGE_RECORD).exists()


def test_metrics_roundtrip(tmp_path):
    assert art.read_metrics(tmp_path) is None
    art.write_metrics(tmp_path, {"accuracy": np.float64(0.9125), "n": np.int64(80)})
    assert art.read_metrics(tmp_path) == {"accuracy": 0.9125, "n": 80}
