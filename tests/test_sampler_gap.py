"""The sampler's own drift: reverse-time grids and sampler_gap_kl against closed forms."""

import math

import numpy as np
import pytest
import torch

from collapselab.config import build_config, load_config
from collapselab.engine.executors import prepare_run_dir, run_experiment
from collapselab.errors import ConfigError
from collapselab.measure import estimators as est
from collapselab.processes import OU, time_grid
from collapselab.samplers import euler_maruyama
from collapselab.scores.analytic import AnalyticScore
from collapselab.targets import GaussianMixture


@pytest.mark.parametrize("schedule", ["uniform", "geometric", "edm"])
def test_time_grids_run_from_T_to_t0_and_are_finest_near_t0(schedule):
    g = time_grid(4.0, 0.02, 50, schedule=schedule)
    assert len(g) == 51 and g[0].item() == 4.0 and g[-1].item() == 0.02
    steps = -(g[1:] - g[:-1])
    assert (steps > 0).all()
    if schedule != "uniform":
        assert steps[-1] < steps[0] / 10  # finest near t0
    torch.testing.assert_close(g, time_grid(4.0, 0.02, 50, schedule=schedule))  # pure


def test_time_grid_closed_forms():
    torch.testing.assert_close(time_grid(4.0, 0.02, 10), torch.linspace(4.0, 0.02, 11,
                                                                         dtype=torch.float64))
    g = time_grid(4.0, 0.02, 10, schedule="geometric")
    ratio = g[1:] / g[:-1]
    torch.testing.assert_close(ratio, torch.full_like(ratio, (0.02 / 4.0) ** 0.1))
    # EDM with ρ = 1 is the uniform grid; t0 = 0 is allowed there, not for geometric.
    torch.testing.assert_close(time_grid(1.0, 0.0, 8, schedule="edm", rho=1.0),
                               time_grid(1.0, 0.0, 8))
    assert time_grid(1.0, 0.0, 8, schedule="edm")[-1].item() == 0.0
    with pytest.raises(ValueError, match="t0 > 0"):
        time_grid(1.0, 0.0, 8, schedule="geometric")
    with pytest.raises(ValueError, match="schedule"):
        time_grid(1.0, 0.1, 8, schedule="cosine")


@pytest.mark.parametrize(
    "data, field",
    [
        ({"sampler": {"schedule": "cosine"}}, "sampler.schedule"),
        ({"sampler": {"schedule": "geometric", "t0": 0.0}}, "sampler.schedule"),
        ({"sampler": {"schedule": "edm", "rho": 0}}, "sampler.rho"),
    ],
)
def test_bad_schedules_name_the_field(data, field):
    with pytest.raises(ConfigError) as info:
        build_config(data)
    msg = str(info.value)
    assert msg.startswith(field) and "\n" not in msg, msg


def _em_gaussian_law(m: np.ndarray, s2: float, times) -> tuple[np.ndarray, float]:
    """Law of Euler–Maruyama on the OU reverse SDE with the exact score of N(m, s² I), started
    from N(0, I): each step y ← A y + c + √Δt z is linear, with A = 1 + Δt/2 − Δt/V_t and
    c = a_t m Δt/V_t (a_t = e^{−t/2}, V_t = a_t² s² + 1 − e^{−t}), so the mean and the
    (isotropic) variance propagate exactly: μ ← A μ + c, σ² ← A² σ² + Δt."""
    mu, var = np.zeros_like(m), 1.0
    t = [float(x) for x in times]
    for i in range(len(t) - 1):
        dt, a = t[i] - t[i + 1], math.exp(-t[i] / 2)
        v = a * a * s2 + 1 - math.exp(-t[i])
        A = 1 + 0.5 * dt - dt / v
        mu, var = A * mu + a * m * dt / v, A * A * var + dt
    return mu, var


def _kl_isotropic(mu1, v1, mu2, v2, d) -> float:
    """KL(N(μ1, v1 I) ‖ N(μ2, v2 I))."""
    return 0.5 * (d * v1 / v2 + float(np.sum((mu1 - mu2) ** 2)) / v2 - d + d * math.log(v2 / v1))


