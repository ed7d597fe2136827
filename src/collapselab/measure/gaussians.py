"""χ² and KL between two Gaussians in closed form: the one implementation in collapselab.

Both divergences depend only on the generalised eigenvalues λ_j of (Σ_a, Σ_b) (Σ_a v = λ Σ_b v,
vᵀΣ_b v = 1) and on the mean gap z = Vᵀ(μ_a − μ_b) in that basis, where N_b is standard and
N_a is N(z, diag λ); both become sums of one-dimensional terms:

    log(1 + χ²(N_a ‖ N_b)) = Σ_j [ −½ log(λ_j (2 − λ_j)) + z_j² / (2 − λ_j) ],
    KL(N_a ‖ N_b)          = ½ Σ_j (λ_j − 1 − log λ_j + z_j²),

(χ²(a‖b) = ∫ a²/b − 1, the divergence of D_i and I_i; KL is its twin). One infinity rule:
χ² is finite iff 2Σ_b − Σ_a is positive definite, i.e. every λ_j < 2 (N_a's variance in no
direction reaches twice N_b's); λ_max ≥ 2(1 − 10⁻¹²) counts as the boundary (round-off in
λ must not turn an infinite χ² into a huge finite one). A finite χ² beyond float64
(log(1 + χ²) > log(max float64)) is also reported as inf. Each infinite value carries the
reason in its note. KL is finite for non-degenerate covariances.

Inputs: means as sequences, NumPy arrays or torch tensors; a covariance as a (d, d) matrix, a
diagonal (d,) or a scalar variance. Computed in float64 with NumPy/SciPy.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg

from .estimate import Estimate

__all__ = ["BOUNDARY_RTOL", "gaussian_chi2", "gaussian_kl", "whitened"]

BOUNDARY_RTOL = 1e-12
LOG_MAX = math.log(np.finfo(np.float64).max)


def _array(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _params(mu, cov) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(_array(mu)).reshape(-1)
    cov = _array(cov)
    if cov.ndim < 2:  # scalar variance or diagonal
        cov = np.diag(np.broadcast_to(cov.reshape(-1), mu.shape)).astype(np.float64)
    if cov.shape != (mu.size, mu.size):
        raise ValueError(f"covariance of shape {cov.shape} does not match a mean of shape "
                         f"{mu.shape}")
    return mu, 0.5 * (cov + cov.T)  # symmetrise: round-off in fitted covariances


def whitened(mu_a, cov_a, mu_b, cov_b) -> tuple[np.ndarray, np.ndarray]:
    """(λ, z): the generalised eigenvalues of (Σ_a, Σ_b) and the mean gap in their basis."""
    mu_a, cov_a = _params(mu_a, cov_a)
    mu_b, cov_b = _params(mu_b, cov_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"the two Gaussians have different dimensions ({mu_a.size} vs "
                         f"{mu_b.size})")
    try:
        lam, vecs = scipy.linalg.eigh(cov_a, cov_b)
    except np.linalg.LinAlgError as exc:
        raise ValueError(f"cov_b is not positive definite ({exc})") from None
    if lam.min() <= 0:
        raise ValueError("cov_a is not positive definite")
    return lam, vecs.T @ (mu_a - mu_b)


def gaussian_chi2(mu_a, cov_a, mu_b, cov_b) -> Estimate:
    """χ²(N(μ_a, Σ_a) ‖ N(μ_b, Σ_b)) in closed form (module docstring; the D_i / I_i of two
    Gaussians). In 1-D: s_b² / (s_a √(2 s_b² − s_a²)) · exp((m_a − m_b)² / (2 s_b² − s_a²)) − 1.
    Evaluated in log space, then ``expm1``; inf with the reason in the note where infinite."""
    lam, z = whitened(mu_a, cov_a, mu_b, cov_b)
    lmax = float(lam.max())
    if lmax >= 2.0 * (1.0 - BOUNDARY_RTOL):
        return Estimate(
            math.inf, 0.0, "exact",
            f"χ² infinite: 2Σ_b − Σ_a is not positive definite (the first Gaussian's variance "
            f"is {lmax:.4g}× the second's in some direction; infinite from 2× on)")
    log1p_chi2 = float(np.sum(-0.5 * np.log(lam * (2.0 - lam)) + z**2 / (2.0 - lam)))
    log1p_chi2 = max(log1p_chi2, 0.0)  # ≥ 0 exactly; clip round-off
    if log1p_chi2 > LOG_MAX:
        return Estimate(math.inf, 0.0, "exact",
                        f"χ² finite but beyond float64: log(1 + χ²) = {log1p_chi2:.6g}")
    return Estimate(math.expm1(log1p_chi2), 0.0, "exact")


def gaussian_kl(mu_a, cov_a, mu_b, cov_b) -> Estimate:
    """KL(N(μ_a, Σ_a) ‖ N(μ_b, Σ_b)) = ½ [tr(Σ_b⁻¹Σ_a) − d + δᵀΣ_b⁻¹δ + log|Σ_b|/|Σ_a|]
    (the KL twin of D_i, I_i), as ½ Σ_j (λ_j − 1 − log λ_j + z_j²)."""
    lam, z = whitened(mu_a, cov_a, mu_b, cov_b)
    return Estimate(float(0.5 * np.sum(lam - 1.0 - np.log(lam) + z**2)), 0.0, "exact")
