"""Batched chains: K independent ε-prediction MLPs trained in one hand-written batched step
(collapselab.fast's trainer, ``score.train_backend: native``).

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
a single one, so a step agrees to ~1e-6 relative, and runs of 80-200 steps differ by < 1e-6 in
weights and losses (tests/fast/test_batched.py checks 2e-5). Rounding differences could, in
principle, flip a validation comparison that is tied to 1e-7 and so the early-stopping step.
Against itself with K = 1 (what :func:`~collapselab.scores.neural.fit_neural` runs for one
MLP) a chain agrees to the last bit whatever chains share its batch: see :class:`_Flat`.

Speed (CPU). The training step does not use autograd: the backward of a SiLU MLP is short
and written out (``bmm`` for weight and input gradients, ``aten.silu_backward``), which removes
the graph bookkeeping. The K chains are split into shards, one per thread, each running whole
steps with one intra-op thread (one synchronisation per step instead of one per op); inside a
shard the forward/backward goes chain by chain (cache-resident activations; input gradients
overwrite the activations they no longer need) while sampling, clipping, Adam and the EMA run
over the shard's chains at once: the training state is chain-major flat (row k of a (K, P)
tensor is chain k's parameters), so each of these is one kernel. Where a C compiler is
available, :mod:`collapselab.fast.native` fuses the SiLU/bias passes and computes a narrow output
layer (d ≤ 10) with the loss, and :mod:`collapselab.fast.gemm` picks the products (the native
register-tiled GEMM on AVX-512, else oneDNN's, else ``torch.mm``). ``compile=True`` adds
``torch.compile`` to the forward/backward. Measurements and where the time goes:
benchmarks/results/performance-records-before-fast-leaf.md, "Batched chains".
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import torch
from torch import Tensor, nn

from ..scores.mlp import MLPNet, embedding_freqs, sinusoidal_embedding
from ..scores.training import (
    TrainConfig,
    TrainingDivergedError,
    TrainResult,
    lr_at,
    make_optimizer,
    run_plan,
    seed_from,
)
from .gemm import NativeProducts, Products
from .gemm import load as load_products
from .native import Kernels
from .native import load as load_native

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


class _Flat:
    """Chain-major flat layout of the K chains' parameters: row k of a (K, P) tensor holds
    chain k's weights-then-biases. Training state (weights, EMA, gradients, Adam moments)
    lives in such tensors, so gradient clipping, Adam and the EMA are one kernel each over
    all chains instead of one per layer; per-layer views (K, in, out) / (K, 1, out) of them
    feed the forward/backward (each chain's slice of a view is contiguous).

    Rows are padded with zeros to whole 64-byte lines (P a multiple of :attr:`ALIGN`), so
    every chain's parameters sit at the same vector offsets whatever K and the shard split:
    torch's vectorised kernels (the fused Adam) round a vector's remainder differently from
    its body, and with unpadded rows of 41,858 parameters (d = 2) a chain trained with two
    others differed from the same chain trained alone by ~4e-8 after 100 steps. The padding
    stays zero (zero gradient, zero Adam step, zero weight decay)."""

    ALIGN = 16  # float32 elements per 64 bytes: an AVX-512 vector and a cache line

    def __init__(self, params: Sequence[Tensor]):
        self.shapes = [tuple(p.shape[1:]) for p in params]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.P = -(-sum(self.sizes) // self.ALIGN) * self.ALIGN

    def views(self, flat: Tensor) -> list[Tensor]:
        """Per-parameter views (k, *shape) of a (k, P) tensor."""
        k = flat.shape[0]
        return [flat[:, o:o + n].view((k,) + s)
                for o, n, s in zip(self.offsets, self.sizes, self.shapes, strict=True)]

    def pack(self, params: Sequence[Tensor]) -> Tensor:
        """A new (K, P) tensor holding ``params`` (stacked (K, *shape) tensors), zero
        padded."""
        flat = params[0].new_zeros(params[0].shape[0], self.P)
        for v, p in zip(self.views(flat), params, strict=True):
            v.copy_(p.detach())
        return flat

    def rows(self, row: Tensor) -> list[Tensor]:
        """One chain's (P,) row as per-parameter tensors (copies)."""
        return [row[o:o + n].view(s).clone()
                for o, n, s in zip(self.offsets, self.sizes, self.shapes, strict=True)]


# ---- the fused training step --------------------------------------------------------------------


_MM = Products()  # torch.mm, the default of _forward_backward_2d


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


def _forward_backward_2d(ws: list[Tensor], bs: list[Tensor], gws: list[Tensor],
                         gbs: list[Tensor], inp: Tensor, eps: Tensor, bufs: _Buffers,
                         wts: list[Tensor], out: Tensor, nat: Kernels | None = None,
                         sq: Tensor | None = None, prod: Products = _MM) -> None:
    """:func:`_forward_backward` for one chain with 2-D operands and preallocated buffers.

    The CPU path. ``prod`` (:mod:`collapselab.fast.gemm`) makes the products: the native GEMM into
    the buffers, oneDNN's (fresh outputs; they want dense transposed inputs for the weight
    gradients, which the native SiLU pass writes), or ``torch.mm(out=)`` into buffers that
    live for the whole run, per chain faster than ``bmm`` over a batch of one. (With the
    native GEMM and output layer the shard runs the same arithmetic as one C call per chain,
    ``Kernels.mlp_plan``.) The bias is added after the product (``addmm`` first copies
    the broadcast bias into the output, one more pass). ``wts`` are the transposed weights
    and, last, the transposed input (views made once by the caller). ``out`` (B, dim) receives
    the gradient of the loss in the network output, 2(ε_θ − ε)/B; :func:`_losses` turns the
    shard's rows of it into the losses in one pass over all chains. Same gradients as the
    batched form up to float rounding.

    With ``nat`` (:mod:`collapselab.fast.native`) each hidden layer's bias add and SiLU are one
    fused pass that leaves silu'(z) in the pre-activation's buffer, and the backward's
    multiplication by it and the bias gradient are another; without, the PyTorch ops
    (``silu_backward`` in place on the input gradient). With ``sq`` as well (a one-element
    buffer; the caller passes it only where :meth:`~collapselab.fast.native.Kernels.fits_output`
    holds), a narrow output layer runs as two native passes: forward with the loss gradient
    and the loss Σ g² (into ``sq``), and back into the layer below with its weight gradient
    (BLAS is slow at this shape).
    """
    acts = bufs.act
    zs = []  # pre-activations (silu' with nat): the buffers, or the products' fresh outputs
    last = len(ws) - 1
    # The weight gradients' first operands aᵀ: views, or dense copies where the products
    # want them (written by the SiLU pass, and one transpose of the input).
    dense = nat is not None and prod.dense_transpose and bufs.inp_t is not None
    ats = [nat.transpose_(inp, bufs.inp_t) if dense else wts[last + 1]]
    a = inp
    for i in range(last):
        z = prod.forward(a, ws[i], wts[i], bufs.z[i])
        zs.append(z)
        if dense:
            a = nat.bias_silu_t_(z, bs[i], acts[i], bufs.act_tt[i])  # z now holds silu'(z)
            ats.append(bufs.act_tt[i])
        elif nat is not None:
            a = nat.bias_silu_(z, bs[i], acts[i])
            ats.append(bufs.act_t[i])
        else:
            a = torch.ops.aten.silu.out(z.add_(bs[i]), out=acts[i])
            ats.append(bufs.act_t[i])
    if sq is not None:
        nat.out_fwd_(a, ws[last], bs[last], eps, out, gbs[last], sq, 2.0 / eps.shape[0])
        g = nat.out_bwd_(a, out, ws[last], zs[last - 1], gws[last], gbs[last - 1])
        top = last - 1
    else:
        z = prod.forward(a, ws[last], wts[last], out)
        if z is out:
            out.add_(bs[last])
        else:
            torch.add(z, bs[last], out=out)
        g = out.sub_(eps).mul_(2.0 / eps.shape[0])  # d loss / d out
        if nat is not None:
            nat.mul_colsum_(g, None, gbs[last])
        top = last
    for i in range(top, -1, -1):
        prod.weight_grad(ats[i], g, gws[i])
        if nat is None:
            torch.sum(g, dim=0, keepdim=True, out=gbs[i])
        if i > 0:  # no gradient for the input layer's input
            # (torch.mm: into the activation buffer of layer i - 1, last needed just above)
            g = prod.input_grad(g, ws[i], wts[i], acts[i - 1])
            if nat is not None:
                nat.mul_colsum_(g, zs[i - 1], gbs[i - 1])
            else:
                torch.ops.aten.silu_backward.grad_input(g, zs[i - 1], grad_input=g)


def _losses(out_grads: Tensor, sq: Tensor | None = None) -> Tensor:
    """Per-chain DSM losses mean_b ‖ε_θ − ε‖² from the output gradients g = 2(ε_θ − ε)/B
    (shape (k, B, ...)): Σ g² · B/4 (exact rescaling when B is a power of two). ``sq`` (k, 1)
    holds the Σ g² where the native output layer already summed them."""
    k, bsz = out_grads.shape[0], out_grads.shape[1]
    if sq is not None:
        return sq.view(-1).mul(bsz / 4.0)
    return out_grads.reshape(k, -1).square().sum(1).mul_(bsz / 4.0)


class _Buffers:
    """Per-thread work space of :func:`_forward_backward_2d`: pre-activations ``z`` and
    activations ``act`` (and their transposed views) of one chain's batch, reused every step;
    with ``torch.mm`` the backward writes each input gradient over the activation it no longer
    needs (a smaller working set: one chain's buffers fit the 2 MiB L2 of a core). With
    ``in_width`` (the network input's width), dense transposes of the input and of the
    activations too, for products that want them."""

    def __init__(self, widths: list[int], bsz: int, device, dtype,
                 in_width: int | None = None):
        def new(w):
            return torch.empty(bsz, w, device=device, dtype=dtype)

        self.z = [new(w) for w in widths[:-1]]  # the output layer writes the caller's rows
        self.act = [new(w) for w in widths[:-1]]
        self.act_t = [a.T for a in self.act]
        # Dense transposes aᵀ of the input and the activations, for products that want them
        # (collapselab.fast.gemm's dense_transpose; written by collapselab.fast.native's passes).
        self.inp_t = None if in_width is None else \
            torch.empty(in_width, bsz, device=device, dtype=dtype)
        self.act_tt = [] if in_width is None else \
            [torch.empty(w, bsz, device=device, dtype=dtype) for w in widths[:-1]]


def _clip_per_chain_(gflat: Tensor, max_norm: float) -> None:
    """Global-norm clipping of each chain's gradient separately (as training._clip_ per net):
    row k of the (k, P) gradient is chain k's whole gradient."""
    factor = (max_norm / (torch.linalg.vector_norm(gflat, dim=1) + 1e-6)).clamp_(max=1.0)
    gflat.mul_(factor[:, None])


def _as_stack(datas) -> Tensor:
    if isinstance(datas, Tensor):
        return datas
    datas = [torch.as_tensor(d) for d in datas]
    if len({tuple(d.shape) for d in datas}) != 1:
        raise ValueError("every chain needs a data set of the same shape, got "
                         f"{sorted({tuple(d.shape) for d in datas})}")
    return torch.stack(datas)


def _bounds(K: int, parts: int) -> list[tuple[int, int]]:
    q, r = divmod(K, parts)
    out, lo = [], 0
    for i in range(parts):
        hi = lo + q + (i < r)
        out.append((lo, hi))
        lo = hi
    return out


class _Shard:
    """Chains lo:hi of the batch: rows of the flat weights and EMA, their own gradients, Adam
    and random streams. A shard runs a whole training step on one thread.

    Why shards: on a few cores, K small matmuls split across threads inside each op pay a
    thread barrier per op (ruinous when other processes share the cores); giving each thread
    whole chains needs one synchronisation per step instead.
    """

    def __init__(self, lo: int, hi: int, layout: _Flat, raw_flat: Tensor, ema_flat: Tensor,
                 cfg: TrainConfig, device, loop_seeds: list[int], train_x: Tensor, bsz: int,
                 event: tuple, n_weights: int, dim: int, time_embed_dim: int, chunk: int,
                 native: bool = True, products: Products | None = None):
        self.lo, self.hi = lo, hi
        self.layout = layout
        # Rows lo:hi of the chain-major (K, P) tensors are contiguous: Adam, clipping and the
        # EMA are one kernel each over the shard's chains and update the run's own storage.
        self.flat, self.eflat = raw_flat[lo:hi], ema_flat[lo:hi]
        self.gflat = torch.zeros_like(self.flat)
        self.flat.grad = self.gflat
        self.params, self.grads = layout.views(self.flat), layout.views(self.gflat)
        self.opt = make_optimizer([self.flat], cfg, device)
        self.gens = [torch.Generator(device=device).manual_seed(s) for s in loop_seeds[lo:hi]]
        self.train_x = train_x[lo:hi]
        k, dtype = hi - lo, train_x.dtype
        self.t = torch.empty(k, bsz, device=device, dtype=dtype)
        self.eps = torch.empty((k, bsz) + event, device=device, dtype=dtype)
        self.x0 = torch.empty((k, bsz) + event, device=device, dtype=dtype)
        # Row views made once (each costs a dispatch per step otherwise).
        self.rows = list(zip(self.gens, self.train_x, self.t, self.eps, self.x0, strict=True))
        self.orders: list[Tensor] = []
        self.nw = n_weights
        self.bsz, self.event = bsz, event
        self.chunk = max(1, min(chunk, k))
        # Network input [x_t, cos, sin(, 0)] written in place each step (no concatenations);
        # an odd time_embed_dim's zero column is set once here.
        self.inp = torch.zeros(k, bsz, dim + time_embed_dim, device=device, dtype=dtype)
        half = time_embed_dim // 2
        self.trig = torch.empty(k, bsz, half, device=device, dtype=dtype)
        self.inp_x, self.inp_cos, self.inp_sin = (self.inp[:, :, :dim],
                                                  self.inp[:, :, dim:dim + half],
                                                  self.inp[:, :, dim + half:dim + 2 * half])
        self.chunks = [self._views(c, min(c + self.chunk, k)) for c in range(0, k, self.chunk)]
        # chunk == 1 (the CPU default): 2-D operands per chain, buffers shared by the chains.
        self.per_chain = None
        self.plans = None
        # collapselab.fast.native's kernels (CPU float32): the step's passes, and the one-pass
        # clipping + Adam(W) + EMA where the optimizer is the plain fused kind
        self.nat = nat = load_native() if native and device.type == "cpu" \
            and dtype == torch.float32 else None
        if self.chunk == 1:
            self.out = torch.empty(k, bsz, dim, device=device, dtype=dtype)
            widths = [w.shape[2] for w in self.params[:n_weights]]
            prod = products if products is not None else (
                load_products() if device.type == "cpu" and dtype == torch.float32 else _MM)
            if not native and isinstance(prod, NativeProducts):
                prod = prod.fallback  # native=False: nothing of collapselab.fast.native
            dense = nat is not None and prod.dense_transpose
            self.bufs = _Buffers(widths, bsz, device, dtype,
                                 dim + time_embed_dim if dense else None)
            # A narrow output layer goes native and yields the losses (Σ g² per chain) too.
            self.sq = torch.empty(k, 1, device=device, dtype=dtype) if nat is not None \
                and nat.fits_output(self.params[n_weights - 1][0]) else None
            self.per_chain = []
            for i, v in enumerate(self.chunks):
                ws, bs, gws, gbs = ([t[0] for t in group] for group in v[:4])
                self.per_chain.append((ws, bs, gws, gbs, v[4][0], v[5][0], self.bufs,
                                       [w.T for w in ws] + [v[4][0].T], self.out[i], nat,
                                       None if self.sq is None else self.sq[i], prod))
            # With the native GEMM and output layer, each chain's whole forward/backward is
            # one C call with its pointers bound here (same arithmetic as the per-op path).
            if isinstance(prod, NativeProducts) and self.sq is not None \
                    and nat.fits_mlp(self.per_chain[0][0]):
                self.plans = [nat.mlp_plan(ws, bs, gws, gbs, inp, eps, self.bufs.z,
                                           self.bufs.act, out, sq, bsz)
                              for ws, bs, gws, gbs, inp, eps, _, _, out, _, sq, _
                              in self.per_chain]
        self._adam = None  # cached argument lists of the fused Adam kernel (see _update)

    def _views(self, a: int, b: int):
        nw = self.nw
        p, g = self.params, self.grads
        return ([w[a:b] for w in p[:nw]], [x[a:b] for x in p[nw:]],
                [w[a:b] for w in g[:nw]], [x[a:b] for x in g[nw:]],
                self.inp[a:b], self.eps.view(self.hi - self.lo, self.bsz, -1)[a:b])

    def step(self, model: BatchedMLP, process, fb, new_epoch: bool, pos: int, t_min: float,
             t_max: float, lr: float, ema_decay: float, grad_clip: float | None,
             check: bool, active: list[bool]) -> Tensor:
        k, bsz, event = self.hi - self.lo, self.bsz, self.event
        n_train = self.train_x.shape[1]
        # Each chain draws from its own generator exactly what train_dsm draws, in its order.
        for i, (g, data, t_i, eps_i, x0_i) in enumerate(self.rows):
            if new_epoch:
                order = torch.randperm(n_train, generator=g, device=g.device)
                if len(self.orders) < k:
                    self.orders.append(order)
                else:
                    self.orders[i] = order
            torch.index_select(data, 0, self.orders[i][pos:pos + bsz], out=x0_i)
            torch.rand(bsz, generator=g, out=t_i)
            torch.randn((bsz,) + event, generator=g, out=eps_i)
        t = self.t.mul_(t_max - t_min).add_(t_min)
        # x_t = scale(t)·x0 + √var(t)·ε (process.noise's expression), written into inp.
        shape = (k, bsz, 1)
        x = torch.mul(self.x0.view(self.inp_x.shape), process.scale(t).view(shape),
                      out=self.inp_x)
        x.add_(self.eps.view(self.inp_x.shape) * process.var(t).sqrt_().view(shape))
        # The same elementwise ops as sinusoidal_embedding: bit-identical features.
        # cos/sin into a contiguous buffer, then one copy: written straight into the strided
        # columns of inp they take several times longer.
        args = t[:, :, None] * model.freqs
        self.inp_cos.copy_(torch.cos(args, out=self.trig))
        self.inp_sin.copy_(torch.sin(args, out=self.trig))
        # Chains one at a time (chunk = 1 by default): a chain's activations (~2 MB at width
        # 128, batch 512) stay in L2, where the SiLU and bias passes are cheaper
        # than over all K chains' (see benchmarks/results/).
        if self.plans is not None and fb is _forward_backward:
            for run in self.plans:
                run()
            loss = _losses(self.out, self.sq)
        elif self.per_chain is not None and fb is _forward_backward:
            for v in self.per_chain:
                _forward_backward_2d(*v)
            loss = _losses(self.out, self.sq)
        else:
            loss = torch.cat([fb(*views) for views in self.chunks])
        if check:
            mine = active[self.lo:self.hi]
            ok = loss if all(mine) else loss[torch.tensor(mine, device=loss.device)]
            if not bool(torch.isfinite(ok).all()):
                return loss  # no update: the raw weights stay finite (the caller raises)
        self._update(lr, grad_clip, ema_decay)
        return loss

    def _update(self, lr: float, grad_clip: float | None, ema_decay: float) -> None:
        """Clipping, one Adam(W) step and the EMA of the shard. Once the optimizer holds its
        state, the fused kernel is called directly with cached argument lists, as
        ``Optimizer.step`` would call it (step counters, then ``_fused_adam(w)_``): that skips
        the per-step Python (grouping tensors by device and dtype, hooks) at this size;
        with :mod:`collapselab.fast.native`, its one pass does clipping, Adam and the EMA instead.
        The state tensors stay those of ``self.opt``, so checkpoints and :meth:`adam_rows`
        see every update."""
        if not self._adam:  # first step (the optimizer creates its state), or no fused kernel
            if grad_clip is not None:
                _clip_per_chain_(self.gflat, grad_clip)
            for group in self.opt.param_groups:
                group["lr"] = lr
            self.opt.step()
            if self._adam is None:
                self._adam = self._fused_args() or False
        else:
            kernel, lists, kw = self._adam
            torch._foreach_add_(lists[-1], 1)
            if self.nat is not None:
                self.nat.adam_ema_(self.flat, self.gflat, lists[2][0], lists[3][0], self.eflat,
                                   grad_clip, lr, kw["beta1"], kw["beta2"], kw["eps"],
                                   kw["weight_decay"], kernel is torch._fused_adamw_,
                                   float(lists[-1][0]), 1.0 - ema_decay)
                return
            if grad_clip is not None:
                _clip_per_chain_(self.gflat, grad_clip)
            kernel(*lists, lr=lr, **kw)
        self.eflat.lerp_(self.flat, 1.0 - ema_decay)

    def _fused_args(self):
        """(kernel, tensor lists, options) of the fused Adam(W) call, or None where the
        optimizer is not the plain fused kind (then ``self.opt.step()`` is used every step)."""
        (group,) = self.opt.param_groups
        st = self.opt.state.get(self.flat, {})
        plain = not (group.get("amsgrad") or group.get("maximize") or group.get("capturable")
                     or group.get("differentiable"))
        if not (group.get("fused") and plain and "exp_avg" in st):
            return None
        name = "_fused_adamw_" if group.get("decoupled_weight_decay", False) or isinstance(
            self.opt, torch.optim.AdamW) else "_fused_adam_"
        kernel = getattr(torch, name, None)
        if kernel is None or isinstance(group["lr"], Tensor):
            return None
        lists = ([self.flat], [self.gflat], [st["exp_avg"]], [st["exp_avg_sq"]], [],
                 [st["step"]])
        beta1, beta2 = group["betas"]
        kw = dict(amsgrad=False, beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                  eps=group["eps"], maximize=False, grad_scale=None, found_inf=None)
        return kernel, lists, kw

    def adam_rows(self, k: int) -> tuple[list[Tensor], list[Tensor], Tensor] | None:
        """Chain k's Adam moments (weights-then-biases rows) and step, None before step 1."""
        st = self.opt.state.get(self.flat, {})
        if "exp_avg" not in st:
            return None
        i = k - self.lo
        return (self.layout.rows(st["exp_avg"][i]), self.layout.rows(st["exp_avg_sq"][i]),
                st["step"].clone())

    def load_adam(self, states: Sequence[dict]) -> None:
        """Stack chains lo:hi of per-chain train_dsm Adam states (MLPNet order)."""
        mine = states[self.lo:self.hi]
        step = mine[0]["state"][0]["step"]
        nw = self.nw
        buf = {}
        for key in ("exp_avg", "exp_avg_sq"):
            flat = torch.zeros_like(self.flat)
            views = self.layout.views(flat)
            for li in range(nw):
                for kind, pidx, v in (("w", 2 * li, views[li]), ("b", 2 * li + 1, views[nw + li])):
                    rows = [s["state"][pidx][key].to(flat) for s in mine]
                    v.copy_(torch.stack([r.T if kind == "w" else r[None] for r in rows]))
            buf[key] = flat
        self.opt.state[self.flat] = {"step": torch.as_tensor(float(step), dtype=torch.float32,
                                                             device=self.flat.device), **buf}
        for group in self.opt.param_groups:
            for key, val in mine[0]["param_groups"][0].items():
                if key not in ("params", "lr", "fused", "foreach"):
                    group[key] = val


def _compiled_fb(shards: list[_Shard]):
    """torch.compile'd forward/backward, warmed up here (once per chunk size, before threads
    call it), or None when compilation is unavailable."""
    try:
        fb = torch.compile(_forward_backward, dynamic=False)
        seen = set()
        for sh in shards:
            for ws, bs, gws, gbs, inp, eps in sh.chunks:
                if inp.shape[0] in seen:
                    continue
                seen.add(inp.shape[0])
                fb(ws, bs, [torch.empty_like(g) for g in gws], [torch.empty_like(g) for g in gbs],
                   torch.zeros_like(inp), torch.zeros_like(eps))
        return fb
    except Exception as exc:  # no C++ compiler, unsupported platform, ...: stay eager
        warnings.warn(f"torch.compile unavailable ({type(exc).__name__}: {exc}); "
                      "training eagerly", RuntimeWarning, stacklevel=3)
        return None


def train_dsm_batched(nets: BatchedMLP | Sequence[MLPNet], datas: Sequence[Tensor] | Tensor,
                      process, cfg: TrainConfig | None = None, seeds: Sequence[int] | None = None,
                      *, optimizer_states: Sequence[dict] | None = None, device="cpu",
                      threads: int | None = None, chunk: int | None = None,
                      compile: bool = False, native: bool = True,
                      products: Products | None = None,
                      nan_check: bool = True) -> list[TrainResult]:
    """:func:`~collapselab.scores.training.train_dsm` for K chains at once (DSM).

    Minimises, for every chain k separately, E‖ε_θk(X_t, t) − ε‖² over its own data set
    ``datas[k]`` (all of shape (n, *event)), with t ~ U[t_min, t_max] (denoising score matching
    with weight var(t); module docstring of scores/training.py).

    nets: a :class:`BatchedMLP` (trained in place) or K :class:`MLPNet` s (their weights are
        trained in place, as train_dsm does, and returned as ``TrainResult.net``).
    seeds: chain k draws exactly what ``train_dsm(net_k, datas[k], process,
        replace(cfg, seed=seeds[k]))`` draws (default: cfg.seed for every chain).
    optimizer_states: per-chain Adam state dicts of train_dsm (``TrainResult.optimizer_state``)
        to resume from; all chains must be at the same Adam step.
    threads: on CPU, the chains are split into this many shards, one per thread, each running
        whole steps with one intra-op thread (default: ``torch.get_num_threads()``, at most K).
        While more than one shard runs, torch's intra-op thread count is 1 (restored on exit).
    chunk: chains per forward/backward call inside a shard (default: 1 on CPU, where a
        chain's activations then stay in cache, measured faster; K on accelerators). Sampling,
        clipping, Adam and the EMA always run over the whole shard at once.
    compile: run the forward/backward through ``torch.compile`` (falls back to eager with a
        warning where compilation fails). It costs a compilation once per process and shape
        and saves a part of each step on CPU: worth it for long runs or many generations only.
    native: on CPU in float32 (chunk = 1), use the kernels of :mod:`collapselab.fast.native`
        (fused SiLU/bias passes, the narrow output layer, the optimizer pass and, through
        :mod:`collapselab.fast.gemm`, the GEMM) where they compile and pass their self-test (else,
        and with False, the PyTorch ops and a library's products; results agree to float
        rounding).
    products: the CPU float32 step's matrix products (chunk = 1): default
        :func:`collapselab.fast.gemm.load` (oneDNN where PyTorch has it, else ``torch.mm``);
        ``collapselab.fast.gemm.Products()`` forces ``torch.mm``. Results agree to float rounding.

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
    if optimizer_states is not None and len(optimizer_states) != K:
        raise ValueError(f"need {K} optimizer states, got {len(optimizer_states)}")
    dtype = model.weights[0].dtype
    data = _as_stack(datas).to(device=device, dtype=dtype)
    if data.shape[0] != K:
        raise ValueError(f"need {K} data sets, got {data.shape[0]}")
    n = data.shape[1]
    if n < 1:
        raise ValueError("no training data")
    event = tuple(data.shape[2:])
    if math.prod(event) != model.dim:
        raise ValueError(f"data has event shape {event}, the nets expect {model.dim} features")

    # Per-chain random streams, seeded and consumed exactly as train_dsm consumes them.
    chain_seeds = [[seed_from(g) for _ in range(4)]  # split, loop, dropout, validation
                   for g in (torch.Generator().manual_seed(s) for s in seeds)]
    plan = run_plan(cfg, n, process)
    n_val, bsz, total = plan.n_val, plan.batch_size, plan.total
    t_min, t_max, eval_every, do_val = cfg.t_min, plan.t_max, plan.eval_every, plan.do_val
    n_train = n - n_val
    perms = [torch.randperm(n, generator=torch.Generator().manual_seed(cs[0])).to(device)
             for cs in chain_seeds]
    train_x = torch.stack([data[k][perms[k][n_val:]] for k in range(K)])
    val_x = torch.stack([data[k][perms[k][:n_val]] for k in range(K)])
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
    layout = _Flat(params)
    raw_flat = layout.pack(params)  # the run's weights; copied back into ``model`` at the end
    ema_flat = raw_flat.clone()
    raw_p, ema_p = layout.views(raw_flat), layout.views(ema_flat)
    n_threads = torch.get_num_threads() if threads is None else int(threads)
    n_shards = max(1, min(K, n_threads)) if device.type == "cpu" else 1
    loop_seeds = [cs[1] for cs in chain_seeds]
    if chunk is None:
        chunk = 1 if device.type == "cpu" else K
    shards = [_Shard(lo, hi, layout, raw_flat, ema_flat, cfg, device, loop_seeds, train_x, bsz,
                     event, len(model.weights), model.dim, model.time_embed_dim, chunk,
                     native, products)
              for lo, hi in _bounds(K, n_shards)]
    if optimizer_states is not None and all(s["state"] for s in optimizer_states):
        steps_seen = {float(s["state"][0]["step"]) for s in optimizer_states}
        if len(steps_seen) > 1:
            raise ValueError(f"chains are at different Adam steps {sorted(steps_seen)}; "
                             "batched training needs one step count")
        for sh in shards:
            sh.load_adam(optimizer_states)
    owner = {k: sh for sh in shards for k in range(sh.lo, sh.hi)}

    hist = torch.empty(total, K, device=device)
    check_every = 1 if device.type == "cpu" else 25
    active = [True] * K
    frozen: list[dict | None] = [None] * K  # state of a chain that stopped early
    val_history: list[list[tuple[int, float]]] = [[] for _ in range(K)]
    best = [math.inf] * K
    best_step: list[int | None] = [None] * K
    bad = [0] * K
    best_state: list[list[Tensor] | None] = [None] * K

    def check(upto: int):
        lo = upto - 1 if check_every == 1 else 0
        block = hist[lo:upto]
        if bool(torch.isfinite(block).all()):
            return
        for k in range(K):
            if not active[k]:
                continue
            bad_idx = (~torch.isfinite(block[:, k])).nonzero()
            if bad_idx.numel():
                i = lo + int(bad_idx[0])
                err = TrainingDivergedError(i + 1, float(hist[i, k]))
                err.chain = k
                raise err

    prev_threads = torch.get_num_threads()
    pool = None
    if n_shards > 1:
        torch.set_num_threads(1)
        pool = ThreadPoolExecutor(n_shards - 1, initializer=torch.set_num_threads,
                                  initargs=(1,))
    step = 0
    try:
        fb = _compiled_fb(shards) if compile else None
        fb = fb or _forward_backward
        pos = n_train
        with torch.no_grad():
            for step in range(1, total + 1):
                new_epoch = pos + bsz > n_train
                if new_epoch:
                    pos = 0
                lr = lr_at(step, total, cfg)
                d = min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_warmup \
                    else cfg.ema_decay
                check_now = nan_check and step % check_every == 0 and check_every == 1
                args = (model, process, fb, new_epoch, pos, t_min, t_max, lr, d, cfg.grad_clip,
                        check_now, active)
                futs = [pool.submit(sh.step, *args) for sh in shards[1:]] if pool else []
                losses = [shards[0].step(*args)] + [f.result() for f in futs]
                pos += bsz
                hist[step - 1] = torch.cat(losses)
                if nan_check and step % check_every == 0:
                    check(step)

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
                                frozen[k] = {"step": step,
                                             "raw": [p[k].clone() for p in raw_p],
                                             "ema": [p[k].clone() for p in ema_p],
                                             "adam": owner[k].adam_rows(k)}
                    if not any(active):
                        break
        if nan_check and check_every > 1:
            check(step)
    finally:
        if pool is not None:
            pool.shutdown()
            torch.set_num_threads(prev_threads)
        with torch.no_grad():  # the model holds the trained weights, also after an error
            for p, v in zip(params, raw_p, strict=True):
                p.copy_(v)

    results = []
    lr_final = lr_at(step, total, cfg)
    for k in range(K):
        snap = frozen[k]
        steps_k = step if snap is None else snap["step"]
        if snap is not None:  # put the frozen raw weights back into the batched model
            with torch.no_grad():
                for p, r in zip(params, snap["raw"], strict=True):
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
        adam = owner[k].adam_rows(k) if snap is None else snap["adam"]
        lr_k = lr_final if snap is None else lr_at(steps_k, total, cfg)
        results.append(TrainResult(
            net=net, ema_net=ema_net, loss_history=hist[:steps_k, k].tolist(),
            val_history=val_history[k], best_val_loss=best[k] if do_val else math.nan,
            best_step=best_step[k], steps=steps_k, stopped_early=snap is not None,
            optimizer_state=_chain_opt_state(net, cfg, adam, lr_k),
            config=replace(cfg, seed=seeds[k])))
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


def _per_linear(rows: list[Tensor]) -> list[Tensor]:
    """One chain's weights-then-biases rows ((in, out), (1, out)) in MLPNet's parameter order
    (weight (out, in), bias (out,) per layer)."""
    nw = len(rows) // 2
    out = []
    for w, b in zip(rows[:nw], rows[nw:], strict=True):
        out += [w.T.contiguous(), b[0].clone()]
    return out


def _chain_opt_state(net: MLPNet, cfg: TrainConfig, adam, lr: float) -> dict:
    """Chain k's Adam state in the format train_dsm's optimizer produces for an MLPNet."""
    chain_opt = make_optimizer(net.parameters(), cfg, next(net.parameters()).device)
    if adam is not None:
        m, v, step = adam
        ms, vs = _per_linear(m), _per_linear(v)
        for p, mi, vi in zip(net.parameters(), ms, vs, strict=True):
            chain_opt.state[p] = {"step": step.clone(), "exp_avg": mi, "exp_avg_sq": vi}
    for group in chain_opt.param_groups:
        group["lr"] = lr
    return chain_opt.state_dict()
