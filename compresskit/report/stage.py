"""The report stage: rows from the bench stage's measurements, the budget verdict (the deployment
policy in `compresskit.budget`), report.json / report.md, and the chosen model copied to
``deployed.onnx`` with its measured figures in its metadata. No torch."""

from __future__ import annotations

import json
from pathlib import Path

from compresskit.artifacts import read_metrics
from compresskit.budget import decide
from compresskit.report.document import build_report
from compresskit.report.render import write_report
from compresskit.report.rows import evidence, model_rows
from compresskit.stage import StageContext, StageResult
from compresskit.stages import STAGES, ReportJob


def _write_deployed(out: Path, source: Path, row: dict, verdict: dict, run_name: str) -> Path:
    """Copy the chosen model with its measured figures in metadata_props, so the measurements
    travel with the model."""
    from compresskit.onnxutil import write_metadata

    figures = {"model": row["name"], "accuracy": row.get("accuracy"), "size_bytes": row.get("size_bytes"),
               "macs": row.get("macs"), "params": row.get("params"),
               "latency_p50_ms": {f"b{lat['batch_size']}_t{lat['threads']}": lat["p50_ms"]
                                  for lat in row.get("latency", [])},
               "budgets_passed": bool(verdict.get("passed")), "run": run_name}
    return write_metadata(source, {"compresskit.metrics": json.dumps(figures)}, out=out)


def run(ctx: StageContext, job: ReportJob) -> StageResult:
    from compresskit.envinfo import environment

    stage_metrics = {k.removesuffix("_metrics"): read_metrics(Path(p).parent) or {}
                     for k, p in ctx.inputs.items() if k.endswith("_metrics")}
    rows = model_rows((stage_metrics.get("bench") or {}).get("models", {}), stage_metrics)
    verdict = decide(rows, job.budgets)
    # one row per stage of the pipeline, whether it ran, was up to date or is disabled
    seen = {o.name: o for o in ctx.history}
    stages = []
    for stage in STAGES:
        if stage.name == "report":
            continue
        o = seen.get(stage.name)
        status = o.status if o else ("cached" if stage.name in stage_metrics else "not run")
        stages.append({"name": stage.name, "wall_s": o.wall_s if o else 0.0, "cached": status == "cached",
                       "status": status, "summary": o.summary if o else ""})
    rep = build_report(run=job.run, config=job.config, rows=rows, verdict=verdict, environment=environment(),
                       stages=stages, evidence=evidence(stage_metrics), reference_model="teacher")
    json_path, md_path = write_report(Path(job.report_dir), rep)
    outputs = {"report_json": json_path, "report_md": md_path}
    row = next((r for r in rows if r["name"] == verdict.get("model")), None)
    deployed = None
    if row is not None and row["name"] in ctx.inputs:
        deployed = _write_deployed(ctx.dir / "deployed.onnx", ctx.inputs[row["name"]], row, verdict, job.run)
        outputs["deployed"] = deployed
    metrics = {"verdict": verdict, "report_json": str(json_path), "report_md": str(md_path),
               "deployed": str(deployed) if deployed else None, "report": rep}
    return StageResult(outputs, metrics, f"{'PASS' if verdict['passed'] else 'FAIL'}: deploy {verdict.get('model')}")
