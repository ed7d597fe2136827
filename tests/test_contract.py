"""The contract every score model and every sampler keeps (the role scikit-learn's
check_estimator plays): shapes, dtype and device round trip, finiteness, determinism under a
seed, and exactness where a closed form exists.

Score kinds: analytic, population_kde, kde, mlp, unet, perturbed. Closed forms: for a single
Gaussian N(m, s² I) pushed through the forward process (scale a(t), variance v(t)) the score is
−(x − a m)/(a² s² + v); the population KDE of bandwidth h is that of N(m, (s² + h²) I); a KDE
with one centre c is that of N(c, h² I); an aligned error adds magnitude·w·x
(:class:`~collapselab.scores.perturbed.Aligned`, e(x, t) = w·x).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from collapselab.config import ScoreConfig
from collapselab.processes import OU, time_grid
from collapselab.samplers import SAMPLERS
from collapselab.scores.analytic import AnalyticScore
from collapselab.scores.kde import KDEScore
from collapselab.scores.neural import fit_neural
from collapselab.scores.perturbed import PerturbedScore, aligned
from collapselab.targets import GaussianMixture, ring

F64 = torch.float64
PROCESS = OU(T=2.0)
M, S, H = torch.tensor([1.0, -0.5], dtype=F64), 0.7, 0.3
GAUSS = GaussianMixture(torch.ones(1, dtype=F64), M[None], (S * S * torch.eye(2, dtype=F64))[None])
KINDS = ["analytic", "population_kde", "kde", "mlp", "unet", "perturbed"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def gaussian_score(x: Tensor, t, mean: Tensor, var: float) -> Tensor:
    a = PROCESS.scale(torch.as_tensor(t, dtype=F64))
    v = PROCESS.var(torch.as_tensor(t, dtype=F64))
    a, v = (a.reshape(-1, 1), v.reshape(-1, 1)) if a.dim() else (a, v)
    return -(x.to(F64) - a * mean) / (a * a * var + v)


def build(kind: str, seed: int = 0):
    """(score, event shape, exact score function or None) of a small model of each kind."""
    if kind == "analytic":
        return AnalyticScore(GAUSS, PROCESS), (2,), lambda x, t: gaussian_score(x, t, M, S * S)
    if kind == "population_kde":
        return (AnalyticScore(GAUSS, PROCESS, bandwidth=H), (2,),
                lambda x, t: gaussian_score(x, t, M, S * S + H * H))
    if kind == "kde":
        return (KDEScore(M[None].clone(), H, PROCESS, dtype=F64), (2,),
                lambda x, t: gaussian_score(x, t, M, H * H))
    if kind == "perturbed":
        base = AnalyticScore(GAUSS, PROCESS)
        return (PerturbedScore(base, aligned(0.5), magnitude=0.2), (2,),
                lambda x, t: gaussian_score(x, t, M, S * S) + 0.2 * 0.5 * x)
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        cfg = ScoreConfig(kind="mlp", hidden=16, layers=2, train_steps=4, batch_size=32,
                          train_backend="torch")
        data = ring(4, 2.0, 0.3).sample(64, g)
    else:
        cfg = ScoreConfig(kind="unet", base_channels=8, channel_mults=[1], num_res_blocks=1,
                          train_steps=2, batch_size=8, dropout=0.1)
        data = torch.rand(16, 1, 8, 8, generator=g) * 2 - 1
    score, _ = fit_neural(cfg, PROCESS, data.float(), generation=0, seed=seed, t_min=0.02)
    return score, tuple(data.shape[1:]), None


@pytest.fixture(scope="module", params=KINDS)
def model(request):
    return request.param, *build(request.param)


def _x(event, n=7, dtype=torch.float32, seed=3):
    return torch.randn((n, *event), generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("device", DEVICES)
def test_shape_dtype_device_round_trip_and_finite(model, dtype, device):
    kind, score, event, _ = model
    x = _x(event, dtype=dtype).to(device)
    for t in (0.05, 0.8, torch.full((7,), 0.3, dtype=dtype, device=device),
              torch.linspace(0.05, 1.9, 7, dtype=dtype, device=device)):
        out = score(x, t)
        assert out.shape == x.shape and out.dtype == dtype and out.device == x.device, kind
        assert torch.isfinite(out).all(), kind


def test_a_scalar_time_equals_a_constant_time_vector(model):
    kind, score, event, _ = model
    x = _x(event, dtype=F64)
    torch.testing.assert_close(score(x, 0.4), score(x, torch.full((7,), 0.4, dtype=F64)),
                               rtol=1e-6, atol=1e-6)


def test_deterministic_under_a_seed(model):
    kind, score, event, _ = model
    again = build(kind, seed=0)[0]
    x = _x(event)
    assert torch.equal(score(x, 0.3), again(x, 0.3)), kind
    if kind in ("mlp", "unet"):  # another seed: another network
        assert not torch.equal(score(x, 0.3), build(kind, seed=1)[0](x, 0.3))


def test_exact_where_a_closed_form_exists(model):
    kind, score, event, exact = model
    if exact is None:
        pytest.skip(f"{kind}: a trained network has no closed form")
    x = _x(event, n=50, dtype=F64)
    for t in (0.02, 0.5, 1.9, torch.linspace(0.02, 1.9, 50, dtype=F64)):
        torch.testing.assert_close(score(x, t), exact(x, t), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_samplers_keep_shape_dtype_finiteness_and_seed(model, sampler):
    kind, score, event, _ = model
    run = SAMPLERS[sampler]
    times = time_grid(PROCESS.T, 0.02, 10)
    outs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(7)
        x0 = torch.randn((5, *event), generator=g)
        outs.append(run(score, x0, times, PROCESS, generator=g))
    assert outs[0].shape == (5, *event) and outs[0].dtype == torch.float32, (kind, sampler)
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1]), (kind, sampler)
    g = torch.Generator().manual_seed(8)
    other = run(score, torch.randn((5, *event), generator=g), times, PROCESS, generator=g)
    assert not torch.equal(other, outs[0])


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_a_sampler_step_is_the_closed_form_update(sampler):
    """One step of each sampler on the exact score of a Gaussian equals its formula, with the
    noise the step draws (reproduced from the same generator state)."""
    score = AnalyticScore(GAUSS, PROCESS)
    x = _x((2,), n=6, dtype=F64)
    t, t_next = 1.0, 0.9
    g = torch.Generator().manual_seed(4)
    got = SAMPLERS[sampler](score, x, torch.tensor([t, t_next], dtype=F64), PROCESS, generator=g)
    z = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(4))
    s = gaussian_score(x, t, M, S * S)
    if sampler == "euler_maruyama":
        b, dt = float(PROCESS.beta(t)), t - t_next
        want = x + (0.5 * b * x + b * s) * dt + (b * dt) ** 0.5 * z
    elif sampler == "ode":  # Heun on dx/dt = −½β(x + s): Euler predictor, trapezoid corrector
        h = t_next - t
        d = -0.5 * float(PROCESS.beta(t)) * (x + s)
        x_pred = x + h * d
        d_next = -0.5 * float(PROCESS.beta(t_next)) * (
            x_pred + gaussian_score(x_pred, t_next, M, S * S))
        want = x + 0.5 * h * (d + d_next)
    else:
        abar, abar_n = float(PROCESS.scale(t)) ** 2, float(PROCESS.scale(t_next)) ** 2
        alpha = abar / abar_n
        beta = 1 - alpha
        want = (x + beta * s) / alpha ** 0.5 + (beta * (1 - abar_n) / (1 - abar)) ** 0.5 * z
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
