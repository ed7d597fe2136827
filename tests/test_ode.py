"""Probability-flow ODE, flow matching and ODE likelihoods against closed forms.

For a Gaussian target N(μ, s²I) under a VP process the probability-flow ODE with the exact
score is affine: the standardised coordinate (x − a_t μ)/σ_t is constant along the flow
(a_t = scale(t), σ_t² = a_t² s² + var(t)). Started from N(0, I) at T it therefore outputs
N(a_0 μ − (σ_0/σ_T) a_T μ, (σ_0/σ_T)² I) at t0 exactly, whatever the trajectory. The linear
flow-matching path has a closed-form velocity for Gaussian-mixture data
(:func:`collapselab.scores.flow.mixture_velocity`).
"""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from collapselab.config import load_config
from collapselab.engine.executors import prepare_run_dir, run_experiment
from collapselab.measure import estimators as est
from collapselab.measure.likelihood import (
    ODEFlow,
    divergence,
    flow_divergences,
    pf_ode_flow,
    velocity_flow,
)
from collapselab.processes import OU, VPProcess, time_grid
from collapselab.samplers import SAMPLERS, probability_flow
from collapselab.scores.analytic import AnalyticScore
from collapselab.scores.flow import (
    FlowField,
    flow_matching_loss,
    linear_path_law,
    mixture_velocity,
    ot_pairing,
    train_flow_matching,
)
from collapselab.scores.mlp import MLPNet
from collapselab.scores.training import TrainConfig
from collapselab.targets import GaussianMixture

MU = [1.5, -0.5, 0.3]
S = 0.7


def gaussian_ode_output(process, T, t0):
    """(mean, std) of the exact PF-ODE output at t0 from N(0, I) at T for N(MU, S² I)."""
    mu = torch.tensor(MU, dtype=torch.float64)
    a0, aT = process.scale(t0), process.scale(T)
    s0 = math.sqrt(a0**2 * S**2 + process.var(t0))
    sT = math.sqrt(aT**2 * S**2 + process.var(T))
    return a0 * mu - (s0 / sT) * aT * mu, s0 / sT


def normal_log_prob(x, mean, std):
    d = x.shape[1]
    return (-0.5 * ((x - mean) ** 2).sum(1) / std**2 - d * math.log(std)
            - 0.5 * d * math.log(2 * math.pi))


def differentiable_score(law, process):
    """The exact score of law's marginals, kept in the autograd graph (for divergences)."""
    an = AnalyticScore(law, process)
    return lambda x, t: an.marginal(float(t)).score(x)


@pytest.mark.parametrize("process", [OU(T=4.0), VPProcess(0.1, 20.0, 1.0)],
                         ids=["ou", "vp"])
def test_pf_ode_exact_gaussian_score_gives_the_gaussian_law(process, gen):
    law = GaussianMixture.isotropic([MU], S)
    T, t0 = process.T, 0.02 * process.T / 4
    mean, std = gaussian_ode_output(process, T, t0)
    z = torch.randn(400, 3, dtype=torch.float64, generator=gen)
    x = probability_flow(AnalyticScore(law, process), z, time_grid(T, t0, 400), process)
    # Deterministic affine map: every output is mean + std·z up to Heun's O(h²) error.
    assert torch.allclose(x, mean + std * z, atol=1e-4)


def test_ode_log_density_matches_the_gaussian_to_1e3(gen):
    process = OU(T=4.0)
    law = GaussianMixture.isotropic([MU], S)
    mean, std = gaussian_ode_output(process, 4.0, 0.02)
    flow = pf_ode_flow(differentiable_score(law, process), process, time_grid(4.0, 0.02, 400))
    z = torch.randn(200, 3, dtype=torch.float64, generator=gen)
    x, logp, var = flow.sample_with_log_prob(z)
    assert float(var.abs().max()) == 0.0  # d = 3: exact divergence
    assert (logp - normal_log_prob(x, mean, std)).abs().max() < 1e-3
    # Reverse direction at arbitrary points (not the model's own samples).
    y = mean + 1.5 * std * torch.randn(200, 3, dtype=torch.float64, generator=gen)
    lp, _ = flow.log_prob(y)
    assert (lp - normal_log_prob(y, mean, std)).abs().max() < 1e-3


