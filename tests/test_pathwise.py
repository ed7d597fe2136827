"""Pathwise quantities (pathwise.py) against constructions with known answers.

Tolerances are 4 reported standard errors (Monte Carlo, plus the quadrature-error estimate
where one is combined into the stderr); exact-vs-exact comparisons use floating-point
tolerances.
"""

import math

import pytest
import torch
from scipy import integrate
from threadpoolctl import threadpool_limits

from collapselab.measure.pathwise import (
    _integrate,
    _rule,
    dsm_constant,
    gaussian_linear_em,
    gaussian_linear_ode,
    girsanov_martingale,
    measure_observability,
    observability,
    score_energy_ideal,
    score_energy_learned,
)
from collapselab.processes import OU, time_grid
from collapselab.scores.analytic import AnalyticScore
from collapselab.scores.perturbed import (
    PerturbedScore,
    affine_parts,
    aligned,
    random_linear,
    time_constant,
    time_oscillating,
)
from collapselab.targets import GaussianMixture

# Two shared cores: keep BLAS (sklearn regressors) single-threaded too.
threadpool_limits(1)

P = OU()
T, T0 = 4.0, 0.02
MEAN, STD = torch.tensor([[1.0, -0.5]], dtype=torch.float64), 0.6


def gauss():
    return GaussianMixture.isotropic(MEAN, STD)


def gmm2():
    return GaussianMixture.isotropic(
        torch.tensor([[2.0, 2.0], [2.0, -2.0], [-2.0, 2.0], [-2.0, -2.0]]), 0.6
    )


def wb_of(err, c, d):
    return lambda t: tuple(c * z for z in affine_parts(err, t, d))


def close(est, exact, k=4.0):
    assert abs(est.value - exact) <= k * est.stderr, (est, exact)


# ---- ε⋆² ------------------------------------------------------------------------------------
def closed_form_aligned(w, m, s2, d):
    """ε⋆² for e = w y, q = N(m, s² I): ∫ w² Σ_i (a² (m_i² + s²) + v) dt (OU: a² = e^{−t})."""
    msq = float((m**2).sum())
    f = lambda t: w * w * (math.exp(-t) * (msq + d * s2) + d * (1 - math.exp(-t)))  # noqa: E731
    return integrate.quad(f, T0, T, epsabs=1e-13, epsrel=1e-12)[0]


def test_eps_star_monte_carlo_matches_closed_form(gen):
    law, w = gauss(), 0.4
    exact = closed_form_aligned(w, MEAN[0], STD**2, 2)
    score = PerturbedScore(AnalyticScore(law, P), aligned(1.0), w)
    ex = score_energy_ideal(score, law, P, T0, T)
    assert ex.estimator == "exact" and math.isclose(ex.value, exact, rel_tol=1e-8)
    for quad in ["simpson", "trapezoid", "gauss_legendre"]:
        mc = score_energy_ideal(score, law, P, T0, T, n_mc=1000, generator=gen, exact=False,
                                quadrature=quad)
        assert mc.estimator == "monte_carlo"
        close(mc, exact)


def test_eps_star_monte_carlo_matches_exact_path_on_a_mixture(gen):
    law = gmm2()
    score = PerturbedScore(AnalyticScore(law, P), random_linear(2, gen), 0.3)
    ex = score_energy_ideal(score, law, P, T0, T)
    mc = score_energy_ideal(score, law, P, T0, T, n_mc=1000, generator=gen, exact=False)
    close(mc, ex.value)


def test_dsm_constant_turns_dsm_loss_into_eps_star(gen):
    """L_DSM(ŝ) − C = ε⋆² (cross term vanishes), with L_DSM estimated by Monte Carlo."""
    law = gmm2()
    score = PerturbedScore(AnalyticScore(law, P), aligned(1.0), 0.3)
    eps = score_energy_ideal(score, law, P, T0, T).value
    C = dsm_constant(law, P, T0, T, n_mc=1000, generator=gen)
    rule = _rule(T0, T, 50, "simpson", "log")

    def node(t):
        a, v = float(P.scale(t)), float(P.var(t))
        x0 = law.sample(1000, gen)
        z = torch.randn(x0.shape, dtype=torch.float64, generator=gen)
        xt = a * x0 + math.sqrt(v) * z
        f = ((score(xt, t) + z / math.sqrt(v)) ** 2).sum(1)
        return float(f.mean()), float(f.std() / math.sqrt(1000))

    L, L_se, _ = _integrate(rule, node, "dsm")
    assert abs((L - C.value) - eps) <= 4 * math.hypot(L_se, C.stderr)


