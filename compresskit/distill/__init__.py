"""Knowledge distillation: loss terms, feature taps, and the objective built from a config.

Typical use from a training script::

    objective = build_objective(cfg_terms, student=student, teacher=teacher,
                                example_input=images[:2])
    optimizer = torch.optim.SGD([*student.parameters(), *objective.parameters()], lr=0.1)
    with objective:
        for images, targets in loader:
            out = objective(images, targets)   # LossOutput(loss, logits, parts)
            out.loss.backward()
            ...
    # hooks are removed here; export the student afterwards

or, with the training loop and plain loaders, ``distill(student, teacher, train_loader,
val_loader, terms=cfg_terms, epochs=10)`` (`compresskit.distill.train`).
"""

from compresskit.distill.losses import (
    Term,
    TermInputs,
    at_loss,
    attention_map,
    fitnet_loss,
    kd_loss,
)
from compresskit.distill.objective import LossOutput, Objective, build_objective, methods
from compresskit.distill.registry import TERMS
from compresskit.distill.taps import FeatureTaps
from compresskit.distill.train import distill

__all__ = [
    "TERMS",
    "FeatureTaps",
    "LossOutput",
    "Objective",
    "Term",
    "TermInputs",
    "at_loss",
    "attention_map",
    "build_objective",
    "distill",
    "fitnet_loss",
    "kd_loss",
    "methods",
]
