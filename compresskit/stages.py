"""The pipeline's stages: each has `plan(ctx)` (the config it depends on and its input files,
or None when disabled) and `run(ctx)` (does the work, returns output files and metrics).

Stages only glue: the work is done by library functions (train.fit, distill.build_objective,
prune.prune_structured, quantize.ptq.quantize_ptq, quantize.qat.prepare_qat, export.export_onnx,
bench.bench_model, report.build_report) that a user can call from their own script.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from compresskit.pipeline import RunContext, StageError

Plan = tuple[dict[str, Any], dict[str, Path]] | None
Result = tuple[dict[str, Path], dict[str, Any]]


def _dump(model) -> Any:
    return model.model_dump(mode="json") if hasattr(model, "model_dump") else model


def _data_key(ctx: RunContext) -> dict[str, Any]:
    d = ctx.cfg.data.model_dump(mode="json")
    for k in ("eval_batch_size", "num_workers"):  # do not change results
        d.pop(k, None)
    return {"data": d, "seed": ctx.cfg.seed}


def _spec(ctx: RunContext, model_spec) -> dict[str, Any]:
    return model_spec.model_dump(mode="json") | {"num_classes": ctx.data.num_classes,
                                                 "in_channels": ctx.data.in_channels}


def _evaluate(ctx: RunContext, model, split: str) -> float:
    from compresskit.train import evaluate

    model.to(ctx.device)
    return evaluate(model, ctx.data.loader(split, device=ctx.device))["accuracy"]


def _fit(ctx: RunContext, model, teacher, terms, train_cfg, stage: str, desc: str,
         teacher_key: str | None = None, seed: int | None = None, **kw):
    """Train `model` with the loss `terms` (KD from `teacher`); teacher logits are memoised
    across epochs and stages when the inputs repeat exactly."""
    from compresskit.distill.cache import CachedTeacher
    from compresskit.distill.objective import build_objective
    from compresskit.distill.registry import TERMS
    from compresskit.train import fit

    model.to(ctx.device)
    if teacher is not None:
        teacher.to(ctx.device)
        data = ctx.data
        repeatable = not data.hflip and not data.crop_padding
        if (train_cfg.cache_teacher and repeatable and teacher_key
                and all(TERMS[_dump(t)["method"]].teacher_logits_only for t in terms)):
            teacher = CachedTeacher(teacher, ctx.teacher_cache.setdefault(teacher_key, {}))
    objective = build_objective([_dump(t) for t in terms], student=model, teacher=teacher,
                                example_input=ctx.data.example_input(2).to(ctx.device))
    try:
        result = fit(model, objective, ctx.data, train_cfg, device=ctx.device,
                     seed=ctx.cfg.seed if seed is None else seed,
                     desc=desc, resume_file=ctx.stage_dir(stage) / f"resume-{desc}.pt",
                     resume_key=f"{ctx.stage_key}:{desc}", quiet=ctx.quiet, log=ctx.log, **kw)
    finally:
        objective.close()
    if isinstance(teacher, CachedTeacher):
        result.teacher_cache = {"hits": teacher.hits, "misses": teacher.misses}
    return result


def _file_key(path: Path) -> str:
    from compresskit.artifacts import sha256_file

    return sha256_file(path)


def _load(path: Path):
    from compresskit.nets import model_from_checkpoint, read_checkpoint

    ckpt = read_checkpoint(path)
    return model_from_checkpoint(ckpt), ckpt


def _float_model_path(ctx: RunContext) -> Path:
    """The model the quantize stage starts from: pruned if pruning ran, else the student."""
    if ctx.cfg.prune.enabled:
        return ctx.stage_dir("prune") / "model.pt"
    return ctx.stage_dir("distill") / "model.pt"


def _cleanup_resume(stage_dir: Path) -> None:
    for f in stage_dir.glob("resume-*.pt"):
        f.unlink()


# ------------------------------------------------------------------ teacher

def _one_teacher(ctx: RunContext, model_cfg, checkpoint: Path | None, seed: int, desc: str, where: str):
    """Train (or load) one teacher: returns (model, spec, pruning, qat, metrics)."""
    import torch

    from compresskit.nets import build_model, model_from_checkpoint, read_checkpoint

    spec = _spec(ctx, model_cfg)
    metrics: dict[str, Any] = {}
    if checkpoint is not None:
        try:
            ckpt = read_checkpoint(Path(checkpoint))
            model = model_from_checkpoint(ckpt, spec)
        except (ValueError, RuntimeError) as err:
            raise StageError(f"{where} {checkpoint}: {err}") from None
        spec = ckpt.get("spec") or spec
        want = (ctx.data.num_classes, ctx.data.in_channels)
        if (spec["num_classes"], spec["in_channels"]) != want:
            raise StageError(f"{where} {checkpoint} is for {spec['num_classes']} classes and "
                             f"{spec['in_channels']} input channels; the data has {want[0]} and {want[1]}")
        metrics["loaded_from"] = str(checkpoint)
        return model, spec, ckpt.get("pruning"), ckpt.get("qat"), metrics
    cfg = ctx.cfg.teacher
    torch.manual_seed(seed)
    model = build_model(spec)
    res = _fit(ctx, model, None, [{"method": "ce", "weight": 1.0, "label_smoothing": cfg.train.label_smoothing}],
               cfg.train, "teacher", desc, seed=seed)
    metrics["fit"] = res.to_json()
    return model, spec, None, None, metrics


def _teacher_files(ctx: RunContext) -> list[Path]:
    """Every file the teacher stage writes that the combined teacher is built from."""
    cfg, d = ctx.cfg.teacher, ctx.stage_dir("teacher")
    files = [d / "model.pt"] + [d / f"member_{i + 1}.pt" for i in range(len(cfg.ensemble))]
    if cfg.specialists.enabled:
        files += [d / f"specialist_{i + 1}.pt" for i in range(cfg.specialists.count)] + [d / "specialists.json"]
    return files


def _teacher_key(ctx: RunContext) -> str:
    """Cache key of the combined teacher: the sha256 of its files."""
    import hashlib

    return hashlib.sha256("".join(_file_key(f) for f in _teacher_files(ctx)).encode()).hexdigest()


def _load_teacher(ctx: RunContext):
    """The teacher the distill and prune stages learn from: the teacher model, an ensemble of it
    and teacher.ensemble, or generalist + specialists."""
    import json

    cfg, d = ctx.cfg.teacher, ctx.stage_dir("teacher")
    model, _ = _load(d / "model.pt")
    if cfg.ensemble:
        from compresskit.distill.ensemble import TeacherEnsemble

        return TeacherEnsemble([model] + [_load(d / f"member_{i + 1}.pt")[0] for i in range(len(cfg.ensemble))])
    if cfg.specialists.enabled:
        from compresskit.distill.specialists import GeneralistSpecialists

        groups = json.loads((d / "specialists.json").read_text())["groups"]
        specialists = [_load(d / f"specialist_{i + 1}.pt")[0] for i in range(len(groups))]
        return GeneralistSpecialists(model, specialists, groups, top_k=cfg.specialists.top_k,
                                     steps=cfg.specialists.combine_steps)
    return model


class teacher:  # noqa: N801 - a stage is named like its YAML key
    @staticmethod
    def plan(ctx: RunContext) -> Plan:
        t = _dump(ctx.cfg.teacher)
        if not t["ensemble"]:  # unused schemes do not change the key (earlier runs stay valid)
            del t["ensemble"]
        if not t["specialists"]["enabled"]:
            del t["specialists"]
        conf = {"teacher": t, "device": ctx.cfg.device} | _data_key(ctx)
        inputs = {}
        if ctx.cfg.teacher.checkpoint:
            inputs["checkpoint"] = Path(ctx.cfg.teacher.checkpoint)
        for i, member in enumerate(ctx.cfg.teacher.ensemble):
            if member.checkpoint:
                inputs[f"member_{i + 1}_checkpoint"] = Path(member.checkpoint)
        return conf, inputs

    @staticmethod
    def run(ctx: RunContext) -> Result:
        from compresskit.nets import count_params, save_checkpoint

        cfg = ctx.cfg.teacher
        stage_dir = ctx.stage_dir("teacher")
        out = stage_dir / "model.pt"
        model, spec, pruning, qat, metrics = _one_teacher(ctx, cfg.model, cfg.checkpoint, ctx.cfg.seed,
                                                          "teacher", "teacher.checkpoint")
        metrics["val_accuracy"] = _evaluate(ctx, model, "val")
        metrics["test_accuracy"] = _evaluate(ctx, model, "test")
        metrics["params"] = count_params(model)
        save_checkpoint(out, model.cpu(), spec, pruning=pruning, qat=qat,
                        meta={"stage": "teacher", "test_accuracy": metrics["test_accuracy"]})
        outputs = {"model": out}
        summary = f"test {metrics['test_accuracy']:.2%}, {metrics['params'] / 1e6:.2f}M params"
        if cfg.ensemble:
            members = []
            for i, member in enumerate(cfg.ensemble):
                seed = member.seed if member.seed is not None else ctx.cfg.seed + i + 1
                m_model, m_spec, m_pruning, m_qat, m_metrics = _one_teacher(
                    ctx, member.model or cfg.model, member.checkpoint, seed, f"member{i + 1}",
                    f"teacher.ensemble.{i}.checkpoint")
                m_metrics["test_accuracy"] = _evaluate(ctx, m_model, "test")
                path = stage_dir / f"member_{i + 1}.pt"
                save_checkpoint(path, m_model.cpu(), m_spec, pruning=m_pruning, qat=m_qat,
                                meta={"stage": "teacher", "test_accuracy": m_metrics["test_accuracy"]})
                outputs[f"member_{i + 1}"] = path
                members.append(m_metrics)
            metrics["ensemble"] = {"members": members, "test_accuracy": _evaluate(ctx, _load_teacher(ctx), "test")}
            summary += f"; ensemble of {len(members) + 1}: test {metrics['ensemble']['test_accuracy']:.2%}"
        if cfg.specialists.enabled:
            metrics["specialists"] = _train_specialists(ctx, model, spec)
            for i in range(cfg.specialists.count):
                outputs[f"specialist_{i + 1}"] = stage_dir / f"specialist_{i + 1}.pt"
            outputs["specialists"] = stage_dir / "specialists.json"
            summary += (f"; generalist + {cfg.specialists.count} specialists: "
                        f"test {metrics['specialists']['test_accuracy']:.2%}")
        _cleanup_resume(stage_dir)
        metrics["summary"] = summary
        return outputs, metrics


def _train_specialists(ctx: RunContext, generalist, spec: dict[str, Any]) -> dict[str, Any]:
    """Group the classes the generalist confuses, train one specialist per group, save them."""
    from compresskit.artifacts import atomic_write_json
    from compresskit.distill import specialists as sp
    from compresskit.nets import save_checkpoint

    cfg, stage_dir, dev = ctx.cfg.teacher.specialists, ctx.stage_dir("teacher"), ctx.device
    generalist.to(dev)
    conf = sp.confusion_matrix(generalist, ctx.data.loader("val", device=dev), ctx.data.num_classes, device=dev)
    try:
        groups = sp.group_confused_classes(conf, count=cfg.count, size=cfg.size)
    except ValueError as err:
        raise StageError(f"teacher.specialists: {err}") from None
    info: dict[str, Any] = {"groups": groups, "specialists": []}
    for i, group in enumerate(groups):
        model = sp.train_specialist(generalist, spec, group, ctx.data, cfg.train, temperature=cfg.temperature,
                                    soft_weight=cfg.soft_weight, device=dev, seed=ctx.cfg.seed + i,
                                    quiet=ctx.quiet, log=ctx.log)
        save_checkpoint(stage_dir / f"specialist_{i + 1}.pt", model.cpu(), sp.specialist_spec(spec, group),
                        meta={"stage": "teacher", "specialist_classes": group})
        info["specialists"].append({"classes": group})
    atomic_write_json(stage_dir / "specialists.json", {"groups": groups})
    info["generalist_test_accuracy"] = _evaluate(ctx, generalist, "test")
    info["test_accuracy"] = _evaluate(ctx, _load_teacher(ctx), "test")
    return info


# ------------------------------------------------------------------ distill

class distill:  # noqa: N801
    @staticmethod
    def plan(ctx: RunContext) -> Plan:
        conf = {"distill": _dump(ctx.cfg.distill), "device": ctx.cfg.device} | _data_key(ctx)
        extra = {f"teacher_{f.stem}": f for f in _teacher_files(ctx)[1:]}
        return conf, extra | {"teacher": ctx.stage_dir("teacher") / "model.pt"}

    @staticmethod
    def run(ctx: RunContext) -> Result:
        import torch

        from compresskit.nets import build_model, count_params, save_checkpoint

        cfg = ctx.cfg.distill
        stage_dir = ctx.stage_dir("distill")
        from compresskit.distill.registry import TERMS

        teacher_model = _load_teacher(ctx)
        spec = _spec(ctx, cfg.student)
        outputs: dict[str, Path] = {}
        metrics: dict[str, Any] = {}
        runs = [("student", cfg.loss)]
        if cfg.baseline:
            runs.append(("baseline", [{"method": "ce", "weight": 1.0,
                                       "label_smoothing": cfg.train.label_smoothing}]))
        for name, terms in runs:
            torch.manual_seed(ctx.cfg.seed)
            model = build_model(spec)
            uses_teacher = any(TERMS[_dump(t)["method"]].needs_teacher for t in terms)
            res = _fit(ctx, model, teacher_model if uses_teacher and cfg.enabled else None, terms,
                       cfg.train, "distill", name, teacher_key=_teacher_key(ctx))
            test_acc = _evaluate(ctx, model, "test")
            path = stage_dir / ("model.pt" if name == "student" else "baseline.pt")
            save_checkpoint(path, model.cpu(), spec, meta={"stage": "distill", "test_accuracy": test_acc})
            outputs[name] = path
            metrics[name] = {"fit": res.to_json(), "val_accuracy": res.best_val_accuracy,
                             "test_accuracy": test_acc, "params": count_params(model)}
        _cleanup_resume(stage_dir)
        s = metrics["student"]
        summary = f"student test {s['test_accuracy']:.2%}, {s['params'] / 1e6:.3f}M params"
        if "baseline" in metrics:
            summary += f" (no-KD baseline {metrics['baseline']['test_accuracy']:.2%})"
        metrics["summary"] = summary
        return outputs, metrics


# ------------------------------------------------------------------ prune

class prune:  # noqa: N801
    @staticmethod
    def plan(ctx: RunContext) -> Plan:
        if not ctx.cfg.prune.enabled:
            return None
        conf = {"prune": _dump(ctx.cfg.prune), "device": ctx.cfg.device} | _data_key(ctx)
        return conf, {f"teacher_{f.stem}": f for f in _teacher_files(ctx)[1:]} | {
            "student": ctx.stage_dir("distill") / "model.pt", "teacher": ctx.stage_dir("teacher") / "model.pt"}

    @staticmethod
    def run(ctx: RunContext) -> Result:
        import torch

        from compresskit import prune as pr
        from compresskit.nets import save_checkpoint

        cfg = ctx.cfg.prune
        stage_dir = ctx.stage_dir("prune")
        student, ckpt = _load(ctx.stage_dir("distill") / "model.pt")
        teacher_model = _load_teacher(ctx)
        example = ctx.data.example_input(1)
        p = cfg.pruner
        if p.method == "structured":
            taylor_batches = None
            if p.importance == "taylor":
                loader = ctx.data.loader("calib", batch_size=64)
                taylor_batches = [batch for _, batch in zip(range(4), loader, strict=False)]
            options = dict(importance=p.importance, global_pruning=p.global_pruning,
                           iterative_steps=p.iterative_steps, round_to=p.round_to,
                           ignored_layers=p.ignored_layers, max_layer_ratio=p.max_layer_ratio,
                           taylor_batches=taylor_batches, loss_fn=torch.nn.functional.cross_entropy)
            measure = _latency_probe(ctx, stage_dir, example)
            try:
                if p.target_latency_ms is not None or p.target_speedup is not None:
                    result, latency_info = pr.search_ratio(
                        student, example, measure, ratios=p.search_ratios, target_latency_ms=p.target_latency_ms,
                        target_speedup=p.target_speedup, **options)
                else:
                    result = pr.prune_structured(student, example, ratio=p.ratio, **options)
                    before, after = measure(student), measure(result.model)
                    latency_info = {"base_latency_ms": before, "tried": [{
                        "ratio": p.ratio, "macs": result.macs_after, "params": result.params_after,
                        "mac_ratio": result.macs_after / result.macs_before, "latency_ms": after,
                        "latency_ratio": after / before}]}
            except ValueError as err:
                raise StageError(f"prune: {err}") from None
        else:
            result = pr.prune_magnitude(student, sparsity=p.sparsity, example_inputs=example,
                                        ignored_layers=p.ignored_layers)
        model = result.model
        val_before = _evaluate(ctx, model, "val")
        res = _fit(ctx, model, teacher_model, cfg.finetune.loss, cfg.finetune.train, "prune", "finetune",
                   teacher_key=_teacher_key(ctx))
        pruning_state = None
        if p.method == "magnitude":
            model = pr.finalize_magnitude(model)
        else:
            pruning_state = pr.pruning_state(model)
        test_acc = _evaluate(ctx, model, "test")
        out = stage_dir / "model.pt"
        save_checkpoint(out, model.cpu(), ckpt["spec"], pruning=pruning_state,
                        meta={"stage": "prune", "test_accuracy": test_acc})
        _cleanup_resume(stage_dir)
        info = result.to_json()
        info.pop("model", None)
        metrics = {"prune": info, "val_accuracy_before_finetune": val_before, "fit": res.to_json(),
                   "val_accuracy": res.best_val_accuracy, "test_accuracy": test_acc}
        if p.method == "structured":
            metrics["latency"] = latency_info
            row = latency_info["tried"][-1]
            metrics["summary"] = (f"ratio {row['ratio']}: MACs {info['macs_before'] / 1e6:.2f}M -> "
                                  f"{info['macs_after'] / 1e6:.2f}M (x{row['mac_ratio']:.2f}), FP32 latency "
                                  f"x{row['latency_ratio']:.2f}, params {info['params_before'] / 1e3:.0f}k -> "
                                  f"{info['params_after'] / 1e3:.0f}k, test {test_acc:.2%}")
        else:
            metrics["summary"] = f"sparsity {info['sparsity']:.1%} (dense kernels: no speed-up), test {test_acc:.2%}"
        return {"model": out}, metrics


def _latency_probe(ctx: RunContext, stage_dir: Path, example):
    """`model -> p50 ms` of its FP32 ONNX export with onnxruntime, at the latency budget's batch
    size and thread count (what the deployed model is judged on)."""
    import tempfile

    from compresskit.bench import measure_latency
    from compresskit.export import export_onnx

    b, bench_cfg = ctx.cfg.budgets, ctx.cfg.bench
    threads = b.latency_threads if b.latency_threads is not None else bench_cfg.threads[0]

    def measure(model) -> float:
        stage_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=stage_dir, prefix="probe-") as tmp:
            path = export_onnx(model, Path(tmp) / "probe.onnx", example)
            return measure_latency(path, b.latency_batch_size, threads=threads, warmup=bench_cfg.warmup,
                                   min_runs=bench_cfg.min_runs, max_seconds=bench_cfg.max_seconds)["p50_ms"]

    return measure


# ------------------------------------------------------------------ quantize

class quantize:  # noqa: N801
    @staticmethod
    def plan(ctx: RunContext) -> Plan:
        q = ctx.cfg.quantize
        if not (q.ptq.enabled or q.qat.enabled):
            return None
        conf = {"quantize": _dump(q), "export_opset": ctx.cfg.export.opset, "device": ctx.cfg.device} | _data_key(ctx)
        return conf, {"float": _float_model_path(ctx)}

    @staticmethod
    def run(ctx: RunContext) -> Result:
        import numpy as np

        from compresskit.export import export_onnx
        from compresskit.nets import save_checkpoint
        from compresskit.quantize import ptq, qat

        q = ctx.cfg.quantize
        stage_dir = ctx.stage_dir("quantize")
        float_model, ckpt = _load(_float_model_path(ctx))
        float_model.eval()
        example = ctx.data.example_input(1)
        outputs: dict[str, Path] = {}
        metrics: dict[str, Any] = {}
        calib_x, _ = ctx.data.numpy_split("calib")
        qat_activation = q.qat.activation_type if q.qat.activation_type != "auto" else "uint8"
        qat_per_channel = q.qat.per_channel if q.qat.per_channel != "auto" else True
        if q.ptq.enabled:
            fp32 = export_onnx(float_model, stage_dir / "float.onnx", example, opset=ctx.cfg.export.opset)
            if q.ptq.search.enabled:
                info = _search_ptq(ctx, fp32, stage_dir, calib_x.astype(np.float32))
                winner = info["search"]["winner_settings"]
                if q.qat.activation_type == "auto":
                    qat_activation = winner["activation_type"]
                if q.qat.per_channel == "auto":
                    qat_per_channel = bool(winner["per_channel"])
            else:
                info = ptq.quantize_ptq(
                    fp32, stage_dir / "ptq.onnx", calib_x.astype(np.float32),
                    activation_type=q.ptq.activation_type, weight_type=q.ptq.weight_type,
                    per_channel=q.ptq.per_channel, calibrate_method=q.ptq.calibrate_method,
                    percentile=q.ptq.percentile, reduce_range=q.ptq.reduce_range,
                    nodes_to_exclude=q.ptq.nodes_to_exclude)
            outputs["ptq"] = stage_dir / "ptq.onnx"
            metrics["ptq"] = info
        if q.qat.enabled:
            import torch

            observer = [torch.from_numpy(calib_x[i:i + 64]) for i in range(0, min(len(calib_x), 256), 64)]
            metrics["qat_format"] = {"activation_type": qat_activation, "per_channel": qat_per_channel}
            qmodel = qat.prepare_qat(float_model, example, per_channel=qat_per_channel,
                                     activation_dtype=qat_activation, observer_batches=observer)
            epochs = q.qat.train.epochs
            res = _fit(ctx, qmodel, float_model, q.qat.loss, q.qat.train, "quantize", "qat",
                       teacher_key=_file_key(_float_model_path(ctx)),
                       epoch_callback=qat.epoch_callback(epochs) if epochs > 0 else None)
            test_acc = _evaluate(ctx, qmodel, "test")
            out = stage_dir / "qat.pt"
            save_checkpoint(out, qmodel.cpu(), ckpt["spec"], pruning=ckpt.get("pruning"),
                            qat=qat.qat_state(qmodel), meta={"stage": "quantize", "test_accuracy": test_acc})
            outputs["qat"] = out
            metrics["qat"] = {"fit": res.to_json(), "val_accuracy": res.best_val_accuracy,
                              "test_accuracy_torch": test_acc}
        _cleanup_resume(stage_dir)
        parts = []
        if "ptq" in metrics and "search" in metrics["ptq"]:
            sr = metrics["ptq"]["search"]
            parts.append(f"PTQ {sr['chosen']} (fastest of {len(sr['candidates'])} measured"
                         + ("" if sr["met_budget"] else ", none met the accuracy budget") + ")")
        elif "ptq" in metrics:
            parts.append(f"PTQ {q.ptq.activation_type[0].upper()}8{q.ptq.weight_type[0].upper()}8")
        if "qat" in metrics:
            parts.append(f"QAT test {metrics['qat']['test_accuracy_torch']:.2%} (fake-quant, torch)")
        metrics["summary"] = ", ".join(parts)
        return outputs, metrics


def _search_ptq(ctx: RunContext, fp32: Path, stage_dir: Path, calib) -> dict[str, Any]:
    """Quantize in every candidate format, measure each here, copy the winner to ptq.onnx."""
    import shutil

    from compresskit.quantize.search import candidates_for_host, search_ptq

    s, b = ctx.cfg.quantize.ptq.search, ctx.cfg.budgets
    threads = b.latency_threads if b.latency_threads is not None else ctx.cfg.bench.threads[0]
    rank = s.rank_batch_size or b.latency_batch_size
    sizes = sorted(set(s.batch_sizes) | {rank})
    val_x, val_y = ctx.data.numpy_split("val")
    try:
        candidates = candidates_for_host(activation_types=s.activation_types, per_channel=s.per_channel,
                                         calibrate_methods=s.calibrate_methods)
        result = search_ptq(fp32, stage_dir / "candidates", calib, val_x, val_y, candidates=candidates,
                            max_accuracy_drop=s.max_accuracy_drop, batch_sizes=sizes, rank_batch_size=rank,
                            threads=threads, max_seconds=s.max_seconds, fallback=s.fallback,
                            max_excluded=s.max_excluded, nodes_to_exclude=ctx.cfg.quantize.ptq.nodes_to_exclude,
                            progress=ctx.log if not ctx.quiet else None)
    except ValueError as err:
        raise StageError(f"quantize.ptq.search: {err}") from None
    shutil.copyfile(result["chosen_path"], stage_dir / "ptq.onnx")
    winner = next(r for r in result["candidates"] if r["name"] == result["chosen"])
    result["winner_settings"] = winner["settings"]
    return {"search": result, "settings": winner["settings"]}


# ------------------------------------------------------------------ export

def _export_sources(ctx: RunContext) -> dict[str, Path]:
    """Name -> torch checkpoint of every model the run exports."""
    src = {"teacher": ctx.stage_dir("teacher") / "model.pt",
           "student": ctx.stage_dir("distill") / "model.pt"}
    if ctx.cfg.distill.baseline:
        src["student_baseline"] = ctx.stage_dir("distill") / "baseline.pt"
    if ctx.cfg.prune.enabled:
        src["pruned"] = ctx.stage_dir("prune") / "model.pt"
    if ctx.cfg.quantize.qat.enabled:
        src["qat"] = ctx.stage_dir("quantize") / "qat.pt"
    return src


class export:  # noqa: N801
    @staticmethod
    def plan(ctx: RunContext) -> Plan:
        inputs = dict(_export_sources(ctx))
        if ctx.cfg.quantize.ptq.enabled:
            inputs["ptq"] = ctx.stage_dir("quantize") / "ptq.onnx"
        conf = {"export": _dump(ctx.cfg.export)} | _data_key(ctx)
        return conf, inputs

    @staticmethod
    def run(ctx: RunContext) -> Result:
        import torch

        from compresskit import export as ex
        from compresskit.onnxinfo import write_metadata
        from compresskit.quantize import qat

        cfg = ctx.cfg.export
        stage_dir = ctx.stage_dir("export")
        for stale in [*stage_dir.glob("*.onnx"), *stage_dir.glob("*.ort")]:
            stale.unlink()  # models of disabled stages must not be benchmarked or deployed
        data = ctx.data
        meta = ex.preprocess_metadata(data.mean, data.std, channels=data.in_channels,
                                      size=list(data.image_size)) | ex.labels_metadata(data.class_names)
        x_np, _ = data.numpy_split("test", limit=cfg.parity_samples)
        x = torch.from_numpy(x_np)
        example = data.example_input(1)
        outputs: dict[str, Path] = {}
        parity: dict[str, Any] = {}
        float_models = {}
        for name, src in _export_sources(ctx).items():
            model, _ = _load(src)
            model.eval()
            path = stage_dir / f"{name}.onnx"
            if name == "qat":
                qat.export_qat_onnx(model, path, example, opset=cfg.opset, metadata=meta)
            else:
                ex.export_onnx(model, path, example, opset=cfg.opset, metadata=meta)
                float_models[name] = model
            parity[name] = ex.parity_check(model, path, x)
            if name != "qat" and parity[name]["max_abs_diff"] > cfg.max_abs_diff:
                raise StageError(f"export: {name}.onnx differs from PyTorch by "
                                 f"{parity[name]['max_abs_diff']:.2e} > export.max_abs_diff={cfg.max_abs_diff}")
            outputs[name] = path
        if ctx.cfg.quantize.ptq.enabled:
            path = stage_dir / "ptq.onnx"
            shutil.copyfile(ctx.stage_dir("quantize") / "ptq.onnx", path)
            write_metadata(path, meta)
            ref = float_models.get("pruned", float_models["student"])
            parity["ptq"] = ex.parity_check(ref, path, x)
            outputs["ptq"] = path
        if cfg.ort_format:
            for name in list(outputs):
                outputs[f"{name}_ort"] = ex.export_ort_format(outputs[name], stage_dir)
        worst = max((p["max_abs_diff"] for n, p in parity.items() if n in float_models), default=0.0)
        metrics = {"parity": parity, "summary": f"{len([o for o in outputs if not o.endswith('_ort')])} "
                   f"ONNX models, FP32 max |diff| {worst:.1e}"}
        return outputs, metrics


# ------------------------------------------------------------------ bench

MODEL_ORDER = ("teacher", "student_baseline", "student", "pruned", "ptq", "qat")


def _exported(ctx: RunContext) -> dict[str, Path]:
    """The ONNX models this config's export stage writes (never leftovers of other configs)."""
    names = set(_export_sources(ctx))
    if ctx.cfg.quantize.ptq.enabled:
        names.add("ptq")
    d = ctx.stage_dir("export")
    return {n: d / f"{n}.onnx" for n in MODEL_ORDER if n in names}


