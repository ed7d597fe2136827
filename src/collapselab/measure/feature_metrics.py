"""Image divergences computed in a classifier's feature space.

The paper's image divergence (arXiv 2602.16601, §5 "Image divergence") is a Gaussian χ² proxy:
fit a Gaussian to ~1000 feature vectors of each image set and evaluate χ² between the two fitted
Gaussians in closed form. This module gives that proxy (and its KL twin), the closed forms it
rests on, and the usual sample-quality metrics users compare with: Fréchet distance, KID,
precision/recall (Kynkäänniemi et al. 2019) and density/coverage (Naeem et al. 2020).

Every function returns :class:`~collapselab.measure.estimate.Estimate` (or a named pair of them); an
infinite divergence is reported as ``inf`` with the reason in ``note``, never as a finite number.

Convention: the first argument is the model / generated side (p̂), the second the reference
(p or q_i), so ``feature_gaussian_chi2(fake, real)`` estimates χ²(p̂ ‖ p) as in D_i = χ²(p̂_i ‖ p).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from sklearn.metrics import pairwise_distances_chunked
from sklearn.neighbors import NearestNeighbors

from collapselab.measure.estimate import Estimate
from collapselab.measure.gaussians import gaussian_chi2, gaussian_kl  # closed forms, re-exported

__all__ = [
    "DEFAULT_RIDGE",
    "DensityCoverage",
    "PrecisionRecall",
    "density_coverage",
    "feature_gaussian_chi2",
    "feature_gaussian_kl",
    "fit_gaussian",
    "frechet_distance",
    "gaussian_chi2",
    "gaussian_frechet",
    "gaussian_kl",
    "kid",
    "precision_recall",
]

# Ridge added to fitted covariances, relative to the mean feature variance (tr Σ / d averaged over
# the two sets, the same absolute amount added to both). 1e-3 keeps a 64-dim covariance fitted
# from 1000 samples (or features with a near-dead direction) invertible while changing χ² by far
# less than its sampling error.
DEFAULT_RIDGE = 1e-3

_GAUSS = "gaussian_features"


# --------------------------------------------------------------------------------------------
# closed forms between Gaussians


def _as_params(mu, cov) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    cov = np.atleast_2d(np.asarray(cov, dtype=np.float64))
    if mu.ndim != 1 or cov.shape != (mu.size, mu.size):
        raise ValueError(f"mean of shape {mu.shape} needs a covariance of shape ({mu.size},)*2")
    return mu, 0.5 * (cov + cov.T)  # symmetrise: round-off in fitted covariances


def gaussian_frechet(mu_a, cov_a, mu_b, cov_b) -> Estimate:
    """Fréchet (2-Wasserstein²) distance between Gaussians, the quantity behind FID:

        ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2}).

    Uses symmetric eigen-decompositions (no complex sqrtm round-off); PSD covariances are fine.
    """
    mu_a, cov_a = _as_params(mu_a, cov_a)
    mu_b, cov_b = _as_params(mu_b, cov_b)
    return Estimate(_frechet(mu_a, cov_a, mu_b, cov_b), 0.0, "exact")


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(cov)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _frechet(mu_a, cov_a, mu_b, cov_b) -> float:
    ra = _psd_sqrt(cov_a)
    inner = ra @ cov_b @ ra
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (inner + inner.T)), 0.0, None)).sum()
    val = float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross)
    return max(val, 0.0)


# --------------------------------------------------------------------------------------------
# plug-in estimates from feature samples


def _check_feats(a, b) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (n, d) arrays of equal d, got {a.shape} and {b.shape}")
    if min(len(a), len(b)) < 2:
        raise ValueError("need at least 2 samples in each feature set")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("features contain NaN or infinite values")
    return a, b


def fit_gaussian(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample mean and unbiased sample covariance (no ridge) of an (n, d) feature array."""
    feats = np.asarray(feats, dtype=np.float64)
    mu = feats.mean(axis=0)
    x = feats - mu
    return mu, x.T @ x / (len(feats) - 1)


