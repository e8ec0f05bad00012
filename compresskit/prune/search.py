"""Latency-driven choice of the structured pruning ratio: prune, measure, stop at the first fast enough.

Fewer MACs is not the same as lower latency (memory-bound layers, kernel choice), so the ratio
is picked by timing each candidate on the target rather than from the MAC count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from compresskit.prune.common import ExampleInputs, PruneResult
from compresskit.prune.structured import prune_structured


def search_ratio(
    model: nn.Module,
    example_inputs: ExampleInputs,
    measure: Callable[[nn.Module], float],
    *,
    ratios: Sequence[float],
    target_latency_ms: float | None = None,
    target_speedup: float | None = None,
    **prune_kwargs: Any,
) -> tuple[PruneResult, dict[str, Any]]:
    """Pick the pruning ratio by measuring: the smallest of `ratios` whose pruned model meets
    the latency target (the least pruning, so the least accuracy lost, that is fast enough).

    `measure(model) -> ms` times a model on the target (the pipeline exports it to ONNX and
    times it with onnxruntime at the budget's batch size and threads). `target_latency_ms` is an
    absolute p50; `target_speedup` is relative to the unpruned model (latency before / after).
    Every ratio tried is a row with its MAC ratio beside its measured latency ratio, because
    fewer MACs is not the same as lower latency. When no ratio meets the target the largest is
    used and ``met_target`` is False. `prune_kwargs` go to `prune_structured`.
    """
    if (target_latency_ms is None) == (target_speedup is None):
        raise ValueError("give exactly one of target_latency_ms and target_speedup")
    if not ratios or any(not 0.0 < r < 1.0 for r in ratios):
        raise ValueError(f"ratios must be a non-empty list of fractions in (0, 1), got {list(ratios)}")
    base_ms = float(measure(model))
    target = target_latency_ms if target_latency_ms is not None else base_ms / float(target_speedup)
    rows: list[dict[str, Any]] = []
    chosen: PruneResult | None = None
    for ratio in sorted(set(ratios)):
        result = prune_structured(model, example_inputs, ratio=ratio, **prune_kwargs)
        ms = float(measure(result.model))
        rows.append({"ratio": ratio, "macs": result.macs_after, "params": result.params_after,
                     "mac_ratio": result.macs_ratio,
                     "latency_ms": ms, "latency_ratio": ms / base_ms if base_ms > 0 else None,
                     "meets_target": ms <= target})
        chosen = result
        if ms <= target:
            break
    assert chosen is not None
    info = {"base_latency_ms": base_ms, "target_latency_ms": target, "target_speedup": target_speedup,
            "chosen_ratio": rows[-1]["ratio"], "met_target": rows[-1]["meets_target"], "tried": rows}
    return chosen, info
