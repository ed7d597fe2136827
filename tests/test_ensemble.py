"""The default trainer of K MLP chains (vmap over stacked parameters, one fused Adam) against K
sequential train_dsm fits: the same draws and per-chain arithmetic, so the same results (exactly
here; in general up to float rounding), early stopping and the optimizer state included."""

from dataclasses import replace

import pytest
import torch

from collapselab.processes import OU
from collapselab.scores.ensemble import train_dsm_ensemble
from collapselab.scores.mlp import MLPNet
from collapselab.scores.training import TrainConfig, TrainingDivergedError, train_dsm

PROCESS = OU(T=4.0)


def nets(K):
    out = []
    for k in range(K):
        torch.manual_seed(k)
        out.append(MLPNet(2, hidden=32, layers=2))
    return out


@pytest.mark.parametrize("cfg", [
    TrainConfig(steps=60, batch_size=64, optimizer="adamw", weight_decay=1e-4,
                schedule="cosine"),
    # early stopping that stops the chains at different steps (30, 15 and 30)
    TrainConfig(steps=120, batch_size=64, val_fraction=0.2, patience=1, eval_every=3, lr=3e-2,
                optimizer="adamw", weight_decay=1e-4, schedule="cosine"),
])
def test_ensemble_equals_sequential_fits(cfg):
    K = 3
    datas = [torch.randn(300, 2, generator=torch.Generator().manual_seed(k)) + k
             for k in range(K)]
    seq = [train_dsm(n, d, PROCESS, replace(cfg, seed=10 + k))
           for k, (n, d) in enumerate(zip(nets(K), datas, strict=True))]
    ens = train_dsm_ensemble(nets(K), datas, PROCESS, cfg, seeds=[10 + k for k in range(K)])
    if cfg.patience:
        assert len({r.steps for r in ens}) > 1  # the chains stopped at different steps
    for a, b in zip(seq, ens, strict=True):
        assert (a.steps, a.best_step, a.stopped_early) == (b.steps, b.best_step, b.stopped_early)
        assert a.loss_history == b.loss_history and a.val_history == b.val_history
        assert a.config == b.config
        for x, y in zip(a.ema_net.state_dict().values(), b.ema_net.state_dict().values(),
                        strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        for x, y in zip(a.net.parameters(), b.net.parameters(), strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        sa, sb = a.optimizer_state, b.optimizer_state
        assert sa["param_groups"][0]["lr"] == sb["param_groups"][0]["lr"]
        for i, st in sa["state"].items():
            for key, v in st.items():
                torch.testing.assert_close(v, sb["state"][i][key], rtol=0, atol=0)


def test_a_diverged_chain_is_named():
    datas = [torch.randn(100, 2), torch.full((100, 2), float("nan"))]
    with pytest.raises(TrainingDivergedError) as err:
        train_dsm_ensemble(nets(2), datas, PROCESS, TrainConfig(steps=5, batch_size=32),
                           seeds=[0, 1])
    assert err.value.chain == 1 and err.value.step == 1


def test_wide_nets_train_as_sequential_fits(monkeypatch):
    """Above ENSEMBLE_MAX_HIDDEN the default backend fits the chains one after another with
    train_dsm: each chain is exactly fit_neural's."""
    from collapselab.config import ScoreConfig
    from collapselab.scores import neural

    def refuse(*args, **kwargs):
        raise AssertionError("the ensemble must not train wide nets")

    monkeypatch.setattr(neural, "train_dsm_ensemble", refuse)
    cfg = ScoreConfig(kind="mlp", hidden=neural.ENSEMBLE_MAX_HIDDEN + 16, layers=1,
                      train_steps=3, batch_size=32, train_backend="torch")
    datas = [torch.randn(64, 2, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    got = neural.fit_neural_batched(cfg, PROCESS, datas, generation=0, seeds=[4, 5], t_min=0.02)
    for k, (_, res) in enumerate(got):
        _, want = neural.fit_neural(cfg, PROCESS, datas[k], generation=0, seed=4 + k, t_min=0.02)
        assert res.loss_history == want.loss_history
        for x, y in zip(res.ema_net.parameters(), want.ema_net.parameters(), strict=True):
            assert torch.equal(x, y)
