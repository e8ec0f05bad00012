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
from compresskit.budget import FLOAT_SOURCES, MIB, find_latency, format_budget_value, verdict_rows

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


def fmt_pct(fraction: float | None) -> str:
    """A fraction as a percentage with two decimals; '-' when unknown."""
    return _fmt(fraction * 100 if fraction is not None else None, ".2f", "%")


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


def fmt_p50(entry: Mapping | None) -> str:
    """A p50 in ms with the half-width of its 95% confidence interval (``ci95_rel``) when known."""
    if not entry or entry.get("p50_ms") is None:
        return "-"
    rel = entry.get("ci95_rel")
    return f"{entry['p50_ms']:.3f}" + ("" if rel is None else f" ±{rel:.1%}")


def fmt_ci(entry: Mapping | None) -> str:
    """The 95% confidence interval of the median in ms, ``lo-hi``; '-' when too few runs."""
    ci = (entry or {}).get("ci95_ms")
    return "-" if not ci else f"{ci[0]:.3f}-{ci[1]:.3f}"


def budget_reference(report: Mapping) -> tuple[str, float, float | None] | None:
    """(reference model, limit, its accuracy) of the ``max_accuracy_drop`` budget when one is set."""
    verdict = report.get("verdict") or {}
    limit = (verdict.get("budgets") or {}).get("max_accuracy_drop")
    if limit is None or verdict.get("reference_model") is None:
        return None
    return str(verdict["reference_model"]), float(limit), verdict.get("reference_accuracy")


def model_table(report: Mapping) -> tuple[list[str], list[list[str]]]:
    """Header and string cells of the per-model summary, shared by Markdown and the console.

    ``Δ vs <reference_model>`` is accuracy minus the report's reference model's (signed); when a
    ``max_accuracy_drop`` budget is set, ``drop vs <model> (budget)`` is what that budget checks
    (the verdict's reference minus accuracy, positive = worse). p50 cells carry ± the 95% CI of
    the median; params are the ONNX graph's weights (after BatchNorm folding)."""
    threads, big = table_setting(report)
    ref = report.get("reference_model") or "reference"
    bref = budget_reference(report)
    header = ["model", "precision", "accuracy", f"Δ vs {ref}"]
    if bref:
        header.append(f"drop vs {bref[0]} (budget ≤ {bref[1] * 100:.2f} pt)")
    header.append("p50 b1 (ms)")
    if big:
        header.append(f"p50 b{big} (ms)")
    header.append("speed-up b1")
    if big:
        header.append(f"speed-up b{big}")
    header += ["size", "MACs", "params (ONNX)", "wall"]
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
        ]
        if bref:
            ref_acc = bref[2]
            cells.append(_fmt((ref_acc - acc) * 100 if acc is not None and ref_acc is not None else None, ".2f", " pt"))
        cells.append(fmt_p50(b1))
        if big:
            cells.append(fmt_p50(bb))
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


def report_warnings(report: Mapping) -> list[str]:
    """The report's warnings (a model that lost more accuracy than the config allows), one line each."""
    return list((report.get("evidence") or {}).get("warnings") or [])


# --------------------------------------------------------------------------- Markdown


def _md_warnings(report: Mapping) -> list[str]:
    warnings = report_warnings(report)
    if not warnings:
        return []
    return ["## Warnings", ""] + [f"- **Warning:** {_md_cell(w)}" for w in warnings]


def one_pass(report: Mapping) -> bool:
    """Whether the rows' latencies come from one interleaved pass (``bench.bench_models``)."""
    return any("interleaved_with" in e for r in report.get("rows", []) for e in r.get("latency") or [])


