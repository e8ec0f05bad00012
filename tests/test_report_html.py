"""Tests of compresskit.report.html: the self-contained HTML report (inline SVG figures and tables),
checked as a DOM and, where Debian's chromium is installed, rendered headless."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from compresskit import budget, report
from compresskit.report.html import pareto_front, render_html, write_html

MIB = 2**20

SECTION_TITLES = ["Accuracy vs latency", "Models", "Size, MACs and latency per model", "Latency", "Devices",
                  "Training", "INT8 candidates", "Pruning: MACs vs measured latency", "Stages", "Environment",
                  "Budgets and verdict"]


def _lat(batch, p50, threads=1):
    return {"batch_size": batch, "threads": threads, "threads_setting": threads, "p50_ms": p50,
            "p90_ms": p50 * 1.1, "mean_ms": p50 * 1.05, "throughput": batch * 1000 / p50}


def _row(name, stage, precision, acc, size, macs, p50_1, p50_8, **extra):
    return {"name": name, "stage": stage, "precision": precision, "accuracy": acc, "size_bytes": size,
            "macs": macs, "params": macs // 10, "nonzero_params": macs // 10,
            "latency": [_lat(1, p50_1), _lat(8, p50_8)], "stage_wall_s": 10.0, "notes": "", **extra}


def _rows():
    return [
        _row("teacher", "teacher", "fp32", 0.92, 8 * MIB, 30_000_000, 10.0, 60.0),
        _row("student", "distill", "fp32", 0.915, 1 * MIB, 3_000_000, 2.0, 12.0, notes="KD <T=4> & AT"),
        _row("pruned", "prune", "fp32", 0.90, 600 * 1024, 1_500_000, 1.8, 9.0),
        _row("ptq", "quantize", "int8", 0.913, 300 * 1024, 3_000_000, 1.6, 7.0),
        _row("qat", "quantize", "int8", 0.905, 300 * 1024, 3_000_000, 1.7, 7.5),
    ]


def _history(n, loss0, acc1):
    return [{"epoch": e, "train_loss": loss0 / e, "val_accuracy": min(acc1 + 0.05 * e, 0.99)} for e in range(1, n + 1)]


EVIDENCE = {
    "warnings": ["QAT lost 2.1 pt test accuracy against the <pruned> model"],
    "int8_search": {
        "fp32": {"val_accuracy": 0.9, "latency_p50_ms": {"1": 2.0, "8": 12.0}}, "floor": 0.89,
        "rank_batch_size": 1, "chosen": "u8s8-pt-minmax", "met_budget": True, "excluded_nodes": [],
        "candidates": [
            {"name": "u8s8-pt-minmax", "val_accuracy": 0.9, "latency_p50_ms": {"1": 1.6, "8": 7.0},
             "speedup_vs_fp32": {"1": 1.25, "8": 1.71}, "graph": {"int8_kernels": 5, "nodes": 7}},
            {"name": "s8s8-pt-minmax", "val_accuracy": 0.895, "latency_p50_ms": {"1": 2.4, "8": 14.0},
             "speedup_vs_fp32": {"1": 0.83, "8": 0.86}, "graph": {"int8_kernels": 2, "nodes": 20}},
            {"name": "u8s8-tensor-<entropy>", "val_accuracy": 0.87, "latency_p50_ms": {"1": 1.5, "8": 6.8},
             "speedup_vs_fp32": {"1": 1.33, "8": 1.76}, "graph": {"int8_kernels": 5, "nodes": 7}}]},
    "pruning": {"base_latency_ms": 2.0, "target_latency_ms": 1.9, "met_target": True,
                "tried": [{"ratio": 0.25, "macs": 2_200_000, "mac_ratio": 0.73, "latency_ms": 1.9,
                           "latency_ratio": 0.95},
                          {"ratio": 0.5, "macs": 1_500_000, "mac_ratio": 0.5, "latency_ms": 1.8,
                           "latency_ratio": 0.9}]},
    "training": [
        {"stage": "teacher", "what": "teacher", "images_per_s": 900.0, "wall_s": 200.0, "teacher_cache": None,
         "history": _history(5, 2.0, 0.5)},
        {"stage": "distill", "what": "student", "images_per_s": 1500.0, "wall_s": 60.0, "teacher_cache": "10/5",
         "history": _history(4, 1.5, 0.4)},
        {"stage": "quantize", "what": "QAT", "images_per_s": 700.0, "wall_s": 5.0, "teacher_cache": None},
    ],
}
ENV = {"cpu": {"model": "Example <CPU> & co", "architecture": "x86_64", "logical_cores": 2, "usable_cores": 2,
               "isa_flags": ["avx2"], "int8_dot": False},
       "platform": "Linux-x86_64", "python": "3.11.7", "versions": {"onnxruntime": "1.32.0"},
       "onnxruntime_providers": ["CPUExecutionProvider"]}
STAGES = [{"name": "teacher", "wall_s": 200.0, "cached": True, "status": "cached", "summary": "test 92%"},
          {"name": "quantize", "wall_s": 4.2, "cached": False, "status": "ran", "summary": "ptq <b>ok</b>"}]
BUDGETS = {"min_accuracy": 0.90, "max_latency_ms": 1.75, "max_size_mb": 0.5}


def _report(rows=None, evidence=EVIDENCE, run="demo <run> & \"quotes\""):
    rows = rows or _rows()
    budgets = budget.resolve_budgets(BUDGETS, [1])
    return report.build_report(run=run, config={"budgets": BUDGETS}, rows=rows,
                               verdict=budget.decide(rows, budgets), environment=ENV, stages=STAGES,
                               evidence=copy.deepcopy(evidence))


class _Dom(HTMLParser):
    """Just enough of the DOM to check: tags, attributes, the title, h2 texts, all text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.stack: list[str] = []
        self.title = ""
        self.h2: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "h2":
            self.h2.append("")
        self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop() != tag:
            pass

    def handle_data(self, data):
        if "title" in self.stack and "svg" not in self.stack:
            self.title += data
        if self.stack and self.stack[-1] == "h2":
            self.h2[-1] += data
        self.text.append(data)

    def count(self, tag):
        return sum(1 for t, _ in self.tags if t == tag)


