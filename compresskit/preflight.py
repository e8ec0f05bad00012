"""Checks of everything outside the config that can be checked before a run writes anything:
the device, the data (an image folder is scanned whole), checkpoint files (read and matched to
their architecture and to the data), model factories, feature-tap module paths and the shape
pairings of every loss term (one dry forward on the untrained models). `validate` and `run` call
:func:`preflight`; a problem is a `ConfigError` of (key path, message) pairs, exit code 2.
"""

from __future__ import annotations

import re
from pathlib import Path

from compresskit.config import ConfigError, PipelineConfig


def preflight(cfg: PipelineConfig) -> None:
    """Check inputs that exist outside the config (files, data, module paths) before writing."""
    from compresskit.data import check_data

    problems: list[tuple[str, str]] = []
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            problems.append(("device", "cuda was asked for but CUDA is not available here (use auto or cpu)"))
    data_problems = check_data(cfg.data)
    problems += data_problems
    problems += _check_checkpoints(cfg, match_data=not data_problems)
    if not problems:
        problems += _check_models(cfg)
    if problems:
        raise ConfigError(problems)


def _check_checkpoints(cfg: PipelineConfig, *, match_data: bool) -> list[tuple[str, str]]:
    """Open every checkpoint the teacher stage would load (weights_only) and, when the data is
    fine (`match_data`), match it as that stage does (`compresskit.checkpoint.load_for_data`) to
    its architecture (strict load after prefix stripping) and to the data (classes, channels,
    recorded preprocessing under `teacher.preprocess_mismatch`)."""
    from compresskit.checkpoint import load_for_data, read_checkpoint
    from compresskit.data import config_preprocess

    t = cfg.teacher
    wanted = config_preprocess(cfg.data) if match_data else None
    if wanted is not None and not wanted["class_names"]:
        wanted = None
    items = [("teacher.checkpoint", t.checkpoint, t.model)]
    items += [(f"teacher.ensemble.{i}.checkpoint", m.checkpoint, m.model or t.model) for i, m in enumerate(t.ensemble)]
    problems: list[tuple[str, str]] = []
    for where, path, arch in items:
        if path is None:
            continue
        if not Path(path).exists():
            problems.append((where, f"file not found: {path}"))
            continue
        try:
            if wanted is None:
                read_checkpoint(path)
            else:
                spec = arch.model_dump(mode="json") | {"num_classes": len(wanted["class_names"]),
                                                       "in_channels": wanted["channels"]}
                load_for_data(Path(path), spec, wanted, t.preprocess_mismatch)
        except (ValueError, OSError) as err:
            problems.append((where, str(err)))
        except Exception as err:  # noqa: BLE001 - a user's architecture code may raise anything
            first = (str(err).strip().splitlines() or [""])[0]
            problems.append((where, f"{path}: cannot load: {type(err).__name__}: {first}"))
    return problems