@pytest.mark.parametrize("d, s", [(2, 0.15), (10, 0.2)])
def test_sampler_gap_matches_the_closed_form_of_euler_maruyama_on_a_gaussian(d, s):
    """The exact score of a Gaussian sampled by EM gives a Gaussian whose KL to the ideal law
    q_t0 is closed form; the paired kNN estimate must match it within 4 stderr on a uniform
    grid (large gap) and a geometric grid (small gap), and the geometric grid must win."""
    t0, T, steps, n = 0.02, 4.0, 100, 4000
    m = np.zeros(d)
    m[:2] = [2.0, -1.0]
    process = OU(T=T)
    score = AnalyticScore(GaussianMixture.isotropic(torch.tensor(m[None]), s), process)
    ideal = score.output_law(t0)
    a0 = math.exp(-t0 / 2)
    mu_b, v_b = a0 * m, a0 * a0 * s * s + 1 - math.exp(-t0)
    got, exact = {}, {}
    for k, schedule in enumerate(("uniform", "geometric")):
        times = time_grid(T, t0, steps, schedule=schedule)
        mu, v = _em_gaussian_law(m, s * s, times)
        exact[schedule] = _kl_isotropic(mu, v, mu_b, v_b, d)
        g = torch.Generator().manual_seed(10 + k)
        x = euler_maruyama(score, torch.randn(n, d, dtype=torch.float64, generator=g), times,
                           process, generator=g)
        # The recursion is the sampler's law: its moments match the samples'.
        assert np.abs(x.mean(0).numpy() - mu).max() < 4 * math.sqrt(v / n)
        got[schedule] = e = est.knn_kl_known_b_paired(x, ideal, generator=g)
        assert e.estimator == "knn_paired" and 0 < e.stderr < 0.03, e
        assert abs(e.value - exact[schedule]) < 4 * e.stderr, (schedule, e, exact[schedule])
    assert exact["geometric"] < exact["uniform"] / 20
    diff = got["uniform"].value - got["geometric"].value
    assert diff > 4 * math.hypot(got["uniform"].stderr, got["geometric"].stderr)


def test_paired_estimator_is_unbiased_where_plain_knn_is_not():
    """On exact draws of a finite-KDE law in d = 10 (paper-gmm-cpu's geometry) the true KL is
    0: the paired estimate is within 4 stderr of it, while the plain Kozachenko–Leonenko form
    is off by its smoothing bias, many stderrs."""
    from collapselab.scores.kde import KDEScore
    from collapselab.targets import paper_gmm_means

    process = OU(T=4.0)
    p = GaussianMixture.isotropic(paper_gmm_means(10), 0.6)
    centres = p.sample(1000, torch.Generator().manual_seed(1))
    law = KDEScore(centres, 0.6, process).output_law(0.02)
    g = torch.Generator().manual_seed(2)
    x = law.sample(2000, g)
    paired = est.knn_kl_known_b_paired(x, law, generator=g)
    plain = est.knn_kl_known_b(x, law.log_prob)
    assert abs(paired.value) < 4 * paired.stderr, paired
    assert abs(plain.value) > 4 * plain.stderr, plain


def test_chain_rows_carry_the_sampler_gap_on_the_generation_of_the_samples(tmp_path):
    small = ["loop.generations=2", "loop.n_train=300", "sampler.steps=30",
             "estimators.n_mc=1000", "estimators.n_eval=300", "sweep.alphas=[0.5]",
             "sweep.seeds=[0]", "pathwise.score_energy=false", "pathwise.learned=false"]
    cfg = load_config("quickstart", small)
    df = run_experiment(cfg, prepare_run_dir(cfg, tmp_path / "a"))
    gap = df[df.metric == "sampler_gap_kl"]
    # Generation i's samples are p̂_{i+1}: the gap sits beside D_{i+1}, on row i+1.
    assert sorted(gap.generation) == [1, 2]
    assert (gap.estimator == "knn_paired").all() and np.isfinite(gap.stderr).all()
    assert gap.note.str.contains("30 steps, geometric grid").all()
    again = run_experiment(cfg, prepare_run_dir(cfg, tmp_path / "b"))
    np.testing.assert_array_equal(again[again.metric == "sampler_gap_kl"].value, gap.value)


def test_too_few_samples_give_nan_with_a_reason_not_a_crash(tmp_path):
    # The config refuses n_eval < 70 up front; the loop's estimate still degrades to NaN with
    # a reason (not a crash) when handed fewer samples than the kNN batches need.
    from collapselab.engine.loop import ChainContext, sampler_gap
    from collapselab.engine.store import RunStore

    cfg = load_config("quickstart", ["sweep.alphas=[0.5]", "sweep.seeds=[0]"])
    ctx = ChainContext(cfg, 0.5, 0, RunStore(tmp_path / "a"))
    x = ctx.target.sample(40, generator=torch.Generator().manual_seed(0)).numpy()
    gap = sampler_gap(ctx, 0, x, ctx.target)
    assert math.isnan(gap.value) and "too few samples" in gap.note
