"""χ² and KL of finite Gaussian-mixture laws by stratified Monte Carlo (estimators.
stratified_divergences, used by mc_chi2 / mc_divergences) against closed forms and quadrature.

Tolerances are 4 reported standard errors; the closed forms are derived here independently of
the estimator (information form of a product of Gaussians).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from collapselab.measure.estimators import (
    mc_chi2,
    mc_divergences,
    mixture_components,
    stratified_divergences,
)
from collapselab.scores.kde import KDELaw
from collapselab.targets import GaussianMixture, LawMixture, mix_laws, ring

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Opaque:
    """The same law without its structure: only plain Monte Carlo applies."""

    def __init__(self, law):
        self.law, self.dim = law, law.dim

    def sample(self, n, generator=None):
        return self.law.sample(n, generator)

    def log_prob(self, x):
        return self.law.log_prob(x)


def chi2_mixture_vs_gaussian(pi, mu, s2, m, t2) -> float:
    """χ²(Σ_j π_j N(μ_j, s2_j I) ‖ N(m, t2 I)) = Σ_jk π_j π_k ∫ N_j N_k / N_b − 1, each integral
    ∫ exp(−½P‖x‖² + h·x − c) = (2π/P)^{d/2} exp(‖h‖²/(2P) − c) with P = 1/s_j + 1/s_k − 1/t,
    h = μ_j/s_j + μ_k/s_k − m/t, c = ‖μ_j‖²/(2s_j) + ‖μ_k‖²/(2s_k) − ‖m‖²/(2t)."""
    pi, mu, s2, m = (np.asarray(v, dtype=np.float64) for v in (pi, mu, s2, m))
    d = mu.shape[1]
    sj, sk = s2[:, None], s2[None, :]
    P = 1 / sj + 1 / sk - 1 / t2
    assert (P > 0).all()
    h = mu[:, None, :] / sj[..., None] + mu[None, :, :] / sk[..., None] - m / t2
    c = ((mu**2).sum(1)[:, None] / (2 * sj) + (mu**2).sum(1)[None, :] / (2 * sk)
         - (m**2).sum() / (2 * t2))
    log_norm = -0.5 * d * (np.log(2 * np.pi * sj) + np.log(2 * np.pi * sk) - np.log(2 * np.pi * t2))
    log_terms = (np.log(pi)[:, None] + np.log(pi)[None, :] + log_norm
                 + 0.5 * d * np.log(2 * np.pi / P) + (h**2).sum(-1) / (2 * P) - c)
    top = log_terms.max()
    return float(np.exp(top) * np.exp(log_terms - top).sum() - 1)


def grid_chi2_2d(a, b, lo, hi, step) -> float:
    """∫ a²/b − 1 on [lo, hi]² by the trapezoid rule (spectrally accurate for Gaussians)."""
    xs = torch.arange(lo, hi + step / 2, step, dtype=F64)
    gx, gy = torch.meshgrid(xs, xs, indexing="ij")
    pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    f = torch.exp(2 * a.log_prob(pts) - b.log_prob(pts)).reshape(len(xs), len(xs))
    w = torch.full((len(xs),), step, dtype=F64)
    w[[0, -1]] *= 0.5
    return float(w @ f @ w) - 1


def outlier_kde_2d() -> tuple[KDELaw, GaussianMixture]:
    """A finite-KDE law (σ² = 0.1) of 400 centres near N(0, I) plus three far in its tails,
    against the target N(0, I): the three carry almost all of χ²."""
    rng = np.random.default_rng(0)
    c = np.concatenate([rng.normal(size=(400, 2)), [[6.0, 0.5], [-4.5, 4.0], [0.0, -6.2]]])
    return KDELaw(torch.from_numpy(c), 1.0, 0.1), GaussianMixture.isotropic([[0.0, 0.0]], 1.0)


def test_mixture_components_of_each_law():
    g = GaussianMixture.isotropic([[0.0, 1.0], [2.0, 0.0]], [0.5, 0.7], torch.tensor([0.25, 0.75]))
    kde = KDELaw(torch.tensor([[1.0, 1.0], [3.0, -1.0], [0.0, 0.0]], dtype=F64), 0.9, 0.2)
    w, m, v = mixture_components(LawMixture([(0.4, g), (0.6, kde)]))
    assert torch.allclose(w, torch.tensor([0.1, 0.3, 0.2, 0.2, 0.2], dtype=F64))
    assert torch.allclose(m[2:], 0.9 * kde.centres)
    assert torch.allclose(v, torch.tensor([0.25, 0.49, 0.2, 0.2, 0.2], dtype=F64))
    full = GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 0.3], [0.3, 1.0]]])
    assert mixture_components(full) is None and mixture_components(Opaque(g)) is None
    assert stratified_divergences(full, g, 100, gen(0)) is None


def test_outlying_centres_resolved_where_plain_monte_carlo_gave_nan():
    a, b = outlier_kde_2d()
    w, m, v = mixture_components(a)
    truth = chi2_mixture_vs_gaussian(w, m, v, [0.0, 0.0], 1.0)
    assert truth > 1e4  # dominated by the three outlying centres
    old = mc_chi2(Opaque(a), Opaque(b), 10_000, gen(1))
    # Plain sampling from a: the Pareto k̂ guard cannot tell this tail from an infinite mean.
    assert not math.isfinite(old.value) and "k̂" in old.note
    new = mc_chi2(a, b, 10_000, gen(1))
    assert new.estimator == "monte_carlo" and "stratified" in new.note
    assert math.isfinite(new.stderr) and new.stderr < 0.05 * truth
    assert abs(new.value - truth) < 4 * new.stderr


def test_ten_dimensional_kde_against_its_closed_form():
    # The paper's regime: component variance 1.04× the target's, centres drawn from the
    # target, so χ² is astronomically large and set by a few centres in its tails.
    rng = np.random.default_rng(1)
    c = torch.from_numpy(rng.normal(size=(200, 10)))
    a, b = KDELaw(c, 1.0, 1.04), GaussianMixture.isotropic(torch.zeros(1, 10, dtype=F64), 1.0)
    truth = chi2_mixture_vs_gaussian(torch.full((200,), 1 / 200), c, torch.full((200,), 1.04),
                                     np.zeros(10), 1.0)
    assert truth > 1e4
    est = mc_chi2(a, b, 20_000, gen(2))
    assert est.stderr < 0.1 * truth
    assert abs(est.value - truth) < 4 * est.stderr


def test_training_mixture_and_its_t0_push_against_quadrature():
    """q = α p + (1 − α) p̂ (a LawMixture of the ring and a finite-KDE law), pushed or not:
    χ²(p̂' ‖ q) against 2-D quadrature — the intra-generation pairs of the loop."""
    from collapselab.processes import OU

    rng = np.random.default_rng(3)
    p = ring(4, 2.0, 0.5)
    prev = KDELaw(p.sample(30, gen(4)), math.exp(-0.01), 0.11)
    nxt = KDELaw(torch.from_numpy(rng.normal(scale=2.0, size=(25, 2))), math.exp(-0.01), 0.11)
    q = mix_laws([(0.3, p), (0.7, prev)])
    assert isinstance(q, LawMixture)
    for b in (q, q.marginal(OU(T=4.0), 0.02)):
        truth = grid_chi2_2d(nxt, b, -9.0, 9.0, 0.04)
        est = mc_divergences(nxt, b, 8000, gen(5))["chi2"]
        assert "stratified" in est.note
        assert abs(est.value - truth) < 4 * est.stderr


def test_kl_by_the_same_draws_against_quadrature():
    a = GaussianMixture.isotropic([[-1.0], [0.5], [3.0]], [0.4, 0.6, 0.3],
                                  torch.tensor([0.3, 0.5, 0.2], dtype=F64))
    b = GaussianMixture.isotropic([[-0.5], [1.0]], [1.0, 0.8])

    def lp(law, x):
        return float(law.log_prob(torch.tensor([[x]], dtype=F64)))

    kl = quad(lambda x: math.exp(lp(a, x)) * (lp(a, x) - lp(b, x)), -15, 15, limit=200)[0]
    chi2 = quad(lambda x: math.exp(2 * lp(a, x) - lp(b, x)), -15, 15, limit=200)[0] - 1
    out = mc_divergences(a, b, 20_000, gen(6))
    assert abs(out["kl"].value - kl) < 4 * out["kl"].stderr
    assert abs(out["chi2"].value - chi2) < 4 * out["chi2"].stderr


def test_infinite_chi2_is_still_inf():
    # Component variance 0.6 > 2 × 0.25: χ² = ∞ for the KDE law and for a mixture holding it.
    kde = KDELaw(torch.zeros(3, 2, dtype=F64), 1.0, 0.6)
    p = GaussianMixture.isotropic([[0.0, 0.0]], 0.5)
    for a in (kde, LawMixture([(0.5, p), (0.5, kde)])):
        est = mc_chi2(a, p, 1000, gen(7))
        assert est.value == math.inf and "infinite" in est.note
    # KL stays finite and is still estimated (plain sampling).
    assert math.isfinite(mc_divergences(kde, p, 2000, gen(8))["kl"].value)


def test_stderr_matches_the_spread_of_repeats():
    a, b = outlier_kde_2d()
    reps = [mc_divergences(a, b, 2000, gen(100 + r)) for r in range(60)]
    for key in ("chi2", "kl"):
        sd = np.std([r[key].value for r in reps], ddof=1)
        se = np.mean([r[key].stderr for r in reps])
        # the sd of 60 repeats is known to ≈ 10%; the χ² terms are skewed: allow 35%
        assert 0.65 < se / sd < 1.35, (key, se, sd)


@pytest.mark.parametrize("alpha", [0.1, 0.9])
def test_fresh_data_contraction_on_finite_kde_laws(alpha):
    """χ²(α p + (1−α) r ‖ p) = (1−α)² χ²(r ‖ p) (PAPER.md §4) with r a finite-KDE law."""
    r, p = outlier_kde_2d()
    lhs = mc_chi2(LawMixture([(alpha, p), (1 - alpha, r)]), p, 10_000, gen(9))
    rhs = mc_chi2(r, p, 10_000, gen(10))
    err = math.hypot(lhs.stderr, (1 - alpha) ** 2 * rhs.stderr)
    assert abs(lhs.value - (1 - alpha) ** 2 * rhs.value) < 4 * err
