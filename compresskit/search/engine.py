"""The search: latency first, accuracy by multi-fidelity, the finalists trained fully.

For every trial Optuna draws a candidate (architecture + distillation recipe, see `space`):

1. **Latency first.** The untrained candidate is exported, quantized U8S8 per-tensor and timed
   at the budget's batch size and threads (`latency.screen_model`), or looked up in a device
   latency table; over the latency or size budget it is dropped (the trial is pruned) before any
   training.
2. **Proxy training.** Survivors train for `search.proxy_epochs` short epochs
   (`search.proxy_max_batches` batches each) through `compresskit.distill.distill` with the
   teacher's memoised logits; the validation accuracy after each epoch goes to Optuna's pruner
   (`trial.report` / `trial.should_prune`), which stops the unpromising early. The objective is
   the proxy's final validation accuracy (maximised).
3. **Finalists.** The best `top_k` (validation accuracy, ties by latency) are trained fully (the
   pipeline's `distill.train`, `search.full_epochs` epochs), exported, quantized (INT8 format
   chosen by measuring, `quantize.search.search_ptq`) and measured; the most accurate finalist
   within every budget wins (accuracies within `search.accuracy_tie` count as tied: the fastest
   of them wins).

The study lives in an SQLite file (``models/<run>/search/study.db``) opened with
``load_if_exists``: a killed search resumes where it stopped (a trial killed mid-way is marked
failed by the heartbeat and retried once), and several processes (``--worker``) share it. The
trial budget `n_trials` counts the study's trials in all, so a resumed search or a worker only
runs the missing ones.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compresskit.artifacts import atomic_write_json, atomic_write_text, config_hash
from compresskit.bench import BUSY_WARN_FRACTION
from compresskit.config import PipelineConfig, SearchConfig, validate_config
from compresskit.search import report as rep
from compresskit.search.latency import SCREEN_FORMAT, LatencyCache, LatencyTable, file_lock, screen_model
from compresskit.search.space import Candidate, SearchSpace, canonical_spec, recipe_key, recipe_label, spec_key
from compresskit.stage import InputError

__all__ = ["SearchResult", "run_search", "search_dir"]

LogFn = Callable[[str], None]
HEARTBEAT_S = 60
GRACE_S = 180
MAX_FAILURES_IN_A_ROW = 3


class SearchUnavailable(InputError):
    """optuna is not installed (``pip install 'compresskit[search]'``)."""


def _labels_only() -> list[dict[str, Any]]:
    """The no-KD recipe a KD finalist is compared with, spelled as the schema writes recipes."""
    from pydantic import TypeAdapter

    from compresskit.config_terms import LossTerm

    return [TypeAdapter(LossTerm).validate_python({"method": "ce", "weight": 1.0}).model_dump(mode="json")]


def _optuna():
    try:
        import optuna
    except ModuleNotFoundError:
        raise SearchUnavailable("compresskit search needs optuna: pip install 'compresskit[search]'") from None
    return optuna


def search_dir(cfg: PipelineConfig) -> Path:
    """``<models_dir>/<name>/search``: where a search keeps its study and records."""
    return Path(cfg.models_dir) / cfg.name / "search"


@dataclass
class SearchResult:
    """What `run_search` found. `chosen` is the finalist meeting every budget (None when none
    does: `failed_budgets` says which budgets failed, and `best` is the best model found, kept in
    `files["best_model"]`). Rows are plain dicts (see ``trials.json``)."""

    workdir: Path
    storage: str
    study_name: str
    trials: list[dict[str, Any]]
    finals: list[dict[str, Any]]
    pareto: list[int]
    chosen: dict[str, Any] | None
    best: dict[str, Any] | None
    met_budgets: bool
    failed_budgets: list[str]
    budgets: dict[str, Any]
    reference: dict[str, Any] | None
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0
    worker: bool = False

    def table(self) -> list[dict[str, Any]]:
        """One short row per trial (for a console table)."""
        finals = {f["number"]: f for f in self.finals if f.get("baseline_of") is None}
        return [{"#": t["number"], "family": t.get("family", ""), "architecture": t.get("label", ""),
                 "recipe": t.get("recipe_label", ""), "status": t.get("status", ""),
                 "p50 ms": t.get("p50_ms"), "proxy val": t.get("proxy_val_accuracy"),
                 "INT8 val": finals.get(t["number"], {}).get("int8_val_accuracy"),
                 "note": t.get("reason") or ""} for t in self.trials]


# ------------------------------------------------------------------ budgets

@dataclass
class _Budgets:
    batch_size: int
    threads: int
    latency_limit_ms: float | None
    latency_limit_source: str
    max_size_mb: float | None
    min_accuracy: float | None
    max_accuracy_drop: float | None

    def static_failures(self, row: Mapping[str, Any]) -> list[str]:
        """Budgets an untrained candidate already fails (latency, size)."""
        out = []
        p50 = row.get("p50_ms")
        if self.latency_limit_ms is not None and p50 is not None and p50 > self.latency_limit_ms:
            out.append(f"latency: p50 {p50:.3f} ms > {self.latency_limit_ms:.3f} ms")
        size = row.get("size_bytes")
        if self.max_size_mb is not None and size is not None and size / 2**20 > self.max_size_mb:
            out.append(f"size: {size / 2**20:.3f} MiB > {self.max_size_mb:g} MiB")
        return out

    def final_failures(self, row: Mapping[str, Any]) -> list[str]:
        out = self.static_failures(row)
        acc = row.get("int8_val_accuracy")
        if self.min_accuracy is not None and acc is not None and acc < self.min_accuracy:
            out.append(f"accuracy: INT8 val {acc:.2%} < {self.min_accuracy:.2%}")
        fp32 = row.get("fp32_val_accuracy")
        if self.max_accuracy_drop is not None and acc is not None and fp32 is not None \
                and fp32 - acc > self.max_accuracy_drop + 1e-9:
            out.append(f"accuracy drop: INT8 {100 * (fp32 - acc):.2f} pt below FP32 > "
                       f"{100 * self.max_accuracy_drop:.2f} pt")
        return out

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ------------------------------------------------------------------ the search

class _Search:
    def __init__(self, cfg: PipelineConfig, workdir: Path, *, log: LogFn, quiet: bool, worker: bool,
                 raw: Mapping[str, Any] | None) -> None:
        self.cfg = cfg
        self.s: SearchConfig = cfg.search or SearchConfig()
        self.workdir = workdir
        self.log = log
        self.quiet = quiet
        self.worker = worker
        self.raw = raw
        self.space = SearchSpace.from_config(self.s)
        self.study = None
        self._teacher_model = None
        self._teacher_cached = None
        self._numpy: dict[str, Any] = {}
        self.teacher_seconds = 0.0
        self.started = time.perf_counter()  # run_search sets its own start

    # -------------------------------------------------------------- data and settings

    def setup(self) -> None:
        from compresskit.data import load_data
        from compresskit.envinfo import machine_key
        from compresskit.stages import latency_threads
        from compresskit.train import resolve_device

        cfg = self.cfg
        if cfg.threads:
            import torch

            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        self.data = load_data(cfg.data, seed=cfg.seed)
        self.input_shape = (self.data.in_channels, *self.data.image_size)
        self.batch_size = cfg.budgets.latency_batch_size
        self.threads = latency_threads(cfg)
        self.calib = self.data.numpy_split("calib", limit=self.s.calib_images)[0]
        self.table = None
        if self.s.latency_table is not None:
            try:
                self.table = LatencyTable.load(self.s.latency_table, batch_size=self.batch_size, threads=self.threads)
            except ValueError as err:
                raise InputError(str(err)) from None
        machine = config_hash({"machine": machine_key(self.threads), "batch_size": self.batch_size,
                               "format": SCREEN_FORMAT, "calib_images": self.s.calib_images})
        self.cache = LatencyCache(self.workdir / "latency.json", machine)
        self.static_cache = LatencyCache(self.workdir / "latency.json", "static")
        self.reference = self._reference()
        limit, source = self.cfg.budgets.max_latency_ms, "budgets.max_latency_ms"
        if self.reference is not None:
            rel = self.s.max_latency_ratio * self.reference["p50_ms"]
            if limit is None or rel < limit:
                limit, source = rel, (f"{self.s.max_latency_ratio:g} x {self.reference['label']}'s "
                                      f"{self.reference['p50_ms']:.3f} ms")
        b = cfg.budgets
        self.budgets = _Budgets(self.batch_size, self.threads, limit, source if limit is not None else "",
                                b.max_size_mb, b.min_accuracy, b.max_accuracy_drop)
        if limit is not None:
            self.log(f"latency budget: p50 <= {limit:.3f} ms ({source}), batch {self.batch_size}, "
                     f"{self.threads} thread(s){' from ' + self.table.path if self.table else ''}")
        ref = self.reference or {}
        if ref.get("p50_runs_ms"):
            busy = ref.get("busy_fraction")
            self.log(f"latency reference timed {len(ref['p50_runs_ms'])} times: "
                     + " / ".join(f"{v:.3f}" for v in ref["p50_runs_ms"]) + " ms"
                     + (f"; WARNING: other processes used {busy:.0%} of a core meanwhile, the budget is inflated"
                        if busy is not None and busy > BUSY_WARN_FRACTION else ""))

    def full_spec(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        return dict(spec) | {"num_classes": self.data.num_classes, "in_channels": self.data.in_channels}

    def key_of(self, spec: Mapping[str, Any]) -> str:
        return spec_key(spec, self.input_shape, self.data.num_classes)

    def numpy(self, split: str):
        if split not in self._numpy:
            self._numpy[split] = self.data.numpy_split(split)
        return self._numpy[split]

    def _reference(self) -> dict[str, Any] | None:
        if self.s.max_latency_ratio is None:
            return None
        ref = self.s.latency_reference or self.cfg.distill.student
        spec = ref.model_dump(mode="json")
        key = self.key_of(spec)
        # timed again by every process (not a stale figure), three times after a discarded one
        row = self.screen(spec, key, fresh=True, repeats=3)
        if row.get("p50_ms") is None:
            raise InputError(f"search.latency_reference: {key} is not in the latency table "
                             f"{self.table.path if self.table else ''}: the relative budget needs its latency")
        from compresskit.search.space import arch_label

        return {"key": key, "label": arch_label(canonical_spec(spec)), "p50_ms": row["p50_ms"],
                "p50_runs_ms": row.get("p50_runs_ms"), "busy_fraction": row.get("busy_fraction"),
                "source": row.get("source"), "size_bytes": row.get("size_bytes")}

    # -------------------------------------------------------------- latency first

    def screen(self, spec: Mapping[str, Any], key: str, *, fresh: bool = False, repeats: int = 1) -> dict[str, Any]:
        """Latency and size of the untrained candidate: from the table, the cache (unless
        `fresh`), or measured here."""
        full = self.full_spec(spec)
        kwargs = {"batch_size": self.batch_size, "threads": self.threads}
        if self.table is not None:
            ms = self.table.get(key)
            if ms is None and self.s.latency_table_missing == "drop":
                return {"p50_ms": None, "source": "missing"}
            if ms is not None:
                row = self.static_cache.get(key)
                if row is None:
                    row = screen_model(full, self.input_shape, self.calib, time_it=False, **kwargs)
                    self.static_cache.put(key, row)
                return dict(row) | {"p50_ms": ms, "source": "table"}
        row = None if fresh else self.cache.get(key)
        if row is not None:
            return dict(row) | {"source": "cache"}
        bench = self.cfg.bench
        with file_lock(self.workdir / "measure.lock"):  # one process times at a time
            row = screen_model(full, self.input_shape, self.calib, max_seconds=self.s.screen_max_seconds,
                               warmup=bench.warmup, min_runs=bench.min_runs, target_rel_ci=bench.target_rel_ci,
                               repeats=repeats, **kwargs)
        row["source"] = "measured"
        self.cache.put(key, row)
        return row

    # -------------------------------------------------------------- the teacher

    def needs_teacher(self, recipe) -> bool:
        from compresskit.config_terms import TEACHER_FREE

        return any(t["method"] not in TEACHER_FREE for t in recipe)

    def teacher_for(self, recipe):
        """The teacher (trained once per search and saved, or `teacher.checkpoint`), wrapped so
        its logits are memoised when the inputs repeat exactly; None for a teacher-free recipe."""
        if not self.needs_teacher(recipe):
            return None
        from compresskit.distill.registry import TERMS

        if self._teacher_model is None:
            self._teacher_model = self._load_or_train_teacher()
        cached = (self.cfg.distill.train.cache_teacher and not self.data.hflip and not self.data.crop_padding
                  and all(TERMS[t["method"]].teacher_logits_only for t in recipe if t["method"] in TERMS
                          and TERMS[t["method"]].needs_teacher))
        if not cached:
            return self._teacher_model
        if self._teacher_cached is None:
            from compresskit.distill.cache import CachedTeacher

            self._teacher_cached = CachedTeacher(self._teacher_model)
        return self._teacher_cached

    def _load_or_train_teacher(self):
        import torch

        from compresskit.checkpoint import load_for_data, load_model, read_checkpoint, save_checkpoint
        from compresskit.nets import build_model
        from compresskit.teacher.train import train_teacher
        from compresskit.train import loaders_for

        cfg, data = self.cfg, self.data
        spec = self.full_spec(cfg.teacher.model.model_dump(mode="json"))
        t0 = time.perf_counter()
        if cfg.teacher.checkpoint is not None:
            model, _, _ = load_for_data(Path(cfg.teacher.checkpoint), spec, data.checkpoint_preprocess(),
                                        cfg.teacher.preprocess_mismatch)
            self.log(f"teacher: loaded {cfg.teacher.checkpoint}")
            return model.to(self.device).eval()
        key = config_hash({"teacher": cfg.teacher.model_dump(mode="json"), "data": cfg.data.model_dump(mode="json"),
                           "seed": cfg.seed, "device": cfg.device})
        path = self.workdir / "teacher.pt"
        with file_lock(self.workdir / "teacher.lock"):  # one worker trains it, the others load it
            if path.is_file() and (read_checkpoint(path).get("meta") or {}).get("key") == key:
                model, _ = load_model(path)
                self.log(f"teacher: loaded {path}")
            else:
                self.log("teacher: training (once per search; the workers share it)")
                torch.manual_seed(cfg.seed)
                model = build_model(spec)
                tcfg = cfg.teacher.train
                train_loader, val_loader = loaders_for(data, tcfg, device=self.device, seed=cfg.seed)
                res = train_teacher(model, train_loader, val_loader, cfg=tcfg, device=self.device, seed=cfg.seed,
                                    desc="teacher", resume_file=self.workdir / "teacher-resume.pt",
                                    resume_key=key, quiet=self.quiet, log=None if self.quiet else self.log)
                save_checkpoint(path, model.cpu(), spec, preprocess=data.checkpoint_preprocess(),
                                meta={"stage": "search", "key": key, "val_accuracy": res.best_val_accuracy})
                (self.workdir / "teacher-resume.pt").unlink(missing_ok=True)
                self.log(f"teacher: val {res.best_val_accuracy:.2%} ({time.perf_counter() - t0:.0f} s)")
        self.teacher_seconds += time.perf_counter() - t0
        return model.to(self.device).eval()

    # -------------------------------------------------------------- one trial

    def _duplicate(self, cand_key: str, number: int):
        optuna = _optuna()
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        for t in self.study.get_trials(deepcopy=False, states=states):
            if t.number != number and t.user_attrs.get("cand_key") == cand_key and "duplicate_of" not in t.user_attrs:
                return t
        return None

    def objective(self, trial) -> float:
        optuna = _optuna()
        try:
            return self._objective(trial)
        except optuna.TrialPruned:
            raise
        except Exception as err:
            first = (str(err).strip().splitlines() or [""])[0]
            trial.set_user_attr("error", f"{type(err).__name__}: {first}"[:300])
            raise

    def _objective(self, trial) -> float:
        optuna = _optuna()
        from compresskit.train import TrainingDiverged

        cand: Candidate = self.space.suggest(trial)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("family", cand.family)
        trial.set_user_attr("recipe", cand.recipe)
        trial.set_user_attr("recipe_label", cand.recipe_label)
        try:
            spec = canonical_spec(cand.spec) | ({"search_path": cand.spec["search_path"]}
                                                if "search_path" in cand.spec else {})
            key = self.key_of(cand.spec)
        except ValueError as err:
            return self._drop(trial, f"invalid spec: {str(err).splitlines()[0]}", status="dropped")
        cand_key = f"{key}#{recipe_key(cand.recipe)}"
        trial.set_user_attr("spec", spec)
        trial.set_user_attr("label", cand.label)
        trial.set_user_attr("key", key)
        trial.set_user_attr("cand_key", cand_key)

        dup = self._duplicate(cand_key, trial.number)
        if dup is not None:
            trial.set_user_attr("duplicate_of", dup.number)
            for name in ("p50_ms", "latency_source", "size_bytes", "params", "macs", "ops"):
                if name in dup.user_attrs:
                    trial.set_user_attr(name, dup.user_attrs[name])
            if dup.state == optuna.trial.TrialState.COMPLETE:
                trial.set_user_attr("status", "duplicate")
                trial.set_user_attr("reason", f"same candidate as trial {dup.number}: its result, not re-trained")
                self.log(f"trial {trial.number}: {cand.label} + {cand.recipe_label}: same as trial {dup.number}")
                return float(dup.value)
            return self._drop(trial, f"same candidate as trial {dup.number}: {dup.user_attrs.get('reason', 'pruned')}",
                              status="duplicate")

        try:
            lat = self.screen(cand.spec, key)
        except Exception as err:  # noqa: BLE001 - a candidate that does not build, export or quantize
            first = (str(err).strip().splitlines() or [""])[0]
            return self._drop(trial, f"cannot screen: {type(err).__name__}: {first}"[:300], status="dropped")
        trial.set_user_attr("p50_ms", lat.get("p50_ms"))
        trial.set_user_attr("latency_source", lat.get("source"))
        for name in ("size_bytes", "params", "macs", "ops", "busy_fraction"):
            trial.set_user_attr(name, lat.get(name))
        if lat.get("source") == "missing":
            return self._drop(trial, "not in the latency table", status="dropped")
        fails = self.budgets.static_failures(lat)
        if fails:
            return self._drop(trial, "; ".join(fails) + ": dropped before training", status="dropped")

        t0 = time.perf_counter()
        trial.set_user_attr("status", "training")
        try:
            acc = self.proxy(trial, cand)
        except TrainingDiverged as err:
            return self._drop(trial, f"diverged: {str(err)[:200]}", status="diverged")
        except optuna.TrialPruned:
            trial.set_user_attr("proxy_s", time.perf_counter() - t0)
            raise
        trial.set_user_attr("proxy_s", time.perf_counter() - t0)
        trial.set_user_attr("status", "complete")
        self.log(f"trial {trial.number}: {cand.label} + {cand.recipe_label}: p50 {lat['p50_ms']:.3f} ms, "
                 f"proxy val {acc:.2%}")
        return acc

    def _drop(self, trial, reason: str, *, status: str) -> float:
        """End the trial untrained (pruned, so the sampler counts it as a bad region)."""
        optuna = _optuna()
        trial.set_user_attr("status", status)
        trial.set_user_attr("reason", reason)
        label = trial.user_attrs.get("label", "?")
        self.log(f"trial {trial.number}: {label} + {trial.user_attrs.get('recipe_label', '?')}: {reason}")
        raise optuna.TrialPruned(reason)

    def proxy(self, trial, cand: Candidate) -> float:
        """Short training; the val accuracy after each epoch goes to the pruner."""
        optuna = _optuna()
        import torch

        from compresskit.distill.train import distill
        from compresskit.nets import build_model
        from compresskit.train import evaluate, loaders_for

        s, cfg = self.s, self.cfg
        tcfg = cfg.distill.train.model_copy(update={"epochs": s.proxy_epochs,
                                                    "max_batches_per_epoch": s.proxy_max_batches})
        teacher = self.teacher_for(cand.recipe)
        torch.manual_seed(cfg.seed)
        model = build_model(self.full_spec(cand.spec))
        train_loader, val_loader = loaders_for(self.data, tcfg, device=self.device, seed=cfg.seed)

        def report(epoch: int, m) -> None:  # called before each epoch: epoch = epochs done
            if epoch == 0:
                return
            acc = evaluate(m, val_loader, self.device)["accuracy"]
            trial.report(acc, epoch)
            if self.proxies_done() >= s.pruner_startup and trial.should_prune():
                trial.set_user_attr("status", "pruned")
                trial.set_user_attr("last_val_accuracy", acc)
                reason = f"pruned by the {s.pruner} pruner after proxy epoch {epoch} (val {acc:.2%})"
                trial.set_user_attr("reason", reason)
                self.log(f"trial {trial.number}: {cand.label} + {cand.recipe_label}: {reason}")
                raise optuna.TrialPruned(reason)

        distill(model, teacher, train_loader, None, terms=cand.recipe, cfg=tcfg, device=self.device, seed=cfg.seed,
                example_input=self.data.example_input(2).to(self.device), epoch_callback=report,
                desc=f"proxy-{trial.number}", quiet=True)
        acc = evaluate(model, val_loader, self.device)["accuracy"]
        trial.report(acc, s.proxy_epochs)
        trial.set_user_attr("proxy_val_accuracy", acc)
        return acc

    # -------------------------------------------------------------- the study

    def open_study(self, storage_url: str | None) -> str:
        optuna = _optuna()
        from optuna.storages import RDBStorage

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        self.workdir.mkdir(parents=True, exist_ok=True)
        url = storage_url or self.s.storage or f"sqlite:///{(self.workdir / 'study.db').resolve()}"
        engine_kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else None
        with file_lock(self.workdir / "study.lock"):  # table creation must not race between workers
            try:  # optuna >= 4.9
                from optuna.storages import RetryHeartbeatStaleTrialCallback

                retry = {"heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=1)}
            except ImportError:
                from optuna.storages import RetryFailedTrialCallback

                retry = {"failed_trial_callback": RetryFailedTrialCallback(max_retry=1)}
            storage = RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                                 grace_period=GRACE_S, **retry)
            existing = 0
            try:
                existing = len(optuna.load_study(study_name=self.cfg.name, storage=storage).trials)
            except KeyError:
                pass
            # a fresh seed on resume and per worker, so the random start does not redraw the same candidates
            seed = self.s.seed + existing + (os.getpid() if self.worker else 0)
            if self.s.sampler == "random":
                sampler = optuna.samplers.RandomSampler(seed=seed)
            else:
                sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                                     n_startup_trials=min(10, max(2, self.s.n_trials // 3)))
            self.study = optuna.create_study(storage=storage, sampler=sampler, pruner=self._pruner(),
                                             study_name=self.cfg.name, direction="maximize", load_if_exists=True)
            settings = config_hash(self.s.model_dump(mode="json", exclude={"n_trials", "timeout_s", "seed"}))
            known = self.study.user_attrs.get("settings")
            if known is None:
                self.study.set_user_attr("settings", settings)
            elif known != settings:
                self.log("note: the search settings changed since this study began; its earlier trials are kept")
        if existing:
            self.log(f"study {self.cfg.name}: resuming with {existing} trial(s) in {self._safe_url(url)}")
        return url

    @staticmethod
    def _safe_url(url: str) -> str:
        if "@" in url and "://" in url:
            scheme, rest = url.split("://", 1)
            return f"{scheme}://***@{rest.split('@', 1)[1]}"
        return url

    def _pruner(self):
        optuna = _optuna()
        s = self.s
        if s.pruner == "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
        if s.pruner == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=s.proxy_epochs, reduction_factor=3)
        if s.pruner == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
        return optuna.pruners.NopPruner()

    def proxies_done(self) -> int:
        optuna = _optuna()
        done = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        return sum(1 for t in done if t.user_attrs.get("status") == "complete")

    def used(self) -> tuple[int, int]:
        """(trials that count against n_trials, trials queued): finished (complete or pruned) and
        running trials count; failed ones do not (they are drawn again); queued ones are retries
        of trials whose process was killed (the heartbeat found them stale), run before new ones."""
        optuna = _optuna()
        S = optuna.trial.TrialState
        trials = self.study.get_trials(deepcopy=False, states=(S.COMPLETE, S.PRUNED, S.RUNNING, S.WAITING))
        waiting = sum(1 for t in trials if t.state == S.WAITING)
        return len(trials) - waiting, waiting

    def optimize(self, n_trials: int, timeout_s: float | None, start: float) -> None:
        """Run trials until the study holds `n_trials` (or `timeout_s` since `start` passed)."""
        optuna = _optuna()
        failures = 0
        done: list = []
        while True:
            used, waiting = self.used()
            if used >= n_trials and not waiting:
                break
            if timeout_s is not None and time.monotonic() - start >= timeout_s:
                self.log(f"timeout: {timeout_s:g} s passed; {used} of {n_trials} trials in the study")
                break
            done.clear()
            self.study.optimize(self.objective, n_trials=1, catch=(Exception,),
                                callbacks=[lambda _study, t: done.append(t)])
            if done and done[-1].state == optuna.trial.TrialState.FAIL:
                failures += 1
                err = done[-1].user_attrs.get("error") or "see the log above"
                self.log(f"trial {done[-1].number} failed: {err}")
                if failures >= MAX_FAILURES_IN_A_ROW:
                    raise RuntimeError(f"{failures} trials in a row failed; the last: {err}")
            else:
                failures = 0
            self.write_records([], None, None, [], final=False)

    def wait_for_others(self, wait_s: float) -> None:
        """Before the finals: let the other workers' running trials finish (up to `wait_s`)."""
        optuna = _optuna()
        deadline = time.monotonic() + wait_s
        said = False
        while time.monotonic() < deadline:
            optuna.storages.fail_stale_trials(self.study)
            running = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if not running:
                return
            if not said:
                self.log(f"waiting for {len(running)} running trial(s) of other workers")
                said = True
            time.sleep(2.0)
        self.log("stopped waiting for other workers' trials; the finalists come from the finished ones")

    # -------------------------------------------------------------- records

    def rows(self) -> list[dict[str, Any]]:
        optuna = _optuna()
        S = optuna.trial.TrialState
        try:  # optuna >= 4.9
            from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry
        except ImportError:
            from optuna.storages import RetryFailedTrialCallback as Retry
        trials = self.study.get_trials(deepcopy=False)
        retry_of = {t.number: Retry.retried_trial_number(t) for t in trials}
        retried_as = {orig: n for n, orig in retry_of.items() if orig is not None}
        out = []
        for t in trials:
            ua = t.user_attrs
            status = ua.get("status")
            reason = ua.get("reason") or ua.get("error")
            busy = ua.get("busy_fraction")
            if reason is None and busy is not None and busy > BUSY_WARN_FRACTION:
                reason = f"timed while other processes used {busy:.0%} of a core: latency inflated"
            if t.state == S.FAIL:
                status = "failed"
                if reason is None:
                    reason = "its process stopped (no heartbeat)"
                if t.number in retried_as:
                    reason += f"; retried as trial {retried_as[t.number]}"
            elif t.state == S.RUNNING:
                status = status or "running"
            elif t.state == S.WAITING:
                status = "waiting"
            elif t.state == S.PRUNED and status in (None, "training"):
                status = "pruned"
            end = t.datetime_complete
            seconds = (end - t.datetime_start).total_seconds() if end and t.datetime_start else None
            last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
            out.append({
                "number": t.number, "state": t.state.name, "status": status, "family": ua.get("family"),
                "label": ua.get("label"), "recipe_label": ua.get("recipe_label"), "spec": ua.get("spec"),
                "recipe": ua.get("recipe"), "key": ua.get("key"), "p50_ms": ua.get("p50_ms"),
                "latency_source": ua.get("latency_source"), "busy_fraction": ua.get("busy_fraction"),
                "size_bytes": ua.get("size_bytes"), "params": ua.get("params"), "macs": ua.get("macs"),
                "ops": ua.get("ops"),
                "proxy_val_accuracy": t.value if t.state == S.COMPLETE else None,
                "last_val_accuracy": None if t.state == S.COMPLETE else (ua.get("last_val_accuracy") or last),
                "val_by_epoch": {str(k): v for k, v in sorted(t.intermediate_values.items())},
                "duplicate_of": ua.get("duplicate_of"), "retry_of": retry_of.get(t.number), "reason": reason,
                "proxy_s": ua.get("proxy_s"), "seconds": seconds,
                "started": t.datetime_start.isoformat() if t.datetime_start else None,
                "worker": ua.get("worker"), "params_drawn": dict(t.params),
            })
        return out

    def write_records(self, finals, chosen, best, failed, *, final: bool, chosen_yaml: Path | None = None) -> dict:
        rows = self.rows()
        front = rep.pareto_front([r for r in rows if r["status"] == "complete"])
        doc = {
            "schema": rep.SCHEMA, "version": rep.VERSION, "run": self.cfg.name, "study": self.cfg.name,
            "storage": self._safe_url(self.storage_url), "worker": not final,
            "budgets": self.budgets.to_json(), "reference": self.reference,
            "trials": rows, "pareto": front, "finals": finals, "chosen": chosen, "best": best,
            "met_budgets": chosen is not None if final else None, "failed_budgets": failed,
            "chosen_yaml": str(chosen_yaml) if chosen_yaml else None,
            "teacher_s": self.teacher_seconds,
            "process_s": time.perf_counter() - self.started,  # this process (a resumed search: since it resumed)
        }
        atomic_write_json(self.workdir / "trials.json", doc)
        atomic_write_text(self.workdir / "trials.md", rep.markdown(doc))
        return doc

    # -------------------------------------------------------------- finalists

    def full_train_cfg(self):
        tcfg = self.cfg.distill.train
        return tcfg.model_copy(update={"epochs": self.s.full_epochs}) if self.s.full_epochs else tcfg

    def finalists(self) -> list[dict[str, Any]]:
        optuna = _optuna()
        rows = [t for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if t.user_attrs.get("status") == "complete"]
        rows.sort(key=lambda t: (-t.value, t.user_attrs.get("p50_ms") or math.inf, t.number))
        picked, seen = [], set()
        for t in rows:
            if t.user_attrs["cand_key"] not in seen:
                seen.add(t.user_attrs["cand_key"])
                picked.append(t)
            if len(picked) >= self.s.top_k:
                break
        out = []
        trained = {(t.user_attrs["key"], recipe_key(t.user_attrs["recipe"])) for t in picked}
        for t in picked:
            out.append(self.final(t))
            if self.s.labels_only_baseline and self.needs_teacher(t.user_attrs["recipe"]):
                pair = (t.user_attrs["key"], recipe_key(_labels_only()))
                if pair not in trained:  # not when another finalist is that very net on labels alone
                    trained.add(pair)
                    out.append(self.final(t, _labels_only()))
        return out

    def final(self, t, recipe: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Full training of one finalist, then ONNX, INT8 and measurements (kept in
        ``finals/trial-N/final.json`` and reused when the same search is run again). `recipe`
        replaces the trial's (the labels-only baseline of a KD finalist, ``finals/trial-N-labels``)."""
        import json

        import torch

        from compresskit import bench
        from compresskit.checkpoint import save_checkpoint
        from compresskit.distill.train import distill
        from compresskit.export import export_onnx, labels_metadata, preprocess_metadata
        from compresskit.nets import build_model
        from compresskit.quantize.ptq import quantize_ptq
        from compresskit.train import loaders_for

        cfg, data = self.cfg, self.data
        ua = dict(t.user_attrs)
        baseline = recipe is not None
        if baseline:
            ua |= {"recipe": recipe, "recipe_label": recipe_label(recipe)}
        fid = f"{t.number}-labels" if baseline else str(t.number)
        tcfg = self.full_train_cfg()
        use_format_search = self.s.format_search and self.table is None
        ps = cfg.quantize.ptq.search
        key = config_hash({"cand": ua["cand_key"], "recipe": ua["recipe"], "train": tcfg.model_dump(mode="json"), "seed": cfg.seed,
                           "data": cfg.data.model_dump(mode="json"), "teacher": cfg.teacher.model_dump(mode="json"),
                           "format": ps.model_dump(mode="json") if use_format_search else SCREEN_FORMAT,
                           "latency": [self.batch_size, self.threads, self.table.path if self.table else None]})
        folder = self.workdir / "finals" / f"trial-{fid}"
        record = folder / "final.json"
        if record.is_file():
            row = json.loads(record.read_text())
            if row.get("key") == key:
                self.log(f"final {fid}: {ua['label']} + {ua['recipe_label']}: done before, reused")
                row["failed"] = self.budgets.final_failures(row)
                return row
        folder.mkdir(parents=True, exist_ok=True)
        self.log(f"final {fid}: {ua['label']} + {ua['recipe_label']}: training {tcfg.epochs} epochs"
                 + (" (the labels-only baseline of the KD finalist)" if baseline else ""))
        t0 = time.perf_counter()
        spec = self.full_spec(ua["spec"])
        teacher = self.teacher_for(ua["recipe"])
        torch.manual_seed(cfg.seed)
        model = build_model(spec)
        train_loader, val_loader = loaders_for(data, tcfg, device=self.device, seed=cfg.seed)
        res = distill(model, teacher, train_loader, val_loader, terms=ua["recipe"], cfg=tcfg, device=self.device,
                      seed=cfg.seed, example_input=data.example_input(2).to(self.device), desc=f"full-{fid}",
                      resume_file=folder / "resume.pt", resume_key=key, quiet=self.quiet,
                      log=None if self.quiet else self.log)
        train_s = time.perf_counter() - t0
        save_checkpoint(folder / "model.pt", model.cpu(), spec, preprocess=data.checkpoint_preprocess(),
                        meta={"stage": "search", "trial": t.number, "val_accuracy": res.best_val_accuracy})
        (folder / "resume.pt").unlink(missing_ok=True)
        meta = preprocess_metadata(data.mean, data.std, channels=data.in_channels, size=list(data.image_size)) \
            | labels_metadata(data.class_names)
        fp32 = export_onnx(model, folder / "fp32.onnx", data.example_input(1), opset=cfg.export.opset, metadata=meta)
        val_x, val_y = self.numpy("val")
        test_x, test_y = self.numpy("test")
        calib = self.numpy("calib")[0]
        fp32_val = bench.evaluate(fp32, val_x, val_y)["accuracy"]
        if use_format_search:
            from compresskit.quantize.search import candidates_for_host, search_ptq

            cands = candidates_for_host(activation_types=ps.activation_types, per_channel=ps.per_channel,
                                        calibrate_methods=ps.calibrate_methods,
                                        weight_type=cfg.quantize.ptq.weight_type)
            found = search_ptq(fp32, folder / "int8", calib, val_x, val_y, candidates=cands,
                               max_accuracy_drop=ps.max_accuracy_drop, batch_sizes=[self.batch_size],
                               rank_batch_size=self.batch_size, threads=self.threads, max_seconds=ps.max_seconds,
                               fallback=ps.fallback, max_excluded=ps.max_excluded)
            chosen = next(r for r in found["candidates"] if r["name"] == found["chosen"])
            int8, fmt = Path(found["chosen_path"]), found["chosen"]
            int8_val, p50, source = chosen["val_accuracy"], chosen["latency_p50_ms"][str(self.batch_size)], "measured"
            formats = [{"name": r["name"], "val_accuracy": r["val_accuracy"],
                        "p50_ms": r["latency_p50_ms"][str(self.batch_size)]} for r in found["candidates"]]
        else:
            int8, fmt, formats = folder / "int8.onnx", "u8s8-pt-minmax", []
            quantize_ptq(fp32, int8, calib, **SCREEN_FORMAT)
            int8_val = bench.evaluate(int8, val_x, val_y)["accuracy"]
            if self.table is not None:
                p50, source = self.table.get(ua["key"]), "table"
            else:
                p50 = bench.measure_latency(int8, self.batch_size, threads=self.threads,
                                            max_seconds=cfg.bench.max_seconds, warmup=cfg.bench.warmup,
                                            min_runs=cfg.bench.min_runs,
                                            target_rel_ci=cfg.bench.target_rel_ci)["p50_ms"]
                source = "measured"
        row = {
            "key": key, "number": t.number, "id": fid, "baseline_of": t.number if baseline else None, "family": ua["family"], "label": ua["label"],
            "recipe_label": ua["recipe_label"], "spec": ua["spec"], "recipe": ua["recipe"], "spec_key": ua["key"],
            "proxy_val_accuracy": t.value, "fp32_val_accuracy": fp32_val, "int8_format": fmt, "formats": formats,
            "int8_val_accuracy": int8_val, "int8_test_accuracy": bench.evaluate(int8, test_x, test_y)["accuracy"],
            "p50_ms": p50, "latency_source": source, "screen_p50_ms": ua.get("p50_ms"),
            "size_bytes": int8.stat().st_size, "macs": ua.get("macs"), "params": ua.get("params"),
            "epochs": tcfg.epochs, "best_epoch": res.best_epoch, "train_s": train_s,
            "seconds": time.perf_counter() - t0,
            "model": str(folder / "model.pt"), "onnx": str(int8), "fp32_onnx": str(fp32),
        }
        atomic_write_json(record, row)
        row["failed"] = self.budgets.final_failures(row)
        self.log(f"final {fid}: INT8 ({fmt}) val {int8_val:.2%}, test {row['int8_test_accuracy']:.2%}, "
                 f"p50 {p50:.3f} ms" + (f"; fails {'; '.join(row['failed'])}" if row["failed"] else ""))
        return row

    def choose(self, finals: list[dict[str, Any]]) -> tuple[dict | None, dict | None, list[str]]:
        """(chosen, best, failed budgets): the most accurate finalist within every budget
        (ties within accuracy_tie: the fastest); else the most accurate one, with why nothing met."""
        def fastest_of_best(pool):
            top = max(r["int8_val_accuracy"] for r in pool)
            tied = [r for r in pool if r["int8_val_accuracy"] >= top - self.s.accuracy_tie - 1e-12]
            # a KD finalist and its labels-only baseline are one architecture (their p50s differ by
            # timing noise only): of such a pair the more accurate stands for both
            per_arch: dict[int, dict[str, Any]] = {}
            for r in tied:
                if r["number"] not in per_arch or r["int8_val_accuracy"] > per_arch[r["number"]]["int8_val_accuracy"]:
                    per_arch[r["number"]] = r
            return min(per_arch.values(),
                       key=lambda r: (r["p50_ms"] if r["p50_ms"] is not None else math.inf, r["number"]))

        ok = [r for r in finals if not r["failed"]]
        if ok:
            return (c := fastest_of_best(ok)), c, []
        if finals:
            best = fastest_of_best(finals)
            kinds = sorted({f.split(":")[0] for r in finals for f in r["failed"]})
            counts = {k: sum(any(f.split(":")[0] == k for f in r["failed"]) for r in finals) for k in kinds}
            return None, best, [f"{k} budget failed by {n} of {len(finals)} finalist(s)" for k, n in counts.items()] + \
                [f"best found, trial {best.get('id', best['number'])}: " + "; ".join(best["failed"])]
        rows = self.rows()
        dropped = [r for r in rows if r["status"] == "dropped"]
        msgs = []
        for kind in ("latency", "size"):
            n = sum(1 for r in dropped if (r["reason"] or "").startswith(kind) or f"; {kind}:" in (r["reason"] or ""))
            if n:
                msgs.append(f"{kind} budget failed: {n} of {len(rows)} candidates over it before training")
        timed = [r for r in rows if r.get("p50_ms") is not None]
        if timed:
            fastest = min(timed, key=lambda r: r["p50_ms"])
            msgs.append(f"fastest candidate: {fastest['label']} at {fastest['p50_ms']:.3f} ms")
        if not msgs:
            msgs.append("no trial completed its proxy training")
        return None, None, msgs

    def write_chosen_yaml(self, row: Mapping[str, Any], met: bool, failed: list[str]) -> Path:
        """The base pipeline with `distill.student` and `distill.loss` replaced (and
        `distill.train.epochs` when `search.full_epochs` set them), without `search`: a plain
        pipeline that re-runs the winner without searching. Validated before it is written."""
        import yaml

        raw = copy.deepcopy(dict(self.raw)) if self.raw is not None else \
            self.cfg.model_dump(mode="json", exclude_defaults=True)
        raw.pop("search", None)
        base = raw.get("distill") if isinstance(raw.get("distill"), dict) else {}
        distill = {"enabled": True, "student": dict(row["spec"]), "loss": [dict(t) for t in row["recipe"]]}
        distill |= {k: v for k, v in base.items() if k not in distill}
        if self.s.full_epochs:
            train = distill.get("train") if isinstance(distill.get("train"), dict) else {}
            train["epochs"] = self.s.full_epochs
            distill["train"] = train
        raw["distill"] = distill
        validate_config(copy.deepcopy(raw))
        head = [f"# Written by compresskit search (run {self.cfg.name}, trial {row.get('id', row['number'])}): "
                f"{row['label']} with {row['recipe_label']}",
                f"# INT8 ({row['int8_format']}) val {row['int8_val_accuracy']:.2%}, test "
                f"{row['int8_test_accuracy']:.2%}, p50 {row['p50_ms']:.3f} ms at batch {self.batch_size}, "
                f"{self.threads} thread(s) ({row['latency_source']}), {row['size_bytes'] / 1024:.0f} KiB.",
                "# The base pipeline with distill.student and distill.loss replaced; re-run it with "
                "`compresskit run` (no search)."]
        if not met:
            head.append("# It does NOT meet the budgets: " + "; ".join(failed))
        if self.cfg.prune.enabled and self.cfg.prune.pruner.ignored_layers:
            head.append("# Check prune.pruner.ignored_layers: they name the base student's modules.")
        path = self.workdir / "chosen.yaml"
        atomic_write_text(path, "\n".join(head) + "\n" + yaml.safe_dump(raw, sort_keys=False,
                                                                           default_flow_style=None, width=120))
        return path


def run_search(cfg: PipelineConfig, *, workdir: str | os.PathLike | None = None, n_trials: int | None = None,
               timeout_s: float | None = None, worker: bool = False, log: LogFn | None = print,
               quiet: bool = True, raw: Mapping[str, Any] | None = None, storage: str | None = None,
               wait_for_workers_s: float = 3600.0) -> SearchResult:
    """Search the student for `cfg`'s data and budgets (see the module doc); `cfg.search` holds
    the space and settings (defaults when absent).

    `workdir`: the search folder (default ``<models_dir>/<name>/search``); `n_trials` /
    `timeout_s` override `search.n_trials` / `search.timeout_s` (n_trials counts the study's
    trials in all); `worker`: only run trials (no finalists), for extra processes sharing the
    study; `raw`: the pipeline as written (the YAML mapping with any overrides) that
    ``chosen.yaml`` is made from (default: `cfg` without its defaults); `storage`: an Optuna
    storage URL (default `search.storage`, else the SQLite file in `workdir`).

    Writes ``study.db``, ``latency.json``, ``trials.json`` / ``trials.md`` (after every trial),
    ``finals/trial-N/`` (checkpoint, FP32 and INT8 ONNX), ``best/`` (the chosen model, or the
    best found when nothing meets the budgets) and ``chosen.yaml``.
    """
    t0 = time.perf_counter()
    log = log or (lambda _msg: None)
    s = cfg.search or SearchConfig()
    wd = Path(workdir) if workdir is not None else search_dir(cfg)
    srch = _Search(cfg, wd, log=log, quiet=quiet, worker=worker, raw=raw)
    srch.started = t0
    _optuna()
    wd.mkdir(parents=True, exist_ok=True)
    srch.setup()
    srch.storage_url = srch.open_study(storage)
    n_trials = n_trials if n_trials is not None else s.n_trials
    timeout_s = timeout_s if timeout_s is not None else s.timeout_s
    start = time.monotonic()
    srch.optimize(n_trials, timeout_s, start)
    files = {"trials_json": wd / "trials.json", "trials_md": wd / "trials.md"}
    if (wd / "study.db").is_file():
        files["study"] = wd / "study.db"
    if worker:
        doc = srch.write_records([], None, None, [], final=False)
        return SearchResult(wd, srch._safe_url(srch.storage_url), cfg.name, doc["trials"], [], doc["pareto"], None,
                            None, False, [], srch.budgets.to_json(), srch.reference, files,
                            time.perf_counter() - t0, worker=True)
    srch.wait_for_others(wait_for_workers_s)
    srch.optimize(n_trials, timeout_s, start)  # retries of trials found stale while waiting
    finals = srch.finalists()
    chosen, best, failed = srch.choose(finals)
    chosen_yaml = None
    if best is not None:
        out = wd / "best"
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(best["model"], out / "model.pt")
        shutil.copy2(best["onnx"], out / "model.onnx")
        files |= {"best_model": out / "model.pt", "best_onnx": out / "model.onnx"}
        chosen_yaml = srch.write_chosen_yaml(best, chosen is not None, failed)
        files["chosen_yaml"] = chosen_yaml
    if chosen is not None:
        log(f"chosen: trial {chosen.get('id', chosen['number'])}, {chosen['label']} + {chosen['recipe_label']}: INT8 val "
            f"{chosen['int8_val_accuracy']:.2%}, p50 {chosen['p50_ms']:.3f} ms")
    else:
        log("no candidate meets the budgets: " + "; ".join(failed))
    doc = srch.write_records(finals, chosen, best, failed, final=True, chosen_yaml=chosen_yaml)
    return SearchResult(wd, srch._safe_url(srch.storage_url), cfg.name, doc["trials"], finals, doc["pareto"], chosen,
                        best, chosen is not None, failed, srch.budgets.to_json(), srch.reference, files,
                        time.perf_counter() - t0, worker=False)