class bench:  # noqa: N801
    @staticmethod
    def plan(ctx: RunContext) -> Plan:
        conf = {"bench": _dump(ctx.cfg.bench)} | _data_key(ctx)
        return conf, _exported(ctx)

    @staticmethod
    def run(ctx: RunContext) -> Result:
        from compresskit.bench import bench_model

        cfg = ctx.cfg.bench
        x, y = ctx.data.numpy_split("test") if cfg.accuracy else (None, None)
        rows = {}
        for name, path in _exported(ctx).items():
            ctx.log(f"[bench] {name}")
            rows[name] = bench_model(path, batch_sizes=tuple(cfg.batch_sizes), threads=tuple(cfg.threads),
                                     warmup=cfg.warmup, min_runs=cfg.min_runs, max_seconds=cfg.max_seconds,
                                     target_rel_ci=cfg.target_rel_ci, x=x, y=y)
        metrics = {"models": rows, "summary": ", ".join(
            f"{n} {r['accuracy']:.2%}" if r.get("accuracy") is not None else n for n, r in rows.items())}
        return {}, metrics


# ------------------------------------------------------------------ report

STAGE_OF = {"teacher": "teacher", "student": "distill", "student_baseline": "distill",
            "pruned": "prune", "ptq": "quantize", "qat": "quantize"}


