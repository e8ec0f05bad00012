"""Placeholder: filled in by the schemes distillation terms."""

from __future__ import annotations

from compresskit.distill.losses import Term

TERMS: dict[str, type[Term]] = {}
