"""Exact likelihoods of ODE models: the instantaneous change of variables, and D_i, I_i from it.

A model that maps N(0, I) to its samples by an ODE dx/dt = f(x, t) (the probability-flow ODE of
a diffusion, :func:`collapselab.samplers.probability_flow`, or a flow-matching velocity field,
:mod:`collapselab.scores.flow`) has an explicit density (Chen et al. 2018, FFJORD; Song et al.
2021, Sec. 4.3): along a trajectory,

    d/dt log p_t(x_t) = −div f(x_t, t),   log p̂(x) = log N(x_noise; 0, I) + ∫_data^noise div f dt

with the integral taken along the trajectory run from the data end back to the noise end
(:meth:`ODEFlow.log_prob`), or accumulated while sampling from the noise end
(:meth:`ODEFlow.sample_with_log_prob`). The divergence is exact (d autograd passes, done as one
batched backward) for d ≤ 16 and Hutchinson's estimator (Rademacher probes, Hutchinson 1989 /
FFJORD) above, whose sample variance is carried per point.

Whose law. The samples are the model's actual ODE outputs (Heun's method on the sampler's grid)
and the log density is that of the continuous ODE map evaluated on them: exact for the model up
to the integrator's error (the discrete Heun map is not exactly volume-tracked; it converges at
second order in the step). This is what makes χ² and KL of neural ODE chains estimable by
importance sampling (:func:`flow_divergences`, estimator ``flow_likelihood``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..samplers import probability_flow_field
from .estimate import Estimate
from .estimators import pareto_khat

EXACT_MAX_DIM = 16
_LOG2PI = math.log(2 * math.pi)


def divergence(field, x: Tensor, t: float, *, exact: bool | None = None, n_probes: int = 2,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(f(x, t), div f(x, t), variance of the divergence estimate), per sample.

    Exact (``exact=None`` and d ≤ 16, or ``exact=True``): tr ∂f/∂x from d vector-Jacobian
    products, batched as one forward on d stacked copies of x and one backward with one-hot
    cotangents; variance 0. Hutchinson: tr J = E[vᵀ J v] for Rademacher v, averaged over
    ``n_probes`` probes (one batched backward); the variance is the probes' sample variance /
    n_probes (an unbiased estimate of the estimator's variance; needs n_probes ≥ 2).
    """
    n = x.shape[0]
    d = x[0].numel()
    exact = d <= EXACT_MAX_DIM if exact is None else exact
    k = d if exact else n_probes
    if not exact and n_probes < 2:
        raise ValueError("Hutchinson's estimator needs n_probes >= 2 to estimate its variance")
    with torch.enable_grad():
        xr = x.detach().unsqueeze(0).expand(k, *x.shape).reshape(k * n, *x.shape[1:])
        xr = xr.clone().requires_grad_(True)
        out = field(xr, t)
        if exact:
            v = torch.zeros(k, n, d, dtype=out.dtype, device=out.device)
            v[torch.arange(d), :, torch.arange(d)] = 1.0
        else:
            dev = generator.device if generator is not None else x.device
            v = torch.randint(0, 2, (k, n, d), generator=generator, device=dev).to(out)
            v = 2.0 * v - 1.0
        (g,) = torch.autograd.grad(out, xr, v.reshape(out.shape))
    g = g.detach().reshape(k, n, d)
    f = out.detach()[:n]
    if exact:
        div = torch.diagonal(g, dim1=0, dim2=2).sum(-1)  # Σ_k ∂f_k/∂x_k
        return f, div, torch.zeros_like(div)
    est = (g * v).sum(-1)  # (k, n): vᵀJ per probe
    return f, est.mean(0), est.var(0) / k


def std_normal_log_prob(x: Tensor) -> Tensor:
    """log N(x; 0, I) per sample."""
    flat = x.reshape(x.shape[0], -1)
    return -0.5 * (flat.square().sum(1) + flat.shape[1] * _LOG2PI)


def integrate_with_divergence(field, x: Tensor, times, *, exact: bool | None = None,
                              n_probes: int = 2, generator=None, euler_last: bool = False):
    """Heun's method (:func:`collapselab.samplers.heun`, same steps) on x together with
    J = ∫ div f dt along the trajectory (signed dt, the trapezoid rule on the same two points
    per step; Euler on an Euler last step). Returns (x_end, J, Var J), Var J the Hutchinson
    variance (0 when exact)."""
    times = [float(t) for t in times]
    K = len(times) - 1
    J = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    V = torch.zeros_like(J)
    kw = dict(exact=exact, n_probes=n_probes, generator=generator)
    for i in range(K):
        t, t_next = times[i], times[i + 1]
        h = t_next - t
        d, div, var = divergence(field, x, t, **kw)
        x_next = x + h * d
        if euler_last and i == K - 1:
            J += h * div.double()
            V += h * h * var.double()
        else:
            d2, div2, var2 = divergence(field, x_next, t_next, **kw)
            x_next = x + (0.5 * h) * (d + d2)
            J += (0.5 * h) * (div + div2).double()
            V += (0.25 * h * h) * (var + var2).double()
        x = x_next
    return x, J, V


