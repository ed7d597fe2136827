"""Batched chains: K independent ε-prediction MLPs trained in one batched step (issue 6, part 3).

Chains of one sweep (different α or seeds) that fit the same architecture at the same
generation are independent problems of identical shape. :class:`BatchedMLP` holds K copies of
:class:`~collapselab.scores.mlp.MLPNet` as grouped weights: layer l is one (K, in, out) weight
and one (K, 1, out) bias, applied with ``torch.baddbmm``. :func:`train_dsm_batched` runs
:func:`~collapselab.scores.training.train_dsm` for all K chains at once and returns one ordinary
:class:`~collapselab.scores.training.TrainResult` per chain (MLPNet weights, EMA, Adam state),
so the results plug into :class:`~collapselab.scores.mlp.NeuralScore`, checkpoints and resume.

Equivalence with the unbatched path. Chain k draws from its own generators, seeded exactly as
``train_dsm(cfg=replace(cfg, seed=seeds[k]))`` seeds them, and makes the same calls in the same
order (split permutation, per-epoch ``randperm``, then per step ``rand`` for t and ``randn`` for
ε), so every chain sees bit-for-bit the minibatches, times and noises of its unbatched run. The
loss, its gradient, Adam (one fused kernel over the K-stacked tensors is elementwise, hence the
same update per chain), gradient clipping (per chain), EMA, validation and early stopping are
all per chain. What differs is only float rounding: a batched matmul sums in another order than
a single one, so a step agrees to ~1e-6 relative and a run of a few hundred steps to ~1e-4
(tests/test_batched.py states the tolerances it checks).

Speed. The training step does not use autograd: the backward of a SiLU MLP is short and
written out (``bmm`` for weight and input gradients, ``aten.silu_backward``), which removes
the graph bookkeeping that dominates a step of this size on CPU. See docs/performance.md,
"Batched chains", for the measured throughput against K sequential ``train_dsm`` runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from .scores.mlp import MLPNet, embedding_freqs, sinusoidal_embedding
from .scores.training import (
    TrainConfig,
    TrainingDivergedError,
    TrainResult,
    _lr_at,
    _make_optimizer,
    _seed_from,
)

__all__ = ["BatchedMLP", "train_dsm_batched"]


class BatchedMLP(nn.Module):
    """K independent :class:`MLPNet` s (same architecture) with grouped weights.

    ``weights[l]`` has shape (K, in_l, out_l) (the transpose of ``nn.Linear.weight``, so that
    ``baddbmm(bias, x, W)`` needs no transposed operand in the forward) and ``biases[l]`` has
    shape (K, 1, out_l). Chain k of this module computes exactly what ``to_nets()[k]`` computes,
    up to float rounding.

    forward(x, t): x of shape (K, n, *event) with prod(event) = dim; t a float, a 0-d tensor,
    a (n,) tensor shared by all chains or a (K, n) tensor. Returns ε predictions of x's shape.
    """

    def __init__(self, K: int, dim: int, hidden: int = 128, layers: int = 3,
                 time_embed_dim: int = 64, time_scale: float = 1000.0, *,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if K < 1:
            raise ValueError(f"K must be >= 1, got {K}")
        if dim < 1 or hidden < 1 or layers < 1 or time_embed_dim < 2:
            raise ValueError("dim, hidden, layers must be >= 1 and time_embed_dim >= 2")
        self.K = K
        self.config = dict(dim=dim, hidden=hidden, layers=layers, time_embed_dim=time_embed_dim,
                           time_scale=time_scale)
        self.dim, self.time_embed_dim = dim, time_embed_dim
        self.register_buffer("freqs", embedding_freqs(time_embed_dim, time_scale).to(device),
                             False)
        sizes = [dim + time_embed_dim] + [hidden] * layers + [dim]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            # nn.Linear's default init: U(−1/√fan_in, 1/√fan_in) for weight and bias.
            bound = 1.0 / math.sqrt(fan_in)
            w = torch.empty(K, fan_in, fan_out, dtype=dtype, device=device).uniform_(-bound, bound)
            b = torch.empty(K, 1, fan_out, dtype=dtype, device=device).uniform_(-bound, bound)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))

    # ---- conversions ---------------------------------------------------------------------------

    @classmethod
    def from_nets(cls, nets: Sequence[MLPNet]) -> BatchedMLP:
        """Stack K MLPNets of one architecture (weights copied; the nets are not modified)."""
        nets = list(nets)
        if not nets:
            raise ValueError("need at least one MLPNet")
        cfg = nets[0].config
        for i, net in enumerate(nets):
            if not isinstance(net, MLPNet):
                raise TypeError(f"nets[{i}] is a {type(net).__name__}, not an MLPNet")
            if net.config != cfg:
                raise ValueError(f"nets[{i}] has config {net.config}, nets[0] has {cfg}")
        p0 = next(nets[0].parameters())
        out = cls(len(nets), **cfg, dtype=p0.dtype, device=p0.device)
        out.load_nets_(nets)
        return out

    @torch.no_grad()
    def load_nets_(self, nets: Sequence[MLPNet]) -> BatchedMLP:
        """Copy the weights of K MLPNets into this module, in place."""
        if len(nets) != self.K:
            raise ValueError(f"expected {self.K} nets, got {len(nets)}")
        for k, net in enumerate(nets):
            lins = _linears(net)
            if len(lins) != len(self.weights):
                raise ValueError(f"nets[{k}] has {len(lins)} linear layers, "
                                 f"expected {len(self.weights)}")
            for w, b, lin in zip(self.weights, self.biases, lins, strict=True):
                w[k].copy_(lin.weight.T)
                b[k, 0].copy_(lin.bias)
        return self

    @torch.no_grad()
    def to_nets(self) -> list[MLPNet]:
        """K independent MLPNets holding copies of this module's weights."""
        return [self.chain_net(k) for k in range(self.K)]

    @torch.no_grad()
    def chain_net(self, k: int) -> MLPNet:
        """Chain k as an independent MLPNet (weights copied)."""
        return self._net_from_rows([p[k] for p in self.flat_params()])

    @torch.no_grad()
    def _net_from_rows(self, rows: Sequence[Tensor]) -> MLPNet:
        """An MLPNet from one chain's rows of weights-then-biases ((in, out) and (1, out))."""
        ws, bs = self._split(rows)
        net = MLPNet(**self.config).to(device=ws[0].device, dtype=ws[0].dtype)
        for w, b, lin in zip(ws, bs, _linears(net), strict=True):
            lin.weight.copy_(w.T)
            lin.bias.copy_(b[0])
        return net

    def flat_params(self) -> list[Tensor]:
        """Parameters in a fixed order: all weights, then all biases."""
        return list(self.weights) + list(self.biases)

    def _split(self, params):
        params = self.flat_params() if params is None else list(params)
        n = len(self.weights)
        return params[:n], params[n:]

    # ---- forward -------------------------------------------------------------------------------

    def _times(self, t, K: int, n: int, like: Tensor) -> Tensor:
        if isinstance(t, Tensor):
            t = t.to(device=like.device, dtype=like.dtype)
            if t.dim() == 0:
                return t.expand(K, n)
            if t.shape == (n,):
                return t.expand(K, n)
            if t.shape != (K, n):
                raise ValueError(f"t must be a float or have shape ({n},) or ({K}, {n}), "
                                 f"got {tuple(t.shape)}")
            return t
        return torch.full((K, n), float(t), device=like.device, dtype=like.dtype)

    def embed(self, x: Tensor, t) -> Tensor:
        """Network input [x, sinusoidal(t)] of shape (K, n, dim + time_embed_dim)."""
        K, n = x.shape[0], x.shape[1]
        if K != self.K:
            raise ValueError(f"expected {self.K} chains in dim 0, got {K}")
        h = x.reshape(K, n, -1)
        if h.shape[2] != self.dim:
            raise ValueError(f"expected {self.dim} features per sample, got {h.shape[2]}")
        tv = self._times(t, K, n, h)
        # Same function as MLPNet: the embedding is bit-identical to the unbatched one.
        emb = sinusoidal_embedding(tv.reshape(-1), self.time_embed_dim, freqs=self.freqs)
        return torch.cat([h, emb.view(K, n, -1)], dim=2)

    def forward(self, x: Tensor, t, params: Sequence[Tensor] | None = None) -> Tensor:
        ws, bs = self._split(params)
        a = self.embed(x, t)
        last = len(ws) - 1
        for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
            a = torch.baddbmm(b, a, w)
            if i < last:
                a = torch.nn.functional.silu(a)
        return a.reshape(x.shape)


