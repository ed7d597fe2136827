"""Conditional flow matching: a velocity field trained on the linear interpolation path.

Convention (Lipman et al. 2023, rectified flow of Liu et al. 2023): flow time u ∈ [0, 1], noise
at u = 0 and data at u = 1,

    x_u = (1 − u)·x0 + u·x1,   x0 ~ N(0, I),  x1 ~ data,   target velocity x1 − x0,

and the loss E_{u ~ U[0,1], x0, x1} ‖v_θ(x_u, u) − (x1 − x0)‖² has the marginal velocity
v(x, u) = E[x1 − x0 | x_u = x] as its minimiser. Sampling integrates dx/du = v(x, u) from
N(0, I) at u = 0 to u = 1 (Heun, :func:`collapselab.samplers.heun`). Optional minibatch OT
coupling (Tong et al. 2023; Pooladian et al. 2023): within each batch the noises are re-paired
with the data by the exact optimal assignment for squared Euclidean cost (POT's ``ot.emd``).

Link to the diffusion's score (so that the paper's score energies apply to a flow model). By
Tweedie's formula on x_u = u x1 + (1 − u) x0, v(x, u) = (x + (1 − u) s_u(x))/u, with s_u the
score of the law of x_u. A VP marginal y = a x1 + σ z (a = scale(τ), σ = √var(τ)) is that law
rescaled: y/(a + σ) = x_u with u = a/(a + σ), hence the score the flow model implies at process
time τ is ``s(y, τ) = (u·v(y/(a+σ), u) − y/(a+σ))/σ`` (:meth:`FlowField.__call__`).
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from ..targets import GaussianMixture
from .mlp import time_vector
from .training import (
    TrainConfig,
    TrainingDivergedError,
    TrainResult,
    run_plan,
    step_and_average,
)

_UNIT_TIME = SimpleNamespace(T=1.0)  # flow time runs over [0, 1]


class FlowField:
    """A velocity network v_θ(x, u) (flow time u: 0 = noise, 1 = data) as a model of the loop.

    ``velocity(x, u)`` is the network's output in x's dtype and device (evaluated in the
    network's own, eval mode). Calling the object gives the score it implies at the diffusion
    process's time τ (module docstring), so score-based measurements (ε⋆², ε̂²) and the reverse
    SDE samplers apply to it too.
    """

    def __init__(self, net: nn.Module, process):
        self.net = net.eval()
        self.process = process

    def velocity(self, x: Tensor, u) -> Tensor:
        p = next(self.net.parameters(), None)
        xin = x if p is None else x.to(device=p.device, dtype=p.dtype)
        return self.net(xin, time_vector(u, x.shape[0], xin)).to(device=x.device, dtype=x.dtype)

    def __call__(self, y: Tensor, t) -> Tensor:
        if isinstance(t, Tensor) and t.dim() > 0:  # one time per sample
            tt = t.detach().to("cpu", torch.float64)
            a, sig = self.process.scale(tt), self.process.var(tt).sqrt()
            u = a / (a + sig)
            shape = (-1,) + (1,) * (y.dim() - 1)
            c_, u_, s_ = ((v.to(device=y.device, dtype=y.dtype).reshape(shape))
                          for v in (a + sig, u, sig))
            x = y / c_
            return (u_ * self.velocity(x, u.to(device=y.device, dtype=y.dtype)) - x) / s_
        t = float(t)
        a, sig = float(self.process.scale(t)), math.sqrt(float(self.process.var(t)))
        u = a / (a + sig)
        x = y / (a + sig)
        return (u * self.velocity(x, u) - x) / sig


def linear_path_law(law: GaussianMixture, u: float) -> GaussianMixture:
    """Law of x_u = u·x1 + (1 − u)·x0 for x1 ~ ``law``, x0 ~ N(0, I)."""
    return law.noised(u, (1.0 - u) ** 2)


def mixture_velocity(law: GaussianMixture, x: Tensor, u: float) -> Tensor:
    """Exact marginal velocity v(x, u) = (E[x1 | x_u = x] − x)/(1 − u) of the linear path for
    Gaussian-mixture data (flow matching's minimiser, in closed form). With component k,
    x_u | k ~ N(u μ_k, u²Σ_k + (1−u)² I) and E[x1 | x_u, k] = μ_k + uΣ_k(u²Σ_k + (1−u)²I)⁻¹
    (x_u − uμ_k), weighted by the posterior responsibilities. v(x, 1) = x."""
    x = torch.as_tensor(x, dtype=torch.float64)
    if u >= 1.0:
        return x.clone()
    lu = linear_path_law(law, u)
    r = torch.softmax(lu.component_log_prob(x) + lu.weights.log(), dim=1)  # (n, K)
    diff = x.unsqueeze(0) - u * law.means.unsqueeze(1)  # (K, n, d)
    sol = torch.cholesky_solve(diff.transpose(1, 2), lu.chol)  # (K, d, n)
    post = law.means.unsqueeze(1) + u * torch.einsum("kij,kjn->kni", law.covs, sol)
    ex1 = torch.einsum("nk,knd->nd", r, post)
    return (ex1 - x) / (1.0 - u)


def ot_pairing(x0: Tensor, x1: Tensor) -> Tensor:
    """Indices π with x0[π] paired to x1 by the exact minibatch optimal assignment for squared
    Euclidean cost (``ot.emd`` with uniform weights, whose plan is a permutation)."""
    import numpy as np
    import ot

    cost = torch.cdist(x0.reshape(len(x0), -1).double(), x1.reshape(len(x1), -1).double())
    n = len(x0)
    w = np.full(n, 1.0 / n)
    plan = ot.emd(w, w, (cost**2).cpu().numpy())
    return torch.from_numpy(plan.argmax(axis=0)).to(x0.device)


def flow_matching_loss(net: nn.Module, x1: Tensor, x0: Tensor, u: Tensor,
                       batch_size: int = 4096) -> Tensor:
    """Per-sample ‖v_θ(x_u, u) − (x1 − x0)‖² for given draws, without gradients."""
    out = []
    with torch.no_grad():
        for i in range(0, x1.shape[0], batch_size):
            a, z, uu = x1[i:i + batch_size], x0[i:i + batch_size], u[i:i + batch_size]
            ub = uu.reshape((-1,) + (1,) * (a.dim() - 1))
            xu = (1 - ub) * z + ub * a
            out.append((net(xu, uu) - (a - z)).square().flatten(1).sum(1))
    return torch.cat(out)


def train_flow_matching(net: nn.Module, data: Tensor, cfg: TrainConfig | None = None, *,
                        coupling: str = "independent", generator: torch.Generator | None = None,
                        init_state: dict | None = None, device="cpu") -> TrainResult:
    """Fit a velocity network to ``data`` (shape (n, *event)) by conditional flow matching
    (module docstring: linear path, Lipman et al. 2023), ``coupling`` 'independent' or 'ot'
    (minibatch optimal transport, Tong et al. 2023).

    Uses :class:`~collapselab.scores.training.TrainConfig` like DSM (steps/epochs, batch size,
    Adam(W), constant/cosine schedule, grad clipping, EMA with warm-up, validation split and
    early stopping on fixed draws); u ~ U[0, 1] (``t_min``/``t_max`` are the diffusion's and
    are not used). Every random draw comes from ``generator`` (default: seeded by cfg.seed);
    dropout draws from a forked global RNG. Raises TrainingDivergedError on a non-finite loss.
    """
    if coupling not in ("independent", "ot"):
        raise ValueError(f"coupling must be 'independent' or 'ot', got {coupling!r}")
    cfg = cfg or TrainConfig()
    device = torch.device(device)
    gen = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
    split_seed, loop_seed, drop_seed, val_seed = (
        int(torch.randint(0, 2**62, (1,), generator=gen)) for _ in range(4))
    if init_state is not None:
        net.load_state_dict(init_state)
    net.to(device).train()
    data = torch.as_tensor(data).to(device=device, dtype=next(net.parameters()).dtype)
    n = data.shape[0]
    plan = run_plan(cfg, n, _UNIT_TIME)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed)).to(device)
    train_x, val_x = data[perm[plan.n_val:]], data[perm[:plan.n_val]]
    n_train, bsz, total = n - plan.n_val, plan.batch_size, plan.total
    if plan.do_val:
        vg = torch.Generator().manual_seed(val_seed)
        val_x = val_x.repeat((cfg.val_repeats,) + (1,) * (data.dim() - 1))
        val_u = torch.rand(len(val_x), generator=vg, dtype=torch.float64).to(val_x)
        val_z = torch.randn(val_x.shape, generator=vg, dtype=val_x.dtype).to(device)

    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    try:  # the fused kernel (CPU since torch 2.4) removes most per-step Python overhead
        opt = cls(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = cls(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    raw_p, ema_p = list(net.parameters()), list(ema.parameters())
    g = torch.Generator(device=device).manual_seed(loop_seed)
    hist: list[float] = []
    val_history: list[tuple[int, float]] = []
    best, best_step, bad, stopped, best_state = math.inf, None, 0, False, None
    order, pos, step = None, n_train, 0
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(drop_seed)
        for step in range(1, total + 1):
            if pos + bsz > n_train:
                order, pos = torch.randperm(n_train, generator=g, device=device), 0
            x1 = train_x[order[pos:pos + bsz]]
            pos += bsz
            x0 = torch.randn(x1.shape, generator=g, device=device, dtype=x1.dtype)
            if coupling == "ot":
                x0 = x0[ot_pairing(x0, x1)]
            u = torch.rand(bsz, generator=g, device=device, dtype=x1.dtype)
            ub = u.reshape((-1,) + (1,) * (x1.dim() - 1))
            loss = (net((1 - ub) * x0 + ub * x1, u) - (x1 - x0)).square().flatten(1).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            lv = float(loss.detach())
            hist.append(lv)
            if not math.isfinite(lv):
                raise TrainingDivergedError(step, lv)
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(raw_p, cfg.grad_clip)
            step_and_average(opt, ema_p, raw_p, step, total, cfg)
            if plan.do_val and (step % plan.eval_every == 0 or step == total):
                val = float(flow_matching_loss(ema, val_x, val_z, val_u).mean())
                val_history.append((step, val))
                if val < best - cfg.min_delta:
                    best, best_step, bad = val, step, 0
                    if cfg.restore_best:
                        best_state = copy.deepcopy(ema.state_dict())
                else:
                    bad += 1
                    if cfg.patience is not None and bad >= cfg.patience:
                        stopped = True
                        break
    if best_state is not None:
        ema.load_state_dict(best_state)
    net.eval()
    return TrainResult(net=net, ema_net=ema, loss_history=hist, val_history=val_history,
                       best_val_loss=best if plan.do_val else math.nan, best_step=best_step,
                       steps=step, stopped_early=stopped, optimizer_state=opt.state_dict(),
                       config=cfg)
