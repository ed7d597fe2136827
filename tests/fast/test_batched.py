"""Batched chains (collapselab.fast.batched): K MLPs in one step equal K unbatched ones.

Tolerances (float32 throughout). A batched matmul sums in another order than a single one, so
results agree to rounding, not bit for bit:
- forward outputs and one step's gradients: 1e-5 relative (+1e-6 absolute; ~100 float32 ulps);
- a whole run (≤ 80 steps, Adam, clipping, EMA, validation): loss histories and weights within
  2e-5 absolute. The random streams (minibatches, t, ε, splits) are identical by construction,
  so the only source of difference is that rounding; a run that drew different batches would
  differ by O(1e-1) in the loss history.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import replace

import pytest
import torch

import collapselab.fast.batched as batched_mod
from collapselab.fast import gemm
from collapselab.fast.batched import BatchedMLP, _forward_backward, train_dsm_batched
from collapselab.processes import OU, VPProcess
from collapselab.scores.mlp import MLPNet, NeuralScore
from collapselab.scores.training import TrainConfig, TrainingDivergedError, train_dsm

RTOL, ATOL = 1e-5, 1e-6
RUN_ATOL = 2e-5
K, D = 3, 2


def make_nets(k=K, dim=D, seed=0, **kw):
    torch.manual_seed(seed)
    return [MLPNet(dim, hidden=32, layers=3, time_embed_dim=16, **kw) for _ in range(k)]


def make_data(k=K, n=300, dim=D, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=g) * (1 + i) + i for i in range(k)]


def assert_nets_close(a: torch.nn.Module, b: torch.nn.Module, atol: float):
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb
        torch.testing.assert_close(pa, pb, rtol=0, atol=atol, msg=na)


def test_round_trip_is_exact():
    nets = make_nets()
    bm = BatchedMLP.from_nets(nets)
    assert bm.K == K and bm.weights[0].shape == (K, D + 16, 32)
    for net, back in zip(nets, bm.to_nets(), strict=True):
        for (n1, p1), (n2, p2) in zip(net.state_dict().items(), back.state_dict().items(),
                                      strict=True):
            assert n1 == n2 and torch.equal(p1, p2)
    bm2 = BatchedMLP(K, D, hidden=32, layers=3, time_embed_dim=16).load_nets_(nets)
    for p, q in zip(bm.flat_params(), bm2.flat_params(), strict=True):
        assert torch.equal(p, q)


def test_from_nets_rejects_mixed_architectures():
    with pytest.raises(ValueError, match="config"):
        BatchedMLP.from_nets([MLPNet(2, hidden=32), MLPNet(2, hidden=16)])


@pytest.mark.parametrize("tkind", ["per_chain", "shared", "float"])
def test_forward_equals_per_net(tkind):
    nets = make_nets(dim=6)
    bm = BatchedMLP.from_nets(nets)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(K, 50, 2, 3, generator=g)  # event shape (2, 3), flattened to 6
    t = {"per_chain": torch.rand(K, 50, generator=g) * 4,
         "shared": torch.rand(50, generator=g) * 4, "float": 0.7}[tkind]
    out = bm(x, t)
    assert out.shape == x.shape
    for k, net in enumerate(nets):
        tk = t[k] if tkind == "per_chain" else t
        torch.testing.assert_close(out[k], net(x[k], tk), rtol=RTOL, atol=ATOL)


def test_one_step_equals_unbatched_steps():
    """Hand-written forward/backward + fused Adam on stacked weights == autograd + Adam per
    net, from identical weights and identical (x_t, t, ε)."""
    nets = make_nets()
    bm = BatchedMLP.from_nets(nets)
    g = torch.Generator().manual_seed(3)
    xt, t, eps = (torch.randn(K, 64, D, generator=g), torch.rand(K, 64, generator=g) * 4,
                  torch.randn(K, 64, D, generator=g))
    params = bm.flat_params()
    grads = [torch.zeros_like(p) for p in params]
    for p, gr in zip(params, grads, strict=True):
        p.grad = gr
    nw = len(bm.weights)
    raw = [p.detach() for p in params]
    with torch.no_grad():
        loss = _forward_backward(raw[:nw], raw[nw:], grads[:nw], grads[nw:], bm.embed(xt, t),
                                 eps)
    opt = torch.optim.Adam(params, lr=1e-2, fused=True)
    opt.step()
    opt.step()  # a second step with the same gradients exercises the moments
    for k, net in enumerate(nets):
        lk = (net(xt[k], t[k]) - eps[k]).square().flatten(1).sum(1).mean()
        torch.testing.assert_close(loss[k], lk.detach(), rtol=RTOL, atol=ATOL)
        net.zero_grad()
        lk.backward()
        linears = [m for m in net.mlp if isinstance(m, torch.nn.Linear)]
        for li, lin in enumerate(linears):
            torch.testing.assert_close(grads[li][k], lin.weight.grad.T, rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(grads[nw + li][k, 0], lin.bias.grad, rtol=RTOL,
                                       atol=ATOL)
        o = torch.optim.Adam(net.parameters(), lr=1e-2, fused=True)
        o.step()
        o.step()
        assert_nets_close(bm.chain_net(k), net, atol=1e-5)


def products(kind):
    """The products of the step: the default choice (None), torch.mm, or oneDNN (which with
    the native kernels takes the dense-transpose path)."""
    if kind is None:
        return None
    if kind == "mm":
        return gemm.Products()
    lib, why = gemm._library()
    if not isinstance(lib, gemm.OneDNNProducts):
        pytest.skip(f"oneDNN unavailable here: {why}")
    return lib


@pytest.mark.parametrize("threads,chunk,native,dim,prod", [(1, None, True, D, None),
                                                            (2, None, True, D, None),
                                                            (1, K, True, D, None),
                                                            (1, None, False, D, None),
                                                            (1, None, True, 20, None),
                                                            (1, None, True, D, "mm"),
                                                            (1, None, False, 20, "mm"),
                                                            (1, None, True, D, "onednn"),
                                                            (1, None, True, 20, "onednn")])
def test_run_matches_train_dsm_per_chain(threads, chunk, native, dim, prod):
    """Same seeds ⇒ same minibatches, t and ε per chain; with validation, early stopping,
    clipping, AdamW and a cosine schedule, every chain matches its own train_dsm run. chunk = K
    is the accelerator's formulation (one bmm per layer over all chains), run here on CPU;
    native=False uses PyTorch's SiLU ops instead of collapselab.fast.native's fused kernels; at
    dim = 2 the native path computes the narrow output layer and the loss itself, at dim = 20
    (wider than the native output layer is used for) the products do. The products are
    collapselab.fast.gemm's choice (the native GEMM on AVX-512: then, at dim = 2, the one-call
    forward/backward), torch.mm's, or oneDNN's (with dense transposes from the native
    SiLU pass)."""
    nets = make_nets(dim=dim)
    datas = make_data(dim=dim)
    # patience 1 every 4 steps: chains 0 and 1 stop early (steps 32, 20), chain 2 runs to 80.
    cfg = TrainConfig(steps=80, batch_size=64, lr=1e-2, optimizer="adamw", weight_decay=1e-3,
                      schedule="cosine", warmup_steps=5, grad_clip=0.5, ema_decay=0.9,
                      val_fraction=0.2, eval_every=4, patience=1, val_repeats=2)
    seeds = [5, 17, 29]
    proc = VPProcess()
    refs = [train_dsm(copy.deepcopy(nets[k]), datas[k], proc, replace(cfg, seed=seeds[k]))
            for k in range(K)]
    given = [copy.deepcopy(n) for n in nets]
    res = train_dsm_batched(given, datas, proc, cfg, seeds, threads=threads, chunk=chunk,
                            native=native, products=products(prod))
    assert len(res) == K
    for k, (r, b) in enumerate(zip(refs, res, strict=True)):
        assert b.net is given[k]  # trained in place, like train_dsm
        assert (b.steps, b.stopped_early, b.best_step) == (r.steps, r.stopped_early, r.best_step)
        torch.testing.assert_close(torch.tensor(b.loss_history), torch.tensor(r.loss_history),
                                   rtol=0, atol=RUN_ATOL)
        assert [s for s, _ in b.val_history] == [s for s, _ in r.val_history]
        torch.testing.assert_close(torch.tensor([v for _, v in b.val_history]),
                                   torch.tensor([v for _, v in r.val_history]), rtol=0,
                                   atol=RUN_ATOL)
        assert_nets_close(b.net, r.net, RUN_ATOL)
        assert_nets_close(b.ema_net, r.ema_net, RUN_ATOL)
        so, sb = r.optimizer_state, b.optimizer_state
        assert so["param_groups"][0]["lr"] == pytest.approx(sb["param_groups"][0]["lr"])
        for i in so["state"]:
            assert float(so["state"][i]["step"]) == float(sb["state"][i]["step"])
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(sb["state"][i][key], so["state"][i][key], rtol=1e-3,
                                           atol=1e-7)
        assert b.config.seed == seeds[k]
    # Some chains stopped early and one did not: frozen chains really are frozen (this data
    # at dim = 2; at dim = 20 all three run to the end).
    assert [r.stopped_early for r in res] == ([True, True, False] if dim == D else [False] * K)
    assert isinstance(res[0].score(proc), NeuralScore)


@pytest.mark.parametrize("native,threads,prod", [(True, 1, None), (False, 1, None),
                                                 (True, 2, None), (True, 1, "mm"),
                                                 (True, 1, "onednn")])
def test_a_chain_does_not_depend_on_its_companions(native, threads, prod):
    """A chain trained beside others gives the same bits as the same chain trained alone (what
    the local executor does), with clipping and AdamW: the flat state's rows are padded to
    whole vectors (P = 2,786 parameters here, not a multiple of 16), so the vectorised
    optimizer rounds every chain the same way whatever K and the shard split."""
    nets = make_nets()
    datas = make_data()
    assert batched_mod._Flat(BatchedMLP.from_nets(nets).flat_params()).P % 16 == 0
    cfg = TrainConfig(steps=40, batch_size=64, lr=1e-2, optimizer="adamw", weight_decay=1e-3,
                      grad_clip=0.5, ema_decay=0.9)
    prod = products(prod)
    together = train_dsm_batched([copy.deepcopy(n) for n in nets], datas, VPProcess(), cfg,
                                 [5, 17, 29], threads=threads, native=native, products=prod)
    for k, seed in enumerate([5, 17, 29]):
        (alone,) = train_dsm_batched([copy.deepcopy(nets[k])], [datas[k]], VPProcess(), cfg,
                                     [seed], threads=1, native=native, products=prod)
        assert alone.loss_history == together[k].loss_history
        for a, b in ((alone.net, together[k].net), (alone.ema_net, together[k].ema_net)):
            for p, q in zip(a.parameters(), b.parameters(), strict=True):
                assert torch.equal(p, q)


def test_adam_with_coupled_weight_decay_matches():
    """The shard calls the fused Adam kernel itself after step 1: plain Adam (L2 weight decay
    added to the gradient) must take the _fused_adam_ kernel, AdamW the _fused_adamw_ one."""
    nets, datas = make_nets(), make_data()
    cfg = TrainConfig(steps=40, batch_size=64, lr=1e-2, optimizer="adam", weight_decay=0.05)
    seeds = [3, 4, 5]
    proc = VPProcess()
    res = train_dsm_batched([copy.deepcopy(n) for n in nets], datas, proc, cfg, seeds, threads=1)
    for k in range(K):
        ref = train_dsm(copy.deepcopy(nets[k]), datas[k], proc, replace(cfg, seed=seeds[k]))
        assert_nets_close(res[k].net, ref.net, RUN_ATOL)


def test_resume_from_batched_optimizer_state():
    """A batched run's per-chain optimizer states resume both paths identically."""
    nets, datas, proc = make_nets(), make_data(), OU()
    cfg = TrainConfig(steps=20, batch_size=64, ema_decay=0.9)
    first = train_dsm_batched([copy.deepcopy(n) for n in nets], datas, proc, cfg, [1, 2, 3])
    starts = [copy.deepcopy(r.net) for r in first]
    cont_b = train_dsm_batched([copy.deepcopy(n) for n in starts], datas, proc,
                               replace(cfg, steps=15), [7, 8, 9],
                               optimizer_states=[r.optimizer_state for r in first])
    for k, r in enumerate(first):
        ref = train_dsm(starts[k], datas[k], proc, replace(cfg, steps=15, seed=7 + k),
                        optimizer_state=r.optimizer_state)
        torch.testing.assert_close(torch.tensor(cont_b[k].loss_history),
                                   torch.tensor(ref.loss_history), rtol=0, atol=RUN_ATOL)
        assert_nets_close(cont_b[k].net, ref.net, RUN_ATOL)
        assert float(cont_b[k].optimizer_state["state"][0]["step"]) == 35