def models_note(report: Mapping, deployed_mark: str = "`*`") -> str:
    """What the model table's figures are: latency protocol, accuracy references, params."""
    threads, _ = table_setting(report)
    ref = report.get("reference_model") or "reference"
    text = (f"Latency: median (p50) of timed onnxruntime runs, {threads or '-'} thread(s), ± the half-width of its "
            "95% confidence interval. ")
    if one_pass(report):
        text += ("Every latency here and under Latency comes from one pass that timed all models in alternation "
                 "(same conditions), so they compare. ")
    text += f"Speed-up > 1 is faster than the reference. Δ vs {ref}: accuracy minus {ref}'s (the report's reference)."
    bref = budget_reference(report)
    if bref:
        text += (f" drop vs {bref[0]} (budget): {bref[0]}'s accuracy minus the model's, what the max_accuracy_drop "
                 "budget checks.")
    return text + (" params (ONNX): weights in the exported graph, BatchNorm folded (what ships). "
                   f"{deployed_mark} marks the deployed model.")


def _md_models(report: Mapping) -> list[str]:
    header, body = model_table(report)
    lines = ["## Models", ""]
    lines += _md_table(header, body)
    lines += ["", _md_cell(models_note(report))]
    notes = [(r["name"], r["notes"]) for r in report.get("rows", []) if r.get("notes")]
    if notes:
        lines += ["", "Notes:", ""] + [f"- `{name}`: {_md_cell(note)}" for name, note in notes]
    return lines


def fmt_peak_fraction(fraction: float | None) -> str:
    """A fraction of the theoretical peak as a percentage; small ones keep two decimals."""
    if fraction is None:
        return "-"
    return f"{fraction * 100:.2f}%" if fraction < 0.1 else f"{fraction * 100:.1f}%"


def latency_table(rows: Sequence[Mapping]) -> tuple[list[str], list[list[object]]]:
    """Header and cells of the per-(model, batch, threads) latency table, Markdown and HTML."""
    header = ["model", "batch", "threads", "p50 ms", "95% CI of p50 (ms)", "p90 ms", "mean ms", "runs",
              "samples/s", "speed-up", "GMAC/s", "% of peak"]
    body: list[list[object]] = []
    for row in rows:
        for e in row.get("latency") or []:
            body.append([row["name"], e["batch_size"], e.get("threads", "-"), _fmt(e.get("p50_ms"), ".3f"), fmt_ci(e),
                         _fmt(e.get("p90_ms"), ".3f"), _fmt(e.get("mean_ms"), ".3f"), e.get("runs", "-"),
                         _fmt(e.get("throughput"), ".1f"), _fmt(e.get("speedup_vs_teacher"), ".2f", "x"),
                         _fmt(e.get("gmacs"), ".2f"), fmt_peak_fraction(e.get("peak_fraction"))])
    return header, body


LATENCY_NOTE = ("95% CI of p50: distribution-free confidence interval of the median (order statistics; '-' under 8 "
                "runs). GMAC/s: the model's MACs x batch / p50. % of peak: GMAC/s over the CPU's theoretical peak "
                "for the model's precision and thread count (see Environment).")


def _md_latency(report: Mapping) -> list[str]:
    header, body = latency_table(report.get("rows", []))
    if not body:
        return ["## Latency", "", "No latency measured."]
    notes = ["", LATENCY_NOTE]
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


def environment_rows(report: Mapping, rows: Sequence[Mapping] | None = None) -> list[list[str]]:
    """(item, value) rows saying where the figures were measured; `rows` are the models whose
    thread settings are listed (default: all rows)."""
    env = report.get("environment") or {}
    cpu = env.get("cpu") or {}
    rows = report.get("rows", []) if rows is None else rows
    threads = sorted({e.get("threads") for r in rows for e in r.get("latency") or []} - {None})
    versions = env.get("versions") or {}
    int8_dot = cpu.get("int8_dot")
    return [
        ["CPU", cpu.get("model") or "-"],
        ["architecture", cpu.get("architecture") or "-"],
        ["cores (logical / usable)", f"{cpu.get('logical_cores', '-')} / {cpu.get('usable_cores', '-')}"],
        ["ISA flags", ", ".join(cpu.get("isa_flags") or []) or "-"],
        ["INT8 dot-product instructions", "-" if int8_dot is None else "yes" if int8_dot else "no"],
        ["OS", env.get("platform") or env.get("os") or "-"],
        ["Python", env.get("python") or "-"],
        ["libraries", ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) or "-"],
        ["onnxruntime providers", ", ".join(env.get("onnxruntime_providers") or []) or "-"],
        ["benchmark threads", ", ".join(str(t) for t in threads) or "-"],
        *load_rows(report),
        *_md_peak_rows(report, cpu),
    ]


