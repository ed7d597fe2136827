"""score.train_backend: native routes MLP fits through collapselab.fast's trainer (registered
when the package is imported), and agrees with the default trainer within float32 rounding."""

import torch

import collapselab.fast.batched as batched_mod
from collapselab.config import load_config
from collapselab.processes import OU
from collapselab.scores import neural

SETS = ["score.kind=mlp", "score.hidden=32", "score.layers=2", "score.train_steps=40",
        "score.batch_size=64"]


def test_native_backend_is_used_and_agrees_with_the_default(monkeypatch):
    monkeypatch.delenv("COLLAPSELAB_TRAIN_BACKEND", raising=False)
    default = load_config("quickstart", SETS).score
    native = load_config("quickstart", [*SETS, "score.train_backend=native"]).score
    assert "native" in neural.TRAIN_BACKENDS
    calls = []
    real = neural.TRAIN_BACKENDS["native"]

    def counting(*args, **kwargs):
        calls.append(len(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setitem(neural.TRAIN_BACKENDS, "native", counting)
    g = torch.Generator().manual_seed(0)
    datas = [torch.randn(200, 2, generator=g) for _ in range(3)]
    kw = dict(generation=0, t_min=0.02)
    want = neural.fit_neural_batched(default, OU(T=4.0), datas, seeds=[1, 2, 3], **kw)
    got = neural.fit_neural_batched(native, OU(T=4.0), datas, seeds=[1, 2, 3], **kw)
    one = neural.fit_neural(native, OU(T=4.0), datas[0], seed=1, **kw)
    assert calls == [3, 1]
    assert batched_mod.train_dsm_batched is real
    # 40 steps of float32 rounding differences (the hand-written backward sums in another
    # order): the tolerance of tests/fast/test_batched.py for whole runs.
    for (_, a), (_, b) in zip(want, got, strict=True):
        for x, y in zip(a.ema_net.state_dict().values(), b.ema_net.state_dict().values(),
                        strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=2e-5)
        torch.testing.assert_close(torch.tensor(a.loss_history), torch.tensor(b.loss_history),
                                   rtol=0, atol=2e-5)
    for x, y in zip(one[1].ema_net.state_dict().values(),
                    got[0][1].ema_net.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=2e-5)
