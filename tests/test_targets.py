import math

import numpy as np
import torch
from scipy.stats import multivariate_normal

from collapselab.processes import OU, VPProcess
from collapselab.scores.analytic import AnalyticScore
from collapselab.scores.kde import KDEScore
from collapselab.targets import GaussianMixture, LawMixture, mix_laws, paper_gmm_means, ring


def full_mixture():
    return GaussianMixture(
        [0.3, 0.7],
        [[0.0, 1.0, -1.0], [2.0, 3.0, 0.5]],
        [
            [[1.0, 0.3, 0.0], [0.3, 2.0, 0.2], [0.0, 0.2, 0.5]],
            [[2.0, 0.0, 0.1], [0.0, 0.5, 0.0], [0.1, 0.0, 1.0]],
        ],
    )


def scipy_logpdf(gm, x):
    dens = sum(
        w * multivariate_normal(m.numpy(), c.numpy()).pdf(x.numpy())
        for w, m, c in zip(gm.weights.tolist(), gm.means, gm.covs, strict=True)
    )
    return np.log(dens)


def test_log_prob_matches_scipy_full_diag_iso(gen):
    for gm in [
        full_mixture(),
        GaussianMixture([0.5, 0.5], [[0.0, 0.0], [1.0, 2.0]], [[1.0, 0.2], [0.5, 3.0]]),
        ring(),
    ]:
        x = gm.sample(50, gen)
        np.testing.assert_allclose(gm.log_prob(x).numpy(), scipy_logpdf(gm, x), rtol=1e-10)


def test_score_is_gradient_of_log_prob(gen):
    for gm in [full_mixture(), ring()]:
        x = gm.sample(20, gen).requires_grad_(True)
        gm.log_prob(x).sum().backward()
        torch.testing.assert_close(gm.score(x.detach()), x.grad, rtol=1e-9, atol=1e-10)


def test_sampling_moments(gen):
    gm = full_mixture()
    x = gm.sample(200_000, gen)
    mean_se = x.std(0) / math.sqrt(len(x))
    assert ((x.mean(0) - gm.mean()).abs() < 4 * mean_se).all()
    # Covariance entries: SE of a sample covariance ≈ sqrt(Var((x_i-μ_i)(x_j-μ_j))/n).
    xc = x - x.mean(0)
    prods = xc[:, :, None] * xc[:, None, :]
    cov_se = prods.std(0) / math.sqrt(len(x))
    assert ((torch.cov(x.T) - gm.covariance()).abs() < 4 * cov_se + 1e-12).all()


def test_marginal_is_the_forward_process_law():
    gm = full_mixture()
    t = 0.7
    m = gm.marginal(OU(), t)
    a, v = math.exp(-t / 2), 1 - math.exp(-t)
    torch.testing.assert_close(m.means, a * gm.means)
    torch.testing.assert_close(m.covs, a * a * gm.covs + v * torch.eye(3, dtype=torch.float64))
    # A VP process with constant beta = 1 is the OU process.
    vp = VPProcess(beta_min=1.0, beta_max=1.0, T=4.0)
    torch.testing.assert_close(gm.marginal(vp, t).covs, m.covs)


def test_mix_and_convolve():
    p = ring()
    r = GaussianMixture.isotropic([[0.0, 0.0]], 1.0)
    q = p.mix(r, 0.25)
    x = torch.randn(10, 2, dtype=torch.float64)
    expected = torch.logaddexp(math.log(0.25) + p.log_prob(x), math.log(0.75) + r.log_prob(x))
    torch.testing.assert_close(q.log_prob(x), expected)
    torch.testing.assert_close(mix_laws([(0.25, p), (0.75, r)]).log_prob(x), expected)
    torch.testing.assert_close(LawMixture([(0.25, p), (0.75, r)]).log_prob(x), expected)
    c = p.convolve(0.5)
    torch.testing.assert_close(c.covs, p.covs + 0.25 * torch.eye(2, dtype=torch.float64))


def test_kde_score_equals_analytic_score_of_equivalent_mixture(gen):
    centres = torch.randn(300, 4, dtype=torch.float64, generator=gen) * 2
    h = 0.4
    kde = KDEScore(centres, h, OU(), dtype=torch.float64)
    exact = AnalyticScore(GaussianMixture.isotropic(centres, h), OU())
    y = torch.randn(64, 4, dtype=torch.float64, generator=gen) * 2
    for t in [0.02, 0.3, 1.0, 4.0]:
        torch.testing.assert_close(kde(y, t), exact(y, t), rtol=1e-9, atol=1e-9)
    # The float32 fast path agrees within float32 precision.
    kde32 = KDEScore(centres.float(), h, OU())
    for t in [0.02, 1.0]:
        torch.testing.assert_close(kde32(y.float(), t).double(), exact(y, t), rtol=1e-3, atol=2e-3)


def test_population_kde_law_is_convolution_plus_t0_step():
    """After one generation the population-KDE law is (p * N(0,h²))_t0, written out by hand."""
    p = GaussianMixture.isotropic(paper_gmm_means(3), 0.6)
    h, t0 = 0.6, 0.02
    law = AnalyticScore(p, OU(), bandwidth=h).output_law(t0)
    a2 = math.exp(-t0)
    var = a2 * (0.6**2 + h**2) + (1 - a2)
    torch.testing.assert_close(law.means, math.sqrt(a2) * p.means)
    torch.testing.assert_close(law.covs, var * torch.eye(3, dtype=torch.float64).expand(5, 3, 3))


def test_paper_layout():
    m = paper_gmm_means(10)
    assert m.shape == (5, 10)
    assert m[0].abs().sum() == 0 and (m[1:, 2:] == 0).all() and (m[1:, :2].abs() == 4).all()


def test_exact_score_of_kde_law_mixture_equals_the_flattened_mixture(gen):
    """q = 0.4·p + 0.6·(finite-KDE law): LawMixture's marginal score equals that of the same
    law written as one GaussianMixture (the reference ∇log q_t of the pathwise estimators)."""
    from collapselab.scores.analytic import exact_score

    d = torch.float64
    p, centres = ring(), torch.randn(100, 2, dtype=d, generator=gen)
    kde_law = KDEScore(centres, 0.3, OU()).output_law(0.02)
    q = LawMixture([(0.4, p), (0.6, kde_law)])
    flat = GaussianMixture.isotropic(
        torch.cat([p.means, kde_law.scale * centres]),
        torch.cat([torch.full((8,), 0.5, dtype=d), torch.full((100,), kde_law.var**0.5, dtype=d)]),
        torch.cat([torch.full((8,), 0.05, dtype=d), torch.full((100,), 0.006, dtype=d)]),
    )
    y = torch.randn(20, 2, dtype=d, generator=gen) * 3
    for t in [0.02, 0.5, 2.0]:
        torch.testing.assert_close(exact_score(q, OU())(y, t), exact_score(flat, OU())(y, t))
        torch.testing.assert_close(
            q.marginal(OU(), t).log_prob(y), flat.marginal(OU(), t).log_prob(y)
        )
