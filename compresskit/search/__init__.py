"""Search the student for a target under budgets: ``compresskit search PIPELINE.yaml``.

Latency first (every candidate is exported, quantized and timed untrained, or looked up in a
device latency table, and dropped over the budget before any training), accuracy by
multi-fidelity (short proxy trainings judged by Optuna's pruner), then full training, INT8 and
measurement of the best few; the winner is written as a plain pipeline (``chosen.yaml``).

- :func:`run_search` (``engine``): the search, returning a :class:`SearchResult`;
- ``space``: the families (:class:`MBNetFamily`, :class:`PlainConvFamily`,
  :class:`FactoryFamily`), the distillation recipes (:class:`RecipeSpace`), :func:`spec_key`;
- ``latency``: :func:`screen_model`, :class:`LatencyTable`, :class:`LatencyCache`;
- ``report``: the Pareto front and the Markdown table.

`space`, `latency` and `report` import neither optuna nor torch at import time; the search
needs the ``search`` extra (optuna) and the ``train`` extra.
"""

from compresskit.search.engine import SearchResult, SearchUnavailable, run_search, search_dir
from compresskit.search.latency import LatencyCache, LatencyTable, screen_model
from compresskit.search.report import markdown, pareto_front
from compresskit.search.space import (
    Candidate,
    FactoryFamily,
    MBNetFamily,
    PlainConvFamily,
    RecipeSpace,
    SearchSpace,
    arch_label,
    canonical_spec,
    recipe_label,
    spec_key,
)

__all__ = ["Candidate", "FactoryFamily", "LatencyCache", "LatencyTable", "MBNetFamily", "PlainConvFamily",
           "RecipeSpace", "SearchResult", "SearchSpace", "SearchUnavailable", "arch_label", "canonical_spec",
           "markdown", "pareto_front", "recipe_label", "run_search", "screen_model", "search_dir", "spec_key"]
