"""ε-prediction U-Net for image experiments (docs/paper.md §5: residual blocks, GroupNorm, SiLU,
sinusoidal time embedding, dropout 0.1).

DDPM-style architecture (Ho et al. 2020) sized for small images. Down-sampling is a stride-2
3×3 convolution (output size ⌈H/2⌉, so 7 → 4 is fine) and up-sampling is nearest-neighbour
interpolation *to the exact size of the matching skip* followed by a 3×3 convolution, so any
input size works (8×8 digits, 14×14, 28×28 Fashion-MNIST, 32×32 CIFAR-10, odd sizes).
Time conditioning is on t itself, see :mod:`collapselab.scores.mlp`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mlp import embedding_freqs, sinusoidal_embedding, time_vector


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    # Largest group count dividing the width: any base_channels works with the default groups=8.
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm–SiLU–conv, + time projection, GroupNorm–SiLU–dropout–conv, residual skip."""

    def __init__(self, cin: int, cout: int, temb: int, dropout: float, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H·W positions, pre-GroupNorm, residual."""

    def __init__(self, channels: int, groups: int, heads: int = 1):
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels {channels} not divisible by heads {heads}")
        self.heads = heads
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2),
                                             v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(n, c, h, w))


class UNet(nn.Module):
    """ε-prediction U-Net: ``UNet(...)(x, t)`` with x of shape (n, C, H, W), t float or (n,).

    Level i works at resolution ⌈H/2^i⌉ with ``base_channels·channel_mults[i]`` channels and
    ``num_res_blocks`` residual blocks (plus one more on the way up, as in DDPM); self-attention
    follows every block of the levels listed in ``attention_levels`` (the middle block gets one
    when the deepest level is listed). ``time_embed_dim`` defaults to 4·base_channels: the
    sinusoidal features (base_channels wide) go through a 2-layer SiLU MLP and are injected into
    every residual block. Output shape = input shape.
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 32,
                 channel_mults: tuple[int, ...] = (1, 2), num_res_blocks: int = 1,
                 attention_levels: tuple[int, ...] = (), dropout: float = 0.1,
                 time_embed_dim: int | None = None, groups: int = 8, heads: int = 1,
                 time_scale: float = 1000.0):
        super().__init__()
        channel_mults, attention_levels = tuple(channel_mults), tuple(attention_levels)
        if not channel_mults or num_res_blocks < 1:
            raise ValueError("channel_mults must be non-empty and num_res_blocks >= 1")
        bad = [a for a in attention_levels if not 0 <= a < len(channel_mults)]
        if bad:
            raise ValueError(f"attention_levels {bad} outside 0..{len(channel_mults) - 1}")
        temb = time_embed_dim or 4 * base_channels
        self.config = dict(in_channels=in_channels, base_channels=base_channels,
                           channel_mults=list(channel_mults), num_res_blocks=num_res_blocks,
                           attention_levels=list(attention_levels), dropout=dropout,
                           time_embed_dim=temb, groups=groups, heads=heads,
                           time_scale=time_scale)
        self.base_channels, self.time_scale = base_channels, time_scale
        self.register_buffer("freqs", embedding_freqs(base_channels, time_scale), False)
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, temb), nn.SiLU(),
                                      nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def block(cin, cout):
            return ResBlock(cin, cout, temb, dropout, groups)

        def attn(c, level):
            return SelfAttention(c, groups, heads) if level in attention_levels else nn.Identity()

        nlev = len(channel_mults)
        self.down_blocks, self.down_attn, self.downsample = nn.ModuleList(), nn.ModuleList(), \
            nn.ModuleList()
        skips, ch = [base_channels], base_channels
        for lvl, mult in enumerate(channel_mults):
            cout = base_channels * mult
            for _ in range(num_res_blocks):
                self.down_blocks.append(block(ch, cout))
                self.down_attn.append(attn(cout, lvl))
                ch = cout
                skips.append(ch)
            if lvl < nlev - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid1, self.mid_attn, self.mid2 = block(ch, ch), attn(ch, nlev - 1), block(ch, ch)
        self.up_blocks, self.up_attn, self.upsample = nn.ModuleList(), nn.ModuleList(), \
            nn.ModuleList()
        for lvl in reversed(range(nlev)):
            cout = base_channels * channel_mults[lvl]
            for _ in range(num_res_blocks + 1):
                self.up_blocks.append(block(ch + skips.pop(), cout))
                self.up_attn.append(attn(cout, lvl))
                ch = cout
            if lvl > 0:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.norm_out = _norm(ch, groups)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        self._nlev, self._nres = nlev, num_res_blocks

    def forward(self, x: Tensor, t) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"UNet expects (n, C, H, W) input, got shape {tuple(x.shape)}")
        tv = time_vector(t, x.shape[0], x)
        emb = self.time_mlp(sinusoidal_embedding(tv, self.base_channels, freqs=self.freqs))
        h = self.conv_in(x)
        hs = [h]
        b = 0
        for lvl in range(self._nlev):
            for _ in range(self._nres):
                h = self.down_attn[b](self.down_blocks[b](h, emb))
                hs.append(h)
                b += 1
            if lvl < self._nlev - 1:
                h = self.downsample[lvl](h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        b = u = 0
        for lvl in reversed(range(self._nlev)):
            for _ in range(self._nres + 1):
                h = self.up_attn[b](self.up_blocks[b](torch.cat([h, hs.pop()], dim=1), emb))
                b += 1
            if lvl > 0:
                # Interpolate to the skip's exact size: handles odd sizes (7 → 4 → 7).
                h = F.interpolate(h, size=hs[-1].shape[-2:], mode="nearest")
                h = self.upsample[u](h)
                u += 1
        return self.conv_out(F.silu(self.norm_out(h)))
