"""Distil a teacher into a student with plain loaders: the objective from loss-term dicts, then
the one training loop.

The distill stage does the same with the pipeline's loaders (`compresskit.train.loaders_for`)
and memoised teacher logits; this is the function for a script of one's own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from compresskit.config import TrainConfig
    from compresskit.train import FitResult

__all__ = ["distill"]


def _dump(term: Any) -> dict[str, Any]:
    return term.model_dump(mode="json") if hasattr(term, "model_dump") else dict(term)


def distill(student: nn.Module, teacher: nn.Module | None, train_loader: Iterable[Any],
            val_loader: Iterable[Any] | None = None, *, terms: Sequence[Mapping[str, Any] | Any] | None = None,
            cfg: TrainConfig | None = None, epochs: int | None = None,
            optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
            device: torch.device | str | None = None, seed: int | None = 0,
            example_input: torch.Tensor | None = None, **fit_kwargs: Any) -> FitResult:
    """Train `student` through the objective of `terms`, learning from the frozen `teacher`.

    `terms`: dicts such as ``{"method": "kd", "weight": 0.9, "temperature": 4.0}`` or the
    config's term models (see `compresskit.distill.methods()`); default: the config's default,
    0.1 * ce + 0.9 * kd at temperature 4. `example_input` (a batch; two images suffice) lets
    the objective learn feature shapes; default: the first batch of `val_loader` (else of
    `train_loader`), taken without moving the loader's generator on. The objective's own
    parameters (feature adapters) are trained too, so a caller's `optimizer` must be made
    after them, i.e. omit it for terms with adapters (it is then made from `cfg`). The other
    arguments are `compresskit.train.fit`'s; the objective's hooks are removed at the end.
    """
    from compresskit.config import default_kd_loss
    from compresskit.distill.objective import build_objective
    from compresskit.train import first_batch, fit, training_device

    dumped = [_dump(t) for t in (terms if terms is not None else default_kd_loss())]
    device = training_device(device, student)
    student.to(device)
    if teacher is not None:
        teacher.to(device)
    if example_input is None:
        example_input = first_batch(val_loader if val_loader is not None else train_loader)[0][:2]
    objective = build_objective(dumped, student=student, teacher=teacher, example_input=example_input.to(device))
    try:
        if optimizer is not None:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if any(p.requires_grad and id(p) not in held for p in objective.parameters()):
                raise ValueError("the loss terms have trainable adapters that the given optimizer does not "
                                 "hold; omit `optimizer` (it is then made from cfg, adapters included)")
        return fit(student, objective, train_loader, val_loader, cfg=cfg, epochs=epochs, optimizer=optimizer,
                   scheduler=scheduler, device=device, seed=seed, **fit_kwargs)
    finally:
        objective.close()
