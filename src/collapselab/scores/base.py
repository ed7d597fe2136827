"""The one score protocol every model follows: ``score(x, t) -> ∇ log q_t(x)``.

``x`` has shape (n, *event_shape); ``t`` is a float (one time for the whole batch, as in the
samplers) or a tensor of shape (n,). The result has the shape of ``x``.

Models whose output law is known exactly (analytic, KDE, population KDE) also expose
``output_law(process, t0)``: the law of the ideal reverse process stopped at t0, i.e. the
model's target pushed through the forward process to t0 (docs/paper.md §5: stopping early shrinks
by scale(t0) and adds variance var(t0)). Others return None.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Score(Protocol):
    def __call__(self, x: Tensor, t) -> Tensor: ...


@runtime_checkable
class Law(Protocol):
    """A distribution that can be sampled and whose log density is exact."""

    dim: int

    def sample(self, n: int, generator=None) -> Tensor: ...

    def log_prob(self, x: Tensor) -> Tensor: ...


def per_time(score_at: Callable[[Tensor, float], Tensor], x: Tensor, t) -> Tensor:
    """Evaluate a score defined for one time per batch at a float t or a per-sample (n,) t
    (DSM-style evaluation), grouping the samples by their time."""
    if not (isinstance(t, Tensor) and t.dim() > 0):
        return score_at(x, float(t))
    out = torch.empty_like(x)
    for tv in torch.unique(t):
        idx = t == tv
        out[idx] = score_at(x[idx], float(tv))
    return out
