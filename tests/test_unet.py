"""U-Net ε-network (scores/unet.py): shapes, time conditioning, attention, dropout."""

from __future__ import annotations

import pytest
import torch

from collapselab.scores.unet import SelfAttention, UNet

torch.set_num_threads(1)


def small_unet(channels=1, mults=(1, 2), **kw) -> UNet:
    torch.manual_seed(0)
    return UNet(channels, base_channels=8, channel_mults=mults, groups=4, **kw)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [8, 14, 28, 32])
def test_output_shape_equals_input_shape(size, channels):
    net = small_unet(channels).eval()
    x = torch.randn(2, channels, size, size)
    out = net(x, torch.tensor([0.1, 0.7]))
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("size", [7, 14, 15, 28])
def test_odd_sizes_through_three_levels(size):
    # 14 → 7 → 4 and 15 → 8 → 4: up-sampling must land on each skip's exact size.
    net = small_unet(1, mults=(1, 2, 2), num_res_blocks=2).eval()
    x = torch.randn(2, 1, size, size)
    assert net(x, 0.5).shape == x.shape


def test_non_square_input():
    net = small_unet(1).eval()
    x = torch.randn(2, 1, 10, 7)
    assert net(x, 0.5).shape == x.shape


def test_time_conditioning_matters():
    net = small_unet(1).eval()
    x = torch.randn(1, 1, 8, 8).expand(3, 1, 8, 8)
    out = net(x, torch.tensor([0.01, 0.5, 0.99]))
    assert (out[0] - out[1]).abs().max() > 1e-4
    assert (out[1] - out[2]).abs().max() > 1e-4
    # a float t means the same time for every sample
    torch.testing.assert_close(net(x, 0.5), net(x, torch.full((3,), 0.5)))


@pytest.mark.parametrize("levels", [(0,), (1,), (0, 1)])
def test_attention_levels(levels):
    net = small_unet(3, attention_levels=levels, heads=2).eval()
    n_attn = sum(isinstance(m, SelfAttention) for m in net.modules())
    # per level: num_res_blocks down + (num_res_blocks + 1) up; plus the middle at the deepest
    assert n_attn == 3 * len(levels) + (1 in levels)
    x = torch.randn(2, 3, 14, 14)
    out = net(x, 0.3)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # attention mixes positions: a change at one pixel moves outputs far away from it
    x2 = x.clone()
    x2[:, :, 0, 0] += 1.0
    assert (net(x2, 0.3) - out)[:, :, -1, -1].abs().max() > 0


def test_self_attention_is_permutation_equivariant():
    # Attention has no positional terms: permuting pixels permutes the output the same way.
    torch.manual_seed(0)
    attn = SelfAttention(8, groups=4, heads=2)
    x = torch.randn(2, 8, 4, 4)
    perm = torch.randperm(16)
    xp = x.reshape(2, 8, 16)[:, :, perm].reshape(2, 8, 4, 4)
    torch.testing.assert_close(attn(xp).reshape(2, 8, 16), attn(x).reshape(2, 8, 16)[:, :, perm])


def test_dropout_off_in_eval_mode():
    net = small_unet(1, dropout=0.5)
    x = torch.randn(4, 1, 8, 8)
    net.eval()
    torch.testing.assert_close(net(x, 0.4), net(x, 0.4), rtol=0, atol=0)
    net.train()
    assert not torch.equal(net(x, 0.4), net(x, 0.4))


def test_bad_arguments():
    with pytest.raises(ValueError, match="attention_levels"):
        UNet(1, channel_mults=(1, 2), attention_levels=(2,))
    with pytest.raises(ValueError, match=r"\(n, C, H, W\)"):
        UNet(1)(torch.randn(2, 64), 0.5)


def test_odd_base_channels_still_normalise():
    # groups is reduced to gcd(groups, channels) so any width works.
    net = UNet(1, base_channels=12, channel_mults=(1, 2), groups=8).eval()
    assert net(torch.randn(2, 1, 8, 8), 0.2).shape == (2, 1, 8, 8)
