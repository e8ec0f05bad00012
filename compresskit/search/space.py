"""The search space: student architecture families and distillation recipes (no torch, no optuna).

A space draws from any object with Optuna's trial interface (``suggest_categorical``,
``suggest_int``, ``suggest_float``): a live `optuna.Trial`, or `optuna.trial.FixedTrial` to
rebuild a candidate from its parameters. Every family prefixes its parameter names (``pc_``,
``mb_``, ``f_<name>_``), so conditional parameters never clash; the family itself is the
``family`` parameter, the recipe ``recipe`` (an index) and, when searched, ``temperature``.

A candidate's architecture is identified by :func:`spec_key`: the canonical form of its spec
(every default filled in by the config schema, so two spellings of one network have one key)
with the input shape and class count. That key names the candidate in the trial table, in the
latency cache and in a device latency table (``search.latency_table``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from compresskit.config import (
    FactorySpace,
    MBNetSpace,
    PlainConvSpace,
    RangeSpec,
    SearchConfig,
)

__all__ = ["Candidate", "FactoryFamily", "Family", "MBNetFamily", "PlainConvFamily", "RecipeSpace",
           "SearchSpace", "arch_label", "canonical_spec", "recipe_key", "recipe_label", "spec_key"]

_PRIMITIVE = (type(None), bool, int, float, str)
TEMPERATURE_METHODS = ("kd", "dkd", "dist")


class TrialLike(Protocol):
    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...
    def suggest_int(self, name: str, low: int, high: int, *, log: bool = False) -> int: ...
    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float: ...


# ------------------------------------------------------------------ keys and labels

def canonical_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec as the config schema writes it (defaults filled in, JSON types), without the
    data's `num_classes` / `in_channels` and without a custom factory's `search_path` (where the
    module was found does not change the network)."""
    from pydantic import TypeAdapter

    from compresskit.config import ModelSpec

    arch_only = {k: v for k, v in spec.items() if k not in ("num_classes", "in_channels")}
    dumped = TypeAdapter(ModelSpec).validate_python(arch_only).model_dump(mode="json")
    dumped.pop("search_path", None)
    return dumped