def test_ode_is_deterministic_and_likelihood_path_is_the_sampler(gen):
    torch.manual_seed(0)
    net = MLPNet(3, hidden=32, layers=2).double()
    from collapselab.scores.mlp import NeuralScore

    process = OU(T=4.0)
    score = NeuralScore(net, process)
    times = time_grid(4.0, 0.02, 20)
    z = torch.randn(50, 3, dtype=torch.float64, generator=gen)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    a = SAMPLERS["ode"](score, z.clone(), times, process, generator=g1)
    b = SAMPLERS["ode"](score, z.clone(), times, process, generator=g2)
    assert torch.equal(a, b)
    x, _, _ = pf_ode_flow(score, process, times).sample_with_log_prob(z)
    assert torch.allclose(x, a, atol=1e-12)


def test_hutchinson_is_unbiased_within_its_error(gen):
    """d = 20 > 16: Hutchinson by default. Its mean over many independent estimates agrees with
    the exact trace within 4 stderr, and its reported variance matches the spread."""
    torch.manual_seed(3)
    net = MLPNet(20, hidden=32, layers=2).double()

    def field(x, t):
        return net(x, torch.full((x.shape[0],), float(t), dtype=x.dtype))

    x = torch.randn(8, 20, dtype=torch.float64, generator=gen)
    _, exact, v0 = divergence(field, x, 0.3, exact=True)
    assert float(v0.abs().max()) == 0
    reps = [divergence(field, x, 0.3, n_probes=4, generator=gen) for _ in range(300)]
    est_ = torch.stack([r[1] for r in reps])  # (300, 8)
    var = torch.stack([r[2] for r in reps]).mean(0)
    se = est_.std(0) / math.sqrt(len(reps))
    assert ((est_.mean(0) - exact).abs() < 4 * se).all()
    # Reported variance vs the empirical variance of the estimates: ratio near 1.
    ratio = var / est_.var(0)
    assert ((ratio > 0.7) & (ratio < 1.4)).all(), ratio


