"""The runner cannot be confused: one lock per run folder, write failures in words, no empty
folders from failed stages, strict types, and one line for any error at the CLI edge."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from compresskit.config import ConfigError, load_config
from compresskit.pipeline import RunLocked, StageError, describe_write_error, run_lock, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "pipelines" / "tiny_synthetic.yaml"


def _cfg(tmp_path: Path, *extra: str):
    return load_config(TINY, [f"models_dir={tmp_path / 'models'}", f"reports_dir={tmp_path / 'reports'}", *extra])


def _failing_teacher(monkeypatch, err: BaseException, write_first: bool = False):
    import compresskit.teacher.stage as teacher_stage

    def run(ctx, job):
        if write_first:
            (ctx.dir / "partial.txt").write_text("x")
        raise err

    monkeypatch.setattr(teacher_stage, "run", run)


def test_second_run_in_the_same_folder_is_refused_with_the_holders_pid(tmp_path):
    cfg = _cfg(tmp_path)
    with run_lock(tmp_path / "models" / cfg.name):
        with pytest.raises(RunLocked, match=f"PID {os.getpid()}"):
            run_pipeline(cfg, quiet=True, log=lambda m: None, until="teacher")


def test_lock_is_released_after_a_run(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    _failing_teacher(monkeypatch, ValueError("boom"))
    for _ in range(2):  # the failed run released the lock: the second one gets as far again
        with pytest.raises(StageError, match="boom"):
            run_pipeline(cfg, quiet=True, log=lambda m: None, until="teacher")


def test_cli_names_the_lock_holder(tmp_path):
    from typer.testing import CliRunner

    from compresskit.cli import app

    cfg = _cfg(tmp_path)
    with run_lock(tmp_path / "models" / cfg.name):
        result = CliRunner().invoke(app, ["run", str(TINY), "-q", "--set", f"models_dir={tmp_path / 'models'}",
                                          "--set", f"reports_dir={tmp_path / 'reports'}"])
    assert result.exit_code == 2 and f"PID {os.getpid()}" in result.output


@pytest.mark.parametrize(("err", "words"), [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
    (PermissionError(errno.EACCES, "Permission denied", "/x/model.pt"), "no permission to write to /x/model.pt"),
])
def test_write_errors_are_said_in_words(tmp_path, err, words):
    assert words in describe_write_error(err, tmp_path)


def test_torch_full_disk_error_is_recognised_by_free_space(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * 2**30, 10 * 2**30, 2**20))
    assert "no space left" in describe_write_error(RuntimeError(". unexpected pos 128 vs 0"), tmp_path)
    assert describe_write_error(ValueError("other"), tmp_path) is None


def test_full_disk_in_a_stage_is_one_line_and_keeps_earlier_artifacts(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    keep = tmp_path / "models" / cfg.name / "teacher" / "earlier.txt"
    keep.parent.mkdir(parents=True)
    keep.write_text("from an earlier run")
    _failing_teacher(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(StageError, match=r"^teacher: no space left .*earlier artifacts are kept$"):
        run_pipeline(cfg, quiet=True, log=lambda m: None, until="teacher")
    assert keep.read_text() == "from an earlier run"


def test_failed_stage_leaves_no_empty_folder(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    _failing_teacher(monkeypatch, KeyError("surprise"))  # not a ValueError: still one line
    with pytest.raises(StageError, match="teacher: KeyError: 'surprise'"):
        run_pipeline(cfg, quiet=True, log=lambda m: None, until="teacher")
    assert not (tmp_path / "models").exists()  # nor the run folder and its lock


def test_failed_stage_keeps_what_it_wrote(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    _failing_teacher(monkeypatch, KeyError("late"), write_first=True)
    with pytest.raises(StageError):
        run_pipeline(cfg, quiet=True, log=lambda m: None, until="teacher")
    assert (tmp_path / "models" / cfg.name / "teacher" / "partial.txt").is_file()


@pytest.mark.parametrize(("override", "where"), [
    ("teacher.train.epochs=true", "teacher.train.epochs"),
    ("teacher.train.lr='0.1'", "teacher.train.lr"),
    ("data.synthetic.channels=true", "data.synthetic.channels"),
    ("bench.batch_sizes=[1, true]", "bench.batch_sizes.1"),
    ("seed='3'", "seed"),
])
def test_strict_types(tmp_path, override, where):
    with pytest.raises(ConfigError) as info:
        _cfg(tmp_path, override)
    assert [loc for loc, _ in info.value.problems] == [where]


def test_an_int_is_still_a_float_and_paths_are_strings(tmp_path):
    cfg = _cfg(tmp_path, "teacher.train.lr=1", "teacher.checkpoint=some/file.pt")
    assert cfg.teacher.train.lr == 1.0 and cfg.teacher.checkpoint == Path("some/file.pt")


def test_any_error_at_the_cli_edge_is_one_line(monkeypatch, capsys):
    import compresskit.cli as cli

    def broken():
        raise KeyError("unexpected\nsecond line")

    monkeypatch.setattr(cli, "app", broken)
    monkeypatch.setattr("sys.argv", ["compresskit", "run", "x.yaml"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "KeyError" in err and "Traceback" not in err
    monkeypatch.setattr("sys.argv", ["compresskit", "run", "x.yaml", "--traceback"])
    with pytest.raises(KeyError):
        cli.main()


def test_validate_show_prints_valid_json_on_stdout(tmp_path):
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "compresskit", "validate", str(TINY), "--show"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["name"] == "tiny_synthetic"
    assert "ok" in done.stderr


def test_a_failing_tracker_leaves_no_run_folder(tmp_path, monkeypatch):
    import compresskit.pipeline as pipeline

    def broken(cfg):
        raise ValueError("tracking: cannot reach the MLflow server")

    monkeypatch.setattr(pipeline, "_tracker", broken)
    cfg = _cfg(tmp_path)
    with pytest.raises(ValueError, match="MLflow"):
        run_pipeline(cfg, quiet=True, log=lambda m: None)
    assert not (tmp_path / "models").exists()