def _md_environment(report: Mapping) -> list[str]:
    return ["## Environment", ""] + _md_table(["item", "value"], environment_rows(report))


def load_rows(report: Mapping) -> list[list[str]]:
    """The environment row on other processes' CPU use while the bench pass timed (none when the
    report does not record it)."""
    env = report.get("environment") or {}
    load = env.get("bench_load") or (report.get("evidence") or {}).get("bench_load")
    if not load and "busy_fraction" not in env:
        return []
    frac = (load or {}).get("busy_fraction", env.get("busy_fraction"))
    if frac is None:
        short = load and load.get("other_cpu_s") is not None and (load.get("wall_s") or 0) < 0.5
        return [["other processes' CPU use while timing",
                  "unknown: timing too short to tell (< 0.5 s)" if short else "unknown (measured on Linux only)"]]
    text = f"{frac:.0%} of one core on average"
    threshold = (load or {}).get("threshold", 0.10)
    text += (f": BUSY (above {threshold:.0%}), latencies may be inflated and noisy" if frac > threshold
             else f" (below the {threshold:.0%} warning threshold)")
    return [["other processes' CPU use while timing", text]]


def budget_label(budget: str, verdict: Mapping) -> str:
    """A budget's name as tables show it: ``max_accuracy_drop`` names its reference model."""
    ref = verdict.get("reference_model")
    return f"{budget} (vs {ref})" if budget == "max_accuracy_drop" and ref else budget


def deployed_text(report: Mapping) -> str | None:
    """'Deployed file: PATH, sha256 HEX' when the report names the file it ships."""
    dep = report.get("deployed") or {}
    if not dep.get("path"):
        return None
    return f"Deployed file ({dep.get('model')}): {dep['path']}, sha256 {dep.get('sha256') or 'unknown'}"


def ranking_note(verdict: Mapping) -> str:
    """How the deployed model was chosen among the passing candidates."""
    text = ("Choice among the candidates meeting all budgets: the fastest p50 at the latency budget's batch and "
            "threads; candidates whose 95% confidence intervals of the median overlap the fastest's count as equally "
            "fast and are ranked by accuracy, then file size.")
    ties = verdict.get("latency_ties") or []
    if ties:
        text += f" Equally fast here: {', '.join(map(str, ties))}."
    return text