def _linears(net: MLPNet) -> list[nn.Linear]:
    return [m for m in net.mlp if isinstance(m, nn.Linear)]


# ---- the fused training step --------------------------------------------------------------------


def _forward_backward(ws: list[Tensor], bs: list[Tensor], gws: list[Tensor], gbs: list[Tensor],
                      inp: Tensor, eps: Tensor) -> Tensor:
    """Per-chain DSM loss (K,) of ε-prediction and its gradients, written into gws / gbs.

    loss_k = mean_b ‖net_k(inp_kb) − ε_kb‖² (exactly train_dsm's loss per chain). Summing the
    K losses leaves each chain's gradient its own, so one backward serves all chains. Written
    out instead of autograd: at this size the graph bookkeeping costs as much as the matmuls.
    """
    pres, acts = [], [inp]
    a = inp
    last = len(ws) - 1
    for i in range(len(ws)):
        z = torch.baddbmm(bs[i], a, ws[i])
        if i < last:
            pres.append(z)
            a = torch.nn.functional.silu(z)
            acts.append(a)
        else:
            a = z
    diff = a - eps
    loss = diff.square().sum(2).mean(1)
    g = diff.mul_(2.0 / eps.shape[1])  # d loss / d out; diff is not needed any more
    for i in range(last, -1, -1):
        torch.bmm(acts[i].transpose(1, 2), g, out=gws[i])
        torch.sum(g, dim=1, keepdim=True, out=gbs[i])
        if i > 0:  # no gradient for the input layer's input
            g = torch.bmm(g, ws[i].transpose(1, 2))
            g = torch.ops.aten.silu_backward(g, pres[i - 1])
    return loss


