"""What a pipeline stage is: the contract every stage follows. No torch here.

A stage has

- a **name**: its YAML section, its module (``compresskit.<name>``, which defines ``run``), its
  run sub-directory (``models/<run>/<name>/``) and its word in the CLI and the report;
- a **job**: a typed, frozen pydantic model of everything ``run`` receives from the config (its
  own YAML section plus the values of other sections it really reads, passed explicitly).
  ``select(cfg)`` builds it; ``None`` means the stage is disabled for this config;
- its **inputs**: the artifact files it reads (``inputs(cfg, layout)``: which files exist
  depends on which stages the config enables), hashed into the key and handed to ``run`` by name;
- an **environment key** when it measures speed on this machine or chooses by speed
  (``measures(job)`` returns the thread setting(s) it measures at, else ``None``);
- ``run(ctx, job) -> StageResult``: outputs (files) and metrics (``metrics.json``).

The cache key is computed here from exactly those parts (:func:`cache_key`), so it cannot drift
from what ``run`` reads: ``run`` gets no config but its job.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

import compresskit
from compresskit.artifacts import RunLayout, config_hash
from compresskit.envinfo import library_versions


class StageError(Exception):
    """A stage failed for a reason the user can act on (printed as one line, exit code 1)."""


class InputError(Exception):
    """The user's input (data, files named in the config) is unusable: one line, exit code 2."""


class Job(BaseModel):
    """Base of every stage's job: strict, immutable, plain data.

    ``KEY_IGNORES`` lists dotted paths that cannot change a stage's results (e.g. the evaluation
    batch size) and are left out of its cache key.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    KEY_IGNORES: tuple[str, ...] = ("data.eval_batch_size", "data.num_workers")

    def key_data(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        for path in self.KEY_IGNORES:
            *parents, leaf = path.split(".")
            node = data
            for p in parents:
                node = node.get(p) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(leaf, None)
        return data


@dataclass(frozen=True)
class StageResult:
    """What ``run`` returns: the files it wrote (name -> path) and its metrics (JSON-able).

    ``summary`` is the one line shown in the console and the report's stage table."""

    outputs: dict[str, Path]
    metrics: dict[str, Any]
    summary: str = ""


@dataclass(frozen=True)
class StageOutcome:
    """What happened to a stage in one run: ran, cached (up to date) or skipped (disabled)."""

    name: str
    status: str
    wall_s: float = 0.0
    summary: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageContext:
    """Where a stage works, and the run-wide services it may use. It carries no config: the
    stage reads its job only.

    ``memo`` is a run-scoped cache of things that are expensive to rebuild and derived purely
    from their key (loaded datasets, memoised teacher logits); ``history`` is the outcome of
    every earlier stage of this run (the report stage lists them)."""

    name: str
    dir: Path
    inputs: Mapping[str, Path]
    key: str
    log: Callable[[str], None] = print
    quiet: bool = False
    memo: dict[str, Any] = field(default_factory=dict)
    history: tuple[StageOutcome, ...] = ()


@dataclass(frozen=True)
class Stage:
    """A stage's declaration: see the module docstring."""

    name: str
    help: str
    select: Callable[[Any], Job | None]
    inputs: Callable[[Any, RunLayout], dict[str, Path]]
    measures: Callable[[Any], Any] = lambda job: None
    code_version: int = 1

    def runner(self) -> Callable[[StageContext, Job], StageResult]:
        """``run`` of the stage's module ``compresskit.<name>`` (``compresskit.<name>.stage`` when
        the stage is a sub-package): one name for section, module, directory and command."""
        module = f"compresskit.{self.name}"
        if (Path(compresskit.__file__).parent / self.name).is_dir():
            module += ".stage"
        return importlib.import_module(module).run

    def source_files(self) -> list[Path]:
        """The stage's own code: its module, or every file of its sub-package."""
        root = Path(compresskit.__file__).parent
        pkg = root / self.name
        if pkg.is_dir():
            return sorted(pkg.rglob("*.py"))
        return [root / f"{self.name}.py"]

    def code_key(self) -> str:
        """compresskit's version, the stage's code version and a hash of its source: editing
        the stage invalidates its cached results."""
        digest = hashlib.sha256()
        for f in self.source_files():
            digest.update(f.read_bytes())
        return f"{compresskit.__version__}:{self.code_version}:{digest.hexdigest()[:16]}"


# the libraries whose numerics a stage's result depends on (a new version re-runs it)
COMPUTE_LIBRARIES = ("torch", "torchvision", "torch-pruning", "onnx", "onnxruntime", "onnxscript")


def cache_key(stage: Stage, job: Job, input_hashes: Mapping[str, str],
              environment: Mapping[str, Any] | None) -> str:
    """The key of a stage's result: exactly what run receives (its job), the sha256 of every
    input file, the code and the versions of the libraries that compute it, and for stages that
    measure or choose by speed, the machine."""
    return config_hash({"stage": stage.name, "job": job.key_data(), "inputs": dict(input_hashes),
                        "code": stage.code_key(), "libraries": library_versions(COMPUTE_LIBRARIES),
                        "environment": environment})