def _compact(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def spec_key(spec: Mapping[str, Any], input_shape: Sequence[int], num_classes: int) -> str:
    """``<arch>:<canonical spec JSON>|in=CxHxW|classes=N``: one key per network and input."""
    canon = canonical_spec(spec)
    arch = canon.pop("arch")
    shape = "x".join(str(int(v)) for v in input_shape)
    return f"{arch}:{_compact(canon)}|in={shape}|classes={int(num_classes)}"


def recipe_key(terms: Sequence[Mapping[str, Any]]) -> str:
    return _compact([dict(t) for t in terms])


def recipe_label(terms: Sequence[Mapping[str, Any]]) -> str:
    """e.g. ``ce`` (no KD), ``ce0.1+kd0.9@T4``."""
    parts = []
    for t in terms:
        text = t["method"]
        if len(terms) > 1 or t.get("weight", 1.0) != 1.0:
            text += f"{t.get('weight', 1.0):g}"
        if t["method"] in TEMPERATURE_METHODS and "temperature" in t:
            text += f"@T{t['temperature']:g}"
        parts.append(text)
    return "+".join(parts)


def arch_label(spec: Mapping[str, Any]) -> str:
    """A short human label of a spec, e.g. ``plainconv 16s2-32-64s2-128 k3``."""
    arch = spec.get("arch")
    if arch == "plainconv":
        pairs = zip(spec["channels"], spec["strides"], strict=True)
        layers = "-".join(f"{c}{'s2' if s == 2 else ''}" for c, s in pairs)
        return f"plainconv {layers} k{spec.get('kernel', 3)}"
    if arch == "mbnet":
        blocks = "".join(str(b) for b in spec["blocks"])
        expand = sorted({f"{e:g}" for e in spec["expand"][1:]}) or ["1"]
        kernel = sorted({str(k) for k in spec["kernel"]})
        return (f"mbnet w{spec['width_mult']:g} b{blocks} e{'/'.join(expand)} k{'/'.join(kernel)} "
                f"h{spec['last_channel']} s{spec['stem_stride']}")
    if arch == "mobilenetv2":
        return f"mobilenetv2 w{spec.get('width_mult', 1.0):g} h{spec.get('last_channel', 1280)}"
    if arch in ("torchvision", "custom"):
        name = spec.get("name") or spec.get("factory")
        kwargs = ",".join(f"{k}={v}" for k, v in sorted((spec.get("kwargs") or {}).items()))
        return f"{name}({kwargs})"
    return str(arch)


# ------------------------------------------------------------------ families

@dataclass(frozen=True)
class Candidate:
    """One point of the space: a family, a model spec (without the data's classes and channels)
    and a distillation recipe (a `distill.loss` list as dicts)."""

    family: str
    spec: dict[str, Any]
    recipe: list[dict[str, Any]]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return arch_label(self.spec)

    @property
    def recipe_label(self) -> str:
        return recipe_label(self.recipe)


class Family:
    """A family of architectures: `name` (the `family` parameter's value) and `suggest`."""

    name: str

    def suggest(self, trial: TrialLike) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError


def _categorical(trial: TrialLike, name: str, choices: Sequence[Any]) -> Any:
    """suggest_categorical for any JSON values: lists and mappings are drawn by index."""
    choices = list(choices)
    if all(isinstance(c, _PRIMITIVE) for c in choices):
        return trial.suggest_categorical(name, choices)
    return choices[trial.suggest_categorical(f"{name}__index", list(range(len(choices))))]


class PlainConvFamily(Family):
    """`plainconv` nets: `depth` layers, each with channels drawn from `channels`; strides from
    one of `stride_patterns` (truncated to the depth); one kernel size."""

    name = "plainconv"

    def __init__(self, space: PlainConvSpace) -> None:
        self.space = space

    def suggest(self, trial: TrialLike) -> dict[str, Any]:
        s = self.space
        depth = int(trial.suggest_categorical("pc_depth", list(s.depth)))
        patterns = ["-".join(map(str, p)) for p in s.stride_patterns]
        pattern = [int(v) for v in trial.suggest_categorical("pc_strides", patterns).split("-")]
        channels = [int(trial.suggest_categorical(f"pc_c{i}", list(s.channels))) for i in range(depth)]
        kernel = int(trial.suggest_categorical("pc_kernel", list(s.kernel)))
        return {"arch": "plainconv", "channels": channels, "strides": pattern[:depth], "kernel": kernel}


class MBNetFamily(Family):
    """`mbnet` nets on the space's stage template (base channels and strides): width, blocks per
    stage (a stride-2 stage keeps at least one, so the total downsampling stays), one expansion
    ratio for every stage but the first (which keeps MobileNetV2's 1), one kernel, head width."""

    name = "mbnet"

    def __init__(self, space: MBNetSpace) -> None:
        self.space = space

    def suggest(self, trial: TrialLike) -> dict[str, Any]:
        s = self.space
        width = float(trial.suggest_categorical("mb_width", list(s.width_mult)))
        stem = int(trial.suggest_categorical("mb_stem_stride", list(s.stem_stride)))
        blocks = []
        for i, stride in enumerate(s.strides):
            b = int(trial.suggest_categorical(f"mb_b{i}", list(s.blocks)))
            blocks.append(max(b, 1) if stride == 2 else b)
        if sum(blocks) == 0:
            blocks[-1] = 1
        expand = float(trial.suggest_categorical("mb_expand", list(s.expand)))
        kernel = int(trial.suggest_categorical("mb_kernel", list(s.kernel)))
        head = int(trial.suggest_categorical("mb_head", list(s.last_channel)))
        n = len(s.channels)
        return {"arch": "mbnet", "width_mult": width, "stem_stride": stem, "channels": list(s.channels),
                "blocks": blocks, "strides": list(s.strides), "expand": [1.0] + [expand] * (n - 1),
                "kernel": [kernel] * n, "last_channel": head}


class FactoryFamily(Family):
    """A torchvision classifier or a user factory with a declared parameter space: each kwarg
    is drawn from its list of choices or its {low, high, log, integer} range and put into the
    spec's `kwargs`."""

    def __init__(self, space: FactorySpace) -> None:
        self.space = space
        self.name = space.name

    def suggest(self, trial: TrialLike) -> dict[str, Any]:
        spec = self.space.model.model_dump(mode="json")
        kwargs = dict(spec.get("kwargs") or {})
        for kw, dom in self.space.space.items():
            pname = f"f_{self.name}_{kw}"
            if isinstance(dom, RangeSpec):
                if dom.integer:
                    kwargs[kw] = trial.suggest_int(pname, int(round(dom.low)), int(round(dom.high)), log=dom.log)
                else:
                    kwargs[kw] = trial.suggest_float(pname, dom.low, dom.high, log=dom.log)
            else:
                kwargs[kw] = _categorical(trial, pname, dom)
        spec["kwargs"] = kwargs
        return spec


class RecipeSpace:
    """Distillation recipes: one of `recipes` (by index), and, with `temperatures`, the
    temperature of its kd/dkd/dist terms (drawn only for recipes that have one)."""

    def __init__(self, recipes: Sequence[Sequence[Mapping[str, Any]]],
                 temperatures: Sequence[float] | None = None) -> None:
        self.recipes = [[dict(t) for t in r] for r in recipes]
        self.temperatures = list(temperatures) if temperatures else None

    def suggest(self, trial: TrialLike) -> list[dict[str, Any]]:
        index = int(trial.suggest_categorical("recipe", list(range(len(self.recipes))))) if len(self.recipes) > 1 else 0
        terms = [dict(t) for t in self.recipes[index]]
        if self.temperatures and any(t["method"] in TEMPERATURE_METHODS for t in terms):
            temp = float(trial.suggest_categorical("temperature", list(self.temperatures)))
            for t in terms:
                if t["method"] in TEMPERATURE_METHODS:
                    t["temperature"] = temp
        return terms

    @property
    def needs_teacher(self) -> bool:
        from compresskit.config_terms import TEACHER_FREE

        return any(t["method"] not in TEACHER_FREE for r in self.recipes for t in r)


class SearchSpace:
    """The families and the recipes; `suggest(trial)` draws a `Candidate`."""

    def __init__(self, families: Sequence[Family], recipes: RecipeSpace) -> None:
        if not families:
            raise ValueError("the search space needs at least one family")
        names = [f.name for f in families]
        if len(set(names)) != len(names):
            raise ValueError(f"family names must differ, got {names}")
        self.families = {f.name: f for f in families}
        self.recipes = recipes

    @classmethod
    def from_config(cls, search: SearchConfig) -> SearchSpace:
        fams: list[Family] = []
        if search.families.mbnet.enabled:
            fams.append(MBNetFamily(search.families.mbnet))
        if search.families.plainconv.enabled:
            fams.append(PlainConvFamily(search.families.plainconv))
        fams += [FactoryFamily(f) for f in search.families.factories]
        recipes = [[t.model_dump(mode="json") for t in r] for r in search.recipes]
        return cls(fams, RecipeSpace(recipes, search.temperatures))

    def suggest(self, trial: TrialLike) -> Candidate:
        names = list(self.families)
        family = trial.suggest_categorical("family", names) if len(names) > 1 else names[0]
        spec = self.families[family].suggest(trial)
        recipe = self.recipes.suggest(trial)
        params = dict(getattr(trial, "params", {}) or {})
        return Candidate(family=family, spec=spec, recipe=recipe, params=params)
