"""The run report as one self-contained HTML page (``report.html``), rendered from the report
document alone: figures drawn with matplotlib and inlined as SVG (text as paths, so no fonts, no
scripts and no network are needed to view it), each followed by a table of the same figures.

No torch and no onnxruntime; matplotlib is imported only when a page is rendered, so importing
``compresskit.report`` stays fast.
"""

from __future__ import annotations

import html
import io
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from compresskit.artifacts import atomic_write_text
from compresskit.budget import find_latency, format_budget_value, verdict_rows
from compresskit.report.render import (
    LATENCY_NOTE,
    _fmt,
    budget_label,
    budget_reference,
    deployed_text,
    environment_rows,
    fmt_ci,
    fmt_count,
    fmt_seconds,
    fmt_size,
    int8_search_parts,
    latency_table,
    model_table,
    models_note,
    pruning_parts,
    ranking_note,
    table_setting,
)
from compresskit.report.rows import PARAMS_NOTE

REPORT_HTML = "report.html"

# Colours shared by every figure (matplotlib's tab10, so they read in print and for most colour
# vision): precision of a model, the deployed model, budgets.
_FP32, _INT8, _OTHER = "#1f77b4", "#ff7f0e", "#7f7f7f"
_PASS, _FAIL, _BUDGET = "#2ca02c", "#d62728", "#d62728"

_CSS = """
:root { color-scheme: light; }
body { font-family: -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif; color: #1d2329;
       background: #f6f7f9; margin: 0; line-height: 1.45; font-size: 15px; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; min-height: 100vh;
       box-shadow: 0 0 12px rgba(0,0,0,.06); }
h1 { font-size: 1.7em; margin: .2em 0 .4em; }
h2 { font-size: 1.3em; margin: 1.8em 0 .5em; padding-bottom: .25em; border-bottom: 2px solid #e3e6ea; }
h3 { font-size: 1.05em; margin: 1.2em 0 .4em; }
p.meta { color: #5b6470; margin: 0 0 1em; }
p.note { color: #5b6470; font-size: .92em; }
nav { font-size: .92em; margin: .6em 0 1.2em; }
nav a { color: #1f5fa8; text-decoration: none; margin-right: 1em; white-space: nowrap; }
.verdict { border-radius: 6px; padding: 12px 16px; margin: 10px 0; border-left: 6px solid; }
.verdict.pass { background: #eaf6ec; border-color: #2ca02c; }
.verdict.fail { background: #fbeaea; border-color: #d62728; }
.verdict.none { background: #f0f1f3; border-color: #7f7f7f; }
.verdict strong { font-size: 1.1em; }
.warning { background: #fff6e0; border-left: 6px solid #e8a317; border-radius: 6px; padding: 8px 16px; margin: 8px 0; }
details { margin: .4em 0 1em; }
summary { cursor: pointer; color: #1f5fa8; }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: .88em; }
th, td { padding: 4px 7px; border-bottom: 1px solid #e3e6ea; text-align: left; vertical-align: top; }
th { background: #eef1f4; font-weight: 600; border-bottom: 2px solid #cfd5dc; vertical-align: bottom; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num { white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafbfc; }
tr.deployed td { background: #eaf6ec; font-weight: 600; }
tr.fail td.result { color: #b3261e; font-weight: 600; }
.scroll { overflow-x: auto; }
figure { margin: .8em 0; }
figure svg { max-width: 100%; height: auto; display: block; }
figcaption { color: #5b6470; font-size: .9em; margin-top: .2em; }
code { background: #f0f1f3; padding: 0 4px; border-radius: 3px; font-size: .92em; }
"""


# --------------------------------------------------------------------------- HTML helpers


def _e(value: object) -> str:
    """Any report value as escaped HTML text."""
    return html.escape("" if value is None else str(value), quote=True)