def test_dsm_constant_monte_carlo_matches_exact_gaussian(gen):
    # Two identical components: the same Gaussian, but it takes the Monte Carlo path.
    one = gauss()
    two = GaussianMixture(torch.tensor([0.5, 0.5]), MEAN.repeat(2, 1), STD**2)
    ex = dsm_constant(one, P, T0, T)
    assert ex.estimator == "exact" and ex.value > 0
    mc = dsm_constant(two, P, T0, T, n_mc=1000, generator=gen)
    close(mc, ex.value)


# ---- ε̂² and Prop 3.1 -------------------------------------------------------------------------
@pytest.mark.parametrize("start", ["law", "normal"])
def test_learned_energy_matches_exact_em_recursion(gen, start):
    law, c = gauss(), 0.5
    err = aligned(1.0)
    score = PerturbedScore(AnalyticScore(law, P), err, c)
    ref = gaussian_linear_em(law, P, wb_of(err, c, 2), time_grid(T, T0, 100), start=start)
    est = score_energy_learned(score, law, P, T0, T, steps=100, n_paths=2000, generator=gen,
                               start=start)
    close(est, ref["eps_hat_sq"])


def test_prop_3_1_kl_bound_gaussian_linear():
    """KL(p̂ ‖ q_t0) ≤ ½ ε̂² (Girsanov + data processing), exact Gaussians, started at q_T."""
    law = gauss()
    u = torch.tensor([1.0, 1.0], dtype=torch.float64)
    for err, c in [(aligned(1.0), 0.5), (aligned(1.0), -0.3), (time_constant(u), 0.2),
                   (random_linear(2, torch.Generator().manual_seed(0)), 0.4)]:
        wb = wb_of(err, c, 2)
        ode = gaussian_linear_ode(law, P, wb, T0, T)
        assert 0 < ode["kl"] <= 0.5 * ode["eps_hat_sq"]
        # Discrete twin: the EM chains satisfy the same bound exactly.
        em = gaussian_linear_em(law, P, wb, time_grid(T, T0, 200))
        assert em["kl_em"] <= 0.5 * em["eps_hat_sq"]
        # The EM chain converges to the ODE solution (validates both references).
        assert math.isclose(em["eps_hat_sq"], ode["eps_hat_sq"], rel_tol=0.02)
        # Two independent exact routes to ε⋆² agree.
        score = PerturbedScore(AnalyticScore(law, P), err, c)
        assert math.isclose(score_energy_ideal(score, law, P, T0, T).value, ode["eps_star_sq"],
                            rel_tol=1e-6)


# ---- M_T and η ------------------------------------------------------------------------------
def test_martingale_variance_is_eps_star(gen):
    law = gmm2()
    score = PerturbedScore(AnalyticScore(law, P), aligned(1.0), 0.3)
    Y, M, Q = girsanov_martingale(score, law, P, T0, T, 100, 4000, gen, return_energy=True)
    n = len(M)
    assert abs(float(M.mean())) <= 4 * float(M.std()) / math.sqrt(n)
    # Itô isometry for the EM chain itself: E M² = E Σβ‖e‖²Δt (paired difference).
    diff = M**2 - Q
    assert abs(float(diff.mean())) <= 4 * float(diff.std()) / math.sqrt(n)
    # Against the continuous-time ε⋆² (exact path): the EM bias at 100 steps is well below MC.
    eps = score_energy_ideal(score, law, P, T0, T).value
    assert abs(float((M**2).mean()) - eps) <= 4 * float((M**2).std()) / math.sqrt(n)


