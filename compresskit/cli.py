"""Command line: thin commands that parse, call one function and print.

Exit codes: 0 success; 1 a stage failed or a budget was violated; 2 bad input (config, file,
arguments), in which case nothing is written.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from compresskit.config import ConfigError
from compresskit.stages import STAGE_NAMES

app = typer.Typer(help="Distill, prune, quantize and export vision models to fast INT8 ONNX, "
                       "with measurements and CI budgets.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
methods_app = typer.Typer(help="List the available methods of a stage.", no_args_is_help=True)
app.add_typer(methods_app, name="methods")
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, soft_wrap=True)

SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a config value: key.path=value (YAML value). Repeatable.")]


def _config_errors(err: ConfigError) -> None:
    for loc, msg in err.problems:
        err_console.print(f"[red]error[/red] {loc}: {msg}", highlight=False)
    raise typer.Exit(2)


def _load(path: Path, overrides: list[str] | None):
    from compresskit.config import load_config

    try:
        return load_config(path, overrides or [])
    except ConfigError as err:
        _config_errors(err)


@app.command()
def validate(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML file.")],
    set_: SetOpt = None,
    show: Annotated[bool, typer.Option(help="Print the full validated config as JSON.")] = False,
) -> None:
    """Validate a pipeline file (schema, data, checkpoints, module paths) without running it."""
    cfg = _load(pipeline, set_)
    from compresskit.preflight import preflight

    try:
        preflight(cfg)
    except ConfigError as err:
        _config_errors(err)
    if show:
        console.print_json(cfg.model_dump_json())
    console.print(f"[green]ok[/green] {pipeline}: run '{cfg.name}'", highlight=False)


@app.command()
def run(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML file.")],
    set_: SetOpt = None,
    force: Annotated[list[str] | None, typer.Option("--force", help=f"Re-run this stage even if up to date ({', '.join(STAGE_NAMES)}). Repeatable.")] = None,
    from_stage: Annotated[str | None, typer.Option("--from", help="Re-run this stage and every stage after it.")] = None,
    until: Annotated[str | None, typer.Option("--until", help="Stop after this stage.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    traceback: Annotated[bool, typer.Option("--traceback", help="Show the full Python traceback when a stage fails.")] = False,
) -> None:
    """Run the pipeline's stages in order (see --force for their names).

    Up-to-date stages are skipped; an interrupted run resumes. Exits 1 when the deployed model
    violates a budget, 2 on bad input.
    """
    cfg = _load(pipeline, set_)
    from compresskit.data import DataError
    from compresskit.pipeline import StageError, run_pipeline

    try:
        outcomes, report = run_pipeline(cfg, force=set(force or ()), from_stage=from_stage, until=until,
                                        quiet=quiet, traceback=traceback, log=lambda m: console.print(m, highlight=False, markup=False))
    except ConfigError as err:
        _config_errors(err)
    except DataError as err:
        err_console.print(f"[red]error[/red] data: {err}", highlight=False)
        raise typer.Exit(2) from None
    except (StageError, FileNotFoundError, FloatingPointError) as err:
        err_console.print(f"[red]error[/red] {err}", highlight=False)
        err_console.print("earlier stages' artifacts are kept; fix the cause and re-run", highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print("interrupted: completed stages and epochs are kept; re-run to resume")
        raise typer.Exit(130) from None
    table = Table(title=f"run {cfg.name}")
    for col in ("stage", "status", "wall s", "summary"):
        table.add_column(col)
    for o in outcomes:
        table.add_row(o.name, o.status, f"{o.wall_s:.1f}", o.summary)
    console.print(table)
    if report is not None:
        from compresskit.report import render_console_table

        console.print(render_console_table(report))
        verdict = report["verdict"]
        color = "green" if verdict["passed"] else "red"
        console.print(f"[{color}]verdict: {'PASS' if verdict['passed'] else 'FAIL'}[/{color}] "
                      f"deploy {verdict.get('model')}: {verdict.get('reason', '')}", highlight=False)
        console.print(f"report: {Path(cfg.reports_dir) / cfg.name / 'report.md'}", highlight=False)
        if not verdict["passed"]:
            raise typer.Exit(1)


@app.command()
def bench(
    model: Annotated[Path, typer.Argument(help="ONNX model (FP32 or INT8).")],
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,64",
    threads: Annotated[str, typer.Option(help="Comma-separated intra-op thread counts (0: all cores).")] = "1",
    max_seconds: Annotated[float, typer.Option(help="Time budget per measurement.")] = 3.0,
    warmup: Annotated[int, typer.Option(help="Warm-up runs.")] = 10,
    target_rel_ci: Annotated[float | None, typer.Option(help="Stop a measurement early once the 95% confidence interval of the median is within +- this fraction of it (e.g. 0.01).")] = None,
    data: Annotated[Path | None, typer.Option(help=".npz with arrays x (N,C,H,W float32, preprocessed) and y (N,) for accuracy.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
) -> None:
    """Measure latency (and accuracy) of any ONNX model with onnxruntime, and how close it runs to the CPU's peak. Needs no torch."""
    from compresskit.bench import bench_model
    from compresskit.report import fmt_peak_fraction

    try:
        bs = tuple(int(b) for b in batch_sizes.split(","))
        th = tuple(int(t) for t in threads.split(","))
    except ValueError:
        err_console.print("error --batch-sizes/--threads: expected comma-separated integers")
        raise typer.Exit(2) from None
    if not model.is_file():
        err_console.print(f"error {model}: file not found")
        raise typer.Exit(2)
    x = y = None
    if data is not None:
        import numpy as np

        if not data.is_file():
            err_console.print(f"error --data {data}: file not found")
            raise typer.Exit(2)
        with np.load(data) as npz:
            if "x" not in npz or "y" not in npz:
                err_console.print(f"error --data {data}: needs arrays 'x' and 'y'")
                raise typer.Exit(2)
            x, y = npz["x"].astype("float32"), npz["y"]
    try:
        result = bench_model(model, batch_sizes=bs, threads=th, warmup=warmup, max_seconds=max_seconds,
                             target_rel_ci=target_rel_ci, x=x, y=y)
    except ValueError as err:
        err_console.print(f"error {err}")
        raise typer.Exit(2) from None
    table = Table(title=str(model))
    for col in ("batch", "threads", "p50 ms", "95% CI", "p90 ms", "p99 ms", "samples/s", "GMAC/s", "% of peak", "runs"):
        table.add_column(col, justify="right")
    for lat in result["latency"]:
        rel = lat.get("ci95_rel")
        table.add_row(str(lat["batch_size"]), str(lat["threads"]), f"{lat['p50_ms']:.3f}",
                      "-" if rel is None else f"±{rel:.1%}", f"{lat['p90_ms']:.3f}", f"{lat['p99_ms']:.3f}",
                      f"{lat['throughput']:.0f}", "-" if lat.get("gmacs") is None else f"{lat['gmacs']:.2f}",
                      fmt_peak_fraction(lat.get("peak_fraction")), f"{lat['runs']} ({lat.get('stopped_by', '-')})")
    console.print(table)
    peaks = {(p["cores"], p["peak_gmacs"]): p for lat in result["latency"] if (p := lat.get("peak"))}
    if peaks:
        first = next(iter(peaks.values()))
        clock = "unknown" if first["clock_ghz"] is None else f"{first['clock_ghz']:.2f} GHz ({first['clock_source']})"
        console.print(f"{first['formula']}; clock {clock}; {first['precision']} assumes {first['isa'] or 'an unknown ISA'}",
                      highlight=False, soft_wrap=True)
        for p in peaks.values():
            console.print(f"  peak {p['precision']}, {p['cores']} core(s): {p['calculation'] or 'unknown'}",
                          highlight=False, soft_wrap=True)
    params, macs = result.get("params"), result.get("macs")
    console.print(f"size {result['size_bytes'] / 1024:.1f} KiB, "
                  f"params {f'{params:,}' if params is not None else 'n/a'}, "
                  f"MACs {f'{macs / 1e6:.2f}M' if macs is not None else 'n/a'}, int8 {result.get('int8', 'n/a')}"
                  + (f", accuracy {result['accuracy']:.2%}" if result.get("accuracy") is not None else ""),
                  highlight=False)
    if json_out:
        from compresskit.artifacts import atomic_write_json

        atomic_write_json(json_out, result)