def _dom(text: str) -> _Dom:
    dom = _Dom()
    dom.feed(text)
    dom.close()
    return dom


def _assert_self_contained(dom: _Dom) -> None:
    for tag, attrs in dom.tags:
        for key in ("src", "href", "xlink:href", "action", "data"):
            value = (attrs.get(key) or "").strip().lower()
            assert not value.startswith(("http://", "https://", "//")), (tag, key, value)
            if tag != "a":
                assert not value or value.startswith(("#", "data:")), (tag, key, value)
        assert not (tag == "script" and attrs.get("src")), attrs
        assert tag not in ("link", "iframe", "img", "object", "embed"), tag


def test_pareto_front():
    points = [("a", 1.0, 80.0), ("b", 2.0, 85.0), ("c", 2.5, 84.0), ("d", 3.0, 90.0), ("e", 1.0, 79.0),
              ("f", 3.5, 90.0)]
    assert pareto_front(points) == ["a", "b", "d"]
    assert pareto_front([]) == []


def test_html_dom_sections_figures_and_escaping(tmp_path):
    rep = _report()
    rows = rep["rows"]
    rows.append({**copy.deepcopy(rows[3]), "name": "ptq@pi", "device": "raspberry-pi-4 <arm64>", "model": "ptq",
                 "prediction_agreement": 0.99})
    rep["device_verdicts"] = {"raspberry-pi-4 <arm64>": {"model": "ptq", "passed": False,
                                                         "reason": "ptq@pi fails: p50 9.000 ms > 5 ms"}}
    path = write_html(tmp_path / "out", rep)
    assert path == tmp_path / "out" / "report.html"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    dom = _dom(text)
    assert dom.title == 'compresskit report: demo <run> & "quotes"'
    assert dom.h2 == SECTION_TITLES
    # one figure each: trade-off, per-model bars, training curves, INT8 candidates, pruning
    assert dom.count("svg") == 5 and dom.count("figure") == 5
    assert "<?xml" not in text and "<!DOCTYPE svg" not in text
    _assert_self_contained(dom)
    assert dom.count("script") == 0
    # no URL anywhere but the SVG namespace names (identifiers, never fetched)
    assert not re.findall(r"https?://", re.sub(r'xmlns(:\w+)?="[^"]*"', "", text))
    # every text from the report is escaped: none of it became markup
    assert "<run>" not in text and "<CPU>" not in text and "<b>ok</b>" not in text and "<arm64>" not in text
    assert "<T=4>" not in text and "<entropy>" not in text and "<pruned>" not in text
    assert dom.count("b") == 0
    all_text = "".join(dom.text)
    for shown in ("Example <CPU> & co", "ptq <b>ok</b>", "KD <T=4> & AT", "u8s8-tensor-<entropy>",
                  "raspberry-pi-4 <arm64>", "Warning: QAT lost 2.1 pt test accuracy against the <pruned> model"):
        assert shown in all_text
    # verdict: with max latency 1.75 ms at batch 1 the fastest passing candidate is ptq
    assert rep["verdict"]["model"] == "ptq" and rep["verdict"]["passed"]
    assert "Verdict: PASS" in all_text
    assert text.count('class="deployed"') >= 3  # models, trade-off and bars tables
    # the figures as text: trade-off table with the Pareto front, training per epoch
    assert "p50 (ms), batch 1, 1 thread(s)" in all_text
    assert "1.600" in all_text and "91.30%" in all_text
    assert all_text.count("teacher") >= 5
    # the device row is shown in its own table only
    device_section = text[text.index('<section id="devices">'):]
    device_section = device_section[:device_section.index("</section>")]
    assert "ptq@pi" in device_section and "99.00%" in device_section
    assert "Budgets on the devices" in device_section and "ptq@pi fails: p50 9.000 ms &gt; 5 ms" in device_section
    models = text[text.index('<section id="models">'):]
    assert "ptq@pi" not in models[:models.index("</section>")]


