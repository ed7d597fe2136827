"""Reverse-time samplers: small stateless functions over (score, x, times, process).

In the spirit of k-diffusion: ``times`` is a decreasing grid T = t_0 > … > t_k = t0, the score
follows the protocol of :mod:`collapselab.scores.base`, randomness comes from an explicit
``torch.Generator``. ``callback(i, t, t_next, x, x_next, dB)`` sees every step (the pathwise
estimators use it to accumulate the Girsanov martingale along the same Brownian increments).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _randn_like(x: Tensor, generator) -> Tensor:
    # Draw on the generator's device, then move: a CPU generator stays valid for CUDA tensors.
    dev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, dtype=x.dtype, device=dev, generator=generator).to(x.device)


@torch.no_grad()
def euler_maruyama(score, x: Tensor, times: Tensor, process, generator=None, callback=None):
    """Euler–Maruyama on the reverse SDE dY = [½β Y + β s(Y,t)] dt + √β dB̄ (docs/paper.md §2).

    Runs from times[0] (= T, x drawn from N(0, I) by the caller) to times[-1] (= t0) and
    returns Y_{t0}. The paper's GMM experiment: 500 steps, T = 4, t0 = 0.02.
    """
    times = [float(t) for t in times]
    for i in range(len(times) - 1):
        t, t_next = times[i], times[i + 1]
        dt = t - t_next
        b = float(process.beta(t))
        dB = _randn_like(x, generator) * math.sqrt(dt)
        x_next = x + process.reverse_drift(x, t, score(x, t)) * dt + math.sqrt(b) * dB
        if callback is not None:
            callback(i, t, t_next, x, x_next, dB)
        x = x_next
    return x


@torch.no_grad()
def ddpm_ancestral(score, x: Tensor, times: Tensor, process, generator=None, callback=None,
                   clip: tuple[float, float] | None = None):
    """DDPM ancestral sampling (Ho et al. 2020) on the grid ``times`` of a VP process.

    With ᾱ_k = scale(t_k)², α_k = ᾱ_k / ᾱ_{k+1 toward 0} and β_k = 1 − α_k, each step is
    x ← (x + β_k s(x, t_k)) / √α_k + σ_k z with the posterior variance
    σ_k² = β_k (1 − ᾱ_next)/(1 − ᾱ_k); the noise-prediction form ε = −√(1−ᾱ) s gives the
    familiar x ← (x − β_k ε/√(1−ᾱ_k))/√α_k. No noise is added on a final step that ends at t=0.
    The paper's image experiments: 1000 steps.

    ``clip=(lo, hi)``: Ho et al.'s ``clip_denoised``. The step's prediction of x0,
    x̂0 = (x + (1 − ᾱ_k) s)/√ᾱ_k, is clamped to [lo, hi] and the step uses the posterior mean
    q(x_next | x, x̂0): (√ᾱ_next β_k x̂0 + √α_k (1 − ᾱ_next) x)/(1 − ᾱ_k), which equals the
    unclipped mean above when nothing is clamped. It keeps a weak image model from drifting off
    the pixel range; the output law is then no longer the reverse SDE's.
    """
    times = [float(t) for t in times]
    for i in range(len(times) - 1):
        t, t_next = times[i], times[i + 1]
        abar, abar_next = float(process.scale(t)) ** 2, float(process.scale(t_next)) ** 2
        alpha = abar / abar_next
        beta = 1.0 - alpha
        if clip is None:
            mean = (x + beta * score(x, t)) / math.sqrt(alpha)
        else:
            x0 = ((x + (1.0 - abar) * score(x, t)) / math.sqrt(abar)).clamp_(*clip)
            mean = (math.sqrt(abar_next) * beta * x0
                    + math.sqrt(alpha) * (1.0 - abar_next) * x) / (1.0 - abar)
        sigma2 = beta * (1.0 - abar_next) / (1.0 - abar) if t_next > 0 else 0.0
        z = _randn_like(x, generator)
        x_next = mean + math.sqrt(sigma2) * z
        if callback is not None:
            callback(i, t, t_next, x, x_next, z)
        x = x_next
    return x


def heun(field, x: Tensor, times, callback=None, euler_last: bool = False) -> Tensor:
    """Heun's method for dx/dt = field(x, t) along the grid ``times`` (either direction).

    Karras et al. 2022, Algorithm 1: an Euler predictor x̃ = x + h f(x, t) and a trapezoid
    corrector x' = x + h [f(x, t) + f(x̃, t')]/2 with h = t' − t (signed), second order in h.
    ``euler_last``: the last step is the Euler predictor alone, for a field that cannot be
    evaluated at the final time (the probability-flow ODE ending at t = 0, where the score is
    singular). ``callback(i, t, t_next, x, x_next)`` sees every step. Deterministic: no noise.
    """
    times = [float(t) for t in times]
    k = len(times) - 1
    for i in range(k):
        t, t_next = times[i], times[i + 1]
        h = t_next - t
        d = field(x, t)
        x_next = x + h * d
        if not (euler_last and i == k - 1):
            x_next = x + (0.5 * h) * (d + field(x_next, t_next))
        if callback is not None:
            callback(i, t, t_next, x, x_next)
        x = x_next
    return x


def probability_flow_field(score, process):
    """The probability-flow ODE of the VP SDE (Song et al. 2021): dx/dt = −½β(t)[x + s(x, t)].

    Its solution has the forward marginals q_t at every t when s is the exact score, so the map
    from N(0, I) at T to t0 transports (nearly) q_T to q_t0 deterministically (docs/paper.md §2)."""

    def field(x: Tensor, t) -> Tensor:
        return (-0.5 * float(process.beta(float(t)))) * (x + score(x, t))

    return field


@torch.no_grad()
def probability_flow(score, x: Tensor, times: Tensor, process, generator=None, callback=None):
    """Probability-flow ODE sampler: :func:`heun` on dx/dt = −½β(t)[x + s(x, t)] from times[0]
    (= T, x drawn from N(0, I) by the caller) down to times[-1] (= t0).

    Deterministic given the start: ``generator`` is accepted for the samplers' common signature
    and not used. A last step that ends at t = 0 is an Euler step (the score is singular there),
    as in Karras et al.'s Algorithm 1. ``callback(i, t, t_next, x, x_next, None)``.
    """
    times = [float(t) for t in times]
    cb = None if callback is None else (lambda i, t, tn, a, b: callback(i, t, tn, a, b, None))
    return heun(probability_flow_field(score, process), x, times, callback=cb,
                euler_last=times[-1] <= 0.0)


SAMPLERS = {"euler_maruyama": euler_maruyama, "ddpm": ddpm_ancestral, "ode": probability_flow}
