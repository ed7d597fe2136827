"""Divergences between laws, with uncertainty (docs/paper.md §3).

The paper's two divergences are chi-squared divergences,

    D_i = χ²(p̂_i ‖ p)            (accumulated)        I_i = χ²(p̂_{i+1} ‖ q_i)   (intra-generation)

with χ²(a‖b) = ∫ a²/b − 1 = E_a[a/b] − 1, and their KL twins KL(a‖b) = E_a[log a − log b].
Every function returns an :class:`~collapselab.measure.estimate.Estimate` (value, stderr,
estimator, note).

Three families, from most to least exact:

* ``exact``: closed forms for two Gaussians (:func:`gaussian_chi2`, :func:`gaussian_kl`) and the
  analytic finiteness decision for two Gaussian mixtures (:func:`chi2_finiteness`).
* ``monte_carlo``: importance sampling with exact log densities (:func:`mc_chi2`,
  :func:`mc_kl`): stratified over the components of a mixture law with a tilted proposal
  (:func:`stratified_divergences`, valid whenever χ² < ∞), else guarded by a Pareto-k̂ tail
  diagnostic on the importance weights.
* sample based, for models whose density is unknown: :func:`knn_kl`, :func:`knn_kl_known_b`,
  :func:`classifier_divergences`, plus the extra per-generation metrics :func:`mmd`,
  :func:`sliced_w2`, :func:`second_moment`.

Heavy tails (docs/paper.md §3): χ² between laws with Gaussian tails is infinite as soon as
the first law's variance in some direction is at least twice the second's. No function here
returns a finite value in that case: the value is ``inf`` when infinity is established
(analytically, or by a decisively heavy weight tail) and ``nan`` when the estimate cannot be
trusted, with the reason (and the raw number) in ``note``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import linprog, minimize
from scipy.spatial import cKDTree
from scipy.special import digamma, gammaln
from torch import Tensor

from ..targets import GaussianMixture
from .estimate import Estimate
from .gaussians import BOUNDARY_RTOL, gaussian_chi2, gaussian_kl  # closed forms, re-exported

__all__ = [
    "chi2_finiteness",
    "classifier_divergences",
    "classifier_log_ratio",
    "gaussian_chi2",
    "gaussian_kl",
    "knn_kl",
    "knn_kl_known_b",
    "mc_chi2",
    "mc_kl",
    "mc_divergences",
    "mixture_components",
    "stratified_divergences",
    "tilted_partners",
    "isotropic_variances",
    "mixture_log_prob",
    "mmd",
    "pareto_khat",
    "second_moment",
    "sliced_w2",
]

_INF, _NAN = math.inf, math.nan
# Relative tolerance under which a variance ratio counts as exactly 2 (the χ² boundary).
_BOUNDARY_RTOL = BOUNDARY_RTOL


# ================================================================================================
# Analytic finiteness of χ² between Gaussian mixtures
# ================================================================================================
def _isotropic_vars(covs: Tensor) -> Tensor | None:
    """Per-component variances if every covariance is c·I, else None."""
    d = covs.shape[-1]
    v = torch.diagonal(covs, dim1=1, dim2=2).mean(1)
    iso = v[:, None, None] * torch.eye(d, dtype=covs.dtype)
    if torch.allclose(covs, iso, rtol=1e-12, atol=1e-14 * float(v.abs().max())):
        return v
    return None


def _in_interior_of_hull(point: np.ndarray, pts: np.ndarray) -> bool:
    """Whether ``point`` lies in the interior of conv(pts) in R^d (LP: all-positive weights)."""
    m, d = pts.shape
    if m < d + 1 or np.linalg.matrix_rank(pts[1:] - pts[0], tol=1e-10) < d:
        return False  # the hull is flat: it has no interior
    # maximise t subject to λ ≥ t, Σλ = 1, Σ λ_l x_l = point; interior ⇔ t* > 0.
    c = np.zeros(m + 1)
    c[-1] = -1.0
    a_ub = np.hstack([-np.eye(m), np.ones((m, 1))])
    a_eq = np.vstack([np.append(np.ones(m), 0.0), np.hstack([pts.T, np.zeros((d, 1))])])
    b_eq = np.append(1.0, point)
    res = linprog(c, A_ub=a_ub, b_ub=np.zeros(m), A_eq=a_eq, b_eq=b_eq,
                  bounds=[(0, 1)] * (m + 1), method="highs")
    return bool(res.status == 0 and -res.fun > 1e-9)


def _lam_max(cov_j: Tensor, cov_l: Tensor) -> float:
    """Largest eigenvalue of Σ_l⁻¹Σ_j: 2Σ_j⁻¹ − Σ_l⁻¹ ≻ 0 ⇔ this is < 2."""
    L = torch.linalg.cholesky(cov_l)
    X = torch.linalg.solve_triangular(L, cov_j, upper=False)
    M = torch.linalg.solve_triangular(L, X.T, upper=False)
    return float(torch.linalg.eigvalsh(0.5 * (M + M.T)).max())


def _negative_direction(cov_j: Tensor, covs_b: Tensor) -> bool:
    """Search for v with vᵀ(2Σ_j⁻¹ − Σ_l⁻¹)v < 0 for every l (strictly: a proof of χ² = ∞).

    Candidates are the eigenvectors of every A_l = 2Σ_j⁻¹ − Σ_l⁻¹ and of Σ_j, then the best one
    is refined by minimising a smoothed max_l vᵀA_l v / vᵀv. A miss proves nothing (→ None).
    """
    A = (2 * torch.linalg.inv(cov_j) - torch.linalg.inv(covs_b)).numpy()  # (L, d, d)
    A = 0.5 * (A + A.transpose(0, 2, 1))
    scale = np.abs(np.linalg.eigvalsh(A)).max(axis=1)  # per-l size, for a relative tolerance

    def worst(v):  # max_l vᵀA_l v / vᵀv, relative to each A_l's size
        v = v / np.linalg.norm(v)
        return (np.einsum("i,lij,j->l", v, A, v) / scale).max()

    cands = [np.linalg.eigh(a)[1].T for a in A] + [np.linalg.eigh(cov_j.numpy())[1].T]
    cands = np.concatenate(cands)
    vals = np.array([worst(v) for v in cands])
    if vals.min() < -1e-10:
        return True

    def smooth(v, temp=1e-3):
        v = v / np.linalg.norm(v)
        q = np.einsum("i,lij,j->l", v, A, v) / scale
        return temp * np.log(np.exp((q - q.max()) / temp).sum()) + q.max()

    for v0 in cands[np.argsort(vals)[:3]]:
        res = minimize(smooth, v0, method="Nelder-Mead", options={"maxiter": 2000, "xatol": 1e-9})
        if worst(res.x) < -1e-10:
            return True
    return False


def chi2_finiteness(a: GaussianMixture, b: GaussianMixture) -> bool | None:
    """Decide analytically whether χ²(a‖b) < ∞ for Gaussian mixtures (docs/paper.md §3).

    Returns True (finite), False (infinite) or None (undecided). Components of zero weight are
    ignored. Let a = Σ_j π_j N(μ_j, Σ_j), b = Σ_l w_l N(ν_l, Γ_l). Since
    π_j² N_j² ≤ a² ≤ K Σ_j π_j² N_j², χ²(a‖b) < ∞ iff ∫ N_j²/b < ∞ for every j.

    * Sufficient for finiteness: for every j some l has 2Σ_j⁻¹ − Γ_l⁻¹ ≻ 0 (then
      N_j²/b ≤ N_j²/(w_l N_l), a Gaussian integrand).
    * Sufficient for infiniteness: some j and direction v with vᵀ(2Σ_j⁻¹ − Γ_l⁻¹)v < 0 for every
      l: along v every N_j²/N_l grows like exp(c s²), so N_j²/b does too. (Strictly: with "≤ 0"
      the boundary is not decided by the quadratic terms; see below.)
    * Isotropic components (Σ_j = σ_j² I, Γ_l = τ_l² I) are decided exactly. With τ² = max_l τ_l²
      and L* the components of b with that variance: σ_j² < 2τ² ⇒ that component is finite (take
      l ∈ L*); σ_j² > 2τ² ⇒ infinite (every A_jl ≺ 0). At σ_j² = 2τ² the quadratic terms of
      N_j²/N_l cancel for l ∈ L* and N_l/N_j² ∝ exp(2xᵀ(ν_l − μ_j)/σ_j²), while the other
      components of b are negligible in the tails, so ∫ N_j²/b < ∞ iff max_{l∈L*}(ν_l − μ_j)ᵀx
      grows like |x| in every direction, i.e. iff μ_j lies in the *interior* of the convex hull
      of {ν_l : l ∈ L*}. In particular the boundary is infinite when b has one widest component
      (the single-Gaussian case), but e.g. χ²(N(0, 2) ‖ ½N(−1, 1) + ½N(1, 1)) = √(2π)e^{1/2}/4 − 1
      is finite.
    """
    if a.dim != b.dim:
        raise ValueError("the two mixtures have different dimensions")
    ja, lb = a.weights > 0, b.weights > 0
    mu_a, cov_a, nu_b, cov_b = a.means[ja], a.covs[ja], b.means[lb], b.covs[lb]

    va, vb = _isotropic_vars(cov_a), _isotropic_vars(cov_b)
    if va is not None and vb is not None:
        tau2 = float(vb.max())
        widest = nu_b[vb >= tau2 * (1 - _BOUNDARY_RTOL)].numpy()
        for j, s2 in enumerate(va.tolist()):
            if s2 < 2 * tau2 * (1 - _BOUNDARY_RTOL):
                continue
            if s2 > 2 * tau2 * (1 + _BOUNDARY_RTOL):
                return False
            if not _in_interior_of_hull(mu_a[j].numpy(), widest):
                return False
        return True

    all_finite = True
    for j in range(cov_a.shape[0]):
        if _negative_direction(cov_a[j], cov_b):
            return False
        if not any(_lam_max(cov_a[j], cl) < 2 * (1 - _BOUNDARY_RTOL) for cl in cov_b):
            all_finite = False
    return True if all_finite else None


# ================================================================================================
# Mixtures q = α p + (1 − α) r
# ================================================================================================
def mixture_log_prob(alpha: float, log_p, log_r) -> Tensor:
    """log q for q = α p + (1 − α) r (the training law q_i = α p + (1−α) p̂_i, docs/paper.md §1),
    computed in log space: logaddexp(log α + log p, log(1 − α) + log r). α ∈ [0, 1]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    log_p = torch.as_tensor(log_p, dtype=torch.float64)
    log_r = torch.as_tensor(log_r, dtype=torch.float64)
    if alpha == 1.0:
        return log_p.clone()
    if alpha == 0.0:
        return log_r.clone()
    return torch.logaddexp(math.log(alpha) + log_p, math.log1p(-alpha) + log_r)


