"""Pathwise quantities of one generation (docs/paper.md §3): ε⋆², ε̂², the Girsanov martingale M_T
and the observability coefficient η.

Conventions (all functions):

- Score error e(y, t) = ŝ(y, t) − ∇log q_t(y), where q = ``law`` (a GaussianMixture: the training
  law of the generation) and q_t = law.marginal(process, t) has an exact score.
- For a VP process with rate β(t) the reverse SDE is dY = β[½Y + ŝ] dt + √β dB̄ (reverse time),
  so the drift difference between the learned and the ideal process is β·e and Girsanov weighs
  it by 1/β:  KL(path) = ½ ∫ β(t) E‖e‖² dt.  We therefore define

      ε⋆² = ∫_{t0}^{T} β(t) E_{q_t} ‖e(y, t)‖² dt,     M_T = −∫_{t0}^{T} √β(t) e(Y_t, t)·dB̄_t,

  which are exactly the paper's quantities for its OU process (β ≡ 1), and keep the identities
  Var(M_T) = ε⋆² and KL(p̂ ‖ q_t0) ≤ ½ ε̂² for any β schedule.
- Euler–Maruyama (the samplers' own :func:`collapselab.samplers.euler_maruyama`) evaluates the
  error at the left end of each reverse step (Itô), so along a discretised path the integrals
  are the left-point sums Σ_k β_k ‖e(Y_k, t_k)‖² Δt_k and Σ_k √β_k e(Y_k, t_k)·ΔB̄_k. For the
  EM chain these are *exact* discrete Girsanov quantities: ½ Σ β_k‖e_k‖²Δt_k is the KL between
  the learned and the ideal EM chains.

Observability of time-only errors (derivation; docs/paper.md §3 says η ≈ 0). For e = ξ(t),
M_T = −∫ √β ξ(t)·dB̄_t is a Gaussian linear functional of the reverse noise, and Y_t0 depends
on the same noise: for q = N(μ, s²I) under OU, Y_t0 = Φ(t0, T)Y_T + ∫ Φ(t0, t) dB̄_t + const
with Φ(t0, t) = exp(∫_{t0}^{t} (½ − 1/σ_u²) du), σ_u² = e^{−u}s² + 1 − e^{−u}. Hence
Cov(M_T, Y_t0) = −∫ Φ(t0, t) ξ(t) dt ≠ 0 and η = ‖∫Φξ dt‖² / (σ_t0² ∫‖ξ‖² dt) > 0 for a
smooth ξ (a constant drift offset shifts the output mean, which the samples do see). η → 0 only
when ξ oscillates in t faster than the kernel Φ varies (Riemann–Lebesgue); e.g. ξ(t) = √2
cos(2πft)u with f ≫ 1. :func:`gaussian_linear_em` computes η exactly in all these cases.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import integrate
from torch import Tensor

from ..processes import time_grid
from ..samplers import euler_maruyama
from ..scores.analytic import AnalyticScore, exact_score
from ..scores.perturbed import PerturbedScore, affine_parts
from ..targets import GaussianMixture
from . import gaussians
from .estimate import Estimate


# ---- helpers ------------------------------------------------------------------------------
def _beta(process, t: float) -> float:
    return float(process.beta(float(t)))


def _gen_seed(generator: torch.Generator | None) -> int:
    """A numpy/sklearn seed drawn from the torch generator (one seed stream per chain)."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())


def _same_law(a: GaussianMixture, b: GaussianMixture) -> bool:
    return (
        a.means.shape == b.means.shape
        and torch.equal(a.weights, b.weights)
        and torch.equal(a.means, b.means)
        and torch.equal(a.covs, b.covs)
    )


def _affine_error(score, law: GaussianMixture, process) -> Callable | None:
    """t -> (W, b) with e(y, t) = W y + b when ``score`` is an affine PerturbedScore of the
    exact score of ``law`` (so the error is known exactly); None otherwise."""
    if not isinstance(score, PerturbedScore):
        return None
    base = score.base
    if not isinstance(base, AnalyticScore) or base.process != process:
        return None
    if not _same_law(base.base, law):
        return None
    d = law.dim
    if affine_parts(score.error, 1.0, d) is None:
        return None
    c = score.magnitude

    def wb(t: float):
        W, b = affine_parts(score.error, t, d)
        return c * W, c * b

    return wb


def _affine_energy(law_t: GaussianMixture, W: Tensor, b: Tensor) -> float:
    """E_{q_t}‖W y + b‖² = Σ_k π_k [tr(W Σ_k Wᵀ) + ‖W μ_k + b‖²] (exact for a mixture)."""
    tr = torch.einsum("ij,kjl,il->k", W, law_t.covs, W)
    mu = law_t.means @ W.T + b
    return float(law_t.weights @ (tr + (mu * mu).sum(1)))


def error_function(score, law: GaussianMixture, process) -> Callable[[Tensor, float], Tensor]:
    """e(y, t) = ŝ(y, t) − ∇log q_t(y) (docs/paper.md §3), evaluated in float64."""
    exact = exact_score(law, process)

    def e(y: Tensor, t) -> Tensor:
        y = y.to(torch.float64)
        return score(y, t).to(torch.float64) - exact(y, t)

    return e


# ---- quadrature over [t0, T] ---------------------------------------------------------------
@dataclass
class _Rule:
    """Nodes t_j and weights w_j (dt already included) of a rule on [t0, T], plus a coarser
    companion rule (weights on the same or on its own nodes) for the quadrature-error estimate."""

    nodes: np.ndarray
    weights: np.ndarray
    coarse_nodes: np.ndarray
    coarse_weights: np.ndarray
    nested: bool  # coarse rule reuses the fine nodes (coarse_weights indexes them)
    order: int  # convergence order p: error estimate = |coarse − fine| / (2^p − 1)