def test_html_without_optional_parts():
    """No evidence, no devices, no budgets: the sections that have nothing to show are left out."""
    rows = [{"name": "m", "accuracy": 0.9, "size_bytes": 10, "latency": [_lat(1, 0.5)]}]
    rep = report.build_report(run="r", config={}, rows=rows,
                              verdict=budget.select_and_verdict(rows, ["m"], {}, None), environment={}, stages=[])
    dom = _dom(render_html(rep))
    assert dom.h2 == ["Accuracy vs latency", "Models", "Size, MACs and latency per model", "Latency", "Stages",
                      "Environment", "Budgets and verdict"]
    assert dom.count("svg") == 2
    _assert_self_contained(dom)
    # no rows at all still renders
    empty = report.build_report(run="r", config={}, rows=[], verdict={}, environment={}, stages=[])
    assert "Verdict: none" in render_html(empty)


def _chromium():
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("chromium not installed (Debian: apt-get install chromium); the headless render check needs it")
    return exe


def _chromium_run(exe, profile, *args):
    # offline and quiet: no sandbox (root in containers), no GPU, /tmp instead of a small /dev/shm,
    # no network-using background services
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_html_renders_in_headless_chromium(tmp_path):
    exe = _chromium()
    path = write_html(tmp_path, _report())
    shot = tmp_path / "shot.png"
    done = _chromium_run(exe, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,2000",
                         path.as_uri())
    assert shot.is_file(), done.stderr[-2000:]
    import matplotlib.image
    import numpy as np

    pixels = matplotlib.image.imread(str(shot))[..., :3]
    assert pixels.shape[:2] == (2000, 1200)
    colours = np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50 and pixels.std() > 0.05, (len(colours), pixels.std())
    dom = _chromium_run(exe, tmp_path / "profile", "--dump-dom", path.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    rendered = _dom(dom.stdout)
    assert rendered.h2 == SECTION_TITLES[:4] + SECTION_TITLES[5:]
    assert rendered.count("svg") == 5


def test_import_does_not_load_matplotlib():
    """matplotlib is imported only when a page is rendered: `import compresskit.report` stays fast."""
    code = "import sys, compresskit.report; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