# ================================================================================================
# Tail diagnostic: Pareto k̂ (PSIS, Vehtari, Simpson, Gelman, Yao & Gabry 2015/2024)
# ================================================================================================
def _gpd_fit_zhang_stephens(x: np.ndarray) -> float:
    """Shape ξ of a generalised Pareto fitted to exceedances x ≥ 0 (sorted ascending).

    Zhang & Stephens (2009) empirical-Bayes estimator, as used by PSIS, with PSIS's weak prior
    pulling ξ towards 0.5 (10 pseudo-observations), which only matters for tiny tails.
    """
    n = x.size
    m = 30 + int(math.sqrt(n))
    q = x[max(int(n / 4 + 0.5) - 1, 0)]
    if q <= 0:  # ties at the threshold: use the smallest positive exceedance as the scale
        q = x[x > 0].min()
    theta = 1.0 / x[-1] + (1.0 - np.sqrt(m / (np.arange(1, m + 1) - 0.5))) / (3.0 * q)
    k = np.log1p(-theta[:, None] * x).mean(axis=1)
    loglik = n * (np.log(-theta / k) - k - 1.0)
    with np.errstate(over="ignore"):  # an overflowing term just means a negligible weight
        wts = 1.0 / np.exp(loglik - loglik[:, None]).sum(axis=1)
    keep = wts >= 10 * np.finfo(float).eps
    wts, theta = wts[keep] / wts[keep].sum(), theta[keep]
    xi = float(np.log1p(-(theta @ wts) * x).mean())
    return (n * xi + 10 * 0.5) / (n + 10)


def pareto_khat(w) -> tuple[float, float]:
    """Pareto k̂ of the upper tail of non-negative values ``w`` and its approximate stderr.

    As in PSIS: a generalised Pareto is fitted to the M = min(n/5, 3√n) largest values above the
    (M+1)-th largest. The mean of w is infinite when k ≥ 1 and its variance when k ≥ 0.5, so a
    plain Monte Carlo mean is unreliable from k̂ ≥ 0.5 on. The stderr is the asymptotic
    (1 + k)/√M of the GPD shape. A tail with no spread returns (−inf, 0).
    """
    w = np.sort(np.asarray(w, dtype=np.float64).reshape(-1))
    n = w.size
    m = int(min(0.2 * n, 3 * math.sqrt(n)))
    if m < 5:
        return _NAN, _NAN
    exc = w[-m:] - w[-m - 1]
    if not np.isfinite(exc).all():
        return _INF, 0.0
    if exc[-1] <= 0:
        return -_INF, 0.0
    k = _gpd_fit_zhang_stephens(exc / exc[-1])  # ξ is scale free: normalise for stability
    return k, (1.0 + max(k, -0.5)) / math.sqrt(m)


def _tail_guard(raw: float, se: float, w, what: str, label: str,
                known_finite: bool | None = None) -> Estimate:
    """Turn a raw mean-of-weights estimate into an honest Estimate using Pareto k̂ of ``w``.

    k̂ < 0.5: keep it. 0.5 ≤ k̂: the variance of w is infinite, the number is unreliable → nan,
    except when k̂ − 2·se(k̂) ≥ 1 (the mean itself is decisively infinite) → inf, unless the law
    pair is known analytically to have finite χ² (then nan).
    """
    k, k_se = pareto_khat(w)
    if not math.isfinite(k) or k < 0.5:
        return Estimate(raw, se, label)
    detail = f"Pareto k̂={k:.2f}±{k_se:.2f} of {what}; raw estimate {raw:.6g} ± {se:.3g}"
    if k - 2 * k_se >= 1.0 and known_finite is not True:
        return Estimate(_INF, _NAN, label,
                        f"χ² estimated infinite: {what} have an infinite mean (k̂ ≥ 1). {detail}")
    why = "its mean is infinite or undecidable (k̂ ≥ 1)" if k >= 1 else (
        "their variance is infinite (0.5 ≤ k̂ < 1), so the mean is unreliable")
    extra = " χ² is finite analytically." if known_finite else ""
    return Estimate(_NAN, _NAN, label, f"unreliable: heavy tail of {what}: {why}. {detail}.{extra}")