def _ridge_pair(cov_a, cov_b, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    d = cov_a.shape[0]
    eps = ridge * 0.5 * (np.trace(cov_a) + np.trace(cov_b)) / d
    eye = np.eye(d)
    return cov_a + eps * eye, cov_b + eps * eye


def _bootstrap(
    stat: Callable[[np.ndarray, np.ndarray], float],
    a: np.ndarray,
    b: np.ndarray,
    n_boot: int,
    seed: int,
) -> np.ndarray:
    """Statistic on n_boot resamples (with replacement, a and b independently)."""
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    for r in range(n_boot):
        out[r] = stat(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))])
    return out


def _null_baseline(
    stat: Callable[[np.ndarray, np.ndarray], Estimate],
    n_a: int,
    n_b: int,
    d: int,
    reps: int,
    seed: int,
) -> float:
    """Median plug-in value between two samples of one and the same Gaussian at sizes (n_a, n_b).

    χ² and KL are affine invariant, so this null law depends only on (n_a, n_b, d) (up to the
    small relative ridge) and standard normal samples suffice.
    """
    rng = np.random.default_rng(seed + 7919)  # a stream apart from the bootstrap's
    vals = [
        stat(rng.standard_normal((n_a, d)), rng.standard_normal((n_b, d))).value
        for _ in range(reps)
    ]
    return float(np.median(vals))


def _gaussian_divergence(
    closed_form: Callable[..., Estimate],
    a: np.ndarray,
    b: np.ndarray,
    ridge: float,
    bootstrap: int,
    null_reps: int,
    seed: int,
) -> Estimate:
    a, b = _check_feats(a, b)

    def stat(x: np.ndarray, y: np.ndarray) -> Estimate:
        (mx, cx), (my, cy) = fit_gaussian(x), fit_gaussian(y)
        cx, cy = _ridge_pair(cx, cy, ridge)
        return closed_form(mx, cx, my, cy)

    point = stat(a, b)
    notes = [f"plug-in closed form between fitted Gaussians (ridge {ridge:g} × mean variance)"]
    if not point.finite:
        notes.insert(0, point.note)
    if null_reps > 0:
        base = _null_baseline(stat, len(a), len(b), a.shape[1], null_reps, seed)
        notes.append(f"same-law baseline at these n, d (median of {null_reps}): {base:.4g}")
    if bootstrap < 2:
        return Estimate(point.value, math.nan, _GAUSS, "; ".join([*notes, "no bootstrap"]))
    reps = _bootstrap(lambda x, y: stat(x, y).value, a, b, bootstrap, seed)
    n_inf = int(np.sum(~np.isfinite(reps)))
    if not point.finite:
        notes.append(f"{n_inf}/{bootstrap} bootstrap replicates infinite")
        return Estimate(math.inf, math.nan, _GAUSS, "; ".join(notes))
    if n_inf:
        # The estimate sits near the finiteness boundary: its spread is unbounded.
        notes.append(
            f"unreliable: {n_inf}/{bootstrap} ({n_inf / bootstrap:.0%}) bootstrap replicates "
            "infinite (a fitted variance ratio near 2)"
        )
        return Estimate(point.value, math.inf, _GAUSS, "; ".join(notes))
    # The divergences are exp/log of near-additive terms: their bootstrap law is skewed, and the
    # spread of log(1 + D) is the better-behaved one; map it back with the delta method.
    stderr = float(np.std(np.log1p(reps), ddof=1) * (1.0 + point.value))
    notes.append(
        f"stderr: bootstrap over samples ({bootstrap} replicates), sd of log(1 + value) × "
        "(1 + value)"
    )
    return Estimate(point.value, stderr, _GAUSS, "; ".join(notes))


