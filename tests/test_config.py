from pathlib import Path

import pytest

from compresskit.config import ConfigError, PipelineConfig, apply_overrides, load_config, validate_config

PIPELINES = sorted((Path(__file__).resolve().parents[1] / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_shipped_pipelines_validate(path):
    cfg = load_config(path)
    assert cfg.name


def _problems(raw):
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    return dict(info.value.problems)


def test_unknown_key_names_its_path():
    probs = _problems({"name": "x", "distill": {"train": {"epochz": 3}}})
    assert probs == {"distill.train.epochz": "unknown key"}


def test_wrong_type_and_range_are_each_reported():
    probs = _problems({"name": "x", "teacher": {"model": {"arch": "resnet", "width": "wide"}},
                       "prune": {"pruner": {"method": "structured", "ratio": 1.5}}})
    assert set(probs) == {"teacher.model.width", "prune.pruner.ratio"}
    assert "integer" in probs["teacher.model.width"]
    assert "less than 1" in probs["prune.pruner.ratio"]


def test_missing_name_and_bad_union_tag():
    probs = _problems({"distill": {"loss": [{"method": "nope"}]}})
    assert "name" in probs
    assert any(k.startswith("distill.loss.0") for k in probs)


def test_empty_and_non_mapping():
    assert _problems(None) == {"(root)": "the pipeline file is empty"}
    assert "(root)" in _problems([1, 2])


def test_cross_field_budget_check():
    probs = _problems({"name": "x", "bench": {"batch_sizes": [1, 8]}, "budgets": {"latency_batch_size": 64}})
    assert "latency_batch_size" in next(iter(probs.values()))


def test_overrides_parse_yaml_values_and_index_lists():
    raw = {"name": "x", "distill": {"loss": [{"method": "ce"}, {"method": "kd"}]}}
    apply_overrides(raw, ["distill.loss.1.temperature=2.5", "seed=7", "data.augment.hflip=true"])
    cfg = PipelineConfig.model_validate(raw)
    assert cfg.distill.loss[1].temperature == 2.5
    assert cfg.seed == 7 and cfg.data.augment.hflip is True


def test_bad_override_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        apply_overrides({"name": "x", "distill": {"loss": []}}, ["distill.loss.3.weight=1", "noequals"])
    locs = [loc for loc, _ in info.value.problems]
    assert locs == ["distill.loss.3.weight", "noequals"]


def test_yaml_syntax_error_names_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nteacher: {model: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    loc, msg = info.value.problems[0]
    assert "line" in loc and "YAML syntax error" in msg


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert info.value.problems[0][1] == "file not found"


def test_every_field_has_a_description():
    def walk(model, seen):
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            ann = field.annotation
            for sub in getattr(ann, "__args__", ()) + (ann,):
                if isinstance(sub, type) and hasattr(sub, "model_fields"):
                    walk(sub, seen)
                for inner in getattr(sub, "__args__", ()):
                    if isinstance(inner, type) and hasattr(inner, "model_fields"):
                        walk(inner, seen)

    walk(PipelineConfig, set())


def test_preprocess_mismatch_choices():
    base = {"name": "x", "data": {"dataset": "synthetic"}}
    assert validate_config(base).teacher.preprocess_mismatch == "refuse"
    for choice in ("convert", "ignore"):
        cfg = validate_config(base | {"teacher": {"preprocess_mismatch": choice}})
        assert cfg.teacher.preprocess_mismatch == choice
    with pytest.raises(ConfigError) as info:
        validate_config(base | {"teacher": {"preprocess_mismatch": "fold"}})
    assert info.value.problems[0][0] == "teacher.preprocess_mismatch"


def test_custom_factories_search_the_pipeline_folder(tmp_path):
    (tmp_path / "p.yaml").write_text(
        "name: x\n"
        "teacher:\n  model: {arch: custom, factory: 'm:f', search_path: [src, /opt/models]}\n"
        "  ensemble: [{model: {arch: custom, factory: 'm:g'}}]\n"
        "distill:\n  student: {arch: custom, factory: 'm:h'}\n")
    cfg = load_config(tmp_path / "p.yaml")
    here = tmp_path.resolve()
    assert cfg.teacher.model.search_path == [str(here / "src"), "/opt/models", str(here)]
    assert cfg.teacher.ensemble[0].model.search_path == [str(here)]
    assert cfg.distill.student.search_path == [str(here)]
    assert validate_config({"name": "x", "distill": {"student": {"arch": "custom", "factory": "m:h"}}}
                           ).distill.student.search_path == []  # no file: nothing to add