# ================================================================================================
# Monte Carlo with exact densities
# ================================================================================================
def _log_ratio_samples(a, b, n: int, generator) -> Tensor:
    x = a.sample(n, generator)
    return (a.log_prob(x).to(torch.float64) - b.log_prob(x).to(torch.float64)).reshape(-1)


def isotropic_variances(law) -> Tensor | None:
    """Component variances of a law whose every component is isotropic (c·I): Gaussian
    mixtures, finite-KDE laws and mixtures of them; None otherwise."""
    if isinstance(law, GaussianMixture):
        v = _isotropic_vars(law.covs)
        return None if v is None else v[law.weights > 0]
    if hasattr(law, "centres") and hasattr(law, "var"):  # finite-KDE law: N(a c_j, v I)
        return torch.tensor([float(law.var)], dtype=torch.float64)
    if hasattr(law, "laws"):  # LawMixture
        parts = [isotropic_variances(part) for part in law.laws]
        return None if any(p is None for p in parts) else torch.cat(parts)
    return None


def _chi2_known(a, b) -> tuple[bool | None, bool, Estimate | None]:
    """What is known analytically about χ²(a‖b) = E_a[w] − 1, w = a/b:
    (χ² finite?, Var_a(w) finite?, an inf Estimate when χ² is infinite).

    Isotropic components: b's tails are those of its widest component (variance τ²), so
    ∫ a²/b < ∞ when every component variance of a is < 2τ² and = ∞ when one exceeds 2τ²;
    E_a[w²] = ∫ a³/b² < ∞ when every component variance of a is < 1.5 τ² (N_j³/N_l² is then
    integrable). A finite weight variance makes the CLT standard error valid, so the Pareto k̂
    diagnostic (which cannot tell a bounded-but-spiky weight distribution from a heavy tail in
    finite samples) is then only reported, not used to discard the estimate.
    """
    var_finite = False
    known = None
    va, vb = isotropic_variances(a), isotropic_variances(b)
    if va is not None and vb is not None:
        ratio = float(va.max() / vb.max())
        var_finite = ratio < 1.5
        known = True if ratio < 2 else (False if ratio > 2 else None)
    if isinstance(a, GaussianMixture) and isinstance(b, GaussianMixture):
        known = chi2_finiteness(a, b)
    if known is False:
        return False, False, Estimate(
            _INF, 0.0, "exact",
            "χ² infinite: some component of the first law has at least twice the "
            "variance of the second law along a direction (chi2_finiteness)",
        )
    return known, var_finite, None


def _chi2_from_logw(logw: Tensor, known: bool | None, var_finite: bool = False) -> Estimate:
    n = logw.numel()
    if torch.isnan(logw).any():
        raise ValueError("log densities gave NaN on samples of a")
    if torch.isposinf(logw).any():  # b vanishes where a does not: a is not ≪ b
        return Estimate(_INF, 0.0, "monte_carlo",
                        "χ² infinite: the second law has zero density at samples of the first")
    top = float(logw.max())
    w_scaled = torch.exp(logw - top)  # ≤ 1: no overflow
    log_mean = math.log(float(w_scaled.mean())) + top
    raw = math.expm1(log_mean) if log_mean < 700 else _INF
    se = float(w_scaled.std()) * math.exp(min(top, 700)) / math.sqrt(n)
    if var_finite:
        # Finite variance in theory; k̂ still measures whether n draws are past the
        # pre-asymptotic regime. PSIS's practical threshold (Vehtari et al. 2024) applies:
        # min(1 − 1/log10(n), 0.7).
        k, k_se = pareto_khat(w_scaled.numpy())
        limit = min(1 - 1 / math.log10(max(n, 11)), 0.7)
        detail = (f"weights a/b have finite variance analytically (isotropic components, "
                  f"variance ratio < 1.5); Pareto k̂={k:.2f}±{k_se:.2f}")
        if math.isfinite(k) and k >= limit:
            return Estimate(_NAN, _NAN, "monte_carlo",
                            f"unreliable: {detail} ≥ {limit:.2f}, too few draws for the CLT; "
                            f"raw estimate {raw:.6g} ± {se:.3g}")
        return Estimate(raw, se, "monte_carlo", f"{detail} < {limit:.2f}: CLT stderr")
    out = _tail_guard(raw, se, w_scaled.numpy(), "the importance weights a/b under a",
                      "monte_carlo", known_finite=known)
    if known is None and out.finite:
        out = Estimate(out.value, out.stderr, out.estimator,
                       "finiteness not decided analytically; Pareto k̂ < 0.5")
    return out


def _kl_from_logw(logw: Tensor) -> Estimate:
    n = logw.numel()
    if torch.isnan(logw).any():
        raise ValueError("log densities gave NaN on samples of a")
    if torch.isposinf(logw).any():
        return Estimate(_INF, 0.0, "monte_carlo",
                        "KL infinite: the second law has zero density at samples of the first")
    return Estimate(float(logw.mean()), float(logw.std()) / math.sqrt(n), "monte_carlo")


# ================================================================================================
# Stratified Monte Carlo over the components of a Gaussian-mixture law
# ================================================================================================
# Overflow guard: e^{709} is the largest power of e a float64 holds.
_LOG_MAX = 709.0
# Draws per (component, proposal) sub-stratum in the pilot and the floor of the main phase.
_PILOT, _FLOOR = 2, 2


def mixture_components(law) -> tuple[Tensor, Tensor, Tensor] | None:
    """(weights π_j, means μ_j, variances σ_j²) of a law Σ_j π_j N(μ_j, σ_j² I) whose every
    component is an isotropic Gaussian: a :class:`GaussianMixture` with isotropic covariances,
    a finite-KDE law (1/N) Σ_j N(a c_j, v I) (duck-typed: ``centres``, ``scale``, ``var``), or a
    :class:`~collapselab.targets.LawMixture` of those. None for any other law. Components of
    zero weight are dropped."""
    if isinstance(law, GaussianMixture):
        v = _isotropic_vars(law.covs)
        if v is None:
            return None
        keep = law.weights > 0
        return law.weights[keep], law.means[keep], v[keep]
    if all(hasattr(law, k) for k in ("centres", "scale", "var")):
        c = torch.as_tensor(law.centres, dtype=torch.float64).cpu()
        k = c.shape[0]
        return (torch.full((k,), 1.0 / k, dtype=torch.float64), float(law.scale) * c,
                torch.full((k,), float(law.var), dtype=torch.float64))
    if hasattr(law, "laws") and hasattr(law, "weights"):
        parts = [mixture_components(part) for part in law.laws]
        if any(part is None for part in parts):
            return None
        w = torch.cat([float(wm) * part[0] for wm, part in zip(law.weights, parts, strict=True)])
        return (w / w.sum(), torch.cat([part[1] for part in parts]),
                torch.cat([part[2] for part in parts]))
    return None


