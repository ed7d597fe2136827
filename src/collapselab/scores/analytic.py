"""Exact scores of Gaussian-mixture laws: the oracle and the population KDE (docs/paper.md §5)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..targets import GaussianMixture
from .base import per_time


def _on_cpu(score, y: Tensor) -> Tensor:
    """``score(y)`` in float64 on the CPU, where the laws' parameters live, returned in y's
    dtype and on y's device (a sampler running on a GPU passes CUDA tensors)."""
    return score(y.detach().to("cpu", dtype=torch.float64)).to(device=y.device, dtype=y.dtype)


class AnalyticScore:
    """The exact score ∇ log q_t of a Gaussian mixture q pushed through the forward process.

    With ``bandwidth=h`` it is the population KDE of q (the N → ∞ limit of a KDE fitted to
    samples of q): the score of (q * N(0, h² I))_t, whose law stays a Gaussian mixture.
    """

    def __init__(self, law: GaussianMixture, process, bandwidth: float = 0.0):
        self.base = law.convolve(bandwidth) if bandwidth > 0 else law
        self.process = process
        self._cache: dict[float, GaussianMixture] = {}

    def marginal(self, t: float) -> GaussianMixture:
        t = float(t)
        law = self._cache.get(t)
        if law is None:
            if len(self._cache) > 4096:
                self._cache.clear()
            law = self._cache[t] = self.base.marginal(self.process, t)
        return law

    def __call__(self, x: Tensor, t) -> Tensor:
        return per_time(lambda y, tv: _on_cpu(self.marginal(tv).score, y), x, t)

    def output_law(self, t0: float) -> GaussianMixture:
        """Law of the ideal reverse process stopped at t0: the forward marginal at t0."""
        return self.base.marginal(self.process, t0)


class LawScore:
    """Exact score ∇log q_t of any law with ``marginal(process, t)`` returning a law that has
    ``score`` (GaussianMixture, finite-KDE laws, mixtures of them): the reference ∇log q_{i,t}
    the pathwise quantities compare a model with (docs/paper.md §3)."""

    def __init__(self, law, process):
        self.law, self.process = law, process

    def __call__(self, x: Tensor, t) -> Tensor:
        def at(y: Tensor, tv: float) -> Tensor:
            return _on_cpu(self.law.marginal(self.process, tv).score, y)

        return per_time(at, x, t)

    def output_law(self, t0: float):
        return self.law.marginal(self.process, t0)


def exact_score(law, process):
    """The exact score of ``law``'s forward marginals (cached per t for Gaussian mixtures)."""
    return (
        AnalyticScore(law, process) if isinstance(law, GaussianMixture) else LawScore(law, process)
    )
