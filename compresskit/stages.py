"""The pipeline's stages, in order, and what each one's ``run`` receives. No torch here.

This is the one list: the runner's order, the run sub-directories, the CLI's ``--force``,
``--from`` and ``--until`` names and the report's stage rows all come from :data:`STAGES`.
Each entry is a :class:`compresskit.stage.Stage`; its ``select`` picks, from the validated
config, exactly the values the stage reads (its job), and its cache key is computed from that
job, so a value a stage does not receive cannot change its key and a value it does receive
always does. The work itself lives in ``compresskit.<name>.run``.
"""

from __future__ import annotations

from pathlib import Path

from compresskit.artifacts import RunLayout
from compresskit.config import (
    BenchConfig,
    DataConfig,
    DistillConfig,
    ExportConfig,
    PipelineConfig,
    PruneConfig,
    QuantizeConfig,
    SpecialistsConfig,
    TeacherConfig,
)
from compresskit.stage import Job, Stage

# ------------------------------------------------------------------ shared parts of jobs


class TrainingJob(Job):
    """Common to the stages that train: the data, the seed and the device."""

    data: DataConfig
    seed: int
    device: str


class TeacherUse(Job):
    """How the later stages combine the teacher stage's files into the teacher they learn from."""

    members: int = 0
    specialists: SpecialistsConfig | None = None


class LatencySetting(Job):
    """Where a stage that chooses by speed measures: the latency budget's batch size and thread
    count, with the bench section's timing protocol."""

    batch_size: int
    threads: int
    warmup: int
    min_runs: int
    max_seconds: float


def latency_threads(cfg: PipelineConfig) -> int:
    """The thread count the latency budget (and every choice by speed) applies to."""
    b = cfg.budgets
    return b.latency_threads if b.latency_threads is not None else cfg.bench.threads[0]


def _latency(cfg: PipelineConfig) -> LatencySetting:
    return LatencySetting(batch_size=cfg.budgets.latency_batch_size, threads=latency_threads(cfg),
                          warmup=cfg.bench.warmup, min_runs=cfg.bench.min_runs, max_seconds=cfg.bench.max_seconds)


def _teacher_use(cfg: PipelineConfig) -> TeacherUse:
    t = cfg.teacher
    return TeacherUse(members=len(t.ensemble), specialists=t.specialists if t.specialists.enabled else None)


def _training(cfg: PipelineConfig) -> dict:
    return {"data": cfg.data, "seed": cfg.seed, "device": cfg.device}


# ------------------------------------------------------------------ artifact paths


def teacher_files(use: TeacherUse, d: Path) -> dict[str, Path]:
    """Every file in the teacher stage's directory `d` that the combined teacher is built from."""
    files = {"teacher": d / "model.pt"}
    files |= {f"teacher_member_{i + 1}": d / f"member_{i + 1}.pt" for i in range(use.members)}
    if use.specialists is not None:
        files |= {f"teacher_specialist_{i + 1}": d / f"specialist_{i + 1}.pt" for i in range(use.specialists.count)}
        files["teacher_specialists"] = d / "specialists.json"
    return files


def student_file(cfg: PipelineConfig, layout: RunLayout) -> Path:
    """The float model the compression stages start from: the distilled student, or the teacher
    model itself when distillation is off."""
    if cfg.distill.enabled:
        return layout.stage_dir("distill") / "model.pt"
    return layout.stage_dir("teacher") / "model.pt"


def float_file(cfg: PipelineConfig, layout: RunLayout) -> Path:
    """The model the quantize stage starts from: pruned if pruning ran, else the student."""
    return layout.stage_dir("prune") / "model.pt" if cfg.prune.enabled else student_file(cfg, layout)


def export_sources(cfg: PipelineConfig, layout: RunLayout) -> dict[str, Path]:
    """Name -> torch checkpoint of every model the run exports, in report order."""
    src = {"teacher": layout.stage_dir("teacher") / "model.pt"}
    if cfg.distill.enabled:
        if cfg.distill.baseline:
            src["student_baseline"] = layout.stage_dir("distill") / "baseline.pt"
        src["student"] = layout.stage_dir("distill") / "model.pt"
    if cfg.prune.enabled:
        src["pruned"] = layout.stage_dir("prune") / "model.pt"
    if cfg.quantize.qat.enabled:
        src["qat"] = layout.stage_dir("quantize") / "qat.pt"
    return src


def exported_models(cfg: PipelineConfig, layout: RunLayout) -> dict[str, Path]:
    """The ONNX models this config's export stage writes (never leftovers of other configs)."""
    names = list(export_sources(cfg, layout))
    if cfg.quantize.ptq.enabled:
        names.insert(names.index("qat") if "qat" in names else len(names), "ptq")
    return {n: layout.stage_dir("export") / f"{n}.onnx" for n in names}


# ------------------------------------------------------------------ jobs and declarations


class TeacherJob(TrainingJob):
    teacher: TeacherConfig


def _select_teacher(cfg: PipelineConfig) -> TeacherJob:
    return TeacherJob(teacher=cfg.teacher, **_training(cfg))