def _is_num(text: str) -> bool:
    t = text.strip().lstrip("+-−").replace(",", "")
    return bool(t) and (t[0].isdigit() or t[0] == ".") or text.strip() == "-"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]], *, highlight: Sequence[bool] | None = None,
           row_class: Callable[[int], str] | None = None, cls: str = "") -> str:
    """An HTML table of string cells; numeric-looking columns are right-aligned."""
    cells = [[("" if c is None else str(c)) for c in row] for row in rows]
    numeric = [bool(cells) and all(_is_num(r[i]) for r in cells if i < len(r)) for i in range(len(header))]
    out = [f'<div class="scroll"><table class="{_e(cls)}"><thead><tr>']
    out += [f'<th{" class=num" if numeric[i] else ""}>{_e(h)}</th>' for i, h in enumerate(header)]
    out.append("</tr></thead><tbody>")
    for r, row in enumerate(cells):
        classes = []
        if highlight and highlight[r]:
            classes.append("deployed")
        if row_class:
            classes.append(row_class(r))
        attr = f' class="{_e(" ".join(c for c in classes if c))}"' if any(classes) else ""
        out.append(f"<tr{attr}>")
        for i, c in enumerate(row):
            kind = "num" if i < len(numeric) and numeric[i] else ""
            if header[i] == "result":
                kind = (kind + " result").strip()
            out.append(f'<td class="{kind}">{_e(c)}</td>' if kind else f"<td>{_e(c)}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _section(anchor: str, title: str, body: Sequence[str]) -> tuple[str, str, str]:
    """(anchor, title, HTML) of one section of the page."""
    return anchor, title, f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2>\n' + "\n".join(body) + "\n</section>"


def _pct(fraction: float | None) -> str:
    return _fmt(fraction * 100 if fraction is not None else None, ".2f", "%")


def _p(text: str, cls: str = "note") -> str:
    return f'<p class="{cls}">{_e(text)}</p>'


# --------------------------------------------------------------------------- figures


def _svg(draw: Callable[[Any], None], size: tuple[float, float], name: str, caption: str) -> str:
    """Draw with ``draw(fig)`` on a fresh matplotlib Figure and return it as an inline ``<svg>`` in a
    ``<figure>``. The Figure is created without pyplot, so no GUI backend and no global state are
    touched (the SVG canvas is pure Python, like Agg); text is written as paths (no fonts needed to
    view it) and ids are salted per figure so several SVGs can share one page."""
    import matplotlib
    from matplotlib.figure import Figure

    rc = {"svg.fonttype": "path", "svg.hashsalt": f"compresskit-{name}", "text.parse_math": False,
          "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
          "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3}
    with matplotlib.rc_context(rc):
        fig = Figure(figsize=size, layout="constrained")
        draw(fig)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    svg = text[text.index("<svg"):].strip()  # no XML declaration or DOCTYPE inside HTML
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, count=1, flags=re.S)  # RDF boilerplate with URIs
    svg = svg.replace("<svg ", f'<svg role="img" aria-label="{_e(caption)}" ', 1)
    return f'<figure id="fig-{_e(name)}">{svg}<figcaption>{_e(caption)}</figcaption></figure>'


def _colour(row: Mapping) -> str:
    return {"fp32": _FP32, "int8": _INT8}.get(str(row.get("precision")), _OTHER)


def _place_labels(ax, items: Sequence[tuple[float, float, str, bool]], fontsize: float = 8) -> None:
    """Annotate points (x, y, text, bold) so labels do not overlap each other: each label goes to the
    first of a few offsets (right of the point, then stepping below / above) whose box is free, with
    a thin leader line when it had to move. Call after the axes limits are final."""
    fig = ax.get_figure()
    fig.draw_without_rendering()  # run the layout so the data -> display transform is final
    to_pt = 72.0 / fig.dpi
    char_w, line_h = 0.62 * fontsize, 1.25 * fontsize
    placed: list[tuple[float, float, float, float]] = []
    offsets = [(5, 3)] + [(5, 3 + sign * k * line_h) for k in range(1, 7) for sign in (-1, 1)]
    for x, y, text, bold in items:
        px, py = (v * to_pt for v in ax.transData.transform((x, y)))
        width = len(text) * char_w * (1.08 if bold else 1.0)
        choice = offsets[0]
        for dx, dy in offsets:
            box = (px + dx, py + dy, px + dx + width, py + dy + line_h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                choice = (dx, dy)
                break
        dx, dy = choice
        placed.append((px + dx, py + dy, px + dx + width, py + dy + line_h))
        moved = dy != offsets[0][1]
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                    fontweight="bold" if bold else "normal", va="bottom",
                    arrowprops={"arrowstyle": "-", "color": "#999", "lw": 0.6, "shrinkA": 0, "shrinkB": 3}
                    if moved else None)


def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[str]:
    """Names of the (name, latency, accuracy) points no other point beats on both: not slower and
    not less accurate, strictly better on one. Ordered by latency."""
    front, best = [], -math.inf
    for name, _lat, acc in sorted(points, key=lambda p: (p[1], -p[2])):
        if acc > best:
            front.append(name)
            best = acc
    return front


def _latency_setting(report: Mapping) -> tuple[int, int | None, bool]:
    """(batch, threads, from the budget) of the latency the scatter and the verdict use: the
    latency budget's batch and threads when one is set, else batch 1 at the first thread setting."""
    budgets = (report.get("verdict") or {}).get("budgets") or {}
    threads, _ = table_setting(report)
    if budgets.get("max_latency_ms") is not None:
        return int(budgets.get("latency_batch_size") or 1), budgets.get("latency_threads") or threads, True
    return 1, threads, False


def _host_rows(report: Mapping) -> list[Mapping]:
    return [r for r in report.get("rows", []) if not r.get("device")]


def _device_rows(report: Mapping) -> list[Mapping]:
    return [r for r in report.get("rows", []) if r.get("device")]


def _tradeoff(report: Mapping) -> list[tuple[str, str, str]]:
    rows = _host_rows(report)
    batch, threads, from_budget = _latency_setting(report)
    verdict = report.get("verdict") or {}
    budgets = verdict.get("budgets") or {}
    deployed = verdict.get("model")
    points = []
    for row in rows:
        entry = find_latency(row, batch, threads)
        if entry is not None and entry.get("p50_ms") is not None and row.get("accuracy") is not None:
            points.append((str(row["name"]), float(entry["p50_ms"]), float(row["accuracy"]) * 100))
    setting = f"batch {batch}, {threads if threads is not None else '-'} thread(s)"
    if not points:
        return [_section("tradeoff", "Accuracy vs latency", [_p("No model has both accuracy and latency.")])]
    front = pareto_front(points)
    by_name = {str(r["name"]): r for r in rows}
    min_acc = budgets.get("min_accuracy")
    drop, ref_acc = budgets.get("max_accuracy_drop"), verdict.get("reference_accuracy")
    max_lat = budgets.get("max_latency_ms") if from_budget else None

    def draw(fig) -> None:
        ax = fig.subplots()
        fp = sorted((p for p in points if p[0] in front), key=lambda p: p[1])
        ax.step([p[1] for p in fp], [p[2] for p in fp], where="post", color="#555", lw=1, ls="--",
                label="Pareto front", zorder=1)
        for name, lat, acc in points:
            row = by_name[name]
            if name == deployed:
                ax.scatter([lat], [acc], s=220, marker="*", color=_PASS if verdict.get("passed") else _FAIL,
                           edgecolor="black", linewidth=0.8, zorder=4,
                           label="deployed" if verdict.get("passed") else "best candidate (failed)")
            ax.scatter([lat], [acc], s=46, color=_colour(row), edgecolor="white", linewidth=0.6, zorder=3)
            ci = (find_latency(row, batch, threads) or {}).get("ci95_ms")
            if ci:  # the 95% confidence interval of the median, as a horizontal error bar
                ax.errorbar([lat], [acc], xerr=[[max(0.0, lat - ci[0])], [max(0.0, ci[1] - lat)]], fmt="none",
                            ecolor=_colour(row), elinewidth=1.0, capsize=2, zorder=2)
        for prec, colour in (("fp32", _FP32), ("int8", _INT8)):
            if any(by_name[n].get("precision") == prec for n, _, _ in points):
                ax.scatter([], [], s=46, color=colour, label=prec)
        if min_acc is not None:
            ax.axhline(min_acc * 100, color=_BUDGET, lw=1.2, ls=":", label=f"min accuracy {min_acc * 100:.1f}%")
        if drop is not None and ref_acc is not None:
            ax.axhline((ref_acc - drop) * 100, color="#9467bd", lw=1.2, ls=":",
                       label=f"max accuracy drop {drop * 100:.1f} pt vs {verdict.get('reference_model')}")
        if max_lat is not None:
            ax.axvline(max_lat, color=_BUDGET, lw=1.2, ls="-.", label=f"max latency {max_lat:g} ms")
        ax.set_xlabel(f"p50 latency (ms), {setting}")
        ax.set_ylabel("accuracy (%)")
        ax.margins(x=0.15, y=0.12)
        ax.legend(loc="best", frameon=True)
        _place_labels(ax, [(lat, acc, name, name == deployed) for name, lat, acc in points])

    caption = (f"Accuracy against median latency ({setting}); bars: 95% confidence interval of the median; dashed: "
               "the Pareto front (nothing is both faster and more accurate); star: the deployed model; dotted / "
               "dash-dot lines: the budgets.")
    header = ["model", "precision", "accuracy", f"p50 (ms), {setting}", "95% CI of p50 (ms)", "Pareto front",
              "deployed"]
    body = [[name, by_name[name].get("precision") or "-", f"{acc:.2f}%", f"{lat:.3f}",
             fmt_ci(find_latency(by_name[name], batch, threads)),
             "yes" if name in front else "", "yes" if name == deployed else ""] for name, lat, acc in points]
    return [_section("tradeoff", "Accuracy vs latency", [
        _svg(draw, (8.0, 4.6), "tradeoff", caption),
        _table(header, body, highlight=[p[0] == deployed for p in points]),
    ])]


def _models(report: Mapping) -> list[tuple[str, str, str]]:
    host = {**report, "rows": _host_rows(report)}
    header, body = model_table(host)
    deployed = (report.get("verdict") or {}).get("model")
    parts = [_table(header, body, highlight=[r["name"] == deployed for r in host["rows"]]),
             _p(models_note(host, "*"))]
    notes = [(r["name"], r["notes"]) for r in host["rows"] if r.get("notes")]
    if notes:
        parts.append("<ul>" + "".join(f"<li><code>{_e(n)}</code>: {_e(t)}</li>" for n, t in notes) + "</ul>")
    if not body:
        parts = [_p("No models measured.")]
    return [_section("models", "Models", parts)]


def _stage_bars(report: Mapping) -> list[tuple[str, str, str]]:
    rows = _host_rows(report)
    if not rows:
        return []
    batch, threads, _ = _latency_setting(report)
    deployed = (report.get("verdict") or {}).get("model")
    names = [str(r["name"]) for r in rows]
    lats = [(find_latency(r, batch, threads) or {}).get("p50_ms") for r in rows]
    panels = [("file size (KiB)", [r.get("size_bytes") / 1024 if r.get("size_bytes") is not None else None
                                   for r in rows], "{:.1f}"),
              ("MACs (millions)", [r.get("macs") / 1e6 if r.get("macs") is not None else None for r in rows],
               "{:.2f}"),
              (f"p50 latency (ms), batch {batch}", lats, "{:.3f}")]

    def draw(fig) -> None:
        axes = fig.subplots(1, 3, sharey=True)
        ys = list(range(len(rows)))
        for ax, (title, values, spec) in zip(axes, panels, strict=True):
            vals = [v if v is not None else 0.0 for v in values]
            colours = [_colour(r) for r in rows]
            bars = ax.barh(ys, vals, color=colours, edgecolor=["black" if n == deployed else "none" for n in names],
                           linewidth=1.4)
            ax.bar_label(bars, labels=[spec.format(v) if v is not None else "n/a" for v in values], padding=2,
                         fontsize=7)
            ax.set_title(title)
            ax.set_xlim(0, max(vals + [1e-9]) * 1.3)
            ax.grid(axis="y", visible=False)
        axes[0].set_yticks(ys, [n + (" *" if n == deployed else "") for n in names])
        axes[0].invert_yaxis()

    caption = ("Size, MACs and latency of each model in pipeline order (blue: FP32, orange: INT8; outlined and "
               "* : the deployed model).")
    header = ["model", "stage", "precision", "size", "MACs", f"p50 b{batch} (ms)", "size vs ref", "MACs vs ref"]
    body = [[r["name"], r.get("stage") or "-", r.get("precision") or "-", fmt_size(r.get("size_bytes")),
             fmt_count(r.get("macs")), _fmt(lat, ".3f"), _fmt(r.get("size_ratio_vs_teacher"), ".3f"),
             _fmt(r.get("macs_ratio_vs_teacher"), ".3f")] for r, lat in zip(rows, lats, strict=True)]
    return [_section("stages-compared", "Size, MACs and latency per model", [
        _svg(draw, (9.5, 0.5 + 0.42 * len(rows) + 0.8), "stage-bars", caption),
        _table(header, body, highlight=[n == deployed for n in names]),
    ])]


def _latency(report: Mapping) -> list[tuple[str, str, str]]:
    header, body = latency_table(_host_rows(report))
    if not body:
        return [_section("latency", "Latency", [_p("No latency measured.")])]
    return [_section("latency", "Latency", [_table(header, body), _p(LATENCY_NOTE)])]


def _devices(report: Mapping) -> list[tuple[str, str, str]]:
    """Rows measured on other devices (rows with a ``device`` field) in their own table, and the
    per-device budget verdicts when the report has them; nothing when there are no device rows."""
    rows = _device_rows(report)
    if not rows:
        return []
    batches = sorted({e["batch_size"] for r in rows for e in r.get("latency") or []})
    header = ["device", "row", "precision", "accuracy", *[f"p50 b{b} (ms)" for b in batches], "size",
              "same as host", "notes"]
    body = []
    for r in rows:
        device = r["device"]
        if isinstance(device, Mapping):
            device = device.get("name") or device.get("model") or ", ".join(f"{k}={v}" for k, v in device.items())
        body.append([device, r.get("name"), r.get("precision") or "-", _pct(r.get("accuracy")),
                     *[_fmt((find_latency(r, b) or {}).get("p50_ms"), ".3f") for b in batches],
                     fmt_size(r.get("size_bytes")), _pct(r.get("prediction_agreement")), r.get("notes") or ""])
    parts = [_table(header, body),
             _p("Measured on each device; not part of the host comparison above (first thread setting measured "
                "there).")]
    verdicts = report.get("device_verdicts") or {}
    if isinstance(verdicts, Mapping) and verdicts:
        vrows = [[dev, v.get("model"), "pass" if v.get("passed") else "FAIL", v.get("reason") or ""]
                 for dev, v in verdicts.items() if isinstance(v, Mapping)]
        parts += ["<h3>Budgets on the devices</h3>",
                  _table(["device", "model", "result", "reason"], vrows,
                         row_class=lambda i: "fail" if vrows[i][2] == "FAIL" else "")]
    return [_section("devices", "Devices", parts)]


def _training(report: Mapping) -> list[tuple[str, str, str]]:
    runs = (report.get("evidence") or {}).get("training")
    if not runs:
        return []
    curves = [r for r in runs if r.get("history")]
    parts = []
    if curves:
        def draw(fig) -> None:
            loss_ax, acc_ax = fig.subplots(1, 2)
            for r in curves:
                hist = r["history"]
                label = f"{r['stage']}: {r['what']}"
                ep = [h.get("epoch") for h in hist]
                loss = [h.get("train_loss") for h in hist]
                acc = [h["val_accuracy"] * 100 if h.get("val_accuracy") is not None else None for h in hist]
                loss_ax.plot(ep, [math.nan if v is None else v for v in loss], marker="o", ms=3, label=label)
                acc_ax.plot(ep, [math.nan if v is None else v for v in acc], marker="o", ms=3, label=label)
            loss_ax.set_title("training loss")
            acc_ax.set_title("validation accuracy (%)")
            for ax in (loss_ax, acc_ax):
                ax.set_xlabel("epoch")
                ax.xaxis.get_major_locator().set_params(integer=True)
            acc_ax.legend(loc="lower right")

        parts.append(_svg(draw, (9.5, 3.6), "training", "Per-epoch training loss and validation accuracy of "
                                                         "every training run."))
    header = ["stage", "model", "epochs", "last train loss", "best val acc", "images/s", "wall",
              "teacher cache (hits/misses)"]
    body = []
    for r in runs:
        hist = r.get("history") or []
        accs = [h["val_accuracy"] for h in hist if h.get("val_accuracy") is not None]
        body.append([r.get("stage"), r.get("what"), len(hist) or "-",
                     _fmt(hist[-1].get("train_loss") if hist else None, ".4f"),
                     _pct(max(accs) if accs else None), _fmt(r.get("images_per_s"), ".0f"),
                     fmt_seconds(r.get("wall_s")), r.get("teacher_cache") or ""])
    parts.append(_table(header, body))
    if curves:
        parts.append("<details><summary>Per-epoch values</summary>")
        parts.append(_table(["stage", "model", "epoch", "train loss", "val accuracy"],
                            [[r["stage"], r["what"], h.get("epoch"), _fmt(h.get("train_loss"), ".4f"),
                              _pct(h.get("val_accuracy"))]
                             for r in curves for h in r["history"]]))
        parts.append("</details>")
    return [_section("training", "Training", parts)]


def _int8_search(report: Mapping) -> list[tuple[str, str, str]]:
    """The INT8 format search as speed-ups within its own pass (`int8_search_parts`): the figure
    plots validation accuracy against speed-up vs FP32 in that pass, never absolute ms."""
    search = (report.get("evidence") or {}).get("int8_search")
    parts_ = int8_search_parts(report)
    if not search or parts_ is None:
        return []
    before, header, body, after = parts_
    rank = str(search.get("rank_batch_size"))
    fp32 = search.get("fp32") or {}
    chosen = search.get("chosen")
    floor = search.get("floor")
    plotted = [(r["name"], (r.get("speedup_vs_fp32") or {}).get(rank), r.get("val_accuracy"))
               for r in search["candidates"]]
    plotted = [p for p in plotted if p[1] is not None and p[2] is not None]
    parts = [_p(text, "") for text in before]
    if plotted:
        def draw(fig) -> None:
            import matplotlib

            ax = fig.subplots()
            colours = matplotlib.colormaps["tab10"].colors
            markers = "osv^DPX<>p"
            for i, (name, speed, acc) in enumerate(plotted):
                if name == chosen:
                    ax.scatter([speed], [acc * 100], s=200, marker="*", color=_PASS, edgecolor="black", zorder=4,
                               label=f"{name} (chosen)")
                else:
                    ax.scatter([speed], [acc * 100], s=42, marker=markers[(i // 10) % len(markers)],
                               color=colours[i % 10], edgecolor="white", linewidth=0.5, zorder=3, label=name)
            if fp32.get("val_accuracy") is not None:
                ax.scatter([1.0], [fp32["val_accuracy"] * 100], s=60, marker="D", color="black", zorder=3,
                           label="FP32")
            ax.axvline(1.0, color="black", lw=0.8, ls="--", alpha=0.5)
            if floor is not None:
                ax.axhline(floor * 100, color=_BUDGET, lw=1.2, ls=":", label=f"accuracy floor {floor * 100:.2f}%")
            ax.set_xlabel(f"speed-up vs FP32 in the search pass, batch {rank} (> 1: faster)")
            ax.set_ylabel("validation accuracy (%)")
            ax.margins(x=0.12, y=0.15)
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)

        parts.append(_svg(draw, (9.5, 4.2), "int8-search", "INT8 format candidates: validation accuracy against "
                          "speed-up vs FP32, both timed during the format search (relative to FP32 in that pass); "
                          "star: the chosen format; black diamond and dashed line: FP32."))
    parts.append(_table(header, body, highlight=[False] + [r["name"] == chosen for r in search["candidates"]]))
    parts += [_p(text, "warning" if text.startswith("INT8 was slower") else "note") for text in after]
    return [_section("int8", "INT8 candidates", parts)]


def _pruning(report: Mapping) -> list[tuple[str, str, str]]:
    info = (report.get("evidence") or {}).get("pruning")
    if not info or not info.get("tried"):
        return []
    tried = sorted(info["tried"], key=lambda r: r["ratio"])
    paragraphs, header, rows = pruning_parts(report) or ([], [], [])
    parts = [_p(text, "") for text in paragraphs]

    def draw(fig) -> None:
        ax = fig.subplots()
        xs = list(range(len(tried)))
        width = 0.38
        for shift, key, label, colour in ((-width / 2, "mac_ratio", "MACs", "#9467bd"),
                                          (width / 2, "latency_ratio", "p50 latency (probe pass)", "#17becf")):
            values = [r.get(key) for r in tried]
            bars = ax.bar([x + shift for x in xs], [v if v is not None else 0.0 for v in values], width,
                          color=colour, label=label)
            ax.bar_label(bars, labels=[f"{v:.2f}" if v is not None else "n/a" for v in values], padding=2,
                         fontsize=7)
        ax.axhline(1.0, color="#555", lw=0.8, ls="--", label="unpruned")
        ax.set_xticks(xs, [f"{r['ratio']:g}" for r in tried])
        ax.set_xlabel("pruning ratio")
        ax.set_ylabel("pruned / unpruned")
        top = max([1.0] + [r[k] for r in tried for k in ("mac_ratio", "latency_ratio") if r.get(k) is not None])
        ax.set_ylim(0, top * 1.15)
        ax.set_xlim(-0.8, len(tried) - 0.2)
        ax.grid(axis="x", visible=False)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)

    size = (5.0 + 1.1 * len(tried), 3.2)
    parts.append(_svg(draw, size, "pruning", "MACs and measured latency of the pruned student relative to the "
                      "unpruned one, per pruning ratio tried (latency: the prune stage's probe, relative to the "
                      "unpruned model in that pass): fewer MACs need not mean lower latency."))
    parts.append(_table(header, rows))
    return [_section("pruning", "Pruning: MACs vs measured latency", parts)]


def _stages(report: Mapping) -> list[tuple[str, str, str]]:
    body = [[s.get("name", "-"), s.get("status", "-"), "yes" if s.get("cached") else "no",
             fmt_seconds(s.get("wall_s")), s.get("summary") or ""] for s in report.get("stages", [])]
    if not body:
        return [_section("stages", "Stages", [_p("No stages recorded.")])]
    parts = [_table(["stage", "status", "cached", "wall", "summary"], body)]
    if any("(torch count)" in str(row[4]) for row in body):
        parts.append(_p(PARAMS_NOTE[0].upper() + PARAMS_NOTE[1:] + "."))
    return [_section("stages", "Stages", parts)]


def _environment(report: Mapping) -> list[tuple[str, str, str]]:
    body = environment_rows(report, _host_rows(report))
    return [_section("environment", "Environment", [_table(["item", "value"], body)])]


def _budgets(report: Mapping) -> list[tuple[str, str, str]]:
    verdict = report.get("verdict") or {}
    budgets = verdict.get("budgets") or {}
    limits = ("min_accuracy", "max_accuracy_drop", "max_latency_ms", "max_size_mb")
    rows = [[budget_label(k, verdict), format_budget_value(k, budgets[k])] for k in limits
            if budgets.get(k) is not None]
    if budgets.get("max_latency_ms") is not None:
        threads = budgets.get("latency_threads")
        rows.append(["latency measured at", f"batch {budgets.get('latency_batch_size')}, "
                     + ("first thread setting" if threads is None else f"{threads} thread(s)")])
    parts = [_table(["budget", "limit"], rows) if rows else _p("No budgets set.")]
    checks = [[r[0], budget_label(r[1], verdict), *r[2:]] for r in verdict_rows(verdict)]
    if checks:
        parts.append("<h3>Checks per candidate</h3>")
        parts.append(_table(["model", "budget", "limit", "value", "result"], checks,
                            row_class=lambda i: "fail" if checks[i][4] == "FAIL" else ""))
    if verdict:
        parts.append(_p(ranking_note(verdict)))
    dep = report.get("deployed") or {}
    if dep.get("path"):
        parts.append(_table(["deployed file", "model", "sha256", "size"],
                            [[dep["path"], dep.get("model"), dep.get("sha256") or "-",
                              fmt_size(dep.get("size_bytes"))]]))
    return [_section("budgets", "Budgets and verdict", parts)]


def _warnings(report: Mapping) -> str:
    """The report's warnings (e.g. a model that lost more accuracy than the config allows)."""
    warnings = (report.get("evidence") or {}).get("warnings") or []
    return "\n".join(f'<div class="warning"><strong>Warning:</strong> {_e(w)}</div>' for w in warnings)


def _verdict_box(verdict: Mapping) -> str:
    if not verdict:
        return '<div class="verdict none"><strong>Verdict: none</strong></div>'
    passed = bool(verdict.get("passed"))
    role = "deploy" if passed else "best candidate"
    return (f'<div class="verdict {"pass" if passed else "fail"}" id="verdict"><strong>Verdict: '
            f'{"PASS" if passed else "FAIL"}</strong>, {role} <code>{_e(verdict.get("model"))}</code><br>'
            f'{_e(verdict.get("reason", ""))}</div>')


SECTIONS = (_tradeoff, _models, _stage_bars, _latency, _devices, _training, _int8_search, _pruning, _stages,
            _environment, _budgets)


def render_html(report: Mapping) -> str:
    """The whole report as one self-contained HTML page (inline CSS and SVG; no scripts, no links
    out), from the report dict alone. Every text from the report is escaped."""
    sections = [s for section in SECTIONS for s in section(report)]
    toc = "\n".join(f'<a href="#{_e(anchor)}">{_e(title)}</a>' for anchor, title, _ in sections)
    title = f"compresskit report: {report.get('run')}"
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head><body><main>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">Created {_e(report.get("created"))} by compresskit {_e(report.get("compresskit_version"))}'
        f'; reference model: <code>{_e(report.get("reference_model"))}</code> (the Δ column)'
        + (f'; the max_accuracy_drop budget compares with <code>{_e(budget_reference(report)[0])}</code>'
           if budget_reference(report) else "") + ".</p>",
        _verdict_box(report.get("verdict") or {}),
        _p(deployed_text(report), "meta") if deployed_text(report) else "",
        _warnings(report),
        f"<nav>{toc}</nav>",
        *(body for _, _, body in sections),
        "</main></body></html>",
        "",
    ])


def write_html(report_dir: str | os.PathLike, report: Mapping) -> Path:
    """Write ``report.html`` into ``report_dir`` (atomically) and return its path."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(report_dir / REPORT_HTML, render_html(report))


__all__ = ["REPORT_HTML", "pareto_front", "render_html", "write_html"]
