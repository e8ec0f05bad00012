"""The run report: build it from measured rows (`document`, `rows`), render it (`render`), and
the pipeline's report stage (`stage.run`). No torch anywhere in this package.

A report from your own measurements::

    from compresskit.bench import bench_model
    from compresskit.budget import decide, resolve_budgets
    from compresskit.report import build_report, model_rows, write_report

    rows = model_rows({"fp32": bench_model("fp32.onnx"), "ptq": bench_model("int8.onnx")})
    verdict = decide(rows, resolve_budgets({"max_latency_ms": 1.0}, [1]))
    write_report("reports/mine", build_report(run="mine", config={}, rows=rows, verdict=verdict,
                                              environment={}, stages=[]))
"""

from compresskit.report.document import REPORT_SCHEMA, REPORT_SCHEMA_VERSION, build_report, load_report
from compresskit.report.html import REPORT_HTML, render_html, write_html
from compresskit.report.render import (
    REPORT_JSON,
    REPORT_MD,
    fmt_count,
    fmt_peak_fraction,
    fmt_seconds,
    fmt_size,
    model_table,
    render_console_table,
    render_markdown,
    report_warnings,
    table_setting,
    write_report,
)
from compresskit.report.rows import STAGE_OF, accuracy_warnings, evidence, model_rows

__all__ = [
    "REPORT_HTML",
    "REPORT_JSON",
    "REPORT_MD",
    "REPORT_SCHEMA",
    "REPORT_SCHEMA_VERSION",
    "STAGE_OF",
    "accuracy_warnings",
    "build_report",
    "evidence",
    "fmt_count",
    "fmt_peak_fraction",
    "fmt_seconds",
    "fmt_size",
    "load_report",
    "model_rows",
    "model_table",
    "render_console_table",
    "render_html",
    "render_markdown",
    "report_warnings",
    "table_setting",
    "write_html",
    "write_report",
]
