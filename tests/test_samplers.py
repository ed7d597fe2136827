"""Samplers against closed forms: with a Gaussian target the score is linear, so every step is
an affine map plus Gaussian noise and the sampler's output law is known exactly."""

import math

import torch

from collapselab.processes import OU, VPProcess, time_grid
from collapselab.samplers import ddpm_ancestral, euler_maruyama
from collapselab.scores.analytic import AnalyticScore
from collapselab.targets import GaussianMixture, ring

M, S = 1.5, 0.7  # target N(M, S²) in 1-D


def gauss_score(process):
    return AnalyticScore(GaussianMixture.isotropic([[M]], S), process)


def em_moments(process, times, mean, var):
    """Exact mean/variance after Euler–Maruyama steps with the exact linear score."""
    for t, tn in zip(times[:-1].tolist(), times[1:].tolist(), strict=True):
        dt, b = t - tn, float(process.beta(t))
        a, V = process.scale(t), process.scale(t) ** 2 * S**2 + process.var(t)
        A = 1 + 0.5 * b * dt - b * dt / V
        mean = A * mean + b * dt * a * M / V
        var = A * A * var + b * dt
    return mean, var


def ddpm_moments(process, times, mean, var):
    for t, tn in zip(times[:-1].tolist(), times[1:].tolist(), strict=True):
        abar, abar_n = process.scale(t) ** 2, process.scale(tn) ** 2
        alpha, beta = abar / abar_n, 1 - abar / abar_n
        a, V = process.scale(t), process.scale(t) ** 2 * S**2 + process.var(t)
        A = (1 - beta / V) / math.sqrt(alpha)
        mean = A * mean + beta * a * M / V / math.sqrt(alpha)
        sig2 = beta * (1 - abar_n) / (1 - abar) if tn > 0 else 0.0
        var = A * A * var + sig2
    return mean, var


def check_moments(x, mean, var):
    n = len(x)
    m_hat, v_hat = x.mean().item(), x.var().item()
    assert abs(m_hat - mean) < 4 * math.sqrt(var / n)
    # SE of the sample variance of a Gaussian: var·sqrt(2/(n−1)).
    assert abs(v_hat - var) < 4 * var * math.sqrt(2 / (n - 1))


def test_euler_maruyama_matches_its_exact_law_and_the_target(gen):
    proc = OU(T=4.0)
    times = time_grid(4.0, 0.02, 500)
    x = euler_maruyama(
        gauss_score(proc),
        torch.randn(40_000, 1, dtype=torch.float64, generator=gen),
        times,
        proc,
        generator=gen,
    )
    mean, var = em_moments(proc, times, 0.0, 1.0)
    check_moments(x, mean, var)
    # The exact EM law is close to the ideal output q_t0 = N(a M, a² S² + 1 − a²).
    a2 = math.exp(-0.02)
    assert abs(mean - math.sqrt(a2) * M) < 0.02 and abs(var / (a2 * S**2 + 1 - a2) - 1) < 0.02


def test_ddpm_ancestral_matches_its_exact_law_and_the_target(gen):
    proc = VPProcess(beta_min=0.1, beta_max=20.0, T=1.0)
    times = time_grid(1.0, 0.0, 1000)
    x = ddpm_ancestral(
        gauss_score(proc),
        torch.randn(40_000, 1, dtype=torch.float64, generator=gen),
        times,
        proc,
        generator=gen,
    )
    mean, var = ddpm_moments(proc, times, 0.0, 1.0)
    check_moments(x, mean, var)
    assert abs(mean - M) < 0.02 and abs(var / S**2 - 1) < 0.03


def test_em_reproduces_mixture_moments(gen):
    """On the 2-D ring, sampling started from the exact q_T reproduces q_t0's moments."""
    p = ring()
    proc = OU(T=4.0)
    score = AnalyticScore(p, proc)
    x0 = p.marginal(proc, 4.0).sample(20_000, gen)
    x = euler_maruyama(score, x0, time_grid(4.0, 0.02, 500), proc, generator=gen)
    law = score.output_law(0.02)
    se = x.std(0) / math.sqrt(len(x))
    assert ((x.mean(0) - law.mean()).abs() < 4 * se).all()
    second = (x**2).sum(1)
    se2 = second.std() / math.sqrt(len(x))
    exact2 = torch.trace(law.covariance()) + (law.mean() ** 2).sum()
    # 4 SE plus the O(dt) discretisation bias (about 0.3% here, measured on 10 seeds).
    assert abs(second.mean() - exact2) < 4 * se2 + 0.01 * exact2


def test_callback_sees_every_step(gen):
    proc = OU()
    seen = []
    euler_maruyama(
        gauss_score(proc),
        torch.zeros(3, 1, dtype=torch.float64),
        time_grid(4, 0.02, 7),
        proc,
        generator=gen,
        callback=lambda i, *rest: seen.append(i),
    )
    assert seen == list(range(7))


def test_ddpm_clip_is_the_same_step_when_nothing_is_clamped():
    """The x̂0 form of the posterior mean equals the ε form: with a range nothing reaches, the
    clipped sampler gives the unclipped samples (same noise) to float64 rounding."""
    proc = VPProcess(beta_min=0.1, beta_max=20.0, T=1.0)
    times = time_grid(1.0, 0.0, 100)
    x = torch.randn(2000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    plain = ddpm_ancestral(gauss_score(proc), x, times, proc,
                           generator=torch.Generator().manual_seed(2))
    wide = ddpm_ancestral(gauss_score(proc), x, times, proc,
                          generator=torch.Generator().manual_seed(2), clip=(-1e9, 1e9))
    torch.testing.assert_close(wide, plain, rtol=0, atol=1e-9)


def test_ddpm_clip_keeps_samples_in_range():
    """The target N(1.5, 0.7²) lies mostly above 1: clamping x̂0 to [-1, 1] must end every
    sample inside [-1, 1] (the last step to t = 0 returns x̂0 itself), while unclipped samples
    follow the target past 1."""
    proc = VPProcess(beta_min=0.1, beta_max=20.0, T=1.0)
    times = time_grid(1.0, 0.0, 200)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5000, 1, dtype=torch.float64, generator=gen)
    out = ddpm_ancestral(gauss_score(proc), x, times, proc, generator=gen, clip=(-1.0, 1.0))
    assert out.min() >= -1.0 and out.max() <= 1.0
    free = ddpm_ancestral(gauss_score(proc), x, times, proc, generator=gen)
    assert (free > 1.0).double().mean() > 0.5