@dataclass
class ODEFlow:
    """A generative ODE: z ~ N(0, I) at ``times[0]`` (the noise end), dx/dt = field(x, t),
    integrated by Heun along ``times`` to the data end ``times[-1]``.

    ``euler_last``: the sampler's last step is Euler (a field singular at the data end).
    """

    field: Callable[[Tensor, float], Tensor]
    times: list[float]
    euler_last: bool = False

    @property
    def steps(self) -> int:
        return len(self.times) - 1

    def sample_with_log_prob(self, z: Tensor, *, exact=None, n_probes: int = 2,
                             generator=None) -> tuple[Tensor, Tensor, Tensor]:
        """The ODE outputs x of the starts z and log p̂(x) = log N(z) − ∫ div f dt, accumulated
        along the sampling trajectory; + the per-sample Hutchinson variance of log p̂."""
        x, J, V = integrate_with_divergence(self.field, z, self.times, exact=exact,
                                            n_probes=n_probes, generator=generator,
                                            euler_last=self.euler_last)
        return x, std_normal_log_prob(z.double()) - J, V

    def log_prob(self, x: Tensor, *, exact=None, n_probes: int = 2,
                 generator=None) -> tuple[Tensor, Tensor]:
        """log p̂(x) at any points: run the ODE from the data end back to the noise end (the
        reversed grid, Heun throughout), log p̂(x) = log N(x_noise) + ∫_{data}^{noise} div f dt.
        Returns (log p̂, per-sample Hutchinson variance)."""
        if self.euler_last:
            raise ValueError("the field is singular at the data end (t0 = 0): the reverse "
                             "ODE cannot start there; use t0 > 0")
        z, J, V = integrate_with_divergence(self.field, x, self.times[::-1], exact=exact,
                                            n_probes=n_probes, generator=generator)
        return std_normal_log_prob(z.double()) + J, V


def pf_ode_flow(score, process, times) -> ODEFlow:
    """The probability-flow ODE of ``score`` as an :class:`ODEFlow` on the sampler's decreasing
    grid ``times`` (T → t0): exactly the map of :func:`collapselab.samplers.probability_flow`."""
    times = [float(t) for t in times]
    return ODEFlow(probability_flow_field(score, process), times, euler_last=times[-1] <= 0.0)


def velocity_flow(model, steps: int) -> ODEFlow:
    """A flow-matching model (``model.velocity(x, t)``, flow time 0 = noise → 1 = data) as an
    :class:`ODEFlow` on the uniform grid of ``steps`` Heun steps over [0, 1]."""
    return ODEFlow(model.velocity, torch.linspace(0.0, 1.0, steps + 1).tolist())


def _chi2_from_log_weights(logw: Tensor, var: Tensor) -> Estimate:
    """χ² = E_a[w] − 1 from log weights, with the Pareto k̂ tail guard of
    :func:`collapselab.measure.estimators.pareto_khat` (k̂ ≥ 0.5: variance of w infinite → nan; a
    decisively infinite mean, k̂ − 2 se ≥ 1 → inf). Hutchinson noise ε in log w biases e^{log w}
    by E[e^ε] ≈ e^{Var ε/2}: each weight is divided by e^{Var/2} (log-normal correction)."""
    logw = logw - 0.5 * var
    n = logw.numel()
    top = float(logw.max())
    ws = torch.exp(logw - top)
    log_mean = math.log(float(ws.mean())) + top
    raw = math.expm1(log_mean) if log_mean < 700 else math.inf
    se = float(ws.std()) * math.exp(min(top, 700)) / math.sqrt(n)
    k, k_se = pareto_khat(ws.cpu().numpy())
    if not math.isfinite(k) or k < 0.5:
        return Estimate(raw, se, "flow_likelihood", f"Pareto k̂={k:.2f} < 0.5")
    detail = f"Pareto k̂={k:.2f}±{k_se:.2f} of the weights; raw estimate {raw:.6g} ± {se:.3g}"
    if k - 2 * k_se >= 1.0:
        return Estimate(math.inf, math.nan, "flow_likelihood",
                        f"χ² estimated infinite: the weights have an infinite mean. {detail}")
    return Estimate(math.nan, math.nan, "flow_likelihood",
                    f"unreliable: heavy tail of the importance weights (k̂ ≥ 0.5). {detail}")


