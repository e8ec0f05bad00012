"""The report stage: rows from the bench stage's measurements, the budget verdict (the deployment
policy in `compresskit.budget`), report.json / report.md / report.html, and the chosen model copied to
``deployed.onnx`` with its measured figures in its metadata (the report names its path and sha256). No
torch."""

from __future__ import annotations

import json
from pathlib import Path

from compresskit.artifacts import read_metrics, sha256_file
from compresskit.budget import decide
from compresskit.report.document import build_report
from compresskit.report.html import write_html
from compresskit.report.render import write_report
from compresskit.report.rows import evidence, model_rows, stage_summary
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
                       "status": status, "summary": stage_summary(o.summary if o else "")})
    env = environment()
    load = (stage_metrics.get("bench") or {}).get("load")
    if load:  # other processes' CPU use while the bench stage timed (in cores; None off Linux)
        env["busy_fraction"] = load.get("busy_fraction")
        env["bench_load"] = dict(load)
    # the deployed file first, so the report can name it with its sha256
    row = next((r for r in rows if r["name"] == verdict.get("model")), None)
    deployed, deployed_info = None, None
    if row is not None and row["name"] in ctx.inputs:
        deployed = _write_deployed(ctx.dir / "deployed.onnx", ctx.inputs[row["name"]], row, verdict, job.run)
        deployed_info = {"model": row["name"], "path": str(deployed), "sha256": sha256_file(deployed),
                         "size_bytes": deployed.stat().st_size}
    rep = build_report(run=job.run, config=job.config, rows=rows, verdict=verdict, environment=env,
                       stages=stages, evidence=evidence(stage_metrics), reference_model="teacher")
    rep["deployed"] = deployed_info
    json_path, md_path = write_report(Path(job.report_dir), rep)
    html_path = write_html(Path(job.report_dir), rep)
    outputs = {"report_json": json_path, "report_md": md_path, "report_html": html_path}
    if deployed is not None:
        outputs["deployed"] = deployed
    metrics = {"verdict": verdict, "report_json": str(json_path), "report_md": str(md_path),
               "report_html": str(html_path), "deployed": str(deployed) if deployed else None,
               "deployed_sha256": deployed_info["sha256"] if deployed_info else None, "report": rep}
    sha = f" (sha256 {deployed_info['sha256'][:12]}...)" if deployed_info else ""
    return StageResult(outputs, metrics,
                       f"{'PASS' if verdict['passed'] else 'FAIL'}: deploy {verdict.get('model')}{sha}")
