"""Scores with an injected error of a chosen magnitude (docs/paper.md §3, §5: observability η).

``PerturbedScore(base, error, magnitude)`` is the score ŝ(y, t) = base(y, t) + magnitude·e(y, t).
When ``base`` is the exact score of the training law q (e.g. :class:`AnalyticScore`), the score
error of docs/paper.md §3 is exactly e_i(y, t) = ŝ − ∇log q_t = magnitude·e(y, t), so ε⋆², ε̂², the
Girsanov martingale M_T and η of :mod:`collapselab.measure.pathwise` are known functions of
``error``.

Error kinds (each a callable ``(y, t) -> tensor`` with the shape of y, exposing the exact error):

- :func:`aligned` — e = w·y: the state itself, scaled (aligned with the drift ½y of the reverse
  SDE; the paper's "aligned" error, largest η).
- :func:`random_linear` — e = A y with a fixed random Gaussian matrix A normalised to Frobenius
  norm √d, i.e. *unit RMS gain*: E‖A z‖² = ‖A‖_F² = d = E‖z‖² for z ~ N(0, I), the same as
  aligned(1) (= identity). The paper's "random linear" error.
- :func:`time_only` — e = ξ(t), a fixed vector function of time only (the paper's "time-only"
  error). Warning: a *smooth* ξ(t) (e.g. a constant vector) does **not** give η ≈ 0: a constant
  drift offset shifts the output mean, which the final samples do see (see
  :mod:`collapselab.measure.pathwise` for the derivation). η → 0 for ξ oscillating fast in t
  (:func:`time_oscillating`), by Riemann–Lebesgue against the smooth response kernel.
- :func:`custom` (or any plain callable passed to :class:`PerturbedScore`) — user error.

Affine errors (aligned, random_linear, time_only) also expose ``affine(t, d) -> (W, b)`` with
e(y, t) = W y + b, so exact Gaussian formulas (no Monte Carlo) can be used for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


class ScoreError:
    """An exact error function e(y, t). Subclasses set ``kind`` and implement ``__call__``."""

    kind = "custom"

    def __call__(self, y: Tensor, t) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def affine(self, t: float, d: int) -> tuple[Tensor, Tensor] | None:
        """(W, b) with e(y, t) = W y + b on R^d (float64), or None when e is not affine."""
        return None


def _col(t, y: Tensor) -> Tensor:
    """A per-sample time tensor reshaped to broadcast against y (batch-first)."""
    return t.to(y.dtype).reshape((-1,) + (1,) * (y.dim() - 1))


class Aligned(ScoreError):
    """e(y, t) = w·y: the state, scaled (aligned with the reverse drift ½ y)."""

    kind = "aligned"

    def __init__(self, w: float = 1.0):
        self.w = float(w)

    def __call__(self, y: Tensor, t) -> Tensor:
        return self.w * y

    def affine(self, t: float, d: int):
        return self.w * torch.eye(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)

    def __repr__(self) -> str:
        return f"aligned(w={self.w})"


class RandomLinear(ScoreError):
    """e(y, t) = A y with a fixed random matrix A, ‖A‖_F = √d (unit RMS gain, see module)."""

    kind = "random_linear"

    def __init__(self, matrix: Tensor):
        self.matrix = torch.as_tensor(matrix, dtype=torch.float64)
        if self.matrix.dim() != 2 or self.matrix.shape[0] != self.matrix.shape[1]:
            raise ValueError("random_linear needs a square (d, d) matrix")

    def __call__(self, y: Tensor, t) -> Tensor:
        flat = y.reshape(y.shape[0], -1)
        return (flat @ self.matrix.to(y.dtype).T).reshape(y.shape)

    def affine(self, t: float, d: int):
        return self.matrix, torch.zeros(d, dtype=torch.float64)

    def __repr__(self) -> str:
        return f"random_linear(dim={self.matrix.shape[0]})"


class TimeOnly(ScoreError):
    """e(y, t) = ξ(t), independent of the state."""

    kind = "time_only"

    def __init__(self, xi: Callable[[float], Tensor] | Tensor, name: str = "time_only"):
        if isinstance(xi, Tensor):
            v = xi.to(torch.float64)
            self.xi = lambda t: v
        else:
            self.xi = xi
        self.name = name

    def vector(self, t: float) -> Tensor:
        return torch.as_tensor(self.xi(float(t)), dtype=torch.float64).reshape(-1)

    def __call__(self, y: Tensor, t) -> Tensor:
        if isinstance(t, Tensor) and t.dim() > 0:
            rows = torch.stack([self.vector(float(s)) for s in t])
            return rows.to(y.dtype).reshape(y.shape)
        v = self.vector(float(t)).to(y.dtype)
        return v.reshape((1,) + y.shape[1:]).expand_as(y).clone()

    def affine(self, t: float, d: int):
        b = self.vector(t)
        return torch.zeros(b.numel(), b.numel(), dtype=torch.float64), b

    def __repr__(self) -> str:
        return self.name


class CallableError(ScoreError):
    """A user error function ``(y, t) -> tensor`` (no affine structure assumed)."""

    def __init__(self, fn: Callable, kind: str = "custom"):
        self.fn = fn
        self.kind = kind

    def __call__(self, y: Tensor, t) -> Tensor:
        return self.fn(y, t)

    def __repr__(self) -> str:
        return f"custom({getattr(self.fn, '__name__', 'fn')})"


# ---- constructors -------------------------------------------------------------------------


def aligned(w: float = 1.0) -> Aligned:
    """e(y, t) = w·y (aligned with the drift: ‖e‖ = |w|·‖y‖)."""
    return Aligned(w)


def random_linear(dim: int, generator: torch.Generator | None = None) -> RandomLinear:
    """e(y, t) = A y, A with i.i.d. N(0, 1) entries rescaled to ‖A‖_F = √dim (unit RMS gain:
    E‖A z‖² = E‖z‖² for z ~ N(0, I), the same mean-square size as aligned(1))."""
    g = torch.randn(dim, dim, dtype=torch.float64, generator=generator)
    return RandomLinear(g * (math.sqrt(dim) / torch.linalg.matrix_norm(g)))


def time_only(xi: Callable[[float], Tensor] | Tensor) -> TimeOnly:
    """e(y, t) = ξ(t): a fixed vector (Tensor) or a function t -> vector of shape (d,)."""
    return TimeOnly(xi)


def time_constant(direction: Tensor) -> TimeOnly:
    """e(y, t) = u: a constant vector (‖e‖ = ‖u‖). Not unobservable: shifts the output mean."""
    u = torch.as_tensor(direction, dtype=torch.float64).reshape(-1)
    return TimeOnly(u, name=f"time_constant(|u|={float(u.norm()):.3g})")


def time_oscillating(direction: Tensor, frequency: float, phase: float = 0.0) -> TimeOnly:
    """e(y, t) = √2·cos(2π f t + φ)·u: a time-only error whose time-average of ‖e‖² is ‖u‖²
    (over whole periods). For large f its observability η → 0 (see module docstring)."""
    u = torch.as_tensor(direction, dtype=torch.float64).reshape(-1)
    f, ph = float(frequency), float(phase)
    return TimeOnly(
        lambda t: math.sqrt(2.0) * math.cos(2 * math.pi * f * t + ph) * u,
        name=f"time_oscillating(f={f:g})",
    )


def custom(fn: Callable, kind: str = "custom") -> CallableError:
    """Wrap a user error function ``(y, t) -> tensor``."""
    return CallableError(fn, kind)


def as_error(error) -> ScoreError:
    return error if isinstance(error, ScoreError) else CallableError(error)


def affine_parts(error, t: float, d: int) -> tuple[Tensor, Tensor] | None:
    """(W, b) with error(y, t) = W y + b for the affine kinds, None otherwise."""
    return error.affine(t, d) if isinstance(error, ScoreError) else None


class PerturbedScore:
    """ŝ(y, t) = base(y, t) + magnitude·e(y, t): a score with an injected error (docs/paper.md §3).

    ``error`` is a :class:`ScoreError` or any callable ``(y, t) -> tensor``. With magnitude 0
    the base score is returned unchanged. ``error_fn(y, t)`` is the injected error
    magnitude·e(y, t) — the exact score error e_i of docs/paper.md §3 when ``base`` is exact.
    """

    def __init__(self, base, error, magnitude: float = 1.0):
        self.base = base
        self.error = as_error(error)
        self.magnitude = float(magnitude)

    def error_fn(self, y: Tensor, t) -> Tensor:
        return self.magnitude * self.error(y, t)

    def __call__(self, y: Tensor, t) -> Tensor:
        s = self.base(y, t)
        if self.magnitude == 0.0:
            return s
        return s + self.magnitude * self.error(y, t).to(s.dtype)

    def output_law(self, *args, **kwargs):
        # The perturbed model's output law is not known in closed form (see pathwise for the
        # Gaussian-linear exact case).
        return None

    def __repr__(self) -> str:
        return f"PerturbedScore({self.base!r}, {self.error!r}, magnitude={self.magnitude})"
