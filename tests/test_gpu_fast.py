"""score.gpu_fast (scores/gpu_fast.py): CUDA-only speed-ups of the DSM step.

On CPU they must change no number; forced on CPU (bf16 autocast and channels-last, which CPU
PyTorch also runs) the step computes the same loss to bf16 rounding, so the code path works.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _cli import cli

from collapselab.config import load_config
from collapselab.errors import ConfigError
from collapselab.processes import VPProcess
from collapselab.scores.gpu_fast import GpuFast, fast_forward, parse_gpu_fast
from collapselab.scores.training import TrainConfig, train_dsm
from collapselab.scores.unet import UNet

ALL = GpuFast(bf16=True, channels_last=True, compile=True, cuda_graphs=True)


def small_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                attention_levels=(), dropout=0.1)


def test_options_change_nothing_on_cpu():
    data = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=6, batch_size=16, lr=1e-3, seed=3)
    proc = VPProcess(beta_min=0.1, beta_max=20.0, T=1.0)
    net = small_unet()
    a = train_dsm(copy.deepcopy(net), data, proc, cfg)
    b = train_dsm(copy.deepcopy(net), data, proc, cfg, fast=ALL)
    assert a.loss_history == b.loss_history
    for p, q in zip(a.ema_net.state_dict().values(), b.ema_net.state_dict().values(),
                    strict=True):
        assert torch.equal(p, q)
    assert all(p.is_contiguous() for p in b.net.parameters())  # no channels-last on CPU


def test_forced_bf16_channels_last_matches_fp32_to_bf16_rounding():
    net = small_unet().eval()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.rand(16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = net(x, t)
        fwd = fast_forward(copy.deepcopy(net), GpuFast(bf16=True, channels_last=True),
                           torch.device("cpu"), force=True)
        out = fwd(x, t)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert not torch.equal(out, ref)  # bf16 did run
    # bf16 keeps 8 bits of mantissa: a few 2^-8 relative through a handful of layers.
    assert ((out - ref).norm() / ref.norm()).item() < 5e-2


def test_parse_gpu_fast():
    assert parse_gpu_fast(False) == GpuFast() and parse_gpu_fast(None) == GpuFast()
    assert parse_gpu_fast(True) == ALL
    assert parse_gpu_fast(["bf16", "compile"]) == GpuFast(bf16=True, compile=True)
    with pytest.raises(ConfigError, match="score.gpu_fast"):
        parse_gpu_fast(["fp8"])
    with pytest.raises(ConfigError, match="score.gpu_fast"):
        parse_gpu_fast("bf16")


def test_config_key():
    assert load_config("fashion-mnist").score.gpu_fast is False
    cfg = load_config("fashion-mnist", ["score.gpu_fast=[bf16, cuda_graphs]"])
    assert cfg.score.gpu_fast == ["bf16", "cuda_graphs"]
    with pytest.raises(ConfigError, match="score.gpu_fast"):
        load_config("fashion-mnist", ["score.gpu_fast=[fp8]"])


def test_bad_value_exits_2_with_one_line(tmp_path):
    out = tmp_path / "run"
    r = cli("run", "quickstart", "--out", str(out), "--set", "score.gpu_fast=[fp8]")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "score.gpu_fast" in lines[0] and "bf16" in lines[0]
    assert not out.exists()


@pytest.mark.slow
def test_forced_compile_and_graph_mode_match_eager_on_cpu():
    """torch.compile (inductor on CPU; reduce-overhead records no CUDA graph there) gives the
    eager loss and gradients to float32 rounding: the compiled step trains the same network."""
    net = small_unet().eval()  # eval: dropout off, so eager and compiled draw nothing
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.rand(8, generator=torch.Generator().manual_seed(2))
    ref_net = copy.deepcopy(net)
    ref = ref_net(x, t).square().mean()
    ref.backward()
    fwd = fast_forward(net, GpuFast(compile=True, cuda_graphs=True), torch.device("cpu"),
                       force=True)
    for _ in range(2):  # the second call replays what the first compiled
        net.zero_grad()
        loss = fwd(x, t).square().mean()
        loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for p, q in zip(net.parameters(), ref_net.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
