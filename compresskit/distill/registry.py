"""Every distillation method by its config name: one plain dict, filled explicitly here.

Loss terms live in four modules by family (`losses`: ce, kd, fitnet, at; `logit`; `feature`;
`relation`; `schemes`); each exports its own `TERMS` dict. The order of `TERMS` follows the
config's order (`compresskit.config_terms.TERM_SPECS`), which `compresskit methods distill`
prints. Teacher schemes (configured in the teacher stage, not as loss terms) are listed in
`TEACHER_SCHEMES`.
"""

from __future__ import annotations

from compresskit.config_terms import TERM_SPECS
from compresskit.distill import feature, logit, losses, relation, schemes
from compresskit.distill.losses import Term

__all__ = ["TERMS", "TEACHER_SCHEMES"]

_FOUND: dict[str, type[Term]] = {**losses.TERMS, **logit.TERMS, **feature.TERMS,
                                 **relation.TERMS, **schemes.TERMS}
TERMS: dict[str, type[Term]] = {name: _FOUND[name] for name in TERM_SPECS if name in _FOUND}

TEACHER_SCHEMES: dict[str, str] = {
    "specialists": "generalist + specialists teacher: specialists for the classes the teacher confuses, "
                   "combined per image (teacher.specialists)",
}