def feature_gaussian_chi2(
    feats_a: np.ndarray,
    feats_b: np.ndarray,
    *,
    ridge: float = DEFAULT_RIDGE,
    bootstrap: int = 100,
    null_reps: int = 10,
    seed: int = 0,
) -> Estimate:
    """The paper's image divergence proxy: χ²(N(μ̂_a, Σ̂_a) ‖ N(μ̂_b, Σ̂_b)) in feature space.

    Gaussians are fitted to the two (n, d) feature sets (sample mean, unbiased covariance plus a
    common ridge ``ridge × mean variance × I``) and :func:`gaussian_chi2` is applied. stderr:
    bootstrap over resamples of both sets. If the point estimate is infinite the value is
    ``inf``; if only some bootstrap replicates are, the stderr is ``inf`` and the note gives
    their fraction.

    Caution: the plug-in is biased upward by sampling noise, strongly so when d/n is not small
    (two samples of one 64-dim Gaussian with n = 1000 give χ² ~ 10³ or inf, because the fitted
    variance ratios spread to ≈ (1 + √(2d/n))²). The note therefore reports the same-law
    baseline at the same n and d (``null_reps`` simulations, 0 to skip); compare against it.
    """
    return _gaussian_divergence(gaussian_chi2, feats_a, feats_b, ridge, bootstrap, null_reps, seed)


def feature_gaussian_kl(
    feats_a: np.ndarray,
    feats_b: np.ndarray,
    *,
    ridge: float = DEFAULT_RIDGE,
    bootstrap: int = 100,
    null_reps: int = 10,
    seed: int = 0,
) -> Estimate:
    """KL twin of :func:`feature_gaussian_chi2`: KL(N(μ̂_a, Σ̂_a) ‖ N(μ̂_b, Σ̂_b)).

    Same bootstrap stderr and same-law baseline in the note (for KL ≈ d(d + 3)/4 · (1/n_a + 1/n_b)).
    """
    return _gaussian_divergence(gaussian_kl, feats_a, feats_b, ridge, bootstrap, null_reps, seed)


