"""The registry of distillation methods agrees with the config models, and every method is
reachable from `compresskit methods distill`."""

from __future__ import annotations

import inspect

import pytest

from compresskit.config_terms import TEACHER_FREE, TERM_SPECS
from compresskit.distill import methods
from compresskit.distill.registry import TEACHER_SCHEMES, TERMS


def _options(cls) -> dict[str, object]:
    sig = inspect.signature(cls.__init__)
    return {n: p.default for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def test_every_configured_method_has_a_term() -> None:
    assert list(TERMS) == list(TERM_SPECS)


@pytest.mark.parametrize("method", list(TERM_SPECS))
def test_config_options_match_term_options(method: str) -> None:
    spec = TERM_SPECS[method]
    fields = {n: f for n, f in spec.model_fields.items() if n != "method"}
    options = _options(TERMS[method])
    assert set(fields) == set(options), method
    for name, default in options.items():
        if name == "weight" or default is inspect.Parameter.empty:
            continue
        field_default = fields[name].default
        assert field_default == default, f"{method}.{name}: config {field_default!r} vs term {default!r}"
    assert TERMS[method].method == method
    assert TERMS[method].description


def test_methods_lists_terms_then_teacher_schemes() -> None:
    names = [name for name, _ in methods()]
    assert names == [*TERM_SPECS, *TEACHER_SCHEMES]
    assert all(desc and "\n" not in desc for _, desc in methods())


def test_teacher_free_methods_are_those_that_need_no_teacher() -> None:
    assert set(TEACHER_FREE) == {name for name, cls in TERMS.items() if not cls.needs_teacher}


def test_readme_table_lists_every_method_with_its_knobs() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): line for line in readme.splitlines() if line.startswith("| `")}
    for name, _ in methods():
        assert name in rows, f"README's method table has no row for {name}"
    for name, spec in TERM_SPECS.items():
        for field in spec.model_fields:
            if field != "method":
                assert f"`{field}`" in rows[name], f"README row of {name} does not list {field}"