def flow_divergences(flow: ODEFlow, log_bs: dict[str, Callable[[Tensor], Tensor]], n: int,
                     generator: torch.Generator | None = None, *, dim: int,
                     dtype=torch.float64, exact=None, n_probes: int = 2) -> dict[str, Estimate]:
    """χ²(p̂ ‖ b) and KL(p̂ ‖ b) for the ODE model's law p̂ against each law b of ``log_bs``
    (name → log density), by importance sampling on n of the model's own ODE outputs with their
    change-of-variables log densities (D_i, I_i and their KL twins, docs/paper.md §3; estimator
    ``flow_likelihood``). Returns {"<name>_chi2": ..., "<name>_kl": ...}.

    KL = mean(log p̂ − log b), stderr = std/√n, which includes the Hutchinson noise of log p̂
    (independent per point, unbiased). χ² = mean(p̂/b) − 1 with the Pareto k̂ guard (see
    :func:`_chi2_from_log_weights`). Both are of the model's ODE map up to its integrator error.
    """
    z = torch.randn(n, dim, generator=generator, dtype=torch.float64).to(dtype)
    x, log_a, var = flow.sample_with_log_prob(z, exact=exact, n_probes=n_probes,
                                              generator=generator)
    exact_div = var.abs().max() == 0
    how = ("exact divergence" if exact_div else
           f"Hutchinson divergence ({n_probes} Rademacher probes; mean Var log p̂ "
           f"{float(var.mean()):.3g}, in the stderr)")
    base = (f"law of the ODE sampler ({flow.steps} Heun steps from N(0, I)); log density by "
            f"the change of variables, {how}, exact up to the integrator's error; n={n}")
    out = {}
    for name, log_b in log_bs.items():
        logw = log_a - log_b(x.double()).double()
        if not torch.isfinite(logw).all():
            bad = "KL and χ² infinite: b has zero density at samples of the model"
            out[f"{name}_kl"] = Estimate(math.inf, 0.0, "flow_likelihood", bad)
            out[f"{name}_chi2"] = Estimate(math.inf, 0.0, "flow_likelihood", bad)
            continue
        kl = Estimate(float(logw.mean()), float(logw.std()) / math.sqrt(n), "flow_likelihood",
                      base)
        chi = _chi2_from_log_weights(logw, var)
        out[f"{name}_kl"] = kl
        out[f"{name}_chi2"] = Estimate(chi.value, chi.stderr, chi.estimator,
                                       f"{base}; {chi.note}")
    return out


def score_energy_ode(score, law, process, t0: float, T: float, steps: int = 100,
                     n_paths: int = 1000, generator: torch.Generator | None = None,
                     times: Tensor | None = None) -> Estimate:
    """ε̂² along the learned *probability-flow ODE* paths: ∫_{t0}^{T} β(t) E‖ŝ(x_t, t) −
    ∇log q_t(x_t)‖² dt with x_t the ODE trajectories of ``score`` from N(0, I) at T (Heun on
    ``times``, default a geometric grid), left-point sums as the SDE's ε̂² (docs/paper.md §3). The
    Girsanov bound KL ≤ ½ ε̂² is a statement about the SDE: for the ODE this is the same
    energy measured along the deterministic sampler's marginals, not a bound."""
    from ..samplers import heun
    from ..scores.analytic import exact_score

    grid = (torch.exp(torch.linspace(math.log(T), math.log(t0), steps + 1, dtype=torch.float64))
            if times is None else torch.as_tensor(times, dtype=torch.float64))
    exact = exact_score(law, process)
    acc = torch.zeros(n_paths, dtype=torch.float64)
    field = probability_flow_field(score, process)

    def cb(i, t, t_next, x, x_next):
        e = score(x, t).to(torch.float64) - exact(x, t)
        acc.add_(float(process.beta(t)) * (t - t_next) * (e**2).reshape(n_paths, -1).sum(1))

    x = torch.randn(n_paths, law.dim, dtype=torch.float64, generator=generator)
    with torch.no_grad():
        heun(field, x, grid, callback=cb, euler_last=float(grid[-1]) <= 0.0)
    return Estimate(float(acc.mean()), float(acc.std() / math.sqrt(n_paths)), "monte_carlo",
                    f"{n_paths} learned probability-flow ODE paths (Heun), {len(grid) - 1} "
                    "steps from N(0, I); left-point sum")
