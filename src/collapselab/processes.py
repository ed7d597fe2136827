"""Forward noising processes (docs/paper.md §2).

Every process here is a variance-preserving SDE ``dX = -½ β(t) X dt + √β(t) dB`` on [0, T].
Its marginal given X_0 = x is N(scale(t)·x, var(t)·I) with ``scale = exp(-½ B(t))`` and
``var = 1 - exp(-B(t))``, where B(t) = ∫₀ᵗ β. The paper's Ornstein–Uhlenbeck process is β ≡ 1.
The reverse SDE with a score s is ``dY = [½ β Y + β s(Y, t)] dt + √β dB̄``, run from T down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def _as_tensor(t, like: Tensor | None = None) -> Tensor:
    if isinstance(t, Tensor):
        return t
    dtype = like.dtype if like is not None else torch.float64
    device = like.device if like is not None else None
    return torch.as_tensor(t, dtype=dtype, device=device)


@dataclass(frozen=True)
class VPProcess:
    """Variance-preserving SDE with a linear β schedule β(t) = β_min + (β_max − β_min)·t/T.

    ``VPProcess(beta_min=1, beta_max=1, T=4)`` is the paper's OU process (see :class:`OU`).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    T: float = 1.0

    def beta(self, t):
        """β(t)."""
        return self.beta_min + (self.beta_max - self.beta_min) * t / self.T

    def integral(self, t):
        """B(t) = ∫₀ᵗ β(s) ds."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t / self.T

    def scale(self, t):
        """Mean factor of the marginal: X_t | X_0 = x has mean scale(t)·x."""
        if isinstance(t, Tensor):
            return torch.exp(-0.5 * self.integral(t))
        return math.exp(-0.5 * self.integral(t))

    def var(self, t):
        """Variance of the marginal: 1 − exp(−B(t)) (docs/paper.md §2: 1 − e^{−t} for OU)."""
        if isinstance(t, Tensor):
            return -torch.expm1(-self.integral(t))
        return -math.expm1(-self.integral(t))

    def noise(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """X_t = scale(t)·x0 + √var(t)·ε for a per-sample time vector ``t`` of shape (n,)."""
        shape = (-1,) + (1,) * (x0.dim() - 1)
        t = _as_tensor(t, x0)
        return self.scale(t).reshape(shape) * x0 + self.var(t).sqrt().reshape(shape) * eps

    def reverse_drift(self, y: Tensor, t, score: Tensor) -> Tensor:
        """Drift of the reverse SDE in reverse time: ½ β y + β s (docs/paper.md §2)."""
        b = self.beta(t)
        return 0.5 * b * y + b * score


@dataclass(frozen=True)
class OU(VPProcess):
    """The paper's forward process dX = −½ X dt + dB: scale e^{−t/2}, variance 1 − e^{−t}."""

    beta_min: float = 1.0
    beta_max: float = 1.0
    T: float = 4.0

    def beta(self, t):
        return 1.0 if not isinstance(t, Tensor) else torch.ones_like(t)

    def integral(self, t):
        return t


SCHEDULES = ("uniform", "geometric", "edm")


def time_grid(T: float, t0: float, steps: int, dtype=torch.float64, schedule: str = "uniform",
              rho: float = 7.0) -> Tensor:
    """Reverse-time grid T = t_0 > t_1 > ... > t_steps = t0 (steps + 1 points), a pure function
    of (T, t0, steps, schedule, rho), shared by every sampler and path estimator.

    ``uniform``: equal steps (DDPM's grid). ``geometric``: equal steps in log t,
    t_k = T (t0/T)^{k/steps}, so Δt_k/t_k is constant — the reverse drift's stiffness near t0
    grows like 1/var(t) ≈ 1/t for an OU-type process, and a step proportional to t keeps every
    Euler step equally accurate (needs t0 > 0). ``edm``: Karras et al. 2022 (EDM, eq. 5)
    applied to t, t_k = (T^{1/ρ} + k/steps (t0^{1/ρ} − T^{1/ρ}))^ρ: finest near t0 for ρ > 1,
    uniform for ρ = 1, defined for t0 = 0.
    """
    if schedule == "uniform":
        return torch.linspace(T, t0, steps + 1, dtype=dtype)
    if schedule == "geometric":
        if not t0 > 0:
            raise ValueError("the geometric schedule needs t0 > 0")
        g = torch.exp(torch.linspace(math.log(T), math.log(t0), steps + 1, dtype=torch.float64))
    elif schedule == "edm":
        if not rho > 0:
            raise ValueError("rho must be > 0")
        u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
        g = (T ** (1 / rho) + u * (t0 ** (1 / rho) - T ** (1 / rho))) ** rho
    else:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    g[0], g[-1] = T, t0  # the end points exactly, whatever the rounding of exp/pow
    return g.to(dtype)