def _enabled_stages(ctx: RunContext) -> list[str]:
    stages = ["teacher", "distill"]
    if ctx.cfg.prune.enabled:
        stages.append("prune")
    if ctx.cfg.quantize.ptq.enabled or ctx.cfg.quantize.qat.enabled:
        stages.append("quantize")
    return stages + ["export", "bench"]


class report:  # noqa: N801
    @staticmethod
    def plan(ctx: RunContext) -> Plan:
        conf = {"config": ctx.cfg.model_dump(mode="json"), "report_dir": str(ctx.layout.report_dir)}
        inputs = {f"{s}_metrics": ctx.stage_dir(s) / "metrics.json" for s in _enabled_stages(ctx)}
        return conf, inputs

    @staticmethod
    def run(ctx: RunContext) -> Result:
        from compresskit import budget as bg
        from compresskit import report as rp
        from compresskit.artifacts import read_metrics
        from compresskit.envinfo import environment

        bench_m = read_metrics(ctx.stage_dir("bench")) or {}
        stage_metrics = {s: read_metrics(ctx.stage_dir(s)) or {} for s in _enabled_stages(ctx)}
        rows = []
        measured = bench_m.get("models", {})
        for name in sorted(measured, key=lambda n: MODEL_ORDER.index(n) if n in MODEL_ORDER else 99):
            row = measured[name]
            stage = STAGE_OF.get(name, name)
            row = dict(row)
            row.update(name=name, stage=stage, precision="int8" if name in ("ptq", "qat") else "fp32",
                       path=f"export/{name}.onnx", stage_wall_s=stage_metrics.get(stage, {}).get("wall_s"))
            rows.append(row)
        # INT8 models and the float model they were made from: where INT8 loses on this machine
        # the budgets, not a default, decide what ships
        names = {r["name"] for r in rows}
        candidates = [n for n in ("qat", "ptq") if n in names] + [n for n in ("pruned", "student") if n in names][:1]
        budgets = _dump(ctx.cfg.budgets)
        if budgets.get("latency_threads") is None:
            budgets["latency_threads"] = ctx.cfg.bench.threads[0]
        reference = budgets.pop("reference_model")
        if not any(r["name"] == reference for r in rows):
            reference = "student"
        verdict = bg.select_and_verdict(rows, candidates, budgets, reference_model=reference)
        stages = [{"name": o.name, "wall_s": o.wall_s, "cached": o.status == "cached",
                   "status": o.status, "summary": o.summary} for o in ctx.outcomes]
        rep = rp.build_report(run=ctx.cfg.name, config=ctx.cfg.model_dump(mode="json"), rows=rows,
                              verdict=verdict, environment=environment(), stages=stages,
                              evidence=_evidence(stage_metrics))
        json_path, md_path = rp.write_report(ctx.layout.report_dir, rep)
        outputs = {"report_json": json_path, "report_md": md_path}
        deployed = _write_deployed(ctx, rows, verdict)
        if deployed is not None:
            outputs["deployed"] = deployed
        metrics = {"verdict": verdict, "report_json": str(json_path), "report_md": str(md_path),
                   "deployed": str(deployed) if deployed else None,
                   "summary": f"{'PASS' if verdict['passed'] else 'FAIL'}: deploy {verdict.get('model')}",
                   "report": rep}
        return outputs, metrics