def test_mixture_velocity_closed_form():
    """Two formulas: posterior mean (mixture_velocity) and Tweedie through the score."""
    law = GaussianMixture.isotropic([[1.0, -2.0], [0.5, 3.0]], 0.6)
    x = torch.randn(20, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for u in (0.1, 0.5, 0.9):
        via_score = (x + (1 - u) * linear_path_law(law, u).score(x)) / u
        assert torch.allclose(mixture_velocity(law, x, u), via_score, atol=1e-10)
    assert torch.allclose(mixture_velocity(law, x, 1.0), x)
    # The implied VP score of the exact velocity field is the exact VP score.

    class Exact(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

        def forward(self, y, u):
            return torch.cat([mixture_velocity(law, y[i:i + 1], float(u[i]))
                              for i in range(len(y))])

    ff, process = FlowField(Exact(), OU()), OU()
    for t in (0.05, 1.0, 3.0):
        assert torch.allclose(ff(x, t), law.marginal(process, t).score(x), atol=1e-10)


def test_exact_velocity_flow_gives_the_gaussian_law(gen):
    law = GaussianMixture.isotropic([MU], S)
    flow = velocity_flow(type("V", (), {"velocity": staticmethod(
        lambda x, u: mixture_velocity(law, x, float(u)))})(), 200)
    z = torch.randn(100, 3, dtype=torch.float64, generator=gen)
    x, logp, _ = flow.sample_with_log_prob(z)
    mu = torch.tensor(MU, dtype=torch.float64)
    # The linear path maps z to x1 = μ + s·z; Heun converges at second order (1e-5 at 200 steps).
    assert torch.allclose(x, mu + S * z, atol=5e-5)
    assert (logp - normal_log_prob(x, mu, S)).abs().max() < 1e-3


def test_flow_matching_learns_a_gaussians_velocity():
    law = GaussianMixture.isotropic([[1.0, -1.0]], 0.5)
    g = torch.Generator().manual_seed(0)
    data = law.sample(4000, g).float()
    torch.manual_seed(0)
    net = MLPNet(2, hidden=64, layers=3)
    cfg = TrainConfig(steps=1500, batch_size=256, lr=2e-3, ema_decay=0.995, seed=0)
    res = train_flow_matching(net, data, cfg)
    model = FlowField(res.ema_net, OU())
    # Held-out draws: the closed-form velocity is the loss minimiser; the net's excess loss is
    # E‖v̂ − v‖², which must be small next to E‖v‖².
    for u in (0.1, 0.5, 0.9):
        xu = linear_path_law(law, u).sample(4000, g)
        v = mixture_velocity(law, xu, u)
        vh = model.velocity(xu, u)
        rel = float(((vh - v) ** 2).sum(1).mean() / (v**2).sum(1).mean())
        assert rel < 0.02, (u, rel)
    x1 = law.sample(4000, g)
    x0 = torch.randn(4000, 2, dtype=torch.float64, generator=g)
    uu = torch.rand(4000, dtype=torch.float64, generator=g)
    exact_net = type("E", (torch.nn.Module,), {"forward": lambda self, y, u: torch.cat(
        [mixture_velocity(law, y[i:i + 1], float(u[i])) for i in range(len(y))])})()
    l_exact = flow_matching_loss(exact_net, x1, x0, uu)
    l_net = flow_matching_loss(res.ema_net.double(), x1, x0, uu)
    diff = l_net - l_exact
    assert float(diff.mean()) > -4 * float(diff.std()) / math.sqrt(len(diff))


def test_ot_pairing_is_the_optimal_permutation():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g) + 2
    p = ot_pairing(x0, x1)
    assert sorted(p.tolist()) == list(range(64))
    cost = ((x0[p] - x1) ** 2).sum()
    for _ in range(20):  # no random permutation does better
        q = torch.randperm(64, generator=g)
        assert ((x0[q] - x1) ** 2).sum() >= cost - 1e-4
    # OT-coupled training runs and learns a sensible field.
    law = GaussianMixture.isotropic([[1.0, -1.0]], 0.5)
    torch.manual_seed(0)
    res = train_flow_matching(MLPNet(2, hidden=32, layers=2), law.sample(1000, g).float(),
                              TrainConfig(steps=200, batch_size=128, seed=0), coupling="ot")
    assert all(math.isfinite(v) for v in res.loss_history)


def test_flow_likelihood_kl_agrees_with_knn(gen):
    """A trained 2-D MLP sampled by the ODE: KL(p̂ ‖ p) from the change of variables agrees with
    the Kozachenko–Leonenko estimate on the same kind of ODE outputs within 4 joint stderr."""
    from collapselab.scores.mlp import NeuralScore
    from collapselab.scores.training import train_dsm

    law = GaussianMixture.isotropic([[-1.5, 0.0], [1.5, 0.5]], 0.5)
    process = OU(T=4.0)
    torch.manual_seed(0)
    res = train_dsm(MLPNet(2, hidden=64, layers=3), law.sample(3000, gen).float(), process,
                    TrainConfig(steps=600, batch_size=256, lr=2e-3, t_min=0.02, seed=0))
    score, times = NeuralScore(res.ema_net, process), time_grid(4.0, 0.02, 40)
    fl = flow_divergences(pf_ode_flow(score, process, times), {"d": law.log_prob}, 2000, gen,
                          dim=2)["d_kl"]
    z = torch.randn(3000, 2, dtype=torch.float64, generator=gen)
    x = probability_flow(score, z, times, process)
    kn = est.knn_kl_known_b(x.numpy(), law.log_prob)
    assert fl.estimator == "flow_likelihood" and fl.value > 0
    assert abs(fl.value - kn.value) < 4 * math.hypot(fl.stderr, kn.stderr), (fl, kn)


def test_flow_chi2_tail_guard_and_known_value(gen):
    """χ² of an exact Gaussian ODE model against a wider Gaussian (finite, closed form), and
    against a narrower one (infinite: more than twice the variance) → inf or nan, never a
    plausible finite number."""
    process = OU(T=4.0)
    law = GaussianMixture.isotropic([MU], S)
    mean, std = gaussian_ode_output(process, 4.0, 0.02)
    flow = pf_ode_flow(differentiable_score(law, process), process, time_grid(4.0, 0.02, 60))
    wide = GaussianMixture.isotropic([mean.tolist()], 1.2 * std)
    out = flow_divergences(flow, {"w": wide.log_prob}, 4000, gen, dim=3)
    exact = est.gaussian_chi2(mean, std**2, mean, (1.2 * std) ** 2).value
    kl = est.gaussian_kl(mean, std**2, mean, (1.2 * std) ** 2).value
    assert abs(out["w_chi2"].value - exact) < 4 * out["w_chi2"].stderr + 1e-3
    assert abs(out["w_kl"].value - kl) < 4 * out["w_kl"].stderr + 1e-3
    narrow = GaussianMixture.isotropic([mean.tolist()], 0.6 * std)
    bad = flow_divergences(flow, {"n": narrow.log_prob}, 4000, gen, dim=3)["n_chi2"]
    assert not math.isfinite(bad.value) and bad.note


SMALL = [
    "target.kind=ring", "score.kind=mlp", "score.hidden=32", "score.layers=2",
    "score.train_steps=60", "score.batch_size=128", "sampler.kind=ode", "sampler.steps=12",
    "loop.generations=3", "loop.n_train=200", "estimators.n_eval=200", "estimators.n_flow=100",
    "estimators.extra=[]", "pathwise.n_times=5", "pathwise.n_mc=50", "pathwise.n_paths=50",
    "pathwise.steps=10", "sweep.alphas=[0.5]", "sweep.seeds=[0]",
]


@pytest.mark.parametrize("objective", ["dsm", "flow_matching"])
def test_flow_likelihood_rows_at_every_generation(tmp_path, objective):
    cfg = load_config("quickstart", SMALL + [f"score.objective={objective}"])
    df = run_experiment(cfg, prepare_run_dir(cfg, tmp_path / "r"))
    fl = df[df.estimator == "flow_likelihood"]
    for metric, gens in (("accumulated_kl", [1, 2, 3]), ("accumulated_chi2", [1, 2, 3]),
                         ("intra_kl", [0, 1, 2]), ("intra_chi2", [0, 1, 2])):
        assert sorted(fl[fl.metric == metric].generation) == gens, metric
    kl = fl[fl.metric.str.endswith("_kl")]
    assert np.isfinite(kl.value).all() and (kl.stderr > 0).all()
    chi = fl[fl.metric.str.endswith("_chi2")]
    assert (chi.value.isna() | np.isinf(chi.value) | (chi.value > -1)).all()
    assert chi[~np.isfinite(chi.value)].note.str.len().gt(0).all()
    tgt = df[df.metric == "score_energy_target"]
    assert sorted(tgt.generation) == [0, 1, 2]
    # The report's side-by-side table pairs D_{i+1} with generation i's score error.
    from collapselab.report.run import sampler_comparison

    table = sampler_comparison(df, cfg.model_dump(mode="json"))
    assert list(table.arm.unique()) == [f"{objective} + ode"]
    row = table[table.generation == 1].iloc[0]
    d2 = fl[(fl.metric == "accumulated_kl") & (fl.generation == 2)].value.item()
    e1 = tgt[tgt.generation == 1].value.item()
    assert row.ratio_flow == pytest.approx(d2 / e1)


def test_flow_matching_chain_resumes_identically(tmp_path):
    from collapselab.engine.loop import run_chain

    cfg = load_config("quickstart", SMALL + ["score.objective=flow_matching",
                                             "loop.generations=2"])
    full = run_experiment(cfg, prepare_run_dir(cfg, tmp_path / "a"))
    store = prepare_run_dir(cfg, tmp_path / "b")

    class Stop(RuntimeError):
        pass

    def stop(g, s):
        raise Stop

    with pytest.raises(Stop):
        run_chain(cfg, 0.5, 0, store, on_generation=stop)
    pd.testing.assert_frame_equal(full, run_experiment(cfg, store))


def test_config_rejects_flow_matching_without_a_network():
    from collapselab.errors import ConfigError

    with pytest.raises(ConfigError, match="score.objective"):
        load_config("quickstart", ["score.objective=flow_matching"])
    with pytest.raises(ConfigError, match="score.coupling"):
        load_config("quickstart", ["score.kind=mlp", "score.coupling=ot"])


def test_odeflow_rejects_reverse_from_a_singular_end():
    flow = ODEFlow(lambda x, t: -x, [1.0, 0.5, 0.0], euler_last=True)
    with pytest.raises(ValueError, match="t0 = 0"):
        flow.log_prob(torch.zeros(2, 2, dtype=torch.float64))


def test_batched_executor_fits_flow_matching_like_the_local_one(tmp_path):
    """The batched executor's trainer is DSM's: a flow-matching chain falls back to the
    per-chain fit and gives the same results as the local executor."""
    cfg = load_config("quickstart", SMALL + ["score.objective=flow_matching",
                                             "loop.generations=2"])
    local = run_experiment(cfg, prepare_run_dir(cfg, tmp_path / "l"))
    batched = run_experiment(cfg, prepare_run_dir(cfg, tmp_path / "b"), executor="batched",
                             workers=1)
    pd.testing.assert_frame_equal(local, batched)