@app.command()
def check(
    report: Annotated[Path, typer.Argument(help="report.json of a run (or its directory).")],
    budgets: Annotated[Path | None, typer.Option(help="YAML with a 'budgets:' section (or the budgets themselves) to check instead of the run's own.")] = None,
    min_accuracy: Annotated[float | None, typer.Option(help="Override: minimum accuracy (fraction).")] = None,
    max_accuracy_drop: Annotated[float | None, typer.Option(help="Override: maximum drop vs the reference model (fraction points).")] = None,
    max_latency_ms: Annotated[float | None, typer.Option(help="Override: maximum p50 latency (ms).")] = None,
    max_size_mb: Annotated[float | None, typer.Option(help="Override: maximum size (MiB).")] = None,
) -> None:
    """Re-check a run's report against its budgets (or others); exit 1 on a violation."""
    from compresskit.budget import decide, render_verdict, resolve_budgets
    from compresskit.config import BudgetConfig
    from compresskit.report import load_report

    path = report / "report.json" if report.is_dir() else report
    try:
        rep = load_report(path)
    except (FileNotFoundError, ValueError) as err:
        err_console.print(f"error {path}: {err}")
        raise typer.Exit(2) from None
    b = dict(rep["config"].get("budgets", {}))
    if budgets is not None:
        from compresskit.config import load_raw

        try:
            raw = load_raw(budgets)
        except ConfigError as err:
            _config_errors(err)
        b = raw.get("budgets", raw) if isinstance(raw, dict) else raw
        if not isinstance(b, dict):
            err_console.print(f"error {budgets}: expected a mapping of budgets (or a 'budgets:' section)")
            raise typer.Exit(2)
    for key, val in (("min_accuracy", min_accuracy), ("max_accuracy_drop", max_accuracy_drop),
                     ("max_latency_ms", max_latency_ms), ("max_size_mb", max_size_mb)):
        if val is not None:
            b[key] = val
    try:
        bc = BudgetConfig.model_validate(b).model_dump(mode="json")
    except Exception as err:  # pydantic ValidationError: print per-field problems
        from pydantic import ValidationError

        if not isinstance(err, ValidationError):
            raise
        for e in err.errors(include_url=False):
            err_console.print(f"error budgets.{'.'.join(map(str, e['loc']))}: {e['msg']}")
        raise typer.Exit(2) from None
    bc = resolve_budgets(bc, rep["config"].get("bench", {}).get("threads", [1]))
    candidates = rep["verdict"].get("candidates") or [c["model"] for c in rep["verdict"].get("checks", [])]
    verdict = decide(rep["rows"], bc, candidates)
    console.print(render_verdict(verdict), highlight=False)
    if not verdict["passed"]:
        raise typer.Exit(1)


@methods_app.command("distill")
def methods_distill() -> None:
    """Print every distillation method (loss terms, then teacher schemes): name, then a short description."""
    from compresskit.distill.objective import methods

    listed = methods()
    width = max(len(name) for name, _ in listed)
    for name, desc in listed:
        console.print(f"{name:<{width}}  {desc}", highlight=False, soft_wrap=True)


if __name__ == "__main__":
    sys.exit(app())