def test_batched_module_and_stacked_data():
    nets = make_nets()
    bm = BatchedMLP.from_nets(nets)
    data = torch.stack(make_data())
    cfg = TrainConfig(steps=10, batch_size=32)
    res = train_dsm_batched(bm, data, OU(), cfg, [0, 1, 2])
    for k, r in enumerate(res):
        assert_nets_close(bm.chain_net(k), r.net, 0.0)  # the module holds the raw weights
        ref = train_dsm(copy.deepcopy(nets[k]), data[k], OU(), replace(cfg, seed=k))
        assert_nets_close(r.ema_net, ref.ema_net, RUN_ATOL)


def test_divergence_names_step_and_chain():
    datas = make_data()
    datas[1][5:] = float("nan")
    with pytest.raises(TrainingDivergedError) as info:
        train_dsm_batched(make_nets(), datas, OU(), TrainConfig(steps=5, batch_size=32),
                          [0, 1, 2])
    assert info.value.step == 1 and info.value.chain == 1


def test_input_validation():
    nets = make_nets()
    with pytest.raises(ValueError, match="seeds"):
        train_dsm_batched(nets, make_data(), OU(), TrainConfig(steps=1), [0, 1])
    with pytest.raises(ValueError, match="same shape"):
        train_dsm_batched(nets, make_data()[:2] + [torch.randn(10, D)], OU(),
                          TrainConfig(steps=1), [0, 1, 2])
    with pytest.raises(ValueError, match="features"):
        train_dsm_batched(nets, [torch.randn(20, 3)] * K, OU(), TrainConfig(steps=1), [0, 1, 2])


def test_compile_falls_back_to_eager(monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(batched_mod.torch, "compile", broken)
    nets, datas = make_nets(), make_data()
    cfg = TrainConfig(steps=5, batch_size=32)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = train_dsm_batched([copy.deepcopy(n) for n in nets], datas, OU(), cfg, [0, 1, 2],
                                compile=True)
    assert any("torch.compile unavailable" in str(x.message) for x in w)
    ref = train_dsm(copy.deepcopy(nets[0]), datas[0], OU(), replace(cfg, seed=0))
    assert_nets_close(res[0].net, ref.net, RUN_ATOL)
