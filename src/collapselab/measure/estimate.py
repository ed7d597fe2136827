"""The value type every estimator returns: a number with its uncertainty and its method."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Estimate:
    """An estimated quantity.

    value: the point estimate; ``inf`` when the quantity is known to be infinite, ``nan`` when
        it could not be estimated reliably (never a plausible-looking finite stand-in).
    stderr: one standard error of ``value`` (0 for exact values, nan when unknown).
    estimator: how it was obtained (``exact``, ``monte_carlo``, ``knn``, ``classifier``, ...).
    note: why a value is inf/nan or what caveat applies; empty when there is none.
    """

    value: float
    stderr: float
    estimator: str
    note: str = ""

    @property
    def finite(self) -> bool:
        return math.isfinite(self.value)

    def as_row(self) -> dict:
        return {
            "value": float(self.value),
            "stderr": float(self.stderr),
            "estimator": self.estimator,
            "note": self.note,
        }