def _check_models(cfg: PipelineConfig) -> list[tuple[str, str]]:
    """Build teacher and student once (cheap, untrained) to check factories, feature-tap paths and
    that every loss term accepts the shapes it would pair (one dry forward, as training does)."""
    from compresskit.nets import build_model

    channels, classes, size = _shape_hint(cfg)
    problems: list[tuple[str, str]] = []
    built = {}
    # the model the compression stages work on: the student, or the teacher itself without distillation
    student = "distill.student" if cfg.distill.enabled else "teacher.model"
    specs = [("teacher.model", cfg.teacher.model)]
    if cfg.distill.enabled:
        specs.append(("distill.student", cfg.distill.student))
    specs += [(f"teacher.ensemble.{i}.model", m.model) for i, m in enumerate(cfg.teacher.ensemble) if m.model]
    for key, spec in specs:
        try:
            built[key] = build_model(spec.model_dump(mode="json") | {"num_classes": classes, "in_channels": channels})
        except (ValueError, TypeError, KeyError, ImportError) as err:
            problems.append((key, str(err)))
    loss_lists = [("distill.loss", cfg.distill.loss)] if cfg.distill.enabled else []
    if cfg.prune.enabled:
        loss_lists.append(("prune.finetune.loss", cfg.prune.finetune.loss))
    if cfg.quantize.qat.enabled:
        loss_lists.append(("quantize.qat.loss", cfg.quantize.qat.loss))
    for where, terms in loss_lists:
        for i, term in enumerate(terms):
            for field_name, side, path in term.module_paths():
                # QAT's teacher is the float model it starts from (the student side)
                key = "teacher.model" if side == "teacher" and where != "quantize.qat.loss" else student
                if key not in built:
                    continue
                names = dict(built[key].named_modules())
                if path not in names:
                    near = [n for n in names if n and n.split(".")[0] == path.split(".")[0]][:8]
                    problems.append((f"{where}.{i}.{field_name}",
                                     f"no module {path!r} in the {side} model"
                                     + (f" (e.g. {', '.join(near)})" if near else "")))
    sp = cfg.teacher.specialists
    if sp.enabled and (sp.count * sp.size > classes or sp.size >= classes):
        problems.append(("teacher.specialists", f"{sp.count} specialists of {sp.size} classes need at least "
                         f"{max(sp.count * sp.size, sp.size + 1)} classes; the data has {classes}"))
    if not problems and "teacher.model" in built and student in built:
        problems += _dry_run_objectives(cfg, built, built[student],
                                        [lst for lst in loss_lists if lst[0] != "quantize.qat.loss"],
                                        (channels, size, size))
    if cfg.prune.enabled and student in built:
        from compresskit.prune import expand_paths

        try:
            paths = expand_paths(built[student], cfg.prune.pruner.ignored_layers)
        except ValueError as err:
            problems.append(("prune.pruner.ignored_layers", str(err)))
        else:
            names = dict(built[student].named_modules())
            for path in paths:
                if path not in names:
                    problems.append(("prune.pruner.ignored_layers", f"no module {path!r} in the student model"))
            if cfg.prune.pruner.method == "structured" and not any(k.startswith("prune.") for k, _ in problems):
                import torch

                from compresskit.prune import check_prunable

                # Torch-Pruning's dependency graph of the untrained student, as the prune stage builds it
                example = torch.zeros(1, channels, size, size)
                problems += [("prune.pruner", msg)
                             for msg in check_prunable(built[student], example, cfg.prune.pruner.ignored_layers)]
    return problems


def _dry_run_objectives(cfg: PipelineConfig, built: dict, student, loss_lists, shape: tuple[int, int, int]):
    """Build each stage's objective on the untrained models: shape pairings are checked before
    any training (the stage builds it again on the trained models)."""
    import torch

    from compresskit.distill.objective import build_objective
    from compresskit.distill.registry import TERMS

    teacher = built["teacher.model"]
    if cfg.teacher.ensemble:
        from compresskit.teacher.ensemble import TeacherEnsemble

        members = [built.get(f"teacher.ensemble.{i}.model", teacher) for i in range(len(cfg.teacher.ensemble))]
        teacher = TeacherEnsemble([teacher, *members])
    problems = []
    example = torch.zeros(2, *shape)
    for where, terms in loss_lists:
        dumped = [t.model_dump(mode="json") for t in terms]
        needs_teacher = any(TERMS[t["method"]].needs_teacher for t in dumped)
        try:
            build_objective(dumped, student=student, teacher=teacher if needs_teacher else None,
                            example_input=example).close()
        except ValueError as err:
            found = re.match(r"terms\[(\d+)\]:? (?:\(\w+\):? )?(.*)", str(err), re.DOTALL)
            problems.append((f"{where}.{found[1]}", found[2]) if found else (where, str(err)))
    return problems


def _shape_hint(cfg: PipelineConfig) -> tuple[int, int, int]:
    """(channels, classes, image side) the data will have, from the config (and an image
    folder's class folders)."""
    from compresskit.data import config_preprocess

    pre = config_preprocess(cfg.data)
    return pre["channels"], len(pre["class_names"] or ()) or 2, pre["size"][0]