def _evidence(stage_metrics: dict[str, dict]) -> dict[str, Any]:
    """What the report shows beside the model table: the INT8 format search, pruning latency,
    and the training throughput of every training run."""
    out: dict[str, Any] = {}
    search = stage_metrics.get("quantize", {}).get("ptq", {}).get("search")
    if search:
        out["int8_search"] = {k: v for k, v in search.items() if k != "sensitivity"}
    if stage_metrics.get("prune", {}).get("latency"):
        out["pruning"] = stage_metrics["prune"]["latency"]
    training = []
    fits = [("teacher", "teacher", stage_metrics.get("teacher", {}).get("fit"))]
    for name in ("student", "baseline"):
        fits.append(("distill", name, stage_metrics.get("distill", {}).get(name, {}).get("fit")))
    fits += [("prune", "fine-tune", stage_metrics.get("prune", {}).get("fit")),
             ("quantize", "QAT", stage_metrics.get("quantize", {}).get("qat", {}).get("fit"))]
    for stage, what, fit in fits:
        if fit:
            cache = fit.get("teacher_cache")
            training.append({"stage": stage, "what": what, "images_per_s": fit.get("images_per_s"),
                             "wall_s": fit.get("wall_s"),
                             "teacher_cache": f"{cache['hits']}/{cache['misses']}" if cache else None})
    if training:
        out["training"] = training
    return out


def _write_deployed(ctx: RunContext, rows: list[dict], verdict: dict) -> Path | None:
    """Copy the chosen model to report/deployed.onnx with its measured figures in metadata_props,
    so the measurements travel with the model."""
    import json

    from compresskit.onnxinfo import write_metadata

    row = next((r for r in rows if r["name"] == verdict.get("model")), None)
    if row is None:
        return None
    figures = {"model": row["name"], "accuracy": row.get("accuracy"), "size_bytes": row.get("size_bytes"),
               "macs": row.get("macs"), "params": row.get("params"),
               "latency_p50_ms": {f"b{lat['batch_size']}_t{lat['threads']}": lat["p50_ms"]
                                  for lat in row.get("latency", [])},
               "budgets_passed": bool(verdict.get("passed")), "run": ctx.cfg.name}
    out = ctx.stage_dir("report") / "deployed.onnx"
    write_metadata(ctx.stage_dir("export") / f"{row['name']}.onnx",
                   {"compresskit.metrics": json.dumps(figures)}, out=out)
    return out