def _log_normal_iso(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """log N(x_i; mean_i, var_i I), row by row."""
    d = x.shape[1]
    return -0.5 * (((x - mean) ** 2).sum(1) / var + d * torch.log(2 * math.pi * var))


def tilted_partners(comp_a, comp_b, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """For every component N_j = N(μ_j, σ_j² I) of a, the component N_l of b (weight w_l, mean
    ν_l, variance τ_l²) that minimises log Z_jl − log w_l, with

        Z_jl = ∫ N_j²/N_l = (τ_l² / (σ_j √(2τ_l² − σ_j²)))^d · exp(‖μ_j − ν_l‖² / (2τ_l² − σ_j²))

    (the closed form of 1 + χ²(N_j ‖ N_l), finite iff σ_j² < 2τ_l²). Since b ≥ w_l N_l,
    ∫ N_j²/b ≤ min_l Z_jl / w_l: the chosen l is the component of b that bounds N_j's share of
    χ² most tightly, i.e. the one that holds b up where N_j²/b has its mass. Returns the index
    l(j) (−1 when no l has σ_j² < 2τ_l²) and log Z_{j l(j)}.
    """
    _, mu, s2 = comp_a
    w, nu, t2 = comp_b
    d = mu.shape[1]
    logw, nu2 = torch.log(w), (nu**2).sum(1)
    best = torch.empty(mu.shape[0], dtype=torch.long)
    log_z = torch.empty(mu.shape[0], dtype=torch.float64)
    for i in range(0, mu.shape[0], chunk):
        m, v = mu[i:i + chunk], s2[i:i + chunk, None]
        gap = 2 * t2[None, :] - v  # (chunk, L)
        ok = gap > 0
        gap_safe = torch.where(ok, gap, torch.ones_like(gap))
        d2 = ((m**2).sum(1)[:, None] + nu2[None, :] - 2 * m @ nu.T).clamp_min(0)
        lz = d * (torch.log(t2)[None, :] - 0.5 * torch.log(v) - 0.5 * torch.log(gap_safe)) + (
            d2 / gap_safe)
        crit = torch.where(ok, lz - logw[None, :], torch.full_like(lz, math.inf))
        val, idx = crit.min(1)
        best[i:i + chunk] = torch.where(torch.isfinite(val), idx, torch.full_like(idx, -1))
        log_z[i:i + chunk] = lz.gather(1, idx[:, None])[:, 0]
    return best, log_z


class _StratifiedPlan:
    """The 2K sub-strata (j, h) of :func:`stratified_divergences`: component j of a, proposal
    h ∈ {N_j, g_j} with g_j ∝ N_j²/N_{l(j)} the tilted Gaussian, weight ω = π_j/2."""

    def __init__(self, comp_a, comp_b):
        pi, mu, s2 = comp_a
        self.k, self.d = mu.shape
        self.pi, self.mu, self.s2 = pi, mu, s2
        partner, log_z = tilted_partners(comp_a, comp_b)
        self.ok = bool((partner >= 0).all())
        if not self.ok:
            return
        w_b, nu, t2 = comp_b
        # log of the analytic bound π_j ∫ N_j²/b ≤ π_j Z_jl/w_l on component j's self-term.
        self.log_bound = torch.log(pi) + log_z - torch.log(w_b[partner])
        t2j, nuj = t2[partner], nu[partner]
        gap = 2 * t2j - s2
        # g_j ∝ N_j²/N_l: precision 2/σ² − 1/τ², mean μ + σ²(μ − ν)/(2τ² − σ²).
        self.g_mean = mu + (s2 / gap)[:, None] * (mu - nuj)
        self.g_var = s2 * t2j / gap
        self.omega = torch.cat([pi, pi]) / 2  # sub-stratum s = j (N_j) or K + j (g_j)

    def draw(self, counts: Tensor, generator) -> tuple[Tensor, Tensor]:
        """counts[s] draws from sub-stratum s; returns (x, s of each draw)."""
        sub = torch.repeat_interleave(torch.arange(2 * self.k), counts)
        j, tilted = sub % self.k, sub >= self.k
        mean = torch.where(tilted[:, None], self.g_mean[j], self.mu[j])
        var = torch.where(tilted, self.g_var[j], self.s2[j])
        z = torch.randn(len(sub), self.d, dtype=torch.float64, generator=generator)
        return mean + var.sqrt()[:, None] * z, sub

    def terms(self, x: Tensor, sub: Tensor, a, b) -> tuple[Tensor, Tensor, Tensor]:
        """log u = log N_j + log a − log b − log ḡ_j (χ² integrand over the defensive mixture
        ḡ_j = ½N_j + ½g_j), log(a/b) and log(N_j/ḡ_j), at every draw."""
        j = sub % self.k
        log_nj = _log_normal_iso(x, self.mu[j], self.s2[j])
        log_gj = _log_normal_iso(x, self.g_mean[j], self.g_var[j])
        log_bar = torch.logaddexp(log_nj, log_gj) - math.log(2.0)
        log_ab = (a.log_prob(x).to("cpu", torch.float64)
                  - b.log_prob(x).to("cpu", torch.float64)).reshape(-1)
        return log_nj + log_ab - log_bar, log_ab, log_nj - log_bar


def _stratum_moments(values: Tensor, sub: Tensor, n_sub: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sub-stratum (count, mean, unbiased variance) of ``values``."""
    cnt = torch.zeros(n_sub, dtype=torch.float64).index_add_(0, sub, torch.ones_like(values))
    tot = torch.zeros(n_sub, dtype=torch.float64).index_add_(0, sub, values)
    mean = tot / cnt.clamp_min(1)
    dev = (values - mean[sub]) ** 2
    ss = torch.zeros(n_sub, dtype=torch.float64).index_add_(0, sub, dev)
    return cnt, mean, ss / (cnt - 1).clamp_min(1)


def _allocate(total: int, omega: Tensor, sd: Tensor, floor: int,
              log_prior: Tensor | None = None) -> Tensor:
    """Draws per stratum: ``floor`` each, the rest in equal parts in proportion to ω
    (proportional allocation), to ω·sd (Neyman-like: ``sd`` is the pilot's root mean square)
    and, when given, to ω·exp(log_prior) (an analytic scale of each stratum, which a pilot of
    a few draws can miss), rounded by largest remainders. The proportional part bounds the
    variance at a fixed multiple of that of proportional allocation whatever the pilot says."""
    n_sub = omega.numel()
    extra = max(total - floor * n_sub, 0)
    parts = [omega / omega.sum()]
    ney = omega * sd
    parts.append(ney / ney.sum() if float(ney.sum()) > 0 else parts[0])
    if log_prior is not None:
        parts.append(torch.softmax(torch.log(omega) + log_prior, 0))
    share = sum(parts) / len(parts)
    raw = extra * share
    counts = torch.floor(raw).long()
    left = extra - int(counts.sum())
    if left > 0:
        counts[torch.topk(raw - counts, left).indices] += 1
    return counts + floor


def stratified_divergences(a, b, n: int = 100_000,
                           generator: torch.Generator | None = None) -> dict[str, Estimate] | None:
    """χ²(a‖b) and KL(a‖b) by Monte Carlo stratified over the components of a, each sampled
    through a defensive tilted proposal (D_i, I_i and their KL twins; docs/paper.md §3, §7 "heavy
    tails"). Returns None when a or b is not a mixture of isotropic Gaussians (see
    :func:`mixture_components`) or some component of a has no partner in b (then plain Monte
    Carlo is the only option).

    With a = Σ_j π_j N_j, N_j = N(μ_j, σ_j² I), and w = a/b,

        1 + χ²(a‖b) = ∫ a²/b = Σ_j π_j I_j,   I_j = ∫ N_j a/b = E_{N_j}[w],
        KL(a‖b)     = Σ_j π_j E_{N_j}[log a/b].

    Each I_j is estimated by importance sampling from ḡ_j = ½N_j + ½g_j with

        g_j = N_j a / (N_l C_j),   C_j = Σ_k π_k ∫ N_j N_k/N_l   (closed form),

    N_l = N(ν_l, τ_l² I) the component of b chosen by :func:`tilted_partners`: g_j is the
    stratum's integrand N_j a/b with b replaced by N_l, a Gaussian mixture over k that is sampled
    exactly (each N_j N_k/N_l is a Gaussian). Used as a deterministic mixture (half the draws
    from N_j, half from g_j), the 2K sub-strata (j, h) have weights π_j/2 and integrand
    u = N_j a/(b ḡ_j). Above 20,000 components g_j keeps the k = j term only (g_j ∝ N_j²/N_l).

    Validity of the CLT standard error. Under g_j, u ≤ 2 C_j N_l/b ≤ 2 C_j/w_l: the weights are
    bounded, so every moment is finite, as soon as each C_j is, i.e. σ_j²σ_k²/(σ_j² + σ_k²) <
    τ_l² for all k; with the partner among b's widest components (variance τ²) this holds iff
    max σ_j² < 2τ², the condition of χ² < ∞ itself (the boundary case aside, which is left to
    plain Monte Carlo). Under N_j, E[u²] ≤ 4∫N_j a²/b² ≤ 4 C_j ∫ N_l a²/b² ≤ 4 C_j (1 + χ²)/w_l
    (using ḡ_j ≥ ½g_j and N_l/b ≤ 1/w_l): finite too. The single-term proposal has the same
    guarantees with Z_jl = ∫N_j²/N_l for C_j (E_h[u²] ≤ 4 Z_jl (1 + χ²)/w_l). So the stratified
    estimator Σ_s ω_s ū_s has finite variance Σ_s ω_s² Var_s(u)/n_s whenever χ² < ∞, estimated
    from the within-sub-stratum variances. Plain Monte Carlo from a needs σ_j² < 1.5τ² for a
    finite variance and, even then, n ≫ e^{s²} draws when log w has spread s within a centre
    (a centre far in b's tails gives lognormal weights). The KL integrand (N_j/ḡ_j) log(a/b)
    has N_j/ḡ_j ≤ 2 and Gaussian-like log ratios: always finite variance.

    Allocation: a pilot of 2 draws per sub-stratum estimates each component's scale (root mean
    square of u over both halves); the main phase (max(n, 8K) draws) gives every component 4
    draws, then the rest in equal thirds in proportion to π_j, to π_j·scale (Neyman-like) and
    to π_j·(π_j Z_jl/w_l) (the analytic bound on the component's self-term, which a pilot can
    miss), each component's draws split evenly between its two halves. Only
    main-phase draws enter the estimates, so they are unbiased given the allocation. The note
    reports the Welch–Satterthwaite effective degrees of freedom of the variance estimate
    (small: few sub-strata carry the error and the stderr is itself uncertain). Cost:
    4K + max(n, 8K) evaluations of both densities and K² closed forms.
    """
    comp_a, comp_b = mixture_components(a), mixture_components(b)
    if comp_a is None or comp_b is None:
        return None
    plan = _StratifiedPlan(comp_a, comp_b)
    if not plan.ok:
        return None
    n_sub = 2 * plan.k
    # Pilot: spread of u in each sub-stratum (in units of the pilot's largest value).
    x, sub = plan.draw(torch.full((n_sub,), _PILOT, dtype=torch.long), generator)
    log_u, _, _ = plan.terms(x, sub, a, b)
    if torch.isnan(log_u).any():
        raise ValueError("log densities gave NaN on samples of a")
    fin = torch.isfinite(log_u)
    shift = float(log_u[fin].max()) if bool(fin.any()) else 0.0
    e2 = torch.exp(2 * (log_u - shift)).nan_to_num(0.0)
    # Root mean square of u per component, pooled over its two halves: two draws can show no
    # spread by chance, a component with a large mean is where a missed spread costs most, and
    # a large tilted-half value also flags the heavy-tailed plain half of the same component.
    _, ms_p, _ = _stratum_moments(e2, sub % plan.k, plan.k)
    per_comp = _allocate(max(n, 4 * n_sub), plan.pi, ms_p.sqrt(), 2 * _FLOOR, plan.log_bound)
    counts = torch.cat([per_comp // 2, per_comp - per_comp // 2])
    # Main phase.
    x, sub = plan.draw(counts, generator)
    log_u, log_ab, log_r = plan.terms(x, sub, a, b)
    if torch.isnan(log_u).any():
        raise ValueError("log densities gave NaN on samples of a")
    n_tot = int(counts.sum())
    method = (f"stratified over {plan.k} components of the first law, proposal "
              f"½N_j + ½N_j²/N_l; {n_tot} draws")
    if torch.isposinf(log_ab).any():
        inf = Estimate(_INF, 0.0, "monte_carlo",
                       "infinite: the second law has zero density at samples of the first")
        return {"chi2": inf, "kl": inf}
    # KL: Σ_s ω_s mean_s((N_j/ḡ_j) log a/b).
    cnt, m_kl, v_kl = _stratum_moments(torch.exp(log_r) * log_ab, sub, n_sub)
    kl = float((plan.omega * m_kl).sum())
    kl_se = math.sqrt(float((plan.omega**2 * v_kl / cnt).sum()))
    # χ²: the same sums in units of e^{shift}, the largest log u, so nothing overflows.
    shift = float(log_u.max())
    _, m_u, v_u = _stratum_moments(torch.exp(log_u - shift), sub, n_sub)
    mean_u = float((plan.omega * m_u).sum())
    c = plan.omega**2 * v_u / cnt
    var_u = float(c.sum())
    df = var_u**2 / float((c**2 / (cnt - 1)).sum()) if var_u > 0 else _INF
    log_mean = math.log(mean_u) + shift
    note = f"{method}; Welch–Satterthwaite df={df:.0f}"
    if log_mean > _LOG_MAX:
        chi2 = Estimate(_NAN, _NAN, "monte_carlo",
                        f"overflow: 1 + χ² ≈ exp({log_mean:.6g}) ± {math.sqrt(var_u) / mean_u:.2g} "
                        f"relative exceeds float64; {note}")
    else:
        value = math.expm1(log_mean)
        se = math.sqrt(var_u) * math.exp(shift)
        chi2 = Estimate(value, se, "monte_carlo", note)
    return {"chi2": chi2, "kl": Estimate(kl, kl_se, "monte_carlo", note)}


def mc_chi2(a, b, n: int = 100_000, generator: torch.Generator | None = None) -> Estimate:
    """χ²(a‖b) = E_a[w] − 1, w = a/b, with exact densities (D_i, I_i; docs/paper.md §3).

    ``a`` and ``b`` follow the Law protocol (exact ``log_prob``; ``a`` is sampled). An infinite
    χ² decided analytically (isotropic components, :func:`chi2_finiteness`) is returned as
    ``inf`` (estimator "exact") without sampling. When both laws are mixtures of isotropic
    Gaussians (Gaussian mixtures, finite-KDE laws and mixtures of them) the estimate is
    stratified over a's components with a tilted proposal (:func:`stratified_divergences`),
    whose CLT standard error is valid whenever χ² < ∞. Otherwise plain importance sampling
    from a: the mean of w in log space, stderr = std(w)/√n, guarded by the Pareto k̂ of the
    weights (see :func:`pareto_khat`): k̂ ≥ 0.5 gives ``nan`` with k̂ and the raw number in the
    note, a decisively infinite mean gives ``inf``.
    """
    return mc_divergences(a, b, n, generator)["chi2"]


def mc_kl(a, b, n: int = 100_000, generator: torch.Generator | None = None) -> Estimate:
    """KL(a‖b) = E_a[log a − log b] by Monte Carlo (KL twins of D_i, I_i; docs/paper.md §3).

    Stratified over a's components like :func:`mc_chi2` when the laws allow it, else plain
    sampling from a with stderr = std(log a − log b)/√n. The log ratio of laws with Gaussian
    tails has Gaussian-like tails, so no tail guard is needed; an infinite log ratio (b = 0 on
    a's support) gives inf.
    """
    return mc_divergences(a, b, n, generator)["kl"]


def mc_divergences(a, b, n: int = 100_000, generator=None) -> dict[str, Estimate]:
    """{"chi2": χ²(a‖b), "kl": KL(a‖b)} from one set of draws (see :func:`mc_chi2`): stratified
    over a's components (:func:`stratified_divergences`) when both laws are mixtures of
    isotropic Gaussians and χ² is finite, else n plain draws from a."""
    known, var_finite, inf = _chi2_known(a, b)
    if inf is None:
        out = stratified_divergences(a, b, n, generator)
        if out is not None:
            return out
    logw = _log_ratio_samples(a, b, n, generator)
    return {"chi2": inf or _chi2_from_logw(logw, known, var_finite), "kl": _kl_from_logw(logw)}


# ================================================================================================
# Sample-based estimators
# ================================================================================================
def _np(x) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(len(x), -1)


def _batched_stderr(fn, n_a: int, n_b: int, n_batches: int, rng) -> float:
    """stderr of a full-sample estimate from ``n_batches`` disjoint sub-sample estimates.

    Each batch estimate has variance ≈ B × that of the full estimate (variance ∝ 1/n), so
    stderr ≈ std(batch estimates)/√B. Used for the kNN estimators, whose per-point terms are
    dependent (shared neighbours) so that std(terms)/√n is not a valid stderr.
    """
    ia, ib = rng.permutation(n_a), (rng.permutation(n_b) if n_b else None)
    ests = [fn(ia[j::n_batches], None if ib is None else ib[j::n_batches])
            for j in range(n_batches)]
    return float(np.std(ests, ddof=1) / math.sqrt(n_batches))


def _kth_distances(tree: cKDTree, x: np.ndarray, k: int, skip_self: bool) -> np.ndarray:
    kk = k + 1 if skip_self else k
    d, _ = tree.query(x, k=kk)
    d = d.reshape(len(x), kk)
    return d[:, 1:] if skip_self else d


def _knn_kl_point(xa: np.ndarray, xb: np.ndarray, k: int, adaptive: bool) -> float:
    n, dim = xa.shape
    m = xb.shape[0]
    ta, tb = cKDTree(xa), cKDTree(xb)
    if not adaptive:
        rho = _kth_distances(ta, xa, k, skip_self=True)[:, -1]
        nu = _kth_distances(tb, xa, k, skip_self=False)[:, -1]
        return float(dim * np.mean(np.log(nu / rho)) + math.log(m / (n - 1)))
    # WKV (2009) adaptive choice: radius ε_i = max(ρ_k, ν_k); use all neighbours of both samples
    # inside it (counts k_i, l_i, capped) and their exact distances, with digamma corrections.
    cap = min(4 * k, n - 1, m)
    da = _kth_distances(ta, xa, cap, skip_self=True)
    db = _kth_distances(tb, xa, cap, skip_self=False)
    eps = np.maximum(da[:, k - 1], db[:, k - 1])
    ki = np.maximum((da <= eps[:, None]).sum(1), 1)
    li = np.maximum((db <= eps[:, None]).sum(1), 1)
    rho = da[np.arange(n), ki - 1]
    nu = db[np.arange(n), li - 1]
    return float(dim * np.mean(np.log(nu / rho)) + np.mean(digamma(ki) - digamma(li))
                 + math.log(m / (n - 1)))


def knn_kl(x_a, x_b, k: int = 5, adaptive: bool = True, n_batches: int = 10,
           seed: int | None = 0) -> Estimate:
    """KL(a‖b) from samples of both laws: Wang–Kulkarni–Verdú (2009) k-nearest-neighbour estimator
    (KL twin of D_i / I_i when neither model density is available).

        KL ≈ (d/n) Σ_i log(ν_{l_i}(i)/ρ_{k_i}(i)) + (1/n) Σ_i [ψ(k_i) − ψ(l_i)] + log(m/(n−1))

    ρ = distances within x_a (self excluded), ν = distances from x_a to x_b. With
    ``adaptive=True`` (the bias-corrected form) k_i, l_i are the numbers of points of each sample
    inside ε_i = max(ρ_k(i), ν_k(i)), so both densities are estimated at the same scale; with
    ``adaptive=False`` k_i = l_i = k. stderr: from ``n_batches`` disjoint sub-sample estimates
    (batch splitting; see ``_batched_stderr``). Bias: O((n/k)^{-2/d}) smoothing bias, which
    dominates in higher dimensions; the note says so. Duplicate points (ρ = 0) are rejected.
    """
    xa, xb = _np(x_a), _np(x_b)
    if xa.shape[1] != xb.shape[1]:
        raise ValueError("x_a and x_b have different dimensions")
    if min(len(xa) // n_batches, len(xb) // n_batches) <= k + 1:
        raise ValueError(f"too few samples for k={k} and n_batches={n_batches}")
    if len(np.unique(xa, axis=0)) < len(xa):
        raise ValueError("x_a contains duplicate points; kNN estimators need distinct samples")
    value = _knn_kl_point(xa, xb, k, adaptive)
    rng = np.random.default_rng(seed)
    se = _batched_stderr(lambda i, j: _knn_kl_point(xa[i], xb[j], k, adaptive),
                         len(xa), len(xb), n_batches, rng)
    return Estimate(value, se, "knn",
                    f"k={k}, {'adaptive' if adaptive else 'fixed-k'} WKV; stderr from "
                    f"{n_batches} batches; kNN smoothing bias not included (grows with d)")


def _kl_entropy(x: np.ndarray, k: int) -> np.ndarray:
    """Per-point Kozachenko–Leonenko terms −log â(x_i); their mean is the entropy estimate."""
    n, dim = x.shape
    rho = _kth_distances(cKDTree(x), x, k, skip_self=True)[:, -1]
    log_vd = 0.5 * dim * math.log(math.pi) - gammaln(0.5 * dim + 1)
    return digamma(n) - digamma(k) + log_vd + dim * np.log(rho)


def knn_kl_known_b(x_a, log_b: Callable | Tensor | np.ndarray, k: int = 5,
                   n_batches: int = 10, seed: int | None = 0) -> Estimate:
    """KL(a‖b) when only a is sampled and b's log density is known (e.g. b = p, the target:
    the KL twin of D_i): KL = −H(a) − E_a[log b].

    H(a) is the Kozachenko–Leonenko k-NN entropy estimate
    ψ(n) − ψ(k) + log V_d + (d/n) Σ log ρ_k(i); E_a[log b] is a plain mean over x_a. ``log_b``
    is a callable on a float64 tensor or the values log b(x_a). stderr by batch splitting.
    Needs no samples of b, so it avoids the second kNN search and its bias; the entropy term
    keeps the kNN smoothing bias (positive KL bias ≈ the entropy underestimate, grows with d).
    """
    xa = _np(x_a)
    if callable(log_b):
        lb = _np(log_b(torch.as_tensor(xa, dtype=torch.float64)))[:, 0]
    else:
        lb = _np(log_b)[:, 0]
    if lb.shape[0] != xa.shape[0]:
        raise ValueError("log_b must have one value per row of x_a")
    if len(xa) // n_batches <= k + 1:
        raise ValueError(f"too few samples for k={k} and n_batches={n_batches}")
    if len(np.unique(xa, axis=0)) < len(xa):
        raise ValueError("x_a contains duplicate points; kNN estimators need distinct samples")

    def est(idx):
        return float(-np.mean(_kl_entropy(xa[idx], k)) - np.mean(lb[idx]))

    value = est(np.arange(len(xa)))
    rng = np.random.default_rng(seed)
    se = _batched_stderr(lambda i, _: est(i), len(xa), 0, n_batches, rng)
    return Estimate(value, se, "knn",
                    f"Kozachenko–Leonenko entropy (k={k}) + exact E_a[log b]; stderr from "
                    f"{n_batches} batches; kNN smoothing bias not included (grows with d)")


def knn_kl_known_b_paired(x_a, law_b, k: int = 5, n_batches: int = 10, seed: int | None = 0,
                          generator: torch.Generator | None = None, n_ref: int = 4) -> Estimate:
    """KL(a‖b) for a close to b when b can be sampled and its density is known: the
    :func:`knn_kl_known_b` estimate on x_a minus the mean of the same estimate on ``n_ref``
    independent sets of exact draws of b, each as large as x_a (a control variate: KL(b‖b) = 0,
    so the second term estimates the estimator's bias at b for this n).

    The Kozachenko–Leonenko entropy's smoothing bias depends on the shape of the sampled
    density and on n; when a ≈ b (a sampler's output against the law it discretises) the two
    biases cancel to first order, leaving a bias of the order of the bias's change from b to a.
    stderr = √(se_a² + se_b²/n_ref) (independent samples, each se from batch splitting). Not
    clipped at 0: a negative value means "below the resolution", whose size is the stderr.
    ``law_b`` has ``sample(n, generator)`` and ``log_prob``; ``generator`` drives b's draws.
    """
    xa = _np(x_a)
    ea = knn_kl_known_b(xa, law_b.log_prob, k, n_batches, seed)
    refs = [knn_kl_known_b(_np(law_b.sample(len(xa), generator)), law_b.log_prob, k, n_batches,
                           seed) for _ in range(n_ref)]
    bias = float(np.mean([r.value for r in refs]))
    se_b2 = float(np.mean([r.stderr**2 for r in refs])) / n_ref
    return Estimate(ea.value - bias, math.sqrt(ea.stderr**2 + se_b2), "knn_paired",
                    f"Kozachenko–Leonenko (k={k}) KL to the exact law minus its mean "
                    f"({bias:.3g}) on {n_ref} x {len(xa)} exact draws of that law (bias "
                    f"control); stderr from {n_batches} batches")


def _make_classifier(model: str, seed):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import PolynomialFeatures, StandardScaler

    if model == "quadratic":  # exact model class for two Gaussians: log a/b is quadratic
        return make_pipeline(StandardScaler(), PolynomialFeatures(2), StandardScaler(),
                             LogisticRegression(C=10.0, max_iter=2000))
    if model == "mlp":
        from sklearn.neural_network import MLPClassifier

        return make_pipeline(StandardScaler(), MLPClassifier(
            hidden_layer_sizes=(64, 64), alpha=1e-3, early_stopping=True, max_iter=300,
            random_state=seed))
    if model == "hgb":
        from sklearn.ensemble import HistGradientBoostingClassifier

        return HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05,
                                              early_stopping=True, random_state=seed)
    raise ValueError(f"model must be 'quadratic', 'mlp' or 'hgb', got {model!r}")


def classifier_log_ratio(x_a, x_b, model: str = "quadratic", n_folds: int = 5,
                         seed: int | None = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cross-fitted log density ratio log r = log a/b at every point of x_a and x_b.

    A probabilistic classifier (a = class 1) is trained on K−1 folds and predicts the held-out
    fold, so no point's ratio comes from a model that saw it. Class balance:
    r = (n_b/n_a)·P(a|x)/P(b|x) with the training folds' counts.
    """
    from sklearn.model_selection import StratifiedKFold

    xa, xb = _np(x_a), _np(x_b)
    X = np.concatenate([xa, xb])
    y = np.concatenate([np.ones(len(xa), int), np.zeros(len(xb), int)])
    logr = np.empty(len(X))
    for tr, te in StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(X, y):
        clf = _make_classifier(model, seed).fit(X[tr], y[tr])
        # columns: class 0 (b), class 1 (a); clip so a confident 0/1 gives a finite log ratio
        lp = np.log(np.clip(clf.predict_proba(X[te]), 1e-12, 1.0))
        prior = math.log(y[tr].sum() / (len(tr) - y[tr].sum()))
        logr[te] = lp[:, 1] - lp[:, 0] - prior
    return logr[: len(xa)], logr[len(xa):]


def classifier_divergences(x_a, x_b, model: str = "quadratic", n_folds: int = 5,
                           seed: int | None = 0) -> dict[str, Estimate]:
    """χ²(a‖b) and KL(a‖b) from samples via a cross-fitted classifier density ratio r̂ ≈ a/b
    (D_i, I_i and their KL twins when neither density is known; docs/paper.md §3).

    Returns ``{"chi2": ..., "kl": ...}``, estimator "classifier". Each uses the variational
    (first-order bias-free) form, whose error is second order in r̂ − r:

        χ² = sup_f 2E_a[f] − E_b[f²] − 1,   χ̂² = 2·mean_a r̂ − mean_b r̂² − 1
        KL = sup_f E_a[log f] − E_b[f] + 1, K̂L = mean_a log r̂ − mean_b r̂ + 1

    The plug-ins E_a[r̂] − 1 and E_a[log r̂] are off to first order when r̂ is mis-normalised
    (E_b[r̂] ≠ 1), which flexible classifiers usually are. stderr from the per-point terms of the
    held-out points, √(var_a/n_a + var_b/n_b); it ignores the fitting noise. The Pareto k̂ tail
    guard is applied to r̂ under b's r̂² terms and a's r̂ terms: nan + note when unreliable.
    ``model``: "quadratic" (logistic regression on degree-2 features: exact for two Gaussians,
    default), "mlp" or "hgb" (gradient boosting).
    """
    logr_a, logr_b = classifier_log_ratio(x_a, x_b, model, n_folds, seed)
    n_a, n_b = len(logr_a), len(logr_b)
    r_a, r_b = np.exp(logr_a), np.exp(logr_b)
    note = f"model={model}, {n_folds}-fold cross-fitting; stderr excludes classifier fit noise"

    chi2 = 2 * r_a.mean() - (r_b**2).mean() - 1
    se_chi2 = math.sqrt(4 * r_a.var(ddof=1) / n_a + (r_b**2).var(ddof=1) / n_b)
    chi2_est = _tail_guard(float(chi2), se_chi2, r_b**2, "the squared ratios r̂² under b",
                           "classifier")
    if chi2_est.finite:
        chi2_est = _tail_guard(float(chi2), se_chi2, r_a, "the ratios r̂ under a", "classifier")
    kl = logr_a.mean() - r_b.mean() + 1
    se_kl = math.sqrt(logr_a.var(ddof=1) / n_a + r_b.var(ddof=1) / n_b)
    kl_est = _tail_guard(float(kl), se_kl, r_b, "the ratios r̂ under b", "classifier")
    return {
        "chi2": Estimate(chi2_est.value, chi2_est.stderr, "classifier",
                         chi2_est.note or note),
        "kl": Estimate(kl_est.value, kl_est.stderr, "classifier", kl_est.note or note),
    }


# ================================================================================================
# Extra per-generation metrics
# ================================================================================================
def _gauss_kernel_sums(x: np.ndarray, y: np.ndarray, gamma: float, chunk: int = 2048) -> np.ndarray:
    """Row sums Σ_j exp(−γ‖x_i − y_j‖²), computed in chunks to bound memory."""
    out = np.empty(len(x))
    y2 = (y**2).sum(1)
    for s in range(0, len(x), chunk):
        xs = x[s:s + chunk]
        d2 = np.maximum((xs**2).sum(1)[:, None] + y2[None, :] - 2 * xs @ y.T, 0.0)
        out[s:s + chunk] = np.exp(-gamma * d2).sum(1)
    return out


def mmd(x_a, x_b, bandwidth: float | None = None, max_median_points: int = 2000,
        seed: int | None = 0) -> Estimate:
    """Unbiased squared maximum mean discrepancy MMD²_u with a Gaussian kernel
    k(x, y) = exp(−‖x − y‖²/(2h²)); h from the median heuristic on the pooled samples (on at
    most ``max_median_points`` points) unless given. A per-generation distance to the target.

    stderr from the first-order (Hoeffding) projections of the U-statistic,
    √(var(ψ_a)/n_a + var(ψ_b)/n_b) with ψ_a(i) = 2[mean_{i'≠i} k(a_i, a_i') − mean_j k(a_i, b_j)];
    valid when a ≠ b (under a = b the statistic is degenerate and the stderr is an
    underestimate). Cost O((n_a + n_b)²) kernel evaluations, memory O(2048·n).
    """
    xa, xb = _np(x_a), _np(x_b)
    n_a, n_b = len(xa), len(xb)
    if n_a < 2 or n_b < 2:
        raise ValueError("mmd needs at least two points in each sample")
    if bandwidth is None:
        rng = np.random.default_rng(seed)
        pool = np.concatenate([xa, xb])
        pool = pool[rng.permutation(len(pool))[:max_median_points]]
        d2 = ((pool[:, None, :] - pool[None, :, :]) ** 2).sum(-1)
        bandwidth = math.sqrt(0.5 * np.median(d2[np.triu_indices(len(pool), 1)]))
    gamma = 1.0 / (2.0 * bandwidth**2)
    kaa = (_gauss_kernel_sums(xa, xa, gamma) - 1.0) / (n_a - 1)  # mean over i' ≠ i
    kbb = (_gauss_kernel_sums(xb, xb, gamma) - 1.0) / (n_b - 1)
    kab = _gauss_kernel_sums(xa, xb, gamma) / n_b  # mean_j k(a_i, b_j)
    kba = _gauss_kernel_sums(xb, xa, gamma) / n_a
    value = kaa.mean() + kbb.mean() - 2 * kab.mean()
    se = math.sqrt(np.var(2 * (kaa - kab), ddof=1) / n_a + np.var(2 * (kbb - kba), ddof=1) / n_b)
    return Estimate(float(value), se, "mmd",
                    f"unbiased MMD², Gaussian kernel h={bandwidth:.4g}; first-order stderr")


def _w2sq_1d(pa: np.ndarray, pb: np.ndarray) -> np.ndarray:
    """Exact squared W2 between empirical 1-D laws, one per column: ∫₀¹ (F_a⁻¹ − F_b⁻¹)² du."""
    n_a, n_b = pa.shape[0], pb.shape[0]
    pa, pb = np.sort(pa, axis=0), np.sort(pb, axis=0)
    u = np.union1d(np.arange(1, n_a + 1) / n_a, np.arange(1, n_b + 1) / n_b)
    width = np.diff(np.concatenate([[0.0], u]))
    mid = u - width / 2  # quantile functions are constant on each (u_{k-1}, u_k]
    ia = np.minimum((mid * n_a).astype(int), n_a - 1)
    ib = np.minimum((mid * n_b).astype(int), n_b - 1)
    return (width[:, None] * (pa[ia] - pb[ib]) ** 2).sum(0)


def sliced_w2(x_a, x_b, n_projections: int = 128,
              generator: torch.Generator | None = None) -> Estimate:
    """Sliced 2-Wasserstein distance SW2 = (E_θ W2²(θᵀa, θᵀb))^{1/2}, θ uniform on the sphere,
    each 1-D W2 exact between the empirical laws (unequal sizes allowed). A per-generation
    distance to the target. stderr covers the projection randomness only (delta method over
    the projections), not the sampling of x_a, x_b."""
    xa, xb = _np(x_a), _np(x_b)
    theta = torch.randn(xa.shape[1], n_projections, dtype=torch.float64, generator=generator)
    theta = (theta / theta.norm(dim=0, keepdim=True)).numpy()
    w2sq = _w2sq_1d(xa @ theta, xb @ theta)
    mean = float(w2sq.mean())
    value = math.sqrt(mean)
    se_sq = float(w2sq.std(ddof=1)) / math.sqrt(n_projections) if n_projections > 1 else _NAN
    se = se_sq / (2 * value) if value > 0 else 0.0
    return Estimate(value, se, "sliced_wasserstein",
                    f"{n_projections} projections; stderr over projections only")


def second_moment(x) -> Estimate:
    """E‖X‖² from samples (spread of a generation; collapse shrinks or inflates it), with
    stderr std(‖x‖²)/√n."""
    sq = (_np(x) ** 2).sum(1)
    return Estimate(float(sq.mean()), float(sq.std(ddof=1) / math.sqrt(len(sq))), "sample_mean")
