"""The run report for people: Markdown (``report.md``) and the console table, rendered from the
report document alone. No torch and no onnxruntime needed: reports can be rendered anywhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from rich.table import Table
from rich.text import Text

from compresskit.artifacts import atomic_write_json, atomic_write_text
from compresskit.budget import MIB, find_latency, format_budget_value, verdict_rows

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


# --------------------------------------------------------------------------- formatting


def fmt_size(size_bytes: float | None) -> str:
    if size_bytes is None:
        return "-"
    if size_bytes < MIB:
        return f"{size_bytes / 1024:.1f} KiB"
    return f"{size_bytes / MIB:.2f} MiB"


def fmt_count(n: float | None, unit: str = "") -> str:
    """Counts as k/M/G with three significant-ish digits (params, MACs)."""
    if n is None:
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _params_cell(row: Mapping) -> str:
    params, nonzero = row.get("params"), row.get("nonzero_params")
    text = fmt_count(params)
    if params and nonzero is not None and nonzero < 0.995 * params:
        text += f" ({nonzero / params:.0%} nz)"
    return text


def table_setting(report: Mapping) -> tuple[int | None, int | None]:
    """(threads, larger batch) shown in the summary tables: the first thread count measured
    and the largest batch size above 1, if any."""
    entries = [e for row in report.get("rows", []) for e in row.get("latency") or []]
    threads = entries[0].get("threads") if entries else None
    big = max((e["batch_size"] for e in entries if e["batch_size"] > 1), default=None)
    return threads, big


def model_table(report: Mapping) -> tuple[list[str], list[list[str]]]:
    """Header and string cells of the per-model summary, shared by Markdown and the console."""
    threads, big = table_setting(report)
    ref = report.get("reference_model") or "reference"
    header = ["model", "precision", "accuracy", f"Δ vs {ref}", "p50 b1 (ms)"]
    if big:
        header.append(f"p50 b{big} (ms)")
    header.append("speed-up b1")
    if big:
        header.append(f"speed-up b{big}")
    header += ["size", "MACs", "params", "wall"]
    deployed = (report.get("verdict") or {}).get("model")
    body = []
    for row in report.get("rows", []):
        b1 = find_latency(row, 1, threads)
        bb = find_latency(row, big, threads) if big else None
        acc = row.get("accuracy")
        name = str(row["name"]) + (" *" if row["name"] == deployed else "")
        cells = [
            name,
            str(row.get("precision") or "-"),
            _fmt(acc * 100 if acc is not None else None, ".2f", "%"),
            _fmt(row.get("delta_accuracy_vs_teacher"), "+.2f", " pt"),
            _fmt(b1 and b1["p50_ms"], ".3f"),
        ]
        if big:
            cells.append(_fmt(bb and bb["p50_ms"], ".3f"))
        cells.append(_fmt(b1 and b1.get("speedup_vs_teacher"), ".2f", "x"))
        if big:
            cells.append(_fmt(bb and bb.get("speedup_vs_teacher"), ".2f", "x"))
        cells += [
            fmt_size(row.get("size_bytes")),
            fmt_count(row.get("macs")),
            _params_cell(row),
            fmt_seconds(row.get("stage_wall_s")),
        ]
        body.append(cells)
    return header, body


def _md_cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return lines


def _verdict_line(verdict: Mapping, markdown: bool = True) -> str:
    if not verdict:
        return "Verdict: none"
    passed = bool(verdict.get("passed"))
    head = "PASS" if passed else "FAIL"
    role = "deploy" if passed else "best candidate"
    model, reason = verdict.get("model"), verdict.get("reason", "")
    if markdown:
        return f"**Verdict: {head}**, {role} `{model}`: {_md_cell(reason)}"
    return f"Verdict: {head}, {role} {model!r}: {reason}"


# --------------------------------------------------------------------------- Markdown


def _md_models(report: Mapping) -> list[str]:
    threads, _ = table_setting(report)
    header, body = model_table(report)
    lines = ["## Models", ""]
    lines += _md_table(header, body)
    lines += [
        "",
        f"Latency: median (p50) of timed onnxruntime runs, {threads or '-'} thread(s). "
        "Speed-up > 1 is faster than the reference. `*` marks the deployed model.",
    ]
    notes = [(r["name"], r["notes"]) for r in report.get("rows", []) if r.get("notes")]
    if notes:
        lines += ["", "Notes:", ""] + [f"- `{name}`: {_md_cell(note)}" for name, note in notes]
    return lines


def fmt_peak_fraction(fraction: float | None) -> str:
    """A fraction of the theoretical peak as a percentage; small ones keep two decimals."""
    if fraction is None:
        return "-"
    return f"{fraction * 100:.2f}%" if fraction < 0.1 else f"{fraction * 100:.1f}%"


def _md_latency(report: Mapping) -> list[str]:
    header = [
        "model",
        "batch",
        "threads",
        "p50 ms",
        "p90 ms",
        "mean ms",
        "samples/s",
        "speed-up",
        "GMAC/s",
        "% of peak",
    ]
    body = []
    for row in report.get("rows", []):
        for e in row.get("latency") or []:
            body.append(
                [
                    row["name"],
                    e["batch_size"],
                    e.get("threads", "-"),
                    _fmt(e.get("p50_ms"), ".3f"),
                    _fmt(e.get("p90_ms"), ".3f"),
                    _fmt(e.get("mean_ms"), ".3f"),
                    _fmt(e.get("throughput"), ".1f"),
                    _fmt(e.get("speedup_vs_teacher"), ".2f", "x"),
                    _fmt(e.get("gmacs"), ".2f"),
                    fmt_peak_fraction(e.get("peak_fraction")),
                ]
            )
    if not body:
        return ["## Latency", "", "No latency measured."]
    notes = [
        "",
        "GMAC/s: the model's MACs x batch / p50. % of peak: GMAC/s over the CPU's theoretical "
        "peak for the model's precision and thread count (see Environment).",
    ]
    over = sorted({row["name"] for row in report.get("rows", []) for e in row.get("latency") or []
                   if (e.get("peak_fraction") or 0) > 1.0})
    if over:
        notes.append(f"Above 100% ({', '.join(over)}): the real clock is higher than the one the peak was "
                     "computed with (a current or nominal clock, below turbo), so every % of peak here is an "
                     "upper bound.")
    return ["## Latency", ""] + _md_table(header, body) + notes


def _peaks(report: Mapping) -> list[Mapping]:
    """The distinct theoretical peaks the latency entries were compared with, in order."""
    seen: dict[tuple, Mapping] = {}
    for row in report.get("rows", []):
        for e in row.get("latency") or []:
            peak = e.get("peak")
            if peak:
                key = (peak.get("precision"), peak.get("cores"), peak.get("peak_gmacs"))
                seen.setdefault(key, peak)
    return list(seen.values())


def _clock_text(clock_ghz: float | None, source: str | None) -> str:
    return "unknown" if clock_ghz is None else f"{clock_ghz:.2f} GHz ({source or 'source unknown'})"


def _md_peak_rows(report: Mapping, cpu: Mapping) -> list[list[str]]:
    """Environment rows on the theoretical peak: clock and its source, formula, each peak."""
    peaks = _peaks(report)
    clock = next((p for p in peaks if p.get("clock_ghz") is not None), None)
    if clock is not None:
        rows = [["clock (for the peak)", _clock_text(clock["clock_ghz"], clock.get("clock_source"))]]
    elif "clock_ghz" in cpu:
        rows = [["clock (for the peak)", _clock_text(cpu.get("clock_ghz"), cpu.get("clock_source"))]]
    else:
        rows = []
    if not peaks:
        return rows
    rows.append(["peak formula", str(peaks[0].get("formula") or "-")])
    for peak in peaks:
        label = f"peak {peak.get('precision') or '?'}, {peak.get('cores') or '?'} core(s)"
        value = peak.get("calculation") or "unknown"
        if peak.get("isa"):
            value += f"; assumes {peak['isa']}"
        rows.append([label, value])
    return rows


def _md_stages(report: Mapping) -> list[str]:
    body = [
        [
            s.get("name", "-"),
            s.get("status", "-"),
            "yes" if s.get("cached") else "no",
            fmt_seconds(s.get("wall_s")),
        ]
        for s in report.get("stages", [])
    ]
    header = ["stage", "status", "cached", "wall"]
    return ["## Stages", ""] + (_md_table(header, body) if body else ["No stages recorded."])


def _md_environment(report: Mapping) -> list[str]:
    env = report.get("environment") or {}
    cpu = env.get("cpu") or {}
    threads = sorted(
        {e.get("threads") for r in report.get("rows", []) for e in r.get("latency") or []} - {None}
    )
    versions = env.get("versions") or {}
    int8_dot = cpu.get("int8_dot")
    body = [
        ["CPU", cpu.get("model") or "-"],
        ["architecture", cpu.get("architecture") or "-"],
        [
            "cores (logical / usable)",
            f"{cpu.get('logical_cores', '-')} / {cpu.get('usable_cores', '-')}",
        ],
        ["ISA flags", ", ".join(cpu.get("isa_flags") or []) or "-"],
        ["INT8 dot-product instructions", "-" if int8_dot is None else "yes" if int8_dot else "no"],
        ["OS", env.get("platform") or env.get("os") or "-"],
        ["Python", env.get("python") or "-"],
        ["libraries", ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) or "-"],
        ["onnxruntime providers", ", ".join(env.get("onnxruntime_providers") or []) or "-"],
        ["benchmark threads", ", ".join(str(t) for t in threads) or "-"],
        *_md_peak_rows(report, cpu),
    ]
    return ["## Environment", ""] + _md_table(["item", "value"], body)


def _md_budgets(report: Mapping) -> list[str]:
    verdict = report.get("verdict") or {}
    budgets = verdict.get("budgets") or {}
    lines = ["## Budgets", ""]
    limits = ("min_accuracy", "max_accuracy_drop", "max_latency_ms", "max_size_mb")
    set_budgets = [
        [k, format_budget_value(k, budgets[k])] for k in limits if budgets.get(k) is not None
    ]
    if budgets.get("max_latency_ms") is not None:
        threads = budgets.get("latency_threads")
        set_budgets.append(
            [
                "latency measured at",
                f"batch {budgets.get('latency_batch_size')}, "
                + ("first thread setting" if threads is None else f"{threads} thread(s)"),
            ]
        )
    lines += _md_table(["budget", "limit"], set_budgets) if set_budgets else ["No budgets set."]
    checks = verdict_rows(verdict)
    if checks:
        lines += [""] + _md_table(["model", "budget", "limit", "value", "result"], checks)
    return lines


def _md_int8_search(report: Mapping) -> list[str]:
    """Every INT8 format candidate measured by the quantize stage, and the one chosen."""
    search = (report.get("evidence") or {}).get("int8_search")
    if not search:
        return []
    sizes = sorted({b for r in search["candidates"] for b in r["latency_p50_ms"]}, key=int)
    fp32 = search["fp32"]
    lines = ["## INT8 format chosen by measurement", "",
             f"Each candidate was quantized, timed here and evaluated on the validation split; the fastest at "
             f"batch {search['rank_batch_size']} with validation accuracy >= {search['floor']:.2%} "
             f"(FP32: {fp32['val_accuracy']:.2%}) was kept: `{search['chosen']}`"
             + ("." if search["met_budget"] else ", though NO candidate met the accuracy floor (the most accurate "
                "is kept)."), ""]
    header = ["candidate", "val acc", *[f"p50 b{b} (ms)" for b in sizes], *[f"vs FP32 b{b}" for b in sizes],
              "int8 kernels / nodes", "float nodes kept", "chosen"]
    rows = [["FP32", f"{fp32['val_accuracy']:.2%}", *[_fmt(fp32['latency_p50_ms'].get(b), ".3f") for b in sizes],
             *["1.00x" for _ in sizes], "", "", ""]]
    slower = []
    for r in search["candidates"]:
        g = r.get("graph") or {}
        speed = r.get("speedup_vs_fp32") or {}
        slower += [f"`{r['name']}` at batch {b} ({speed[b]:.2f}x)" for b in sizes
                   if speed.get(b) is not None and speed[b] < 1.0 and r["name"] == search["chosen"]]
        rows.append([r["name"], f"{r['val_accuracy']:.2%}", *[_fmt(r["latency_p50_ms"].get(b), ".3f") for b in sizes],
                     *[_fmt(speed.get(b), ".2f", "x") for b in sizes],
                     f"{g.get('int8_kernels', '-')} / {g.get('nodes', '-')}",
                     len(r.get("excluded_nodes") or []), "yes" if r["name"] == search["chosen"] else ""])
    lines += _md_table(header, rows)
    if slower:
        lines += ["", "**INT8 is slower than FP32 here** for " + ", ".join(slower)
                  + ": the budgets decide which model ships (FP32 candidates are considered too)."]
    if search.get("excluded_nodes"):
        kept = ", ".join(f"`{n}`" for n in search["excluded_nodes"])
        lines += ["", f"Kept in float by the accuracy fallback: {kept}"]
    return lines


def _md_pruning(report: Mapping) -> list[str]:
    """MAC ratio beside the measured latency ratio for each pruning ratio tried."""
    info = (report.get("evidence") or {}).get("pruning")
    if not info or not info.get("tried"):
        return []
    lines = ["## Pruning: MACs vs measured latency", "",
             f"FP32 ONNX p50 of the unpruned student: {info['base_latency_ms']:.3f} ms"
             + (f"; target {info['target_latency_ms']:.3f} ms ({'met' if info.get('met_target') else 'NOT met'})"
                if info.get("target_latency_ms") is not None else "") + ". Ratios are pruned / unpruned.", ""]
    rows = [[r["ratio"], fmt_count(r.get("macs")), _fmt(r.get("mac_ratio"), ".2f"), _fmt(r.get("latency_ms"), ".3f"),
             _fmt(r.get("latency_ratio"), ".2f")] for r in info["tried"]]
    return lines + _md_table(["pruning ratio", "MACs", "MAC ratio", "p50 (ms)", "latency ratio"], rows)


def _md_training(report: Mapping) -> list[str]:
    """Training throughput per training stage."""
    runs = (report.get("evidence") or {}).get("training")
    if not runs:
        return []
    rows = [[r["stage"], r["what"], _fmt(r.get("images_per_s"), ".0f"), fmt_seconds(r.get("wall_s")),
             r.get("teacher_cache") or ""] for r in runs]
    return ["## Training throughput", ""] + _md_table(
        ["stage", "model", "images/s", "wall", "teacher cache (hits/misses)"], rows)


def render_markdown(report: Mapping) -> str:
    """The whole report as Markdown."""
    lines = [
        f"# compresskit report: {report.get('run')}",
        "",
        _verdict_line(report.get("verdict") or {}),
        "",
        f"Created {report.get('created')} by compresskit {report.get('compresskit_version')}; "
        f"reference model: `{report.get('reference_model')}`.",
        "",
    ]
    for section in (_md_models, _md_latency, _md_int8_search, _md_pruning, _md_training, _md_stages,
                    _md_environment, _md_budgets):
        lines += section(report) + [""]
    return "\n".join(lines)


def write_report(report_dir: str | os.PathLike, report: Mapping) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``report_dir`` (atomically)."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    json_path = atomic_write_json(report_dir / REPORT_JSON, report)
    md_path = atomic_write_text(report_dir / REPORT_MD, render_markdown(report))
    return json_path, md_path


def render_console_table(report: Mapping) -> Table:
    """The per-model summary as a rich Table, deployed model highlighted, verdict as caption."""
    header, body = model_table(report)
    verdict = report.get("verdict") or {}
    table = Table(
        title=Text(f"compresskit run {report.get('run')}"),
        caption=Text(_verdict_line(verdict, markdown=False)),
    )
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i < 2 else "right")
    deployed = verdict.get("model")
    for row, cells in zip(report.get("rows", []), body, strict=True):
        style = None
        if row["name"] == deployed:
            style = "bold green" if verdict.get("passed") else "bold yellow"
        table.add_row(*(Text(c) for c in cells), style=style)
    return table
