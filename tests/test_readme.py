"""The README's library example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _library_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Library use"):]
    section = section[:section.index("\n## ", 5)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 1, "the Library use section has one runnable example"
    return blocks[0]


def test_readme_library_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(_library_example(), "README.md", "exec"), {"__name__": "readme_example"})
    assert (tmp_path / "ranges.json").is_file()
    assert (tmp_path / "pruned-uint8.onnx").is_file() and (tmp_path / "pruned-int8.onnx").is_file()
    assert (tmp_path / "my-report" / "report.json").is_file()
    printed = capsys.readouterr().out
    assert printed.split()[0] in ("ptq", "pruned")
