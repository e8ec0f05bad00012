"""Run-directory layout, content hashes, atomic writes and per-stage records.

Every stage writes into ``<models_root>/<run>/<stage>/`` and finishes by writing
``stage.json``: the config hash, the sha256 of every input and output file, library versions
and wall time. A re-run skips a stage only when that record proves nothing changed
(:func:`stage_up_to_date`). All writes go to a temporary file in the target directory and are
moved into place with ``os.replace``, so a crash never leaves a half-written artifact under its
final name. No torch here: this module also runs where only numpy + onnxruntime exist.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from compresskit.envinfo import library_versions

STAGE_RECORD = "stage.json"
METRICS_FILE = "metrics.json"
STAGE_SCHEMA = "compresskit.stage"
STAGE_SCHEMA_VERSION = 1

_CHUNK = 1 << 20


# --------------------------------------------------------------------------- hashing


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's content, read in chunks (checkpoints can be large)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cannot hash {path}: no such file")
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _json_default(obj: Any) -> Any:
    """Make paths, sets and numpy values JSON-able; anything else becomes its ``str``."""
    if isinstance(obj, PurePath):
        return obj.as_posix()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def canonical_json(obj: Any) -> str:
    """Key-sorted, whitespace-free JSON: equal data gives equal text, whatever the dict order."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def config_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of a (plain-data) config, used as a cache key."""
    return sha256_bytes(canonical_json(obj).encode("utf-8"))


# --------------------------------------------------------------------------- atomic writes


def _fsync_dir(directory: Path) -> None:
    """Persist a rename; some platforms and filesystems cannot open directories, which is fine."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_in(path: Path) -> Path:
    """Reserve a temporary file next to ``path`` that keeps its suffix.

    Keeping the suffix matters: some writers pick the format from it (``onnx.save`` writes text
    for ``.txtpb``), and the same directory makes ``os.replace`` an atomic rename.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    return Path(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file, flush + fsync, ``os.replace``)."""
    path = Path(path)
    tmp = _temp_in(path)
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON atomically (numpy values and paths allowed)."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"
    return atomic_write_text(path, text)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for a library to write (``torch.save``,
    ``onnx.save``); move it into place on success, delete it if the block raises.

    The temporary file exists (empty) when the block starts, so writers that refuse to
    overwrite are not suitable. If the block removes it, that is an error.
    """
    path = Path(path)
    tmp = _temp_in(path)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"nothing was written to the temporary file for {path}")
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------- layout


def _check_name(kind: str, name: str) -> str:
    if not name or name in {".", ".."} or "/" in name or "\\" in name:
        raise ValueError(f"invalid {kind} name {name!r}: use a plain directory name")
    return name


@dataclass(frozen=True)
class RunLayout:
    """Where one run's artifacts and reports live.

    ``models_root/run/<stage>/`` holds each stage's outputs and ``stage.json``;
    ``reports_root/run/`` holds the report. Nothing is created until asked for.
    """

    models_root: Path
    reports_root: Path
    run: str

    def __post_init__(self) -> None:
        _check_name("run", self.run)
        object.__setattr__(self, "models_root", Path(self.models_root))
        object.__setattr__(self, "reports_root", Path(self.reports_root))

    @property
    def run_dir(self) -> Path:
        return self.models_root / self.run

    @property
    def report_dir(self) -> Path:
        return self.reports_root / self.run

    def stage_dir(self, stage: str) -> Path:
        """The stage's directory (not created)."""
        return self.run_dir / _check_name("stage", stage)

    def ensure_stage_dir(self, stage: str) -> Path:
        """The stage's directory, created if missing."""
        directory = self.stage_dir(stage)
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def ensure_report_dir(self) -> Path:
        """The run's report directory, created if missing."""
        self.report_dir.mkdir(parents=True, exist_ok=True)
        return self.report_dir


# --------------------------------------------------------------------------- stage records