def test_martingale_variance_matches_exact_gaussian(gen):
    law = gauss()
    err = aligned(1.0)
    score = PerturbedScore(AnalyticScore(law, P), err, 0.3)
    ref = gaussian_linear_em(law, P, wb_of(err, 0.3, 2), time_grid(T, T0, 100))
    assert math.isclose(ref["eps_star_sq"], ref["eps_star_sq_sum"], rel_tol=1e-10)
    _, M = girsanov_martingale(score, law, P, T0, T, 100, 4000, gen)
    m2 = M**2
    assert abs(float(m2.mean()) - ref["eps_star_sq"]) <= 4 * float(m2.std()) / math.sqrt(len(M))


def test_eta_matches_exact_gaussian_values(gen):
    """η̂ (cross-fitted regression) vs the exact η of the EM chain for a Gaussian q.

    A constant time-only error is *observable* (exact η ≈ 0.55 here: a drift offset moves the
    output mean); a fast-oscillating one is not (exact η ≈ 1e-3)."""
    law = gauss()
    u = torch.tensor([1.0, 0.0], dtype=torch.float64)
    times = time_grid(T, T0, 100)
    for err, lo in [(aligned(1.0), 0.2), (time_constant(u), 0.4), (time_oscillating(u, 5.0), 0)]:
        ref = gaussian_linear_em(law, P, wb_of(err, 0.3, 2), times)
        assert ref["eta"] >= lo
        score = PerturbedScore(AnalyticScore(law, P), err, 0.3)
        Y, M = girsanov_martingale(score, law, P, T0, T, 100, 4000, gen)
        # poly2 contains the exact E[M | Y] (quadratic in Y for a Gaussian and affine e).
        est = observability(Y, M, None, regressor="poly2", generator=gen)
        close(est, ref["eta"])


def test_eta_of_fast_time_only_error_is_zero_without_overfitting_bias(gen):
    law = gauss()
    err = time_oscillating(torch.tensor([1.0, 0.0], dtype=torch.float64), 5.0)
    ref = gaussian_linear_em(law, P, wb_of(err, 0.3, 2), time_grid(T, T0, 100))["eta"]
    assert ref < 2e-3
    score = PerturbedScore(AnalyticScore(law, P), err, 0.3)
    Y, M = girsanov_martingale(score, law, P, T0, T, 100, 4000, gen)
    est = observability(Y, M, None, regressor="knn", generator=gen)
    assert abs(est.value) <= 4 * est.stderr + ref
    # The fitted-value variance of a flexible regressor is biased upward even out of fold;
    # the cross-fitted covariance used for η is not.
    assert est.diagnostics["eta_var_fitted"] > est.value + 2 * est.stderr


def test_eta_zero_when_no_error(gen):
    law = gauss()
    Y, M = girsanov_martingale(AnalyticScore(law, P), law, P, T0, T, 20, 200, gen)
    assert torch.count_nonzero(M) == 0
    est = observability(Y, M, None, generator=gen)
    assert est.value == 0.0 and est.stderr == 0.0


def test_eta_ordering_aligned_random_timeonly(gen):
    """Fig. 2 ordering η(aligned) > E_A η(random linear A) > η(time-only, fast) ≈ 0, on a
    centred 2-component GMM in d = 10.

    η of one random matrix varies a lot with the draw (0.09-0.21 here), so the random-linear
    value is the mean over 8 matrices with the stderr from their spread (MC + draw-to-draw).
    In d = 2 a random matrix is mostly symmetric and η(random linear) ≈ η(aligned); the gap
    opens with d as the rotation part (nearly invisible for a nearly isotropic law) takes about
    half of A's energy. A *constant* time-only error has a large η (see the Gaussian test)."""
    d = 10
    means = torch.zeros(2, d, dtype=torch.float64)
    means[0, 0], means[1, 0] = 1.0, -1.0
    law = GaussianMixture.isotropic(means, 0.7)
    u = torch.zeros(d, dtype=torch.float64)
    u[0] = 1.0

    def eta(err, n):
        score = PerturbedScore(AnalyticScore(law, P), err, 0.3)
        return measure_observability(score, law, P, T0, T, 100, n, gen, regressor="poly2")["eta"]

    a = eta(aligned(1.0), 3000)
    t = eta(time_oscillating(u, 5.0), 3000)
    rl = torch.tensor([eta(random_linear(d, gen), 1500).value for _ in range(8)])
    r, r_se = float(rl.mean()), float(rl.std() / math.sqrt(len(rl)))
    msg = (a, t, rl)
    assert a.value - r > 4 * math.hypot(a.stderr, r_se), msg
    assert r - t.value > 4 * math.hypot(r_se, t.stderr), msg
    assert abs(t.value) <= 4 * t.stderr + 2e-3, msg