def _clip_per_chain_(grads: list[Tensor], max_norm: float) -> None:
    """Global-norm clipping of each chain's gradient separately (as training._clip_ per net)."""
    K = grads[0].shape[0]
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(K, -1), dim=1) for g in grads], 1)
    total = torch.linalg.vector_norm(norms, dim=1)
    factor = (max_norm / (total + 1e-6)).clamp_(max=1.0)
    for g in grads:
        g.mul_(factor.view((K,) + (1,) * (g.dim() - 1)))


def _as_stack(datas, K: int | None) -> Tensor:
    if isinstance(datas, Tensor):
        return datas
    datas = [torch.as_tensor(d) for d in datas]
    if len({tuple(d.shape) for d in datas}) != 1:
        raise ValueError("every chain needs a data set of the same shape, got "
                         f"{sorted({tuple(d.shape) for d in datas})}")
    return torch.stack(datas)


def train_dsm_batched(nets: BatchedMLP | Sequence[MLPNet], datas: Sequence[Tensor] | Tensor,
                      process, cfg: TrainConfig | None = None, seeds: Sequence[int] | None = None,
                      *, optimizer_states: Sequence[dict] | None = None, device="cpu",
                      nan_check: bool = True) -> list[TrainResult]:
    """:func:`~collapselab.scores.training.train_dsm` for K chains at once (DSM, PAPER.md §3).

    Minimises, for every chain k separately, E‖ε_θk(X_t, t) − ε‖² over its own data set
    ``datas[k]`` (all of shape (n, *event)), with t ~ U[t_min, t_max] (denoising score matching
    with weight var(t); module docstring of scores/training.py).

    nets: a :class:`BatchedMLP` (trained in place) or K :class:`MLPNet` s (their weights are
        trained in place, as train_dsm does, and returned as ``TrainResult.net``).
    seeds: chain k draws exactly what ``train_dsm(net_k, datas[k], process,
        replace(cfg, seed=seeds[k]))`` draws (default: cfg.seed for every chain).
    optimizer_states: per-chain Adam state dicts of train_dsm (``TrainResult.optimizer_state``)
        to resume from; all chains must be at the same Adam step.

    Returns one :class:`TrainResult` per chain: the raw net (last weights), the EMA net (best
    validated EMA weights when ``cfg.restore_best``), per-chain loss and validation histories,
    early stopping per chain, and an optimizer state that train_dsm accepts to resume. A chain
    that stops early is frozen at its stopping point (its later batched updates are discarded).
    """
    cfg = cfg or TrainConfig()
    device = torch.device(device)
    given_nets = None if isinstance(nets, BatchedMLP) else list(nets)
    model = nets if isinstance(nets, BatchedMLP) else BatchedMLP.from_nets(given_nets)
    model.to(device).train()
    K = model.K
    seeds = [cfg.seed] * K if seeds is None else [int(s) for s in seeds]
    if len(seeds) != K:
        raise ValueError(f"need {K} seeds, got {len(seeds)}")
    dtype = model.weights[0].dtype
    data = _as_stack(datas, K).to(device=device, dtype=dtype)
    if data.shape[0] != K:
        raise ValueError(f"need {K} data sets, got {data.shape[0]}")
    n = data.shape[1]
    if n < 1:
        raise ValueError("no training data")
    event = tuple(data.shape[2:])
    if math.prod(event) != model.dim:
        raise ValueError(f"data has event shape {event}, the nets expect {model.dim} features")

    # Per-chain random streams, seeded and consumed exactly as train_dsm consumes them.
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    chain_seeds = [[_seed_from(g) for _ in range(4)] for g in gens]  # split, loop, drop, val
    n_val = 0
    if cfg.val_fraction > 0:
        if n < 2:
            raise ValueError(f"need at least 2 data points for a validation split, got {n}")
        n_val = min(max(int(round(cfg.val_fraction * n)), 1), n - 1)
    perms = [torch.randperm(n, generator=torch.Generator().manual_seed(cs[0])).to(device)
             for cs in chain_seeds]
    train_x = torch.stack([data[k][perms[k][n_val:]] for k in range(K)])
    val_x = torch.stack([data[k][perms[k][:n_val]] for k in range(K)])
    n_train = n - n_val
    bsz = min(cfg.batch_size, n_train)
    per_epoch = n_train // bsz
    total = cfg.steps if cfg.epochs is None else max(1, math.ceil(cfg.epochs * per_epoch))
    t_min = cfg.t_min
    t_max = float(process.T if cfg.t_max is None else cfg.t_max)

    eval_every = per_epoch if cfg.eval_every is None else cfg.eval_every
    do_val = n_val > 0 and eval_every > 0
    if do_val:
        val_x = val_x.repeat((1, cfg.val_repeats) + (1,) * len(event))
        val_t, val_eps = [], []
        for k in range(K):
            vg = torch.Generator().manual_seed(chain_seeds[k][3])
            val_t.append((torch.rand(val_x.shape[1], generator=vg, dtype=torch.float64)
                          * (t_max - t_min) + t_min).to(device=device, dtype=dtype))
            val_eps.append(torch.randn(val_x.shape[1:], generator=vg, dtype=dtype).to(device))
        val_t, val_eps = torch.stack(val_t), torch.stack(val_eps)

    params = model.flat_params()
    opt = _make_optimizer(params, cfg, device)
    if optimizer_states is not None:
        _load_opt_states(opt, model, optimizer_states)
    ema_p = [p.detach().clone() for p in params]
    raw_p = [p.detach() for p in params]
    grads = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    nw = len(model.weights)
    ws, bs, gws, gbs = raw_p[:nw], raw_p[nw:], grads[:nw], grads[nw:]

    loops = [torch.Generator(device=device).manual_seed(cs[1]) for cs in chain_seeds]
    hist = torch.empty(total, K, device=device)
    check_every = 1 if device.type == "cpu" else 25
    t_buf = torch.empty(K, bsz, device=device, dtype=dtype)
    eps_buf = torch.empty((K, bsz) + event, device=device, dtype=dtype)
    idx = torch.empty(K, bsz, device=device, dtype=torch.long)
    chain_ix = torch.arange(K, device=device)[:, None]
    orders: list[Tensor] = []
    pos = n_train
    active = [True] * K
    frozen: list[dict | None] = [None] * K  # snapshot of a chain that stopped early
    val_history: list[list[tuple[int, float]]] = [[] for _ in range(K)]
    best = [math.inf] * K
    best_step: list[int | None] = [None] * K
    bad = [0] * K
    best_state: list[list[Tensor] | None] = [None] * K

    def check(upto: int):
        lo = upto - 1 if check_every == 1 else 0
        block = hist[lo:upto]
        for k in range(K):
            if not active[k]:
                continue
            bad_idx = (~torch.isfinite(block[:, k])).nonzero()
            if bad_idx.numel():
                i = lo + int(bad_idx[0])
                err = TrainingDivergedError(i + 1, float(hist[i, k]))
                err.chain = k
                raise err

    step = 0
    with torch.no_grad():
        for step in range(1, total + 1):
            new_epoch = pos + bsz > n_train
            if new_epoch:
                pos = 0
            for k, g in enumerate(loops):
                if new_epoch:
                    if len(orders) < K:
                        orders.append(torch.randperm(n_train, generator=g, device=device))
                    else:
                        orders[k] = torch.randperm(n_train, generator=g, device=device)
                idx[k] = orders[k][pos:pos + bsz]
                torch.rand(bsz, generator=g, out=t_buf[k])
                torch.randn((bsz,) + event, generator=g, out=eps_buf[k])
            pos += bsz
            t = t_buf.mul_(t_max - t_min).add_(t_min)
            x0 = train_x[chain_ix, idx]
            shape = (K, bsz) + (1,) * len(event)
            xt = (process.scale(t).reshape(shape) * x0
                  + process.var(t).sqrt().reshape(shape) * eps_buf)
            inp = model.embed(xt, t)
            loss = _forward_backward(ws, bs, gws, gbs, inp, eps_buf.reshape(K, bsz, -1))
            hist[step - 1] = loss
            if nan_check and step % check_every == 0:
                check(step)  # before the update on CPU: the raw weights stay finite
            if cfg.grad_clip is not None:
                _clip_per_chain_(grads, cfg.grad_clip)
            lr = _lr_at(step, total, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            d = min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_warmup \
                else cfg.ema_decay
            torch._foreach_lerp_(ema_p, raw_p, 1.0 - d)

            if do_val and (step % eval_every == 0 or step == total):
                vals = _val_losses(model, ema_p, val_x, val_t, val_eps, process)
                for k in range(K):
                    if not active[k]:
                        continue
                    val_history[k].append((step, vals[k]))
                    if vals[k] < best[k] - cfg.min_delta:
                        best[k], best_step[k], bad[k] = vals[k], step, 0
                        if cfg.restore_best:
                            best_state[k] = [p[k].clone() for p in ema_p]
                    else:
                        bad[k] += 1
                        if cfg.patience is not None and bad[k] >= cfg.patience:
                            active[k] = False
                            frozen[k] = _snapshot(k, step, raw_p, ema_p, opt, params)
                if not any(active):
                    break
    if nan_check and check_every > 1:
        check(step)

    results = []
    for k in range(K):
        snap = frozen[k]
        steps_k = step if snap is None else snap["step"]
        if snap is not None:  # put the frozen raw weights back into the batched model
            for p, r in zip(raw_p, snap["raw"], strict=True):
                p[k].copy_(r)
        ema_k = [p[k] for p in ema_p] if snap is None else snap["ema"]
        if best_state[k] is not None:
            ema_k = best_state[k]
        net = model.chain_net(k)
        if given_nets is not None:
            with torch.no_grad():
                given_nets[k].to(device)
                given_nets[k].load_state_dict(net.state_dict())
            net = given_nets[k]
        net.eval()
        ema_net = model._net_from_rows(ema_k).eval().requires_grad_(False)
        opt_state = _chain_opt_state(k, opt, params, net, cfg, snap)
        results.append(TrainResult(
            net=net, ema_net=ema_net, loss_history=hist[:steps_k, k].tolist(),
            val_history=val_history[k], best_val_loss=best[k] if do_val else math.nan,
            best_step=best_step[k], steps=steps_k, stopped_early=snap is not None,
            optimizer_state=opt_state, config=replace(cfg, seed=seeds[k])))
    model.eval()
    for p in params:
        p.grad = None
    return results


def _val_losses(model: BatchedMLP, ema_p: list[Tensor], val_x: Tensor, val_t: Tensor,
                val_eps: Tensor, process, batch_size: int = 4096) -> list[float]:
    """Per-chain mean DSM loss of the EMA weights on the fixed validation draws (dsm_loss)."""
    K, m = val_x.shape[0], val_x.shape[1]
    errs = []
    for i in range(0, m, batch_size):
        xb, tb, eb = val_x[:, i:i + batch_size], val_t[:, i:i + batch_size], \
            val_eps[:, i:i + batch_size]
        shape = tb.shape + (1,) * (xb.dim() - 2)
        xt = process.scale(tb).reshape(shape) * xb + process.var(tb).sqrt().reshape(shape) * eb
        out = model(xt, tb, params=ema_p)
        errs.append((out - eb).square().reshape(K, tb.shape[1], -1).sum(2))
    return torch.cat(errs, 1).mean(1).tolist()


def _snapshot(k: int, step: int, raw_p, ema_p, opt, params) -> dict:
    """Chain k's state when it stops early (later batched updates to it are discarded)."""
    st = [opt.state[p] for p in params]
    return {
        "step": step,
        "raw": [p[k].clone() for p in raw_p],
        "ema": [p[k].clone() for p in ema_p],
        "exp_avg": [s["exp_avg"][k].clone() for s in st],
        "exp_avg_sq": [s["exp_avg_sq"][k].clone() for s in st],
        "adam_step": st[0]["step"].clone(),
    }


def _per_linear(tensors: list[Tensor], k: int) -> list[Tensor]:
    """Chain k's slices of weights-then-biases tensors, in MLPNet's parameter order
    (weight (out, in), bias (out,) per layer)."""
    nw = len(tensors) // 2
    out = []
    for w, b in zip(tensors[:nw], tensors[nw:], strict=True):
        out += [w[k].T.contiguous(), b[k, 0].clone()]
    return out


def _chain_opt_state(k: int, opt, params, net: MLPNet, cfg: TrainConfig, snap) -> dict:
    """Chain k's Adam state in the format train_dsm's optimizer produces for an MLPNet."""
    st = [opt.state.get(p, {}) for p in params]
    chain_opt = _make_optimizer(net.parameters(), cfg, next(net.parameters()).device)
    if st and "exp_avg" in st[0]:
        nw = len(params) // 2
        if snap is None:
            m = [s["exp_avg"] for s in st]
            v = [s["exp_avg_sq"] for s in st]
            steps = [s["step"] for s in st]
            k_sel = k
        else:  # snapshot already holds chain k's rows only
            m = [x[None] for x in snap["exp_avg"]]
            v = [x[None] for x in snap["exp_avg_sq"]]
            steps = [snap["adam_step"]] * len(params)
            k_sel = 0
        ms, vs = _per_linear(m, k_sel), _per_linear(v, k_sel)
        order = [i for pair in zip(range(nw), range(nw, 2 * nw), strict=True) for i in pair]
        for p, mi, vi, j in zip(net.parameters(), ms, vs, order, strict=True):
            chain_opt.state[p] = {"step": steps[j].clone(), "exp_avg": mi, "exp_avg_sq": vi}
    lr = opt.param_groups[0]["lr"]
    for group in chain_opt.param_groups:
        group["lr"] = lr
    return chain_opt.state_dict()


def _load_opt_states(opt, model: BatchedMLP, states: Sequence[dict]) -> None:
    """Stack per-chain train_dsm Adam states (MLPNet order) into the batched optimizer."""
    if len(states) != model.K:
        raise ValueError(f"need {model.K} optimizer states, got {len(states)}")
    params = model.flat_params()
    nw = len(model.weights)
    steps = {float(s["state"][0]["step"]) for s in states if s["state"]}
    if len(steps) > 1:
        raise ValueError(f"chains are at different Adam steps {sorted(steps)}; "
                         "batched training needs one step count")
    if not steps or any(not s["state"] for s in states):
        return
    step = states[0]["state"][0]["step"]
    for li in range(nw):
        for kind, pidx, p in (("w", 2 * li, params[li]), ("b", 2 * li + 1, params[nw + li])):
            buf = {}
            for key in ("exp_avg", "exp_avg_sq"):
                rows = [s["state"][pidx][key].to(p) for s in states]
                stacked = torch.stack([r.T if kind == "w" else r[None] for r in rows])
                buf[key] = stacked.contiguous()
            opt.state[p] = {"step": torch.as_tensor(step, dtype=torch.float32).clone(), **buf}
    for group, src in zip(opt.param_groups, states[0]["param_groups"], strict=True):
        for key, val in src.items():
            if key not in ("params", "lr", "fused", "foreach"):
                group[key] = val