def _rule(t0: float, T: float, n: int, quadrature: str, grid: str) -> _Rule:
    if grid not in ("log", "linear"):
        raise ValueError(f"grid must be 'log' or 'linear', got {grid!r}")
    if t0 <= 0 and grid == "log":
        raise ValueError("grid='log' needs t0 > 0")
    lo, hi = (math.log(t0), math.log(T)) if grid == "log" else (t0, T)
    to_t = np.exp if grid == "log" else (lambda u: u)
    jac = (lambda u: np.exp(u)) if grid == "log" else (lambda u: np.ones_like(u))
    if quadrature in ("trapezoid", "simpson"):
        if n < 3:
            raise ValueError("n_times must be >= 3")
        u = np.linspace(lo, hi, n)
        sub = np.unique(np.r_[np.arange(0, n, 2), n - 1])
        if quadrature == "trapezoid":
            w, wc, p = integrate.trapezoid(np.eye(n), u, axis=1), None, 2
            wc = integrate.trapezoid(np.eye(len(sub)), u[sub], axis=1)
        else:
            w, p = integrate.simpson(np.eye(n), x=u, axis=1), 4
            wc = integrate.simpson(np.eye(len(sub)), x=u[sub], axis=1)
        coarse = np.zeros(n)
        coarse[sub] = wc
        return _Rule(to_t(u), w * jac(u), to_t(u), coarse * jac(u), True, p)
    if quadrature == "gauss_legendre":
        def gl(m):
            x, w = np.polynomial.legendre.leggauss(m)
            u = 0.5 * (hi - lo) * x + 0.5 * (hi + lo)
            return to_t(u), 0.5 * (hi - lo) * w * jac(u)

        tn, wn = gl(n)
        tc, wc = gl(max(n // 2, 1))
        # GL with n/2 nodes is a different (non-nested) rule; |I_n − I_{n/2}| bounds the error
        # of the coarse rule, a conservative estimate for the fine one (order set to 0).
        return _Rule(tn, wn, tc, wc, False, 0)
    raise ValueError(
        f"quadrature must be 'trapezoid', 'simpson' or 'gauss_legendre', got {quadrature!r}"
    )


def _integrate(rule: _Rule, node_fn: Callable[[float], tuple[float, float]], what: str):
    """Apply the rule to node values (mean, stderr) and return (value, stderr, note)."""
    fine = np.array([node_fn(t) for t in rule.nodes])  # (n, 2)
    val = float(rule.weights @ fine[:, 0])
    mc_se = float(math.sqrt(np.sum((rule.weights * fine[:, 1]) ** 2)))
    if rule.nested:
        diff = float((rule.coarse_weights - rule.weights) @ fine[:, 0])
        diff_se = float(math.sqrt(np.sum(((rule.coarse_weights - rule.weights) * fine[:, 1]) ** 2)))
        quad_err = abs(diff) / (2**rule.order - 1)
        diff_se /= 2**rule.order - 1
    else:
        coarse = np.array([node_fn(t) for t in rule.coarse_nodes])
        diff = float(rule.coarse_weights @ coarse[:, 0]) - val
        diff_se = float(math.sqrt(mc_se**2 + np.sum((rule.coarse_weights * coarse[:, 1]) ** 2)))
        quad_err = abs(diff)
    se = math.sqrt(mc_se**2 + quad_err**2)
    note = (
        f"{what}: {len(rule.nodes)} nodes; Monte Carlo stderr {mc_se:.3g}, quadrature error "
        f"estimate {quad_err:.3g} (coarse-vs-fine rule, itself ±{diff_se:.2g} from MC noise); "
        "stderr combines both"
    )
    return val, se, note


# ---- ε⋆²: ideal-path score energy ------------------------------------------------------------
def score_energy_ideal(
    score,
    law: GaussianMixture,
    process,
    t0: float,
    T: float,
    n_times: int = 50,
    n_mc: int = 2000,
    generator: torch.Generator | None = None,
    quadrature: str = "simpson",
    grid: str = "log",
    exact: str | bool = "auto",
) -> Estimate:
    """ε⋆² = ∫_{t0}^{T} β(t) E_{q_t}‖ŝ(y, t) − ∇log q_t(y)‖² dt (docs/paper.md §3; β ≡ 1 for OU).

    The ideal reverse process has marginals q_t, so a marginal expectation suffices: at each
    quadrature node, n_mc fresh draws of q_t give the mean of β‖e‖² and its stderr, which is
    propagated through the quadrature weights. The quadrature error is estimated by a coarser
    companion rule (every other node for trapezoid/Simpson, Richardson-scaled; n/2-point
    Gauss–Legendre) and combined with the MC stderr (both are in the note).

    ``grid='log'`` (default) places the nodes uniformly in log t: score errors of laws with
    small-scale structure (KDE bandwidth h, component std s) vary on the scale t ~ s² + t near
    t0 (e.g. the DSM integrand behaves like d/t), so a log grid gives every scale the same
    relative resolution; the Jacobian dt = t du is included in the weights.

    ``exact='auto'``: when ``score`` is a :class:`PerturbedScore` of the exact score of ``law``
    with an affine error (aligned, random_linear, time_only), E_{q_t}‖W y + b‖² is exact for a
    Gaussian mixture and the time integral is done by adaptive quadrature (estimator 'exact').
    ``exact=False`` forces Monte Carlo; ``exact=True`` raises if no exact path is available.
    """
    wb = _affine_error(score, law, process) if exact in ("auto", True) else None
    if exact is True and wb is None:
        raise ValueError("no exact path: score is not an affine PerturbedScore of law's score")
    if wb is not None:
        def g(u):
            t = math.exp(u)
            W, b = wb(t)
            return t * _beta(process, t) * _affine_energy(law.marginal(process, t), W, b)

        val, err = integrate.quad(g, math.log(t0), math.log(T), epsabs=1e-12, epsrel=1e-10,
                                  limit=200)
        return Estimate(val, err, "exact", "affine error on a Gaussian mixture: "
                        "closed-form E‖W y + b‖², adaptive quadrature in log t")

    e = error_function(score, law, process)
    rule = _rule(t0, T, n_times, quadrature, grid)

    def node(t: float):
        y = law.marginal(process, t).sample(n_mc, generator)
        f = _beta(process, t) * (e(y, t) ** 2).reshape(n_mc, -1).sum(1)
        return float(f.mean()), float(f.std() / math.sqrt(n_mc))

    val, se, note = _integrate(rule, node, f"{quadrature} in {grid} t, {n_mc} draws/node")
    return Estimate(val, se, "monte_carlo", note)


def dsm_constant(
    law: GaussianMixture,
    process,
    t0: float,
    T: float,
    n_times: int = 50,
    n_mc: int = 2000,
    generator: torch.Generator | None = None,
    quadrature: str = "simpson",
    grid: str = "log",
) -> Estimate:
    """C with L_DSM(ŝ) = ε⋆² + C (docs/paper.md §3), for the training law q = ``law``.

    Weighting convention (the score-matching form, same β weight as ε⋆²):

        L_DSM(ŝ) = ∫_{t0}^{T} β(t) E_{X0~q, Xt|X0} ‖ŝ(X_t, t) − ∇log p_t(X_t | X0)‖² dt,

    with ∇log p_t(x | x0) = −(x − a_t x0)/v_t (a_t = scale, v_t = var). Since
    E[∇log p_t(X_t|X0) | X_t] = ∇log q_t(X_t), the cross term vanishes and

        C = ∫ β(t) E‖∇log p_t(X_t|X0) − ∇log q_t(X_t)‖² dt = ∫ β(t) (d/v_t − J(q_t)) dt ≥ 0,

    J = Fisher information. A training loss that *averages* over t ~ U[t0, T] instead of
    integrating equals L_DSM/(T − t0); multiply it by (T − t0) before subtracting C. The
    integrand grows like d/t near t0 (log grid by default). C is exact (adaptive quadrature)
    for a single Gaussian, where J(q_t) = tr(Σ_t⁻¹); Monte Carlo otherwise, sampling (X0, X_t)
    and averaging the non-negative conditional-minus-marginal score gap directly.
    """
    d = law.dim
    if law.n_components == 1:
        def g(u):
            t = math.exp(u)
            cov = law.marginal(process, t).covs[0]
            fisher = float(torch.linalg.inv(cov).diagonal().sum())
            return t * _beta(process, t) * (d / float(process.var(t)) - fisher)

        val, err = integrate.quad(g, math.log(t0), math.log(T), epsabs=1e-12, epsrel=1e-10,
                                  limit=200)
        return Estimate(val, err, "exact", "single Gaussian: J(q_t) = tr(Σ_t⁻¹)")

    exact = exact_score(law, process)
    rule = _rule(t0, T, n_times, quadrature, grid)

    def node(t: float):
        a, v = float(process.scale(t)), float(process.var(t))
        x0 = law.sample(n_mc, generator)
        z = torch.randn(x0.shape, dtype=torch.float64, generator=generator)
        xt = a * x0 + math.sqrt(v) * z
        f = _beta(process, t) * ((-z / math.sqrt(v) - exact(xt, t)) ** 2).sum(1)
        return float(f.mean()), float(f.std() / math.sqrt(n_mc))

    val, se, note = _integrate(rule, node, f"{quadrature} in {grid} t, {n_mc} draws/node")
    return Estimate(val, se, "monte_carlo", note)


# ---- simulation along paths -----------------------------------------------------------------
class _Recorder:
    """Wraps a score and remembers its last evaluation, so a sampler callback can reuse it."""

    def __init__(self, score):
        self.score = score
        self.x = self.t = self.out = None

    def __call__(self, x, t):
        self.out = self.score(x, t)
        self.x, self.t = x, t
        return self.out

    def value_at(self, x, t):
        if self.x is x and self.t == t:
            return self.out
        return self.score(x, t)


def _start(law: GaussianMixture, process, T: float, n: int, start: str, generator) -> Tensor:
    if start == "normal":
        return torch.randn(n, law.dim, dtype=torch.float64, generator=generator)
    if start == "law":
        return law.marginal(process, T).sample(n, generator)
    raise ValueError(f"start must be 'normal' (N(0, I), the paper) or 'law' (q_T), got {start!r}")


def _grid(T, t0, steps, times):
    return time_grid(T, t0, steps) if times is None else torch.as_tensor(times, dtype=torch.float64)


def skewed_mean(values, generator: torch.Generator | None = None, n_resamples: int = 2000):
    """Mean of skewed, non-negative path energies with a standard error that allows for skew.

    Returns (mean, stderr, sample skewness). The stderr is the larger half-width of the BCa
    bootstrap interval (Efron 1987) at the one-sigma level (z = ±1, 68.27%), so a right-skewed
    energy (a few paths carry much of the mean) gets the wider upper side instead of the
    symmetric s/√n. Why BCa: the mean of n draws with skewness γ has skewness γ/√n, and the
    plain CLT interval is only first-order accurate in it; BCa corrects the interval's skew
    (acceleration a = Σd³ / (6 (Σd²)^{3/2}), d = x − x̄, the closed-form jackknife of a mean) and
    its median bias (z0) to second order. Valid when the variance is finite and n ≫ γ²; the
    bootstrap resamples are drawn in chunks, so memory stays O(n).
    """
    from scipy.special import ndtr, ndtri

    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    m = float(x.mean()) if n else float("nan")
    if n < 3:
        return m, (float(x.std(ddof=1)) / math.sqrt(n) if n == 2 else float("nan")), 0.0
    d = x - m
    s2, s3 = float(d @ d), float((d * d) @ d)
    sd = math.sqrt(s2 / (n - 1))
    if not sd > 0:
        return m, 0.0, 0.0
    skew = (s3 / n) / (s2 / n) ** 1.5
    rng = np.random.default_rng(_gen_seed(generator))
    boot = np.empty(n_resamples)
    chunk = max(1, min(n_resamples, 4_000_000 // n))
    for j in range(0, n_resamples, chunk):
        k = min(chunk, n_resamples - j)
        boot[j: j + k] = x[rng.integers(0, n, size=(k, n))].mean(1)
    frac = float(np.mean(boot < m)) + 0.5 * float(np.mean(boot == m))
    z0 = float(ndtri(min(max(frac, 1.0 / n_resamples), 1.0 - 1.0 / n_resamples)))
    acc = s3 / (6.0 * s2**1.5)
    lo_q, hi_q = (float(ndtr(z0 + (z0 + z) / (1.0 - acc * (z0 + z)))) for z in (-1.0, 1.0))
    lo, hi = np.quantile(boot, [lo_q, hi_q])
    return m, float(max(hi - m, m - lo)), float(skew)


def score_energy_learned(
    score,
    law: GaussianMixture,
    process,
    t0: float,
    T: float,
    steps: int = 100,
    n_paths: int = 2000,
    generator: torch.Generator | None = None,
    start="normal",
    times: Tensor | None = None,
    rel_tol: float | None = None,
    max_paths: int | None = None,
) -> Estimate:
    """ε̂² = ∫_{t0}^{T} β(t) E‖e(Ŷ_t, t)‖² dt along the *learned* reverse path (docs/paper.md §3-4,
    Prop 3.1: KL(p̂ ‖ q_t0) ≤ KL(p̂_T ‖ q_T) + ½ ε̂², with equality for a score exact for its
    own law).

    Ŷ is simulated with the samplers' Euler–Maruyama and ``score`` on the uniform grid (or
    ``times``), started from N(0, I) (``start='normal'``, as the paper samples), from q_T
    (``start='law'``), from the model's own T-marginal (``start='model'``: ``score.output_law(T)``,
    the start of the law whose KL the bound compares) or from any law with ``sample``
    (e.g. that T-marginal passed directly). Each path accumulates the left-point sum
    Σ_k β_k ‖e(Y_k, t_k)‖² Δt_k (twice the exact KL between the learned and the ideal EM
    chains); time discretisation is not part of stderr.

    Path energies are strongly right-skewed, so the stderr comes from :func:`skewed_mean` (BCa
    bootstrap). ``rel_tol``: keep adding batches of ``n_paths`` paths until stderr/mean ≤
    rel_tol (or ``max_paths``, default 10 × n_paths, is reached); the note records the count,
    the skewness and whether the target was met.
    """
    exact = exact_score(law, process)
    grid = _grid(T, t0, steps, times)
    k = len(grid) - 1
    if isinstance(start, str) and start == "model":
        law_fn = getattr(score, "output_law", None)
        start = None if law_fn is None else law_fn(T)
        if start is None:
            raise ValueError("start='model' needs a score whose output_law (its own law) is "
                             "known")
    cap = max_paths if max_paths is not None else 10 * n_paths
    chunks: list[Tensor] = []
    while True:
        rec = _Recorder(score)
        acc = torch.zeros(n_paths, dtype=torch.float64)

        def cb(i, t, t_next, x, x_next, dB, rec=rec, acc=acc):
            e = rec.value_at(x, t).to(torch.float64) - exact(x, t)
            acc.add_(_beta(process, t) * (t - t_next) * (e**2).reshape(n_paths, -1).sum(1))

        if isinstance(start, str):
            x = _start(law, process, T, n_paths, start, generator)
            where = start
        else:
            x = start.sample(n_paths, generator).to(torch.float64)
            where = "model T-marginal"
        euler_maruyama(rec, x, grid, process, generator, callback=cb)
        chunks.append(acc)
        vals = torch.cat(chunks).numpy()
        m, se, skew = skewed_mean(vals, generator)
        n = len(vals)
        if rel_tol is None or n + n_paths > cap or not (m > 0) or se <= rel_tol * m:
            break
    met = ""
    if rel_tol is not None:
        ok = m > 0 and se <= rel_tol * m
        met = (f"; relative stderr {se / m:.2g} {'≤' if ok else '> (path cap reached)'} "
               f"{rel_tol:g}" if m > 0 else "; mean 0")
    return Estimate(m, se, "monte_carlo",
                    f"{n} learned EM paths, {k} steps, start={where}; left-point sum; "
                    f"skewness {skew:.2g}; stderr: BCa bootstrap (one-sigma, larger side){met}")


def girsanov_martingale(
    score,
    law: GaussianMixture,
    process,
    t0: float,
    T: float,
    steps: int = 100,
    n_paths: int = 4000,
    generator: torch.Generator | None = None,
    start: str = "law",
    times: Tensor | None = None,
    return_energy: bool = False,
):
    """(Y_t0, M_T) along *ideal* reverse trajectories (docs/paper.md §3): Y solves the reverse SDE
    with the exact score ∇log q_t (Euler–Maruyama of :mod:`collapselab.samplers`) and

        M_T = −∫_{t0}^{T} √β(t) e(Y_t, t) · dB̄_t,    e = ŝ − ∇log q_t,

    accumulated with the very Brownian increments that drive the sampler (its callback), so
    E[M_T] = 0 and Var(M_T) = ε⋆² (Itô isometry; exact for the EM chain's own marginals).
    ``start='law'`` (default) draws Y_T ~ q_T so the path is ideal up to time discretisation;
    ``'normal'`` starts from N(0, I). With ``return_energy`` also returns each path's
    Σ β‖e‖²Δt (its quadratic variation, another unbiased estimate of ε⋆²).
    """
    exact = _Recorder(exact_score(law, process))
    M = torch.zeros(n_paths, dtype=torch.float64)
    Q = torch.zeros(n_paths, dtype=torch.float64)

    def cb(i, t, t_next, x, x_next, dB):
        e = score(x, t).to(torch.float64) - exact.value_at(x, t)
        b = _beta(process, t)
        M.sub_(math.sqrt(b) * (e * dB).reshape(n_paths, -1).sum(1))
        Q.add_(b * (t - t_next) * (e**2).reshape(n_paths, -1).sum(1))

    x = _start(law, process, T, n_paths, start, generator)
    y = euler_maruyama(exact, x, _grid(T, t0, steps, times), process, generator, callback=cb)
    return (y, M, Q) if return_energy else (y, M)


# ---- observability η ------------------------------------------------------------------------
@dataclass(frozen=True)
class ObservabilityEstimate(Estimate):
    """An :class:`Estimate` of η with the regression diagnostics (r2_oos, regressor, ...)."""

    diagnostics: dict = field(default_factory=dict, compare=False)


REGRESSORS = ("linear", "poly2", "knn", "kernel", "gbm")
AUTO_CANDIDATES = ("poly2", "knn", "kernel")


class _NystromKRR:
    """RBF kernel ridge regression on a Nyström basis (m landmarks), with the bandwidth and the
    ridge penalty chosen by generalised cross-validation (closed form from one eigendecomposition
    of ΦᵀΦ per bandwidth, so it stays fast: O(n m²))."""

    def __init__(self, m: int, seed: int, gammas=(0.25, 1.0, 4.0), alphas=np.logspace(-6, 1, 8)):
        self.m, self.seed, self.gammas, self.alphas = m, seed, gammas, alphas

    def _features(self, X, gamma):
        sq = (X * X).sum(1)[:, None] + (self.Z * self.Z).sum(1)[None, :] - 2 * X @ self.Z.T
        return np.exp(-gamma * np.maximum(sq, 0.0)) @ self.proj

    def fit(self, X, y):
        self.mu, self.sd = X.mean(0), X.std(0) + 1e-12
        X = (X - self.mu) / self.sd
        d = X.shape[1]
        rng = np.random.default_rng(self.seed)
        self.Z = X[rng.choice(len(X), size=min(self.m, len(X)), replace=False)]
        self.ymean = y.mean()
        yc = y - self.ymean
        n = len(y)
        best = (np.inf, None)
        for g in self.gammas:
            gamma = g / d
            Kzz = np.exp(-gamma * np.maximum(
                (self.Z**2).sum(1)[:, None] + (self.Z**2).sum(1)[None, :] - 2 * self.Z @ self.Z.T,
                0.0))
            lam, U = np.linalg.eigh(Kzz)
            keep = lam > 1e-10 * lam.max()
            self.proj = U[:, keep] / np.sqrt(lam[keep])  # Φ = K_xz K_zz^{-1/2}
            Phi = self._features(X, gamma)
            s2, V = np.linalg.eigh(Phi.T @ Phi)
            s2 = np.maximum(s2, 0.0)
            Uy = V.T @ (Phi.T @ yc)
            PV = Phi @ V
            for a in self.alphas:
                a_eff = a * n
                shrink = s2 / (s2 + a_eff)
                fit = PV @ (Uy / (s2 + a_eff))
                dof = shrink.sum()
                gcv = np.mean((yc - fit) ** 2) / (1.0 - dof / n) ** 2
                if gcv < best[0]:
                    best = (gcv, (gamma, self.proj.copy(), V @ (Uy / (s2 + a_eff))))
        self.gamma, self.proj, self.coef = best[1]
        return self

    def predict(self, X):
        X = (X - self.mu) / self.sd
        return self._features(X, self.gamma) @ self.coef + self.ymean


def _make_regressor(name: str, n_train: int, d: int, seed: int):
    from sklearn.linear_model import RidgeCV
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import PolynomialFeatures, StandardScaler

    alphas = np.logspace(-6, 3, 10)
    if name == "linear":
        return make_pipeline(StandardScaler(), RidgeCV(alphas=alphas))
    if name == "poly2":
        return make_pipeline(StandardScaler(), PolynomialFeatures(2), RidgeCV(alphas=alphas))
    if name == "knn":
        # k ~ √n balances the variance σ²/k against the smoothing bias.
        k = int(np.clip(round(math.sqrt(n_train)), 5, 200))
        return make_pipeline(StandardScaler(), KNeighborsRegressor(n_neighbors=k))
    if name == "kernel":
        return _NystromKRR(m=int(min(300, n_train)), seed=seed)
    if name == "gbm":
        from sklearn.ensemble import HistGradientBoostingRegressor

        return HistGradientBoostingRegressor(
            max_iter=300, learning_rate=0.05, early_stopping=True, validation_fraction=0.2,
            random_state=seed,
        )
    raise ValueError(f"regressor must be 'auto' or one of {REGRESSORS}, got {name!r}")


def _select(X, y, candidates, seed: int) -> str:
    """Pick the candidate with the lowest held-out MSE on an inner 75/25 split of X."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(y))
    cut = (3 * len(y)) // 4
    tr, va = idx[:cut], idx[cut:]
    best, best_mse = candidates[0], np.inf
    for name in candidates:
        model = _make_regressor(name, len(tr), X.shape[1], seed).fit(X[tr], y[tr])
        mse = float(np.mean((model.predict(X[va]) - y[va]) ** 2))
        if mse < best_mse:
            best, best_mse = name, mse
    return best


def observability(
    Y,
    M,
    eps_star_sq=None,
    regressor: str = "auto",
    generator: torch.Generator | None = None,
    n_folds: int = 5,
    clip: bool = False,
) -> ObservabilityEstimate:
    """η = Var(E[M_T | Y_t0]) / ε⋆² (docs/paper.md §3) from ideal paths (Y_t0, M_T).

    Method (cross-fitting): the paths are split into ``n_folds`` folds; for each fold a
    regressor of M on Y is chosen and fitted on the other folds only and predicts the held-out
    fold, giving out-of-fold fitted values F_i = f̂_{−i}(Y_i). The numerator is estimated by

        Var(E[M|Y]) ≈ Cov(M_i, F_i),

    not by Var(F_i): since M_i − f(Y_i) is independent of f̂_{−i} and has mean zero given Y_i,
    E[M_i F_i] = E[f(Y_i) f̂_{−i}(Y_i)] — exactly 0 when E[M|Y] = 0 (no upward bias from the
    estimation noise of f̂, which still inflates Var(F) even with cross-fitting), and between
    the two one-sided estimates Var(F) (biased up) and the out-of-sample R²·Var(M) (biased
    down) otherwise. Both are reported in ``diagnostics``.

    ``regressor``: 'auto' (per outer fold, the best of poly2 / kNN / Nyström-RBF kernel ridge by
    an inner 75/25 validation *inside the training folds*, so the selection never sees the
    held-out fold) or one of 'linear', 'poly2', 'knn', 'kernel', 'gbm'.

    ``eps_star_sq``: ε⋆² (float or Estimate, e.g. from :func:`score_energy_ideal`) or None to
    use Var(M_T) of the same paths (= ε⋆² by Itô isometry; the ratio then also cancels common
    noise). stderr: influence function of the ratio over paths (delta method, including the
    stderr of an Estimate denominator); it does not include the fold-split variability.
    η is 0 when ε⋆² = 0. The raw estimate can fall slightly outside [0, 1]; ``clip=True``
    clips it (and says so in the note).
    """
    Y = np.asarray(Y.detach().cpu().numpy() if isinstance(Y, Tensor) else Y, dtype=np.float64)
    M = np.asarray(M.detach().cpu().numpy() if isinstance(M, Tensor) else M, dtype=np.float64)
    n = len(M)
    X = Y.reshape(n, -1)
    den_se = 0.0
    if isinstance(eps_star_sq, Estimate):
        den_se = float(eps_star_sq.stderr) if math.isfinite(eps_star_sq.stderr) else 0.0
        eps_star_sq = eps_star_sq.value
    # E[M_T] = 0 exactly (a martingale, also for the EM chain): moments are taken about 0, not
    # about sample means. Centring the out-of-fold predictions would bias the numerator by
    # about −Var(M)/n, because each prediction carries its training folds' mean of M.
    var_m = float(np.mean(M**2))
    den = var_m if eps_star_sq is None else float(eps_star_sq)
    if den == 0.0 or var_m == 0.0:
        return ObservabilityEstimate(0.0, 0.0, "exact", "ε⋆² = 0: η = 0 by definition",
                                     {"r2_oos": float("nan"), "regressor": None})
    seed = _gen_seed(generator)
    rng = np.random.default_rng(seed)
    fold = rng.permutation(n) % n_folds
    F = np.empty(n)
    chosen = []
    for k in range(n_folds):
        tr, te = fold != k, fold == k
        name = regressor
        if regressor == "auto":
            name = _select(X[tr], M[tr], AUTO_CANDIDATES, seed + k)
        model = _make_regressor(name, int(tr.sum()), X.shape[1], seed + k).fit(X[tr], M[tr])
        F[te] = model.predict(X[te])
        chosen.append(name)
    a = M * F
    num = float(a.mean())
    eta = num / den
    # Standard error. First order, Cov(M, f̂) behaves like the efficient estimator of E[f²]
    # (f = E[M|Y]): influence 2 M F − F² (the f̂-estimation error adds a second f·ε term, so
    # the naive M·F influence would be too small). To that the cross-fold coupling adds
    # 2 σ² Var_noise(F)/n (F_i depends on the noise of M_j in its training folds and F_j on
    # that of M_i), while the plug-in 4 F² ε² overstates 4 f² ε² by 4 σ² Var_noise(F): net
    # −2 σ² Var_noise(F)/n, with σ² ≈ mean (M − F)² and Var_noise(F) ≈ mean F² − Cov.
    # Checked against the spread over repeated runs (tests/test_pathwise.py).
    phi = 2.0 * M * F - F**2
    if eps_star_sq is None:
        phi = phi - eta * M**2  # ratio of means over the same paths (delta method)
    var = float(phi.var()) / n / den**2
    noise_f = max(float(np.mean(F**2)) - num, 0.0)
    sigma2 = float(np.mean((M - F) ** 2))
    var = max(var - 2.0 * sigma2 * noise_f / n / den**2, float(a.var()) / n / den**2)
    var += (eta * den_se / den) ** 2
    se = math.sqrt(var)
    r2 = 1.0 - float(np.mean((M - F) ** 2)) / var_m
    diag = {
        "r2_oos": r2,
        "eta_var_fitted": float(np.var(F)) / den,
        "eta_r2": r2 * var_m / den,
        "var_M": var_m,
        "eps_star_sq": den,
        "regressor": chosen[0] if len(set(chosen)) == 1 else ",".join(chosen),
        "n_paths": n,
    }
    note = (f"cross-fitted ({n_folds} folds) Cov(M, f̂(Y))/ε⋆², regressor {diag['regressor']}, "
            f"out-of-sample R² {r2:.3g}, n={n}")
    if not 0.0 <= eta <= 1.0:
        if clip:
            note += f"; raw {eta:.3g} clipped to [0, 1]"
            eta = min(max(eta, 0.0), 1.0)
        else:
            note += "; raw estimate outside [0, 1] (sampling noise; not clipped)"
    return ObservabilityEstimate(eta, se, "cross_fit_regression", note, diag)


def measure_observability(
    score,
    law: GaussianMixture,
    process,
    t0: float,
    T: float,
    steps: int = 100,
    n_paths: int = 4000,
    generator: torch.Generator | None = None,
    regressor: str = "auto",
    start: str = "law",
    times: Tensor | None = None,
) -> dict:
    """Simulate ideal paths, accumulate M_T (:func:`girsanov_martingale`) and regress it on
    Y_t0 (:func:`observability`). Returns a dict with 'eta' (Estimate, denominator Var(M_T)),
    'eps_star_sq_var_m' (Var(M_T) with stderr), 'eps_star_sq_qv' (mean path quadratic
    variation Σβ‖e‖²Δt), 'r2_oos', 'regressor', and the raw 'Y', 'M'. ``times``: the reverse
    grid (default uniform with ``steps`` steps); the loop passes ε̂²'s grid."""
    Y, M, Q = girsanov_martingale(score, law, process, t0, T, steps, n_paths, generator,
                                  start=start, times=times, return_energy=True)
    eta = observability(Y, M, None, regressor=regressor, generator=generator)
    Mc = M.numpy()  # E[M_T] = 0 exactly
    v = float(np.mean(Mc**2))
    return {
        "eta": eta,
        "eps_star_sq_var_m": Estimate(v, float(np.std(Mc**2) / math.sqrt(n_paths)),
                                      "monte_carlo", "Var(M_T) over ideal paths"),
        "eps_star_sq_qv": Estimate(float(Q.mean()), float(Q.std() / math.sqrt(n_paths)),
                                   "monte_carlo", "mean Σ β‖e‖²Δt over ideal paths"),
        "r2_oos": eta.diagnostics.get("r2_oos"),
        "regressor": eta.diagnostics.get("regressor"),
        "Y": Y,
        "M": M,
    }


# ---- exact reference for a Gaussian q and an affine error -------------------------------------
def gaussian_kl(m1: Tensor, S1: Tensor, m2: Tensor, S2: Tensor) -> float:
    """KL(N(m1, S1) ‖ N(m2, S2)) in closed form
    (:func:`collapselab.measure.gaussians.gaussian_kl`)."""
    return gaussians.gaussian_kl(m1, S1, m2, S2).value


def _single_gaussian(law: GaussianMixture):
    if law.n_components != 1:
        raise ValueError("the exact Gaussian reference needs a single-component law")


def gaussian_linear_em(
    law: GaussianMixture,
    process,
    error_wb: Callable[[float], tuple[Tensor, Tensor]],
    times: Tensor,
    start: str = "law",
) -> dict:
    """Exact (no Monte Carlo) pathwise quantities of the Euler–Maruyama chains on ``times`` for a
    Gaussian q = ``law`` and an affine score error e(y, t) = W_t y + b_t (``error_wb(t)``).

    Both chains are linear-Gaussian: Y_{k+1} = A_k Y_k + c_k + √β_k ΔB_k with
    A_k = I + Δt β_k(½ I − Σ_k⁻¹ (+ W_k)) etc., so their means/covariances follow exact
    recursions, and M_T = −Σ √β_k e_k(Y_k)·ΔB_k is a quadratic form in the standard normal
    vector Z = (start noise, all increments): M = −ZᵀQZ − gᵀZ. Then Var(M) = 2tr(Q_s²) + ‖g‖²,
    and given Y_K = L Z + c, E[M | Y_K] = −uᵀHu − hᵀu + const (u = Y_K − c ~ N(0, V)), whose
    variance is 2tr(HVHV) + hᵀVh. Returns:

    eps_star_sq (= Var M = Σβ_kΔt_k E‖e_k‖² on the ideal chain), eta (exact η of that chain),
    eps_hat_sq (Σβ_kΔt_k E‖e_k‖² on the learned chain), learned/ideal output mean and cov,
    kl_em (KL between the two outputs; ≤ ½ eps_hat_sq exactly when start='law').
    """
    _single_gaussian(law)
    ts = [float(t) for t in times]
    K, d = len(ts) - 1, law.dim
    D = d * (K + 1)
    marg = [law.marginal(process, t) for t in ts]
    mu_T, S_T = marg[0].means[0], marg[0].covs[0]
    if start == "law":
        C0 = torch.linalg.cholesky(S_T)
        m0 = mu_T.clone()
    elif start == "normal":
        C0, m0 = torch.eye(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    else:
        raise ValueError("start must be 'law' or 'normal'")
    eye = torch.eye(d, dtype=torch.float64)
    # Ideal chain as an affine map of Z; learned chain by moments.
    L = torch.zeros(d, D, dtype=torch.float64)
    L[:, :d] = C0
    c = m0.clone()
    Q = torch.zeros(D, D, dtype=torch.float64)
    g = torch.zeros(D, dtype=torch.float64)
    mh, Ph = m0.clone(), C0 @ C0.T
    eps_star = eps_hat = 0.0
    for k in range(K):
        t, dt = ts[k], ts[k] - ts[k + 1]
        b = _beta(process, t)
        prec = torch.linalg.inv(marg[k].covs[0])
        mu = marg[k].means[0]
        W, bb = error_wb(t)
        A = eye + dt * b * (0.5 * eye - prec)
        cc = dt * b * (prec @ mu)
        E = torch.zeros(d, D, dtype=torch.float64)
        E[:, d * (k + 1): d * (k + 2)] = eye
        s = math.sqrt(b * dt)
        # M increment: −s (W Y_k + b)·ΔZ_k  with Y_k = L Z + c.
        Q += s * E.T @ (W @ L)
        g += s * E.T @ (W @ c + bb)
        P = L @ L.T
        eps_star += b * dt * (float(torch.trace(W @ P @ W.T)) + float(((W @ c + bb) ** 2).sum()))
        eps_hat += b * dt * (float(torch.trace(W @ Ph @ W.T)) + float(((W @ mh + bb) ** 2).sum()))
        L = A @ L + s * E
        c = A @ c + cc
        Ah = A + dt * b * W
        mh = Ah @ mh + cc + dt * b * bb
        Ph = Ah @ Ph @ Ah.T + b * dt * eye
    Qs = 0.5 * (Q + Q.T)
    var_m = 2.0 * float((Qs * Qs).sum()) + float(g @ g)
    V = L @ L.T
    G = torch.linalg.solve(V, L).T  # (D, d): E[Z | Y] = G u
    H = G.T @ Qs @ G
    h = G.T @ g
    HV = H @ V
    var_cond = 2.0 * float(torch.trace(HV @ HV)) + float(h @ V @ h)
    return {
        "eps_star_sq": var_m,
        "eps_star_sq_sum": eps_star,
        "eta": var_cond / var_m if var_m > 0 else 0.0,
        "eps_hat_sq": eps_hat,
        "ideal_mean": c,
        "ideal_cov": V,
        "learned_mean": mh,
        "learned_cov": Ph,
        "kl_em": gaussian_kl(mh, Ph, c, V),
    }


def gaussian_linear_ode(
    law: GaussianMixture,
    process,
    error_wb: Callable[[float], tuple[Tensor, Tensor]],
    t0: float,
    T: float,
    start: str = "law",
) -> dict:
    """Continuous-time exact reference for a Gaussian q and an affine error e = W_t y + b_t.

    The learned reverse SDE dY = β[(½I − Σ_t⁻¹ + W_t)Y + Σ_t⁻¹μ_t + b_t]dt + √β dB̄ is linear, so
    its law is Gaussian with mean/covariance ODEs (integrated from T down to t0 with the running
    integral ε̂² = ∫β[tr(W P Wᵀ) + ‖W m + b‖²]dt). Returns eps_hat_sq, eps_star_sq (the same
    integral over q_t), the learned output N(mean, cov) and kl = KL(p̂ ‖ q_t0) (Prop 3.1:
    kl ≤ ½ eps_hat_sq when start='law').
    """
    _single_gaussian(law)
    d = law.dim
    eye = np.eye(d)

    def parts(t):
        q = law.marginal(process, t)
        W, bb = error_wb(t)
        return (q.means[0].numpy(), q.covs[0].numpy(), W.numpy(), bb.numpy(), _beta(process, t))

    def rhs(tau, z):
        t = T - tau  # reverse time runs forward in tau
        m, P = z[:d], z[d: d + d * d].reshape(d, d)
        mu, S, W, bb, b = parts(t)
        prec = np.linalg.inv(S)
        F = 0.5 * eye - prec + W
        dm = b * (F @ m + prec @ mu + bb)
        dP = b * (F @ P + P @ F.T + eye)
        r = W @ m + bb
        de_hat = b * (np.trace(W @ P @ W.T) + r @ r)
        rs = W @ mu + bb
        de_star = b * (np.trace(W @ S @ W.T) + rs @ rs)
        return np.concatenate([dm, dP.ravel(), [de_hat, de_star]])

    qT = law.marginal(process, T)
    if start == "law":
        m0, P0 = qT.means[0].numpy(), qT.covs[0].numpy()
    else:
        m0, P0 = np.zeros(d), eye.copy()
    z0 = np.concatenate([m0, P0.ravel(), [0.0, 0.0]])
    sol = integrate.solve_ivp(rhs, (0.0, T - t0), z0, method="DOP853", rtol=1e-10, atol=1e-12)
    z = sol.y[:, -1]
    m = torch.as_tensor(z[:d])
    P = torch.as_tensor(z[d: d + d * d].reshape(d, d))
    P = 0.5 * (P + P.T)
    q0 = law.marginal(process, t0)
    return {
        "eps_hat_sq": float(z[-2]),
        "eps_star_sq": float(z[-1]),
        "learned_mean": m,
        "learned_cov": P,
        "kl": gaussian_kl(m, P, q0.means[0], q0.covs[0]),
    }
