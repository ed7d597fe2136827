"""Finite Gaussian KDE score: centres = the training set, bandwidth h (docs/paper.md §5).

The KDE (1/N) Σ_j N(c_j, h² I) pushed through the forward process to time t is the mixture
(1/N) Σ_j N(a c_j, v I) with a = scale(t), v = a² h² + var(t); its exact score is an
attention operation over the centres, computed by :func:`collapselab.scores.kde_attention.kde_score`
without ever forming an n×N matrix.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import per_time
from .kde_attention import KDEKeys, kde_log_prob, kde_score


def kde_scale_var(process, t: float, bandwidth: float) -> tuple[float, float]:
    """(a, v) of a KDE component N(c, h² I) pushed to time t: a = scale(t), v = a²h² + var(t)."""
    a = float(process.scale(t))
    return a, a * a * bandwidth * bandwidth + float(process.var(t))


class KDEScore:
    """Exact score of the noised KDE of ``centres`` (the paper's GMM score model)."""

    def __init__(self, centres: Tensor, bandwidth: float, process, dtype=torch.float32):
        self.centres = centres
        self.bandwidth = float(bandwidth)
        self.process = process
        self.keys = KDEKeys.prepare(centres.to(dtype))

    def __call__(self, x: Tensor, t) -> Tensor:
        return per_time(self._at, x, t)

    def _at(self, x: Tensor, t: float) -> Tensor:
        a, v = kde_scale_var(self.process, t, self.bandwidth)
        # The model computes in its keys' dtype (float32: the fused attention path) and on its
        # keys' device whatever the caller passes (the pathwise estimators pass float64 CPU
        # tensors; kde_score would otherwise copy the keys to the CPU on every call).
        y = x.to(device=self.keys.device, dtype=self.keys.dtype)
        return kde_score(y, self.keys, a, v).to(device=x.device, dtype=x.dtype)

    def output_law(self, t0: float) -> KDELaw:
        """The law of the ideal reverse process stopped at t0: the KDE pushed to t0."""
        a, v = kde_scale_var(self.process, t0, self.bandwidth)
        return KDELaw(self.centres, a, v)


class KDELaw:
    """(1/N) Σ_j N(a c_j, v I): exact sampling, exact (streamed) log density and score, and
    its forward marginals (still of this form: a → scale(t)·a, v → scale(t)²v + var(t))."""

    def __init__(self, centres: Tensor, scale: float, var: float, _keys: KDEKeys | None = None):
        # Samples are drawn on the CPU like every other law's (the estimators mix laws and
        # generators there); densities and scores run where the centres are (a GPU when the
        # model lives there) and come back on the caller's device.
        self.centres = centres.detach().to("cpu", torch.float64)
        self.scale, self.var = float(scale), float(var)
        self.dim = centres.shape[1]
        self._keys = _keys if _keys is not None else KDEKeys.prepare(
            centres.detach().to(torch.float64))

    def marginal(self, process, t: float) -> KDELaw:
        a = float(process.scale(t))
        v = a * a * self.var + float(process.var(t))
        return KDELaw(self.centres, a * self.scale, v, _keys=self._keys)

    def score(self, x: Tensor) -> Tensor:
        # The fused CPU attention kernel is exact in float64 and faster than the chunked path;
        # fused CUDA kernels take no float64, so there the stream is asked for directly.
        dev = self._keys.device
        backend = "sdpa" if dev.type == "cpu" else "chunked"
        y = x.to(device=dev, dtype=torch.float64)
        return kde_score(y, self._keys, self.scale, self.var, backend=backend).to(x.device)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        idx = torch.randint(self.centres.shape[0], (n,), generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.scale * self.centres[idx] + math.sqrt(self.var) * z

    def log_prob(self, x: Tensor) -> Tensor:
        y = x.to(device=self._keys.device, dtype=torch.float64)
        return kde_log_prob(y, self._keys, self.scale, self.var).to(x.device)
