"""The search's record: one row per trial, the Pareto front, the finalists, as JSON and Markdown
(no torch, no optuna: rows are plain dicts)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["markdown", "pareto_front"]

SCHEMA = "compresskit.search"
VERSION = 1


def _lat(row: Mapping[str, Any]) -> float:
    v = row.get("p50_ms")
    return float(v) if v is not None else math.inf


def pareto_front(rows: Sequence[Mapping[str, Any]], accuracy: str = "proxy_val_accuracy") -> list[int]:
    """Trial numbers of the rows no other row beats on every axis: `accuracy` (higher is better),
    p50 latency and INT8 size (lower is better). Rows without the accuracy are left out; among
    rows equal on all three axes the first (lowest number) stands for them."""
    pts = [(r["number"], float(r[accuracy]), _lat(r), float(r.get("size_bytes") or math.inf))
           for r in rows if r.get(accuracy) is not None]
    front = []
    for n, acc, lat, size in pts:
        dominated = False
        for m, a2, l2, s2 in pts:
            if m == n:
                continue
            no_worse = a2 >= acc and l2 <= lat and s2 <= size
            better = a2 > acc or l2 < lat or s2 < size
            if no_worse and (better or m < n):
                dominated = True
                break
        if not dominated:
            front.append(n)
    return sorted(front, key=lambda k: next(_lat(r) for r in rows if r["number"] == k))


def _pct(v: Any) -> str:
    return f"{100 * v:.2f}%" if isinstance(v, (int, float)) else ""


def _ms(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else ""


def _pt(a: Any, b: Any) -> str:
    return f"{100 * (a - b):+.2f} pt" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else ""


def _kib(v: Any) -> str:
    return f"{v / 1024:.0f}" if isinstance(v, (int, float)) else ""


def _macs(v: Any) -> str:
    return f"{v / 1e6:.2f}M" if isinstance(v, (int, float)) else ""


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def markdown(doc: Mapping[str, Any]) -> str:
    """The Markdown page of a search record (``trials.json``'s content)."""
    b = doc.get("budgets") or {}
    lines = [f"# Student search: {doc.get('run', '')}", ""]
    limits = []
    if b.get("latency_limit_ms") is not None:
        limits.append(f"p50 <= {b['latency_limit_ms']:.3f} ms ({b.get('latency_limit_source', '')}) at batch "
                      f"{b.get('batch_size')}, {b.get('threads')} thread(s)")
    if b.get("max_size_mb") is not None:
        limits.append(f"INT8 size <= {b['max_size_mb']:g} MiB")
    if b.get("min_accuracy") is not None:
        limits.append(f"INT8 val accuracy >= {_pct(b['min_accuracy'])}")
    lines.append("Budgets: " + ("; ".join(limits) if limits else "none") + ".")
    ref = doc.get("reference")
    if ref:
        lines.append(f"Latency reference: {ref.get('label')} at {_ms(ref.get('p50_ms'))} ms ({ref.get('source')}).")
    trials = doc.get("trials") or []
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.get("status") or "?"] = counts.get(t.get("status") or "?", 0) + 1
    lines += ["", f"{len(trials)} trials: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ".", ""]
    final_rows = list(doc.get("finals") or [])
    finals = {f["number"]: f for f in final_rows if f.get("baseline_of") is None}
    lines.append("## Trials")
    lines.append("")
    lines += _table(
        ["#", "family", "architecture", "recipe", "status", "p50 ms", "INT8 KiB", "MACs", "proxy val",
         "INT8 val (full)", "INT8 test (full)", "s", "note"],
        [[t["number"], t.get("family", ""), t.get("label", ""), t.get("recipe_label", ""), t.get("status", ""),
          _ms(t.get("p50_ms")), _kib(t.get("size_bytes")), _macs(t.get("macs")),
          _pct(t.get("proxy_val_accuracy") if t.get("proxy_val_accuracy") is not None else t.get("last_val_accuracy")),
          _pct(finals.get(t["number"], {}).get("int8_val_accuracy")),
          _pct(finals.get(t["number"], {}).get("int8_test_accuracy")),
          f"{t['seconds']:.0f}" if t.get("seconds") is not None else "", t.get("reason") or ""]
         for t in trials])
    front = doc.get("pareto") or []
    if front:
        by_n = {t["number"]: t for t in trials}
        lines += ["", "## Pareto front (proxy val accuracy vs p50 latency vs INT8 size)", ""]
        lines += _table(["#", "architecture", "recipe", "proxy val", "p50 ms", "INT8 KiB"],
                        [[n, by_n[n].get("label", ""), by_n[n].get("recipe_label", ""),
                          _pct(by_n[n].get("proxy_val_accuracy")), _ms(by_n[n].get("p50_ms")),
                          _kib(by_n[n].get("size_bytes"))] for n in front if n in by_n])
    if final_rows:
        lines += ["", "## Finalists (full training, INT8)", ""]
        lines += _table(["#", "architecture", "recipe", "FP32 val", "INT8 format", "INT8 val", "INT8 test", "p50 ms",
                         "INT8 KiB", "budgets"],
                        [[f.get("id", f["number"]), f.get("label", ""), f.get("recipe_label", ""),
                          _pct(f.get("fp32_val_accuracy")),
                          f.get("int8_format", ""), _pct(f.get("int8_val_accuracy")), _pct(f.get("int8_test_accuracy")),
                          _ms(f.get("p50_ms")), _kib(f.get("size_bytes")),
                          "met" if not f.get("failed") else "; ".join(f["failed"])] for f in final_rows])
        pairs = [(finals[b["baseline_of"]], b) for b in final_rows
                 if b.get("baseline_of") is not None and b["baseline_of"] in finals]
        if pairs:
            lines += ["", "## Does KD help? (same architecture, epochs and seed; labels alone vs the KD recipe)", ""]
            lines += _table(["#", "architecture", "KD recipe", "INT8 val: labels alone / KD", "KD gain (val)",
                             "INT8 test: labels alone / KD", "KD gain (test)"],
                            [[kd["number"], kd.get("label", ""), kd.get("recipe_label", ""),
                              f"{_pct(lo.get('int8_val_accuracy'))} / {_pct(kd.get('int8_val_accuracy'))}",
                              _pt(kd.get("int8_val_accuracy"), lo.get("int8_val_accuracy")),
                              f"{_pct(lo.get('int8_test_accuracy'))} / {_pct(kd.get('int8_test_accuracy'))}",
                              _pt(kd.get("int8_test_accuracy"), lo.get("int8_test_accuracy"))] for kd, lo in pairs])
    lines.append("")
    chosen, best = doc.get("chosen"), doc.get("best")
    if chosen:
        lines.append(f"**Chosen**: trial {chosen.get('id', chosen['number'])}, {chosen.get('label')} with {chosen.get('recipe_label')}: "
                     f"INT8 val {_pct(chosen.get('int8_val_accuracy'))}, "
                     f"test {_pct(chosen.get('int8_test_accuracy'))}, "
                     f"p50 {_ms(chosen.get('p50_ms'))} ms, {_kib(chosen.get('size_bytes'))} KiB.")
    elif doc.get("worker"):
        lines.append("Written by a worker: the finalists are trained by the main `compresskit search` process.")
    else:
        lines.append("**No candidate meets the budgets**: " + "; ".join(doc.get("failed_budgets") or ["(none tried)"]))
        if best:
            lines.append(f"Best found (kept): trial {best.get('id', best['number'])}, {best.get('label')} "
                         f"with {best.get('recipe_label')}.")
    if doc.get("chosen_yaml"):
        lines.append(f"Pipeline without search: `{doc['chosen_yaml']}` (`compresskit run` it).")
    return "\n".join(lines) + "\n"