def _teacher_inputs(cfg: PipelineConfig, layout: RunLayout) -> dict[str, Path]:
    inputs = {"checkpoint": Path(cfg.teacher.checkpoint)} if cfg.teacher.checkpoint else {}
    for i, member in enumerate(cfg.teacher.ensemble):
        if member.checkpoint:
            inputs[f"member_{i + 1}_checkpoint"] = Path(member.checkpoint)
    return inputs


class DistillJob(TrainingJob):
    distill: DistillConfig
    teacher: TeacherUse


def _select_distill(cfg: PipelineConfig) -> DistillJob | None:
    if not cfg.distill.enabled:
        return None
    return DistillJob(distill=cfg.distill, teacher=_teacher_use(cfg), **_training(cfg))


class PruneJob(TrainingJob):
    prune: PruneConfig
    teacher: TeacherUse
    latency: LatencySetting


def _select_prune(cfg: PipelineConfig) -> PruneJob | None:
    if not cfg.prune.enabled:
        return None
    return PruneJob(prune=cfg.prune, teacher=_teacher_use(cfg), latency=_latency(cfg), **_training(cfg))


def _prune_measures(job: PruneJob) -> int | None:
    return job.latency.threads if job.prune.pruner.method == "structured" else None


class QuantizeJob(TrainingJob):
    quantize: QuantizeConfig
    opset: int
    latency: LatencySetting


def _select_quantize(cfg: PipelineConfig) -> QuantizeJob | None:
    q = cfg.quantize
    if not (q.ptq.enabled or q.qat.enabled):
        return None
    return QuantizeJob(quantize=q, opset=cfg.export.opset, latency=_latency(cfg), **_training(cfg))


def _quantize_measures(job: QuantizeJob) -> int | None:
    ptq = job.quantize.ptq
    return job.latency.threads if ptq.enabled and ptq.search.enabled else None


class ExportJob(Job):
    export: ExportConfig
    data: DataConfig
    seed: int


def _select_export(cfg: PipelineConfig) -> ExportJob:
    return ExportJob(export=cfg.export, data=cfg.data, seed=cfg.seed)


def _export_inputs(cfg: PipelineConfig, layout: RunLayout) -> dict[str, Path]:
    """The checkpoints to export, and the PTQ model to check and copy."""
    inputs = export_sources(cfg, layout)
    if cfg.quantize.ptq.enabled:
        inputs["ptq"] = layout.stage_dir("quantize") / "ptq.onnx"
    return inputs


class BenchJob(Job):
    bench: BenchConfig
    data: DataConfig
    seed: int


def _select_bench(cfg: PipelineConfig) -> BenchJob:
    return BenchJob(bench=cfg.bench, data=cfg.data, seed=cfg.seed)


class ReportJob(Job):
    run: str
    config: dict
    budgets: dict
    report_dir: str


def _select_report(cfg: PipelineConfig) -> ReportJob:
    from compresskit.budget import resolve_budgets

    return ReportJob(run=cfg.name, config=cfg.model_dump(mode="json"),
                     budgets=resolve_budgets(cfg.budgets.model_dump(mode="json"), cfg.bench.threads),
                     report_dir=str(Path(cfg.reports_dir) / cfg.name))


def _report_inputs(cfg: PipelineConfig, layout: RunLayout) -> dict[str, Path]:
    """Every enabled stage's metrics, and the exported models (the chosen one is copied)."""
    inputs = {f"{s.name}_metrics": layout.stage_dir(s.name) / "metrics.json"
              for s in STAGES if s.name != "report" and s.select(cfg) is not None}
    return inputs | exported_models(cfg, layout)


def _distill_inputs(cfg: PipelineConfig, layout: RunLayout) -> dict[str, Path]:
    return teacher_files(_teacher_use(cfg), layout.stage_dir("teacher"))


def _prune_inputs(cfg: PipelineConfig, layout: RunLayout) -> dict[str, Path]:
    return {"student": student_file(cfg, layout)} | teacher_files(_teacher_use(cfg), layout.stage_dir("teacher"))


def _quantize_inputs(cfg: PipelineConfig, layout: RunLayout) -> dict[str, Path]:
    return {"float": float_file(cfg, layout)}


STAGES: tuple[Stage, ...] = (
    Stage("teacher", "train or load the teacher (and its ensemble members or specialists)",
          select=_select_teacher, inputs=_teacher_inputs),
    Stage("distill", "train the student from the teacher (knowledge distillation)",
          select=_select_distill, inputs=_distill_inputs),
    Stage("prune", "shrink the student (structured or magnitude pruning), then fine-tune",
          select=_select_prune, inputs=_prune_inputs, measures=_prune_measures),
    Stage("quantize", "INT8: post-training quantization (format chosen by measuring) and QAT",
          select=_select_quantize, inputs=_quantize_inputs, measures=_quantize_measures),
    Stage("export", "ONNX export of every model, checked against PyTorch",
          select=_select_export, inputs=_export_inputs),
    Stage("bench", "latency and accuracy of every exported model with onnxruntime",
          select=_select_bench, inputs=exported_models, measures=lambda job: list(job.bench.threads)),
    Stage("report", "report tables, budget verdict and the deployed model",
          select=_select_report, inputs=_report_inputs),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
