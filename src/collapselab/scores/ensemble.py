"""K networks of one architecture trained together by PyTorch's own ensembling.

:func:`train_dsm_ensemble` runs :func:`~collapselab.scores.training.train_dsm` for K chains at
once: the K networks' parameters are stacked with ``torch.func.stack_module_state`` into
(K, ...) leaves, the forward is ``vmap(functional_call)`` over the chain axis, the backward is
autograd's, and one fused Adam(W) (``make_optimizer``, elementwise, hence the same update per
chain as K separate optimizers) steps all chains. Nothing is written by hand.

Equivalence with ``train_dsm``. Chain k draws from its own generators, seeded exactly as
``train_dsm(cfg=replace(cfg, seed=seeds[k]))`` seeds them, in the same order (split
permutation, per-epoch ``randperm``, per step ``rand`` for t and ``randn`` for ε), so every
chain sees bit for bit the minibatches, times and noises of its own ``train_dsm`` run. The
loss, gradient clipping (per chain), Adam, EMA, validation and early stopping are per chain;
only float rounding differs (a batched product sums in another order). A chain that stops
early keeps the state it had when it stopped (the stacked step goes on for the others).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from .training import (
    TrainConfig,
    TrainingDivergedError,
    TrainResult,
    lr_at,
    make_optimizer,
    run_plan,
    seed_from,
    step_and_average,
)

__all__ = ["train_dsm_ensemble"]


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    """(K, n) per-sample factors against (K, n, *event) data."""
    return v.reshape(v.shape + (1,) * (x.dim() - v.dim()))


def _rows(stacked: list[Tensor], k: int) -> list[Tensor]:
    return [p[k].detach().clone() for p in stacked]


def _load(net: nn.Module, rows: list[Tensor]) -> None:
    with torch.no_grad():
        for p, r in zip(net.parameters(), rows, strict=True):
            p.copy_(r)


def train_dsm_ensemble(nets: Sequence[nn.Module], datas: Sequence[Tensor], process,
                       cfg: TrainConfig | None = None, *, seeds: Sequence[int], device="cpu",
                       nan_check: bool = True) -> list[TrainResult]:
    """``[train_dsm(nets[k], datas[k], process, replace(cfg, seed=seeds[k])) for k]`` in one
    vmapped step per iteration (module docstring), up to float rounding.

    nets: K networks of one architecture without dropout or batch statistics (the MLP); they
    are trained in place and returned as ``TrainResult.net``. datas: K training sets of one
    shape. A non-finite loss raises :class:`TrainingDivergedError` with ``.chain = k``.
    """
    from torch.func import functional_call, stack_module_state

    cfg = cfg or TrainConfig()
    K = len(nets)
    if K < 1 or len(datas) != K or len(seeds) != K:
        raise ValueError(f"need as many data sets and seeds as nets ({K})")
    device = torch.device(device)
    cfgs = [replace(cfg, seed=int(s)) for s in seeds]
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    chain_seeds = [[seed_from(g) for _ in range(4)] for g in gens]  # split, loop, drop, val
    for net in nets:
        net.to(device).train()
    dtype = next(nets[0].parameters()).dtype
    datas = [torch.as_tensor(d).to(device=device, dtype=dtype) for d in datas]
    shape = datas[0].shape
    if any(d.shape != shape for d in datas):
        raise ValueError("the ensemble's training sets must have one shape")
    n = shape[0]
    if n < 1:
        raise ValueError("no training data")
    plan = run_plan(cfg, n, process)
    n_val, bsz, total = plan.n_val, plan.batch_size, plan.total
    t_min, t_max, eval_every, do_val = cfg.t_min, plan.t_max, plan.eval_every, plan.do_val
    n_train = n - n_val
    train_x, val_x = [], []
    for d, (split_seed, _, _, _) in zip(datas, chain_seeds, strict=True):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
        perm = perm.to(device)
        train_x.append(d[perm[n_val:]])
        val_x.append(d[perm[:n_val]])
    if do_val:  # fixed validation draws per chain, as train_dsm makes them
        vx, vt, ve = [], [], []
        for x, (_, _, _, val_seed) in zip(val_x, chain_seeds, strict=True):
            vg = torch.Generator().manual_seed(val_seed)
            x = x.repeat((cfg.val_repeats,) + (1,) * (x.dim() - 1))
            vt.append((torch.rand(x.shape[0], generator=vg, dtype=torch.float64)
                       * (t_max - t_min) + t_min).to(device=device, dtype=x.dtype))
            ve.append(torch.randn(x.shape, generator=vg, dtype=x.dtype).to(device))
            vx.append(x)
        val_x_s, val_t_s, val_eps_s = torch.stack(vx), torch.stack(vt), torch.stack(ve)

    params, buffers = stack_module_state(list(nets))
    names = list(params)
    raw = [params[k] for k in names]
    base = copy.deepcopy(nets[0]).to("meta")

    def one(p, b, x, t):
        return functional_call(base, (dict(zip(names, p, strict=True)), b), (x, t))

    vf = torch.vmap(one, in_dims=(0, 0, 0, 0))
    opt = make_optimizer(raw, cfg, device)
    ema = [p.detach().clone() for p in raw]

    loop_gens = [torch.Generator(device=device).manual_seed(s[1]) for s in chain_seeds]
    hist = torch.empty(K, total, device=device)
    val_history: list[list[tuple[int, float]]] = [[] for _ in range(K)]
    best = [math.inf] * K
    best_step: list[int | None] = [None] * K
    bad = [0] * K
    best_state: list[list[Tensor] | None] = [None] * K
    frozen: list[dict | None] = [None] * K  # a stopped chain's final state
    orders: list[Tensor | None] = [None] * K
    pos, step = n_train, 0

    # As train_dsm: every step on CPU; every 25 steps on accelerators (no per-step
    # synchronisation), still naming the first bad step. A stopped chain is checked only up
    # to its last step.
    check_every = 1 if device.type == "cpu" else 25
    checked = 0

    def check(upto: int) -> None:
        nonlocal checked
        window = hist[:, checked:upto]
        if not bool(torch.isfinite(window).all()):
            for k in range(K):
                last = frozen[k]["steps"] if frozen[k] is not None else upto
                bad_idx = (~torch.isfinite(hist[k, checked:last])).nonzero()
                if bad_idx.numel():
                    i = checked + int(bad_idx[0])
                    err = TrainingDivergedError(i + 1, float(hist[k, i]))
                    err.chain = k
                    raise err
        checked = upto

    def val_losses() -> Tensor:
        with torch.no_grad():
            out = []
            for i in range(0, val_x_s.shape[1], 4096):
                xb, tb = val_x_s[:, i:i + 4096], val_t_s[:, i:i + 4096]
                eb = val_eps_s[:, i:i + 4096]
                xt = _bcast(process.scale(tb), xb) * xb + _bcast(process.var(tb).sqrt(), xb) * eb
                out.append((vf(ema, buffers, xt, tb) - eb).square().flatten(2).sum(2))
            return torch.cat(out, dim=1).mean(1)

    def snapshot(k: int) -> dict:
        st = [opt.state[p] for p in raw]
        return {"raw": _rows(raw, k), "ema": _rows(ema, k), "steps": step,
                "adam": ([s["exp_avg"][k].clone() for s in st],
                         [s["exp_avg_sq"][k].clone() for s in st],
                         st[0]["step"].clone()) if st and st[0] else None}

    for step in range(1, total + 1):
        if pos + bsz > n_train:
            orders = [torch.randperm(n_train, generator=g, device=device) for g in loop_gens]
            pos = 0
        x0s, ts, es = [], [], []
        for k, g in enumerate(loop_gens):  # chain k's draws, in train_dsm's order
            x0 = train_x[k][orders[k][pos:pos + bsz]]
            t = torch.rand(bsz, generator=g, device=device, dtype=x0.dtype) * (t_max - t_min)
            t += t_min
            es.append(torch.randn(x0.shape, generator=g, device=device, dtype=x0.dtype))
            x0s.append(x0)
            ts.append(t)
        pos += bsz
        x0, t, eps = torch.stack(x0s), torch.stack(ts), torch.stack(es)
        xt = _bcast(process.scale(t), x0) * x0 + _bcast(process.var(t).sqrt(), x0) * eps
        losses = (vf(raw, buffers, xt, t) - eps).square().flatten(2).sum(2).mean(1)
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()  # chains are independent: each gets its own loss's gradient
        hist[:, step - 1] = losses.detach()
        if nan_check and (step % check_every == 0 or step == total):
            check(step)  # on CPU every step, before the update: the raw weights stay finite
        if cfg.grad_clip is not None:
            with torch.no_grad():
                grads = [p.grad for p in raw]
                norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1)
                                     for g in grads], dim=1)
                coef = (cfg.grad_clip / (torch.linalg.vector_norm(norms, dim=1) + 1e-6))
                coef = coef.clamp_(max=1.0)
                for g in grads:
                    g.mul_(_bcast(coef, g))
        step_and_average(opt, ema, raw, step, total, cfg)
        if do_val and (step % eval_every == 0 or step == total):
            vals = val_losses()
            for k in range(K):
                if frozen[k] is not None:
                    continue
                val = float(vals[k])
                val_history[k].append((step, val))
                if val < best[k] - cfg.min_delta:
                    best[k], best_step[k], bad[k] = val, step, 0
                    if cfg.restore_best:
                        best_state[k] = _rows(ema, k)
                else:
                    bad[k] += 1
                    if cfg.patience is not None and bad[k] >= cfg.patience:
                        frozen[k] = snapshot(k)
            if all(f is not None for f in frozen):
                break

    if nan_check and checked < step:  # stopped early between two checks (accelerators)
        check(step)
    results = []
    lr_final = lr_at(step, total, cfg)
    for k, net in enumerate(nets):
        snap = frozen[k] or snapshot(k)
        _load(net, snap["raw"])
        net.eval()
        ema_net = copy.deepcopy(net).eval().requires_grad_(False)
        _load(ema_net, best_state[k] if best_state[k] is not None else snap["ema"])
        steps_k = snap["steps"]
        chain_opt = make_optimizer(net.parameters(), cfgs[k], device)
        if snap["adam"] is not None:
            ms, vs, st = snap["adam"]
            for p, m, v in zip(net.parameters(), ms, vs, strict=True):
                chain_opt.state[p] = {"step": st.clone(), "exp_avg": m, "exp_avg_sq": v}
        for group in chain_opt.param_groups:
            group["lr"] = lr_final if frozen[k] is None else lr_at(steps_k, total, cfg)
        results.append(TrainResult(
            net=net, ema_net=ema_net, loss_history=hist[k, :steps_k].tolist(),
            val_history=val_history[k], best_val_loss=best[k] if do_val else math.nan,
            best_step=best_step[k], steps=steps_k, stopped_early=frozen[k] is not None,
            optimizer_state=chain_opt.state_dict(), config=cfgs[k]))
    return results