# ---- ε̂² from the model's own T-marginal: the de Bruijn identity and a skew-aware stderr ----
def test_learned_energy_from_own_marginal_satisfies_de_bruijn():
    """For a score exact for its own law p̂ (here a Gaussian), KL(p̂_t0 ‖ q_t0) =
    KL(p̂_T ‖ q_T) + ½ ε̂² with ε̂² along p̂'s reverse paths started from p̂_T (closed-form KLs)."""
    from collapselab.measure.pathwise import gaussian_kl

    T, t0 = 4.0, 0.02
    q = GaussianMixture.isotropic(torch.tensor([[0.0]], dtype=torch.float64), 0.5)
    ph = GaussianMixture.isotropic(torch.tensor([[0.6]], dtype=torch.float64), 0.7)
    model = AnalyticScore(ph, P)

    def kl(t):
        a, b = ph.marginal(P, t), q.marginal(P, t)
        return gaussian_kl(a.means[0], a.covs[0], b.means[0], b.covs[0])

    grid = torch.exp(torch.linspace(math.log(T), math.log(t0), 201, dtype=torch.float64))
    g = torch.Generator().manual_seed(3)
    e = score_energy_learned(model, q, P, t0, T, 200, 2000, g, start="model", times=grid)
    assert "start=model T-marginal" in e.note and "BCa" in e.note
    # ½ ε̂² = KL_t0 − KL_T (= 0.3895 − 0.0006 here) within 4 of its standard errors
    assert abs(0.5 * e.value - (kl(t0) - kl(T))) <= 4 * 0.5 * e.stderr
    # a uniform grid of 20 steps under-resolves t near t0 and reads low by far more
    low = score_energy_learned(model, q, P, t0, T, 20, 2000, g, start="model")
    assert 0.5 * low.value < kl(t0) - kl(T) - 4 * 0.5 * low.stderr


def test_learned_energy_adaptive_path_count_and_bad_start():
    T, t0 = 4.0, 0.02
    q = GaussianMixture.isotropic(torch.tensor([[0.0]], dtype=torch.float64), 0.5)
    ph = GaussianMixture.isotropic(torch.tensor([[0.3]], dtype=torch.float64), 0.6)
    model = AnalyticScore(ph, P)
    g = torch.Generator().manual_seed(4)
    e = score_energy_learned(model, q, P, t0, T, 20, 50, g, start="model", rel_tol=0.05,
                             max_paths=2000)
    n = int(e.note.split()[0])
    assert n % 50 == 0 and (e.stderr <= 0.05 * e.value or n + 50 > 2000), e.note
    assert "relative stderr" in e.note
    with pytest.raises(ValueError, match="output_law"):
        score_energy_learned(PerturbedScore(model, time_constant([1.0]), 0.1), q, P, t0, T, 5, 10,
                             g, start="model")


def test_skewed_mean_bca_stderr_covers_a_lognormal_mean():
    """Lognormal(0, 1.5) (skewness ≈ 33): mean ± 2 BCa stderr covers e^{1.125} in ≥ 90% of 200
    repetitions of n = 300 (the nominal 95% would be ~0.95; the symmetric s/√n falls short)."""
    import numpy as np

    from collapselab.measure.pathwise import skewed_mean

    rng = np.random.default_rng(1)
    truth = math.exp(1.5**2 / 2)
    hits = 0
    for _ in range(200):
        y = rng.lognormal(0.0, 1.5, 300)
        m, se, skew = skewed_mean(y, None, 500)
        assert m == pytest.approx(y.mean()) and skew > 2
        hits += abs(m - truth) <= 2 * se
    assert hits / 200 >= 0.90
    m, se, _ = skewed_mean(np.array([1.0, 1.0, 1.0]))
    assert (m, se) == (1.0, 0.0)