def frechet_distance(
    feats_a: np.ndarray, feats_b: np.ndarray, *, bootstrap: int = 100, seed: int = 0
) -> Estimate:
    """Fréchet distance between Gaussians fitted to two feature sets (FID's formula, computed in
    our own classifier's features, so not comparable with Inception-FID numbers).

    stderr: standard deviation over ``bootstrap`` resamples of both sets.
    """
    a, b = _check_feats(feats_a, feats_b)

    def stat(x: np.ndarray, y: np.ndarray) -> float:
        return _frechet(*fit_gaussian(x), *fit_gaussian(y))

    value = stat(a, b)
    if bootstrap < 2:
        return Estimate(value, math.nan, _GAUSS, "plug-in Fréchet distance; no bootstrap")
    reps = _bootstrap(stat, a, b, bootstrap, seed)
    return Estimate(
        value,
        float(np.std(reps, ddof=1)),
        _GAUSS,
        f"plug-in Fréchet distance; stderr: bootstrap over samples ({bootstrap} replicates)",
    )


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    g = x @ y.T / x.shape[1] + 1.0
    return g * g * g  # explicit product: numpy's float ** 3 is slower


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    m = len(x)
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    off = m * (m - 1)
    return float(
        (kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off - 2.0 * kxy.mean()
    )


def kid(
    feats_a: np.ndarray,
    feats_b: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    *,
    seed: int = 0,
) -> Estimate:
    """Kernel Inception Distance (Bińkowski et al. 2018) in our feature space: the unbiased MMD²
    with the cubic polynomial kernel k(x, y) = (xᵀy / d + 1)³, averaged over random subsets.

    Each subset draws ``subset_size`` points without replacement from each set; the subset size
    is capped at half the smaller set so that subsets differ. The mean over subsets is unbiased
    for MMD², so it can be slightly negative when the laws agree. stderr: the subsets are drawn
    from one pool, so the plain std/√subsets would be far too small. Subsets of m out of n vary
    by a factor (1 − m/n) less than fresh draws of m, and the U-statistic's variance scales as
    1/m, so the full-sample variance is ≈ var_subsets · m/(n − m); we add the subset-averaging
    noise var_subsets/subsets. (When the laws agree the variance scales as 1/m² and this is
    conservative.) Calibrated by simulation in tests/test_feature_metrics.py.
    """
    a, b = _check_feats(feats_a, feats_b)
    n = min(len(a), len(b))
    m = min(subset_size, n // 2)
    if m < 2 or subsets < 2:
        raise ValueError(f"KID needs ≥ 4 samples per set and ≥ 2 subsets (n={n}, {subsets=})")
    rng = np.random.default_rng(seed)
    vals = np.array(
        [
            _mmd2_unbiased(
                a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]
            )
            for _ in range(subsets)
        ]
    )
    stderr = float(np.std(vals, ddof=1) * math.sqrt(1.0 / subsets + m / (n - m)))
    note = f"mean over {subsets} subsets of {m}; stderr: subset std × √(1/subsets + m/(n−m))"
    if m < subset_size:
        note += f" (subset_size {subset_size} capped at n/2 = {m})"
    return Estimate(float(vals.mean()), stderr, "kid", note)


# --------------------------------------------------------------------------------------------
# k-nearest-neighbour manifold metrics


class PrecisionRecall(NamedTuple):
    precision: Estimate
    recall: Estimate


class DensityCoverage(NamedTuple):
    density: Estimate
    coverage: Estimate


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each point to its k-th nearest neighbour in its own set (itself excluded)."""
    if len(x) <= k:
        raise ValueError(f"need more than k={k} samples, got {len(x)}")
    nn = NearestNeighbors(n_neighbors=k + 1).fit(x)
    dist, _ = nn.kneighbors(x)
    return dist[:, k]  # column 0 is the point itself


def _ball_counts(centres: np.ndarray, radii: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """For each query, how many balls B(centre_i, radius_i) contain it (chunked distances)."""
    counts = []
    for block in pairwise_distances_chunked(queries, centres, working_memory=64):
        counts.append(np.sum(block <= radii[None, :], axis=1))
    return np.concatenate(counts)


def _binomial(p: float, n: int, what: str) -> Estimate:
    return Estimate(
        p,
        math.sqrt(max(p * (1.0 - p), 0.0) / n),
        "knn",
        f"{what}; stderr binomial √(p(1−p)/n), conditional on the reference manifold",
    )


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 5) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    The real manifold is the union of balls around real points with radius the distance to the
    k-th nearest real neighbour; precision is the fraction of fake points inside it. Recall swaps
    roles: the fraction of real points inside the fake manifold. A collapsed generator keeps
    precision high and loses recall.
    """
    real, fake = _check_feats(real, fake)
    prec = float(np.mean(_ball_counts(real, _knn_radii(real, k), fake) > 0))
    rec = float(np.mean(_ball_counts(fake, _knn_radii(fake, k), real) > 0))
    return PrecisionRecall(
        _binomial(prec, len(fake), f"precision, k={k}"),
        _binomial(rec, len(real), f"recall, k={k}"),
    )


def density_coverage(real: np.ndarray, fake: np.ndarray, k: int = 5) -> DensityCoverage:
    """Density and coverage (Naeem et al. 2020), over kNN balls around the real points only.

    density = (1 / (k M)) Σ_j #{i : fake_j ∈ B(real_i, r_i)}  (≈ 1 when the laws agree);
    coverage = (1 / N) Σ_i 1[∃ j : fake_j ∈ B(real_i, r_i)].
    stderr: density, the standard error of the per-fake-point mean; coverage, binomial.
    """
    real, fake = _check_feats(real, fake)
    radii = _knn_radii(real, k)
    per_fake = _ball_counts(real, radii, fake) / k
    nn = NearestNeighbors(n_neighbors=1).fit(fake)
    nearest_fake = nn.kneighbors(real)[0][:, 0]
    cov = float(np.mean(nearest_fake <= radii))
    dens = Estimate(
        float(per_fake.mean()),
        float(per_fake.std(ddof=1) / math.sqrt(len(fake))),
        "knn",
        f"density, k={k}; stderr of the mean over fake points, conditional on the real balls",
    )
    return DensityCoverage(dens, _binomial(cov, len(real), f"coverage, k={k}"))
