"""Feature-space divergences against closed forms and Monte Carlo (tolerances from MC error)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
from scipy.stats import multivariate_normal

from collapselab.measure.feature_metrics import (
    density_coverage,
    feature_gaussian_chi2,
    feature_gaussian_kl,
    frechet_distance,
    gaussian_chi2,
    gaussian_frechet,
    gaussian_kl,
    kid,
    precision_recall,
)


def chi2_1d(m1, s1, m2, s2):
    # independent closed form, valid for s1² < 2 s2²
    return (
        s2**2 / (s1 * math.sqrt(2 * s2**2 - s1**2)) * math.exp((m1 - m2) ** 2 / (2 * s2**2 - s1**2))
        - 1
    )


@pytest.mark.parametrize(
    "m1,s1,m2,s2", [(0.0, 1.0, 0.0, 1.0), (0.3, 1.1, -0.2, 0.9), (2.0, 0.5, 0.0, 1.0)]
)
def test_chi2_1d_closed_form(m1, s1, m2, s2):
    est = gaussian_chi2([m1], [[s1**2]], [m2], [[s2**2]])
    assert est.estimator == "exact" and est.stderr == 0.0
    assert est.value == pytest.approx(chi2_1d(m1, s1, m2, s2), rel=1e-10, abs=1e-14)


def _spd(rng, d, scale):
    a = rng.standard_normal((d, d))
    return scale * (a @ a.T / d + 0.5 * np.eye(d))


def test_chi2_3d_against_monte_carlo():
    rng = np.random.default_rng(0)
    cov_b = _spd(rng, 3, 1.0)
    # Σ_a = 0.8 Σ_b + small perturbation: ratio λ < 1.5 so (N_a/N_b) has finite variance under N_a
    cov_a = 0.8 * cov_b + 0.05 * np.eye(3)
    mu_a, mu_b = np.array([0.3, -0.2, 0.1]), np.zeros(3)
    exact = gaussian_chi2(mu_a, cov_a, mu_b, cov_b).value
    # χ² = E_{x~N_a}[N_a(x)/N_b(x)] − 1
    x = rng.multivariate_normal(mu_a, cov_a, size=200_000)
    w = np.exp(
        multivariate_normal(mu_a, cov_a).logpdf(x) - multivariate_normal(mu_b, cov_b).logpdf(x)
    )
    mc, se = w.mean() - 1, w.std(ddof=1) / math.sqrt(len(w))
    assert abs(exact - mc) < 4 * se


def test_chi2_infinite_cases_flagged():
    # s1² = 2 s2² (boundary) and beyond: ∫ N_a²/N_b diverges
    for s1sq in (2.0, 3.0):
        est = gaussian_chi2([0.0], [[s1sq]], [0.0], [[1.0]])
        assert est.value == math.inf and "not positive definite" in est.note
    # finite just below the boundary, and huge
    assert math.isfinite(gaussian_chi2([0.0], [[1.99]], [0.0], [[1.0]]).value)
    # multivariate: fine in two directions, too wide in the third
    est = gaussian_chi2(np.zeros(3), np.diag([1.0, 0.5, 2.5]), np.zeros(3), np.eye(3))
    assert est.value == math.inf and "2.5" in est.note


def test_kl_closed_form():
    m1, s1, m2, s2 = 0.4, 1.3, -0.1, 0.8
    ref = math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    assert gaussian_kl([m1], [[s1**2]], [m2], [[s2**2]]).value == pytest.approx(ref, rel=1e-12)
    rng = np.random.default_rng(1)
    ca, cb = _spd(rng, 4, 1.0), _spd(rng, 4, 2.0)
    ma, mb = rng.standard_normal(4), rng.standard_normal(4)
    ib = np.linalg.inv(cb)
    ref = 0.5 * (
        np.trace(ib @ ca)
        - 4
        + (ma - mb) @ ib @ (ma - mb)
        + np.linalg.slogdet(cb)[1]
        - np.linalg.slogdet(ca)[1]
    )
    assert gaussian_kl(ma, ca, mb, cb).value == pytest.approx(ref, rel=1e-10)


def test_frechet_exact_parameters():
    # commuting covariances: ‖δ‖² + Σ (σ_a − σ_b)²
    va, vb = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 1.0])
    ma, mb = np.array([1.0, 0.0, 2.0]), np.zeros(3)
    ref = np.sum((ma - mb) ** 2) + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2)
    got = gaussian_frechet(ma, np.diag(va), mb, np.diag(vb)).value
    assert got == pytest.approx(ref, rel=1e-12)
    # general case against scipy's sqrtm formula
    rng = np.random.default_rng(2)
    ca, cb = _spd(rng, 5, 1.0), _spd(rng, 5, 3.0)
    ref = np.trace(ca + cb - 2 * np.real(scipy.linalg.sqrtm(ca @ cb)))
    assert gaussian_frechet(np.zeros(5), ca, np.zeros(5), cb).value == pytest.approx(ref, rel=1e-8)


def test_plugin_gaussian_features_match_exact_within_bootstrap_error():
    rng = np.random.default_rng(3)
    d, n = 3, 10_000
    cov_b = _spd(rng, d, 1.0)
    cov_a, mu_a = 1.2 * cov_b, np.array([0.2, 0.0, -0.1])
    a = rng.multivariate_normal(mu_a, cov_a, size=n)
    b = rng.multivariate_normal(np.zeros(d), cov_b, size=n)
    for fn, exact in (
        (feature_gaussian_chi2, gaussian_chi2(mu_a, cov_a, np.zeros(d), cov_b).value),
        (feature_gaussian_kl, gaussian_kl(mu_a, cov_a, np.zeros(d), cov_b).value),
        (frechet_distance, gaussian_frechet(mu_a, cov_a, np.zeros(d), cov_b).value),
    ):
        kw = {} if fn is frechet_distance else {"null_reps": 0}
        est = fn(a, b, bootstrap=40, seed=0, **kw)
        assert est.estimator == "gaussian_features" and est.stderr > 0
        # plug-in bias here is O(d²/n) ≈ 1e-3, far below the 4-stderr tolerance
        assert abs(est.value - exact) < 4 * est.stderr, (fn.__name__, est, exact)
    # the note carries the same-law baseline
    est = feature_gaussian_chi2(a[:2000], b[:2000], bootstrap=2, null_reps=3)
    assert "same-law baseline" in est.note


def test_plugin_chi2_infinite_flagged_with_fraction():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((2000, 2)) * np.array([1.0, 1.8])  # variance ratio 3.24 > 2
    b = rng.standard_normal((2000, 2))
    est = feature_gaussian_chi2(a, b, bootstrap=20, null_reps=0)
    assert est.value == math.inf and math.isnan(est.stderr)
    assert "20/20 bootstrap replicates infinite" in est.note
    assert math.isfinite(feature_gaussian_kl(a, b, bootstrap=5).value)


def test_kid_zero_for_same_law_positive_for_shift():
    rng = np.random.default_rng(5)
    d = 8
    a, b = rng.standard_normal((600, d)), rng.standard_normal((600, d))
    same = kid(a, b, subsets=30, subset_size=300)
    assert same.estimator == "kid" and abs(same.value) < 3 * same.stderr
    shifted = kid(a + 0.4, b, subsets=30, subset_size=300)
    assert shifted.value > 3 * shifted.stderr
    # capping the subset size is reported
    assert "capped" in kid(a, b, subsets=5, subset_size=1000).note


def test_precision_recall_identical_and_collapsed():
    rng = np.random.default_rng(6)
    real = rng.standard_normal((1000, 2))
    pr = precision_recall(real, real.copy(), k=5)
    assert pr.precision.value == 1.0 and pr.recall.value == 1.0
    fresh = precision_recall(real, rng.standard_normal((1000, 2)), k=5)
    assert fresh.precision.value > 0.9 and fresh.recall.value > 0.9
    assert fresh.precision.estimator == "knn" and 0 < fresh.precision.stderr < 0.02
    # a collapsed generator: all mass near one real mode point
    collapsed = 0.1 * rng.standard_normal((1000, 2)) + np.array([0.5, 0.0])
    pc = precision_recall(real, collapsed, k=5)
    assert pc.precision.value > 0.9 and pc.recall.value < 0.2


def test_density_coverage():
    rng = np.random.default_rng(7)
    real = rng.standard_normal((1000, 2))
    dc = density_coverage(real, rng.standard_normal((1000, 2)), k=5)
    # Naeem et al.: E[density] = 1 when the laws agree (up to O(1/k) finite-sample effects)
    assert abs(dc.density.value - 1.0) < 0.15 and dc.coverage.value > 0.9
    collapsed = 0.1 * rng.standard_normal((1000, 2))
    dcc = density_coverage(real, collapsed, k=5)
    assert dcc.coverage.value < 0.2 and dcc.density.value > 1.0