def _md_budgets(report: Mapping) -> list[str]:
    verdict = report.get("verdict") or {}
    budgets = verdict.get("budgets") or {}
    lines = ["## Budgets", ""]
    limits = ("min_accuracy", "max_accuracy_drop", "max_latency_ms", "max_size_mb")
    set_budgets = [
        [budget_label(k, verdict), format_budget_value(k, budgets[k])] for k in limits if budgets.get(k) is not None
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
    checks = [[r[0], budget_label(r[1], verdict), *r[2:]] for r in verdict_rows(verdict)]
    if checks:
        lines += [""] + _md_table(["model", "budget", "limit", "value", "result"], checks)
    if verdict:
        lines += ["", ranking_note(verdict)]
    return lines


def _bench_setting(report: Mapping) -> tuple[int, int | None]:
    """(batch, threads) the stages' own latency passes measured at: the latency budget's."""
    budgets = (report.get("verdict") or {}).get("budgets") or {}
    threads, _ = table_setting(report)
    return int(budgets.get("latency_batch_size") or 1), budgets.get("latency_threads", threads)


def bench_pass_ratio(report: Mapping, model: str, other: str, batch: int, threads: int | None) -> float | None:
    """p50 of ``other`` / p50 of ``model`` in the bench pass (> 1: ``model`` is faster)."""
    rows = {r.get("name"): r for r in report.get("rows", [])}
    if model not in rows or other not in rows:
        return None
    a, b = find_latency(rows[model], batch, threads), find_latency(rows[other], batch, threads)
    if not a or not b or not a.get("p50_ms") or b.get("p50_ms") is None:
        return None
    return b["p50_ms"] / a["p50_ms"]


def int8_search_parts(report: Mapping) -> tuple[list[str], list[str], list[list[object]], list[str]] | None:
    """(paragraphs before, header, rows, paragraphs after) of the INT8 format search, shown as
    speed-ups within the search's own pass only (its absolute ms were measured at another moment
    than the Models table's and are left in report.json)."""
    search = (report.get("evidence") or {}).get("int8_search")
    if not search or not search.get("candidates"):
        return None
    sizes = sorted({b for r in search["candidates"] for b in r.get("speedup_vs_fp32") or r.get("latency_p50_ms") or {}},
                   key=int)
    fp32 = search.get("fp32") or {}
    floor, chosen = search.get("floor"), search.get("chosen")
    before = [f"Each candidate was quantized, timed and evaluated on the validation split during the format search; "
              f"the fastest at batch {search.get('rank_batch_size')} with validation accuracy >= "
              f"{fmt_pct(floor)} (FP32: {fmt_pct(fp32.get('val_accuracy'))}) "
              f"was kept: {chosen}"
              + ("." if search.get("met_budget") else ", though NO candidate met the accuracy floor (the most accurate "
                 "is kept)."),
              "Speed-ups here were measured during the format search, relative to FP32 in that pass (FP32 p50 / "
              "candidate p50, timed at the same moment); they are not comparable with the Models table, whose "
              "latencies come from the bench pass."]
    header = ["candidate", "val acc", *[f"speed-up vs FP32 b{b} (search pass)" for b in sizes],
              "int8 kernels / nodes", "float nodes kept", "chosen"]
    rows: list[list[object]] = [["FP32", fmt_pct(fp32.get("val_accuracy")), *["1.00x" for _ in sizes], "", "", ""]]
    slower = []
    for r in search["candidates"]:
        g = r.get("graph") or {}
        speed = r.get("speedup_vs_fp32") or {}
        slower += [f"{r['name']} at batch {b} ({speed[b]:.2f}x)" for b in sizes
                   if speed.get(b) is not None and speed[b] < 1.0 and r["name"] == chosen]
        rows.append([r["name"], fmt_pct(r.get("val_accuracy")),
                     *[_fmt(speed.get(b), ".2f", "x") for b in sizes],
                     f"{g.get('int8_kernels', '-')} / {g.get('nodes', '-')}",
                     len(r.get("excluded_nodes") or []), "yes" if r["name"] == chosen else ""])
    after = []
    if slower:
        after.append("INT8 was slower than FP32 during the format search for " + ", ".join(slower)
                     + ", relative to FP32 in that pass: the budgets decide which model ships (FP32 candidates are "
                       "considered too).")
    source = next((n for n in FLOAT_SOURCES if any(r.get("name") == n for r in report.get("rows", []))), None)
    _, threads = _bench_setting(report)
    pairs = [(b, bench_pass_ratio(report, "ptq", source, int(b), threads)) for b in sizes] if source else []
    pairs = [(b, v) for b, v in pairs if v is not None]
    if pairs:
        after.append("In the bench pass (Models table), ptq runs at " + ", ".join(
            f"{v:.2f}x the speed of {source} at batch {b}" for b, v in pairs) + ".")
    if search.get("excluded_nodes"):
        after.append("Kept in float by the accuracy fallback: " + ", ".join(map(str, search["excluded_nodes"])))
    return before, header, rows, after


def pruning_parts(report: Mapping) -> tuple[list[str], list[str], list[list[object]]] | None:
    """(paragraphs, header, rows) of the pruning ratios tried, as ratios within the prune stage's
    probe pass only (its absolute ms were measured at another moment than the Models table's)."""
    info = (report.get("evidence") or {}).get("pruning")
    if not info or not info.get("tried"):
        return None
    base, target = info.get("base_latency_ms"), info.get("target_latency_ms")
    text = ("MACs and FP32 ONNX latency of the pruned model relative to the unpruned one (pruned / unpruned); the "
            "latency ratios were measured by the prune stage's probe, relative to the unpruned model in that pass, "
            "not in the bench pass of the Models table")
    if target is not None and base:
        text += (f"; target latency ratio <= {target / base:.2f} "
                 f"({'met' if info.get('met_target') else 'NOT met'} in that pass)")
    paragraphs = [text + "."]
    names = {r.get("name") for r in report.get("rows", [])}
    unpruned = next((n for n in ("student", "teacher") if n in names), None)
    batch, threads = _bench_setting(report)
    ratio = bench_pass_ratio(report, unpruned, "pruned", batch, threads) if unpruned else None
    if ratio is not None:
        paragraphs.append(f"In the bench pass (Models table), pruned / {unpruned} p50 = {ratio:.2f} at batch {batch}.")
    rows = [[r["ratio"], fmt_count(r.get("macs")), _fmt(r.get("mac_ratio"), ".2f"), _fmt(r.get("latency_ratio"), ".2f")]
            for r in sorted(info["tried"], key=lambda r: r["ratio"])]
    return paragraphs, ["pruning ratio", "MACs", "MAC ratio", "latency ratio (probe pass)"], rows


def _md_int8_search(report: Mapping) -> list[str]:
    """Every INT8 format candidate measured by the quantize stage, and the one chosen, as speed-ups
    within the search's own pass (`int8_search_parts`)."""
    parts = int8_search_parts(report)
    if parts is None:
        return []
    before, header, rows, after = parts
    lines = ["## INT8 format chosen by measurement", ""]
    for text in before:
        lines += [_md_cell(text), ""]
    lines += _md_table(header, rows)
    for text in after:
        bold = text.startswith("INT8 was slower")
        lines += ["", f"**{_md_cell(text)}**" if bold else _md_cell(text)]
    return lines


def _md_pruning(report: Mapping) -> list[str]:
    """MAC ratio beside the latency ratio (within the prune stage's probe pass) per ratio tried."""
    parts = pruning_parts(report)
    if parts is None:
        return []
    paragraphs, header, rows = parts
    lines = ["## Pruning: MACs vs measured latency", ""]
    for text in paragraphs:
        lines += [_md_cell(text), ""]
    return lines + _md_table(header, rows)


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
    ]
    dep = report.get("deployed") or {}
    if dep.get("path"):
        lines += [f"Deployed file ({_md_cell(dep.get('model'))}): `{_md_cell(dep['path'])}`, sha256 "
                  f"`{dep.get('sha256') or 'unknown'}`", ""]
    lines += [
        f"Created {report.get('created')} by compresskit {report.get('compresskit_version')}; "
        f"reference model: `{report.get('reference_model')}` (the Δ column)"
        + (f"; the max_accuracy_drop budget compares with `{budget_reference(report)[0]}`"
           if budget_reference(report) else "") + ".",
        "",
    ]
    for section in (_md_warnings, _md_models, _md_latency, _md_int8_search, _md_pruning, _md_training, _md_stages,
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
    caption = "\n".join([_verdict_line(verdict, markdown=False)]
                        + ([deployed_text(report)] if deployed_text(report) else [])
                        + [f"Warning: {w}" for w in report_warnings(report)])
    table = Table(title=Text(f"compresskit run {report.get('run')}"), caption=Text(caption))
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i < 2 else "right")
    deployed = verdict.get("model")
    for row, cells in zip(report.get("rows", []), body, strict=True):
        style = None
        if row["name"] == deployed:
            style = "bold green" if verdict.get("passed") else "bold yellow"
        table.add_row(*(Text(c) for c in cells), style=style)
    return table
