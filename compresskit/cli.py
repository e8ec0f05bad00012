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
from compresskit.stages import STAGE_NAMES, STAGES

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
    show: Annotated[bool, typer.Option(help="Print the full validated config as JSON on stdout (the 'ok' line goes to stderr), e.g. validate --show > config.json.")] = False,
) -> None:
    """Validate a pipeline file (schema, data, checkpoints, module paths) without running it."""
    cfg = _load(pipeline, set_)
    from compresskit.preflight import preflight

    try:
        preflight(cfg)
    except ConfigError as err:
        _config_errors(err)
    if show:  # plain JSON, no console markup or wrapping: it is meant to be redirected
        sys.stdout.write(cfg.model_dump_json(indent=2) + "\n")
    (err_console if show else console).print(f"[green]ok[/green] {pipeline}: run '{cfg.name}'", highlight=False)


@app.command(epilog="Stages, in order: " + "; ".join(f"{s.name}: {s.help}" for s in STAGES) + ".")
def run(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML file.")],
    set_: SetOpt = None,
    force: Annotated[list[str] | None, typer.Option("--force", help=f"Re-run this stage even if up to date ({', '.join(STAGE_NAMES)}). Repeatable.")] = None,
    from_stage: Annotated[str | None, typer.Option("--from", help="Re-run this stage and every stage after it.")] = None,
    until: Annotated[str | None, typer.Option("--until", help="Stop after this stage.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    traceback: Annotated[bool, typer.Option("--traceback", help="Show the full Python traceback when a stage fails.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="If another run holds this run's folder, wait for it instead of exiting.")] = False,
) -> None:
    """Run the pipeline's stages in order (see --force for their names).

    Up-to-date stages are skipped; an interrupted run resumes. Exits 1 when a stage fails or the
    deployed model violates a budget, 2 on bad input (nothing written), 130 when interrupted.
    """
    cfg = _load(pipeline, set_)
    from compresskit.pipeline import RunLocked, StageError, run_pipeline
    from compresskit.stage import InputError

    try:
        outcomes, report = run_pipeline(cfg, force=set(force or ()), from_stage=from_stage, until=until,
                                        quiet=quiet, traceback=traceback, wait=wait,
                                        log=lambda m: console.print(m, highlight=False, markup=False))
    except ConfigError as err:
        _config_errors(err)
    except (InputError, RunLocked) as err:
        err_console.print(f"[red]error[/red] {'data: ' if type(err).__name__ == 'DataError' else ''}{err}", highlight=False)
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
def search(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML file; its `search:` section holds the space and settings (defaults when absent).")],
    set_: SetOpt = None,
    trials: Annotated[int | None, typer.Option("--trials", "-n", min=1, help="Trials in the study in all (default: search.n_trials); a resumed search or a worker runs only the missing ones.")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", min=0.0, help="Start no new trial after this many seconds (default: search.timeout_s); the finalists still train.")] = None,
    worker: Annotated[bool, typer.Option("--worker", help="Only run trials of the shared study (no finalists): extra processes for one search; the plain command trains the finalists.")] = False,
    storage: Annotated[str | None, typer.Option("--storage", help="Optuna storage URL (default: search.storage, else sqlite:///<models_dir>/<name>/search/study.db); PostgreSQL for workers on several machines.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars while the finalists train.")] = False,
) -> None:
    """Search the student under the budgets: latency first, short proxy trainings, then full
    training of the best; writes models/<run>/search/ (trials.json, trials.md, chosen.yaml).

    Exit codes: 0 a candidate meets every budget (or a worker finished); 1 none does (the best
    model found is kept and the failed budgets are named); 2 bad input; 130 interrupted (re-run
    the same command to resume).
    """
    cfg = _load(pipeline, set_)
    from compresskit.config import apply_overrides, load_raw
    from compresskit.search import run_search
    from compresskit.stage import InputError

    raw = apply_overrides(load_raw(pipeline), list(set_ or []))
    try:
        result = run_search(cfg, n_trials=trials, timeout_s=timeout, worker=worker, storage=storage, raw=raw,
                            quiet=quiet, log=lambda m: console.print(m, highlight=False, markup=False))
    except InputError as err:  # data, latency table, optuna missing
        err_console.print(f"[red]error[/red] {err}", highlight=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err_console.print("interrupted: finished trials are kept in the study; re-run the same command to resume")
        raise typer.Exit(130) from None
    table = Table(title=f"search {cfg.name}: {len(result.trials)} trials")
    for col in ("#", "family", "architecture", "recipe", "status", "p50 ms", "proxy val", "INT8 val", "note"):
        table.add_column(col)
    for r in result.table():
        table.add_row(str(r["#"]), r["family"] or "", r["architecture"] or "", r["recipe"] or "", r["status"] or "",
                      f"{r['p50 ms']:.3f}" if r["p50 ms"] is not None else "",
                      f"{r['proxy val']:.2%}" if r["proxy val"] is not None else "",
                      f"{r['INT8 val']:.2%}" if r["INT8 val"] is not None else "", r["note"][:60])
    console.print(table)
    console.print(f"records: {result.files['trials_md']}", highlight=False)
    if worker:
        return
    if result.chosen is not None:
        c = result.chosen
        console.print(f"[green]chosen[/green] trial {c.get('id', c['number'])}: {c['label']} + {c['recipe_label']}: INT8 val "
                      f"{c['int8_val_accuracy']:.2%}, test {c['int8_test_accuracy']:.2%}, p50 {c['p50_ms']:.3f} ms; "
                      f"re-run without search: compresskit run {result.files['chosen_yaml']}", highlight=False)
        return
    console.print("[red]no candidate meets the budgets[/red]: " + "; ".join(result.failed_budgets), highlight=False)
    if result.best is not None:
        console.print(f"best found kept: {result.files['best_onnx']} ({result.files['chosen_yaml']})", highlight=False)
    raise typer.Exit(1)


@app.command()
def bench(
    models: Annotated[list[Path], typer.Argument(help="ONNX model(s) (FP32 or INT8); several are timed together, in alternation, so their latencies compare.")],
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,64",
    threads: Annotated[str, typer.Option(help="Comma-separated intra-op thread counts (0: all cores).")] = "1",
    max_seconds: Annotated[float, typer.Option(help="Time budget per measurement (per model and setting).")] = 3.0,
    warmup: Annotated[int, typer.Option(help="Warm-up runs.")] = 10,
    target_rel_ci: Annotated[float | None, typer.Option(help="Stop a measurement early once the 95% confidence interval of the median is within +- this fraction of it (e.g. 0.01).")] = None,
    data: Annotated[Path | None, typer.Option(help=".npz with arrays x (N,C,H,W float32, preprocessed) and y (N,) for accuracy; checked against the model's recorded preprocessing (write one with `compresskit npz`).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here (one model: its result; several: {\"models\": {name: result}}).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines on stderr (warnings are still printed).")] = False,
    providers: Annotated[str, typer.Option(help="Comma-separated onnxruntime execution providers in priority order (e.g. XNNPACKExecutionProvider,CPUExecutionProvider); recorded in the results.")] = "CPUExecutionProvider",
) -> None:
    """Measure latency (and accuracy) of ONNX models with onnxruntime, and how close they run to the CPU's peak. Needs no torch.

    Prints one progress line per measurement on stderr, and a warning when other processes used
    more than 10% of a CPU core meanwhile (Linux) or when --data does not look preprocessed the
    way the model records.
    """
    from compresskit.bench import PREPROCESS_KEY, bench_models, busy_warning, check_preprocessed
    from compresskit.report import fmt_peak_fraction

    try:
        bs = tuple(int(b) for b in batch_sizes.split(","))
        th = tuple(int(t) for t in threads.split(","))
    except ValueError:
        err_console.print("error --batch-sizes/--threads: expected comma-separated integers")
        raise typer.Exit(2) from None
    for model in models:
        if not model.is_file():
            err_console.print(f"error {model}: file not found")
            raise typer.Exit(2)
    names: dict[str, Path] = {}
    for model in models:  # table and JSON names: the file stem, numbered when two share one
        name = model.stem if model.stem not in names else f"{model.stem}#{len(names) + 1}"
        names[name] = model
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
            x_raw, y = npz["x"], npz["y"]
        from compresskit.onnxutil import read_metadata

        warned = set()
        for name, model in names.items():
            try:
                recorded = read_metadata(model).get(PREPROCESS_KEY) if model.suffix != ".ort" else None
            except Exception:  # an unreadable model is reported by the measurement below
                recorded = None
            problem = check_preprocessed(x_raw, recorded)
            if problem and problem not in warned:
                warned.add(problem)
                err_console.print(f"[yellow]warning[/yellow] --data {data} ({name}): {problem}", highlight=False,
                                  soft_wrap=True)
        x = x_raw.astype("float32")

    def progress(msg: str) -> None:
        err_console.print(msg, highlight=False, markup=False, soft_wrap=True)

    try:
        results = bench_models(names, batch_sizes=bs, threads=th, warmup=warmup, max_seconds=max_seconds,
                               target_rel_ci=target_rel_ci, x=x, y=y, progress=None if quiet else progress,
                               providers=[p.strip() for p in providers.split(",") if p.strip()])
    except ValueError as err:
        err_console.print(f"error {err}")
        raise typer.Exit(2) from None
    for name, result in results.items():
        table = Table(title=str(names[name]))
        for col in ("batch", "threads", "p50 ms", "95% CI", "p90 ms", "p99 ms", "samples/s", "GMAC/s", "% of peak", "runs"):
            table.add_column(col, justify="right")
        for lat in result["latency"]:
            rel = lat.get("ci95_rel")
            table.add_row(str(lat["batch_size"]), str(lat["threads"]), f"{lat['p50_ms']:.3f}",
                          "-" if rel is None else f"±{rel:.1%}", f"{lat['p90_ms']:.3f}", f"{lat['p99_ms']:.3f}",
                          f"{lat['throughput']:.0f}", "-" if lat.get("gmacs") is None else f"{lat['gmacs']:.2f}",
                          fmt_peak_fraction(lat.get("peak_fraction")), f"{lat['runs']} ({lat.get('stopped_by', '-')})")
        console.print(table)
        params, macs = result.get("params"), result.get("macs")
        console.print(f"size {result['size_bytes'] / 1024:.1f} KiB, "
                      f"params {f'{params:,}' if params is not None else 'n/a'}, "
                      f"MACs {f'{macs / 1e6:.2f}M' if macs is not None else 'n/a'}, int8 {result.get('int8', 'n/a')}"
                      + (f", accuracy {result['accuracy']:.2%}" if result.get("accuracy") is not None else ""),
                      highlight=False)
    all_latency = [lat for result in results.values() for lat in result["latency"]]
    peaks = {(p["precision"], p["cores"], p["peak_gmacs"]): p for lat in all_latency if (p := lat.get("peak"))}
    if peaks:
        first = next(iter(peaks.values()))
        clock = "unknown" if first["clock_ghz"] is None else f"{first['clock_ghz']:.2f} GHz ({first['clock_source']})"
        console.print(f"{first['formula']}; clock {clock}; {first['precision']} assumes {first['isa'] or 'an unknown ISA'}",
                      highlight=False, soft_wrap=True)
        for p in peaks.values():
            console.print(f"  peak {p['precision']}, {p['cores']} core(s): {p['calculation'] or 'unknown'}",
                          highlight=False, soft_wrap=True)
    if len(results) > 1:
        console.print("Timed together: per batch size and thread count the models ran in alternation, so their "
                      "latencies compare.", highlight=False, soft_wrap=True)
    load = next(iter(results.values()))["load"]
    warning = busy_warning(load)
    if warning:
        err_console.print(f"[yellow]warning[/yellow] {warning}", highlight=False, soft_wrap=True)
    elif load.get("busy_fraction") is not None and not quiet:
        err_console.print(f"other processes used {load['busy_fraction']:.0%} of a CPU core while timing", highlight=False)
    if json_out:
        from compresskit.artifacts import atomic_write_json

        atomic_write_json(json_out, next(iter(results.values())) if len(results) == 1 else {"models": results})


@app.command("npz")
def npz_cmd(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML file (its data section is used).")],
    out: Annotated[Path, typer.Option("--out", "-o", help=".npz file to write.")],
    split: Annotated[str, typer.Option(help="Split: test, val, train or calib.")] = "test",
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many samples (default: the whole split).")] = None,
    set_: SetOpt = None,
) -> None:
    """Write a split as a preprocessed .npz (x: float32 NCHW normalised like the model's input, y: int64 labels) for `bench --data` and `bundle --samples-from`."""
    if split not in ("test", "val", "train", "calib"):
        err_console.print(f"error --split {split!r}: expected test, val, train or calib")
        raise typer.Exit(2)
    cfg = _load(pipeline, set_)
    from compresskit.data import DataError, write_eval_npz

    try:
        info = write_eval_npz(cfg.data, out, split=split, limit=limit, seed=cfg.seed)
    except DataError as err:
        err_console.print(f"[red]error[/red] data: {err}", highlight=False)
        raise typer.Exit(2) from None
    except OSError as err:
        err_console.print(f"error {out}: cannot write: {err}", highlight=False)
        raise typer.Exit(2) from None
    console.print(f"wrote {info['path']}: {info['n']} {split} samples, x {tuple(info['shape'])} float32 "
                  f"preprocessed as (pixel * {info['preprocess']['scale']:.6g} - mean {info['preprocess']['mean']}) "
                  f"/ std {info['preprocess']['std']}", highlight=False, soft_wrap=True)


@app.command()
def check(
    report: Annotated[Path, typer.Argument(help="report.json of a run (or its directory).")],
    budgets: Annotated[Path | None, typer.Option(help="YAML with a 'budgets:' section (or the budgets themselves) to check instead of the run's own.")] = None,
    min_accuracy: Annotated[float | None, typer.Option(help="Override: minimum accuracy (fraction).")] = None,
    max_accuracy_drop: Annotated[float | None, typer.Option(help="Override: maximum drop vs the reference model (fraction points).")] = None,
    max_latency_ms: Annotated[float | None, typer.Option(help="Override: maximum p50 latency (ms).")] = None,
    max_size_mb: Annotated[float | None, typer.Option(help="Override: maximum size (MiB).")] = None,
    baseline: Annotated[Path | None, typer.Option(help="report.json (or run directory) of a baseline run, e.g. the main branch's: compare accuracy, latency and size per model present in both and for the deployed model.")] = None,
    max_accuracy_drop_vs_baseline_pt: Annotated[float, typer.Option(min=0, help="With --baseline: fail when a model's accuracy is more than this many percentage points below the baseline's (0.5: 92.0% -> 91.5% passes).")] = 0.5,
    max_latency_increase_vs_baseline_pct: Annotated[float, typer.Option(min=0, help="With --baseline: fail when a latency is significantly higher (95% bootstrap CI of the ratio of medians above 1, from the timing samples in both reports) and by more than this percent; pass when the CI rules out more than this; otherwise inconclusive.")] = 5.0,
    max_size_increase_vs_baseline_pct: Annotated[float, typer.Option(min=0, help="With --baseline: fail when a model file grew by more than this percent.")] = 5.0,
    any_machine: Annotated[bool, typer.Option("--any-machine", help="With --baseline: judge latency even when the runs were timed on different CPUs or onnxruntime versions (otherwise those latency checks are inconclusive).")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 on inconclusive checks too.")] = False,
    junit: Annotated[Path | None, typer.Option("--junit", help="Write JUnit XML here: one testcase per model x check; failures as <failure>, inconclusive as <skipped>.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write every check as JSON here (schema compresskit.gate).")] = None,
    markdown: Annotated[Path | None, typer.Option("--markdown", help="Write a Markdown summary here (for $GITHUB_STEP_SUMMARY or a PR comment).")] = None,
    device_max_latency_ms: Annotated[float | None, typer.Option(help="Latency budget (ms) for the device rows merged with 'compresskit report --add-device' (the host's --max-latency-ms does not apply to them).")] = None,
) -> None:
    """Re-check a run's report against its budgets (or others) and, with --baseline, against a
    baseline run's report.

    Latency is judged on the timing samples both reports keep: pass, fail (a significant slow-down
    larger than the minimum effect) or inconclusive (too few samples, overlapping evidence, other
    machine).

    Device rows merged with 'compresskit report --add-device' are re-checked too.

    Exit codes: 0 every check passed (inconclusive allowed unless --strict); 1 a budget, baseline
    or device check failed; 2 bad input (missing or invalid report, budgets or options).
    """
    from compresskit.budget import decide, render_verdict, resolve_budgets
    from compresskit.config import BudgetConfig
    from compresskit.report import load_report

    def _load_report(where: Path, what: str) -> dict:
        path = where / "report.json" if where.is_dir() else where
        try:
            return load_report(path)
        except (FileNotFoundError, ValueError) as err:
            err_console.print(f"error {what}{path}: {err}")
            raise typer.Exit(2) from None

    rep = _load_report(report, "")
    base_rep = _load_report(baseline, "--baseline ") if baseline is not None else None
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
    try:
        verdict = decide(rep["rows"], bc, candidates)
    except ValueError as err:  # a report without the rows its verdict names
        err_console.print(f"error {report}: {err}")
        raise typer.Exit(2) from None
    console.print(render_verdict(verdict), highlight=False)
    devices_failed = _check_devices(rep, {"min_accuracy": min_accuracy, "max_accuracy_drop": max_accuracy_drop,
                                          "max_size_mb": max_size_mb}, device_max_latency_ms)
    from compresskit import gate
    from compresskit.artifacts import atomic_write_text

    limits = gate.GateLimits(max_accuracy_drop_pt=max_accuracy_drop_vs_baseline_pt,
                             max_latency_increase_pct=max_latency_increase_vs_baseline_pct,
                             max_size_increase_pct=max_size_increase_vs_baseline_pct,
                             any_machine=any_machine, strict=strict)
    result = gate.compare_runs(rep, base_rep, limits, budget_verdict=verdict)
    console.print(gate.render_text(result, suites=(gate.SUITE_BASELINE,)), highlight=False, markup=False, soft_wrap=True)
    for out, render in ((junit, gate.to_junit), (json_out, gate.to_json), (markdown, gate.to_markdown)):
        if out is not None:
            try:
                atomic_write_text(out, render(result))
            except OSError as err:
                err_console.print(f"error {out}: cannot write: {err}")
                raise typer.Exit(2) from None
    if result.exit_code or devices_failed:
        raise typer.Exit(result.exit_code or 1)


def _check_devices(rep: dict, overrides: dict, device_max_latency_ms: float | None) -> bool:
    """Re-check the deployed model on every device merged into the report; True if one fails."""
    if not any(r.get("device") for r in rep.get("rows", [])):
        return False
    from compresskit.report.device import recheck_devices

    verdicts = recheck_devices(rep, overrides, device_max_latency_ms)
    for name, v in verdicts.items():
        mark = "[green]PASS[/green]" if v["passed"] else "[red]FAIL[/red]"
        console.print(f"device {name}: {mark} {v['reason']}", highlight=False)
    return not all(v["passed"] for v in verdicts.values())


@methods_app.command("distill")
def methods_distill() -> None:
    """Print every distillation method (loss terms, then teacher schemes): name, then a short description."""
    from compresskit.distill.objective import methods

    listed = methods()
    width = max(len(name) for name, _ in listed)
    for name, desc in listed:
        console.print(f"{name:<{width}}  {desc}", highlight=False, soft_wrap=True)


def _run_report_paths(target: Path, report: Path | None) -> tuple[Path | None, Path]:
    """(run dir or None, report.json) for a models/<run> folder, a report folder or report.json."""
    from compresskit.bundle import BundleError, report_path_of

    if report is not None or (target / "report" / "metrics.json").is_file():
        try:
            return target, report_path_of(target, report)
        except BundleError as err:
            err_console.print(f"error {err}", highlight=False)
            raise typer.Exit(2) from None
    path = target / "report.json" if target.is_dir() else target
    if not path.is_file():
        err_console.print(f"error {target}: neither a run folder (models/<run> with report/metrics.json) "
                          "nor a report folder or report.json", highlight=False)
        raise typer.Exit(2)
    from compresskit.report.device import run_dir_of

    return run_dir_of(path), path


def _merge_and_print(report_json: Path, run_dir: Path | None, files: list[tuple[str | None, Path]],
                     max_latency_ms: float | None) -> None:
    from compresskit.report.device import DeviceResultError, add_devices, render_device_verdicts

    try:
        merged = add_devices(report_json, files, run_dir=run_dir,
                             budget_overrides={"max_latency_ms": max_latency_ms} if max_latency_ms else None)
    except (DeviceResultError, FileNotFoundError, ValueError) as err:
        err_console.print(f"error {err}", highlight=False)
        raise typer.Exit(2) from None
    console.print(render_device_verdicts(merged), highlight=False, markup=False, soft_wrap=True)
    console.print(f"report: {report_json.parent / 'report.md'}", highlight=False)
    if any(not v["passed"] for v in (merged.get("device_verdicts") or {}).values()):
        raise typer.Exit(1)


def _device_file(spec: str) -> tuple[str | None, Path]:
    """``result.json`` or ``NAME=result.json`` (NAME overrides the device's own name)."""
    name, sep, rest = spec.partition("=")
    if sep and not Path(spec).exists() and name and "/" not in name:
        return name, Path(rest)
    return None, Path(spec)


@app.command()
def bundle(
    run_dir: Annotated[Path, typer.Argument(help="The run's folder: models/<run>.")],
    target: Annotated[str, typer.Option(help="rpi | android | ios | x86 (android and ios add .ort files).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle folder to write (OUT.zip is written too).")],
    all_models: Annotated[bool, typer.Option("--all-models", help="Every export/*.onnx, not only the deployed model.")] = False,
    samples: Annotated[int, typer.Option(help="Evaluation samples from the test split (0: none).")] = 1000,
    samples_from: Annotated[Path | None, typer.Option(help=".npz with x (preprocessed float32 NCHW) and y: use these samples (needs no torch).")] = None,
    report: Annotated[Path | None, typer.Option(help="The run's report.json (default: from report/metrics.json).")] = None,
    force: Annotated[bool, typer.Option(help="Replace OUT even if it is not an earlier bundle.")] = False,
    ssh: Annotated[str | None, typer.Option(help="user@host: copy the bundle there, run bench.py, fetch and merge result.json.")] = None,
    ssh_port: Annotated[int | None, typer.Option(help="ssh port.")] = None,
    ssh_identity: Annotated[Path | None, typer.Option(help="ssh private key file.")] = None,
    ssh_option: Annotated[list[str] | None, typer.Option(help="Extra ssh/scp -o option, e.g. StrictHostKeyChecking=no. Repeatable.")] = None,
    remote_python: Annotated[str, typer.Option(help="Python on the host (e.g. ~/ck-venv/bin/python after the README's setup).")] = "python3",
    remote_dir: Annotated[str, typer.Option(help="Folder on the host that receives the bundle (relative to home).")] = "compresskit-bundles",
    bench_args: Annotated[str, typer.Option(help="Extra arguments for bench.py on the host, e.g. '--threads 1,0 --max-seconds 5'.")] = "",
    device_name: Annotated[str | None, typer.Option(help="Device name for the merged rows (default: bench.py's, e.g. rpi5).")] = None,
    max_latency_ms: Annotated[float | None, typer.Option(help="With --ssh: latency budget for the device verdict (default: the run's).")] = None,
) -> None:
    """Write a device bundle (model, .ort for phones, samples, runner bench.py, README); with --ssh also measure it there and merge the result into the report."""
    import shlex

    from compresskit.bundle import BundleError, describe_model, make_bundle, ssh_bench

    def log(msg: str) -> None:
        console.print(msg, highlight=False, markup=False, soft_wrap=True)

    try:
        manifest = make_bundle(run_dir, target, out, all_models=all_models, samples=samples, samples_from=samples_from,
                               report=report, force=force, log=log)
    except BundleError as err:
        err_console.print(f"error {err}", highlight=False)
        raise typer.Exit(2) from None
    for m in manifest["models"]:
        log(describe_model(m))
    if not ssh:
        return
    extra = shlex.split(bench_args) + (["--device-name", device_name] if device_name else [])
    try:
        result = ssh_bench(out, ssh, port=ssh_port, identity=ssh_identity, options=ssh_option or (),
                           remote_python=remote_python, remote_dir=remote_dir, bench_args=extra, log=log)
    except BundleError as err:
        err_console.print(f"error {err}", highlight=False)
        raise typer.Exit(1) from None
    _, report_json = _run_report_paths(run_dir, report)
    _merge_and_print(report_json, run_dir, [(device_name, result)], max_latency_ms)


@app.command("report")
def report_cmd(
    run: Annotated[Path, typer.Argument(help="models/<run> (its report is found from report/metrics.json), a report folder, or report.json.")],
    add_device: Annotated[list[str] | None, typer.Option("--add-device", help="A bench.py result.json (or NAME=result.json). Repeatable.")] = None,
    report: Annotated[Path | None, typer.Option(help="The run's report.json, if not found from RUN.")] = None,
    max_latency_ms: Annotated[float | None, typer.Option(help="Latency budget for the device verdicts (default: the run's); kept for later merges.")] = None,
) -> None:
    """Merge device results into the run's report (rows MODEL@DEVICE), re-render report.md and re-check the budgets at each device's measurements; exit 1 when a device fails them. Without --add-device, re-merges the stored results (after a re-run)."""
    run_dir, report_json = _run_report_paths(run, report)
    files = [_device_file(spec) for spec in add_device or []]
    _merge_and_print(report_json, run_dir, files, max_latency_ms)


# what `pip install 'compresskit[train]'` adds to the torch-free core
TRAIN_EXTRA = {"torch", "torchvision", "torch_pruning", "onnxscript"}


def main() -> None:
    """The `compresskit` command: any error that escapes a command is one line on stderr
    (type and message) with exit code 1; `--traceback` (or COMPRESSKIT_TRACEBACK=1) shows it whole."""
    import os

    try:
        app()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in TRAIN_EXTRA:
            raise
        err_console.print(f"[red]error[/red] this command needs {err.name}, which the light install leaves out: "
                          "pip install 'compresskit\\[train]'", highlight=False)
        sys.exit(2)
    except Exception as err:
        if "--traceback" in sys.argv or os.environ.get("COMPRESSKIT_TRACEBACK") == "1":
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        err_console.print(f"[red]error[/red] {type(err).__name__}: {first} (--traceback shows where)", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