def _rel(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when possible, so a moved models root stays valid."""
    try:
        return Path(os.path.relpath(path, base)).as_posix()
    except ValueError:  # different drives on Windows
        return Path(path).resolve().as_posix()


def _describe_files(kind: str, files: Mapping[str, str | os.PathLike], base: Path) -> dict:
    described = {}
    for name, file in files.items():
        file = Path(file)
        if not file.is_file():
            what = "is a directory, not a file" if file.is_dir() else "does not exist"
            raise FileNotFoundError(f"stage {kind} {name!r} {what}: {file}")
        described[name] = {
            "path": _rel(file, base),
            "sha256": sha256_file(file),
            "size_bytes": file.stat().st_size,
        }
    return described


def versions_with_python() -> dict[str, str]:
    """Python and library versions as stored in a stage record."""
    return {"python": platform.python_version(), **library_versions()}


def write_stage_record(
    stage_dir: str | os.PathLike,
    *,
    stage: str,
    config_hash: str,
    inputs: Mapping[str, str | os.PathLike],
    outputs: Mapping[str, str | os.PathLike],
    wall_s: float,
    extra: dict | None = None,
) -> Path:
    """Write ``stage.json`` describing a finished stage; returns its path.

    Every input and output must exist: they are hashed so a later run can prove they are
    unchanged. Paths are stored relative to ``stage_dir``. Write it last, after the outputs.
    """
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    finished = datetime.now(timezone.utc)
    record = {
        "schema": STAGE_SCHEMA,
        "schema_version": STAGE_SCHEMA_VERSION,
        "stage": stage,
        "config_hash": config_hash,
        "inputs": _describe_files("input", inputs, stage_dir),
        "outputs": _describe_files("output", outputs, stage_dir),
        "wall_s": float(wall_s),
        "started_utc": datetime.fromtimestamp(
            finished.timestamp() - float(wall_s), timezone.utc
        ).isoformat(),
        "finished_utc": finished.isoformat(),
        "versions": versions_with_python(),
        "extra": extra or {},
    }
    return atomic_write_json(stage_dir / STAGE_RECORD, record)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def read_stage_record(stage_dir: str | os.PathLike) -> dict | None:
    """The stage's ``stage.json`` as a dict, or None if the stage never finished."""
    return _read_json(Path(stage_dir) / STAGE_RECORD)


def _files_match(recorded: dict, base: Path) -> bool:
    for entry in recorded.values():
        file = base / entry["path"]
        if not file.is_file() or sha256_file(file) != entry["sha256"]:
            return False
    return True


def stage_up_to_date(
    stage_dir: str | os.PathLike,
    config_hash: str,
    inputs: Mapping[str, str | os.PathLike],
) -> bool:
    """True only if the stage can be skipped: its record exists, was made with this config hash
    and these very inputs (same names, same content), and every recorded output is still there
    with its recorded content. An unreadable record counts as stale, never as trusted.
    """
    stage_dir = Path(stage_dir)
    try:
        record = read_stage_record(stage_dir)
    except ValueError:
        return False
    if record is None or record.get("schema_version") != STAGE_SCHEMA_VERSION:
        return False
    if record.get("config_hash") != config_hash:
        return False
    recorded_inputs = record.get("inputs", {})
    if set(recorded_inputs) != set(inputs):
        return False
    for name, file in inputs.items():
        file = Path(file)
        if not file.is_file() or sha256_file(file) != recorded_inputs[name]["sha256"]:
            return False
    return _files_match(record.get("outputs", {}), stage_dir)


def write_metrics(stage_dir: str | os.PathLike, metrics: dict) -> Path:
    """Write the stage's ``metrics.json`` atomically; returns its path."""
    stage_dir = Path(stage_dir)
    return atomic_write_json(stage_dir / METRICS_FILE, metrics)


def read_metrics(stage_dir: str | os.PathLike) -> dict | None:
    """The stage's ``metrics.json``, or None if it has none."""
    return _read_json(Path(stage_dir) / METRICS_FILE)
