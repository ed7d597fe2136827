"""Noise-predicting MLP and the wrapper that turns any ε-network into a score.

Parametrisation. A network ``net(x, t)`` predicts the noise ε of the forward marginal
X_t = scale(t)·x0 + √var(t)·ε. Since ∇ log p(x_t | x0) = −ε/√var(t), the minimiser of the
ε-prediction loss is ε⋆(x, t) = −√var(t)·∇ log q_t(x), hence the score
``s(x, t) = −net(x, t)/√var(t)`` (:class:`NeuralScore`).

Time conditioning. Networks are conditioned on the process time t itself (not on log-SNR):
the sinusoidal features are those of ``time_scale·t`` (DDPM's integer-step embedding with
``time_scale = 1000`` maps t ∈ [0, 1] to DDPM's 0…1000 steps; for the paper's OU with T = 4 the
angular frequencies 10⁻⁴…1 of ``1000·t`` still resolve t₀ = 0.02 and t = T). A network is
therefore tied to the process it was trained for, which is how the recursive loop uses it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def embedding_freqs(dim: int, time_scale: float = 1000.0, max_period: float = 10000.0) -> Tensor:
    """time_scale · max_period^(−k/half), k = 0…half−1 (half = dim // 2), float32."""
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32)
    return time_scale * torch.exp(-math.log(max_period) * k / max(half, 1))


def sinusoidal_embedding(t: Tensor, dim: int, time_scale: float = 1000.0,
                         max_period: float = 10000.0, freqs: Tensor | None = None) -> Tensor:
    """Transformer/DDPM sinusoidal features of ``time_scale·t``: shape (n,) → (n, dim).

    Half the features are cosines and half sines at angular frequencies
    max_period^(−k/half), k = 0…half−1; an odd ``dim`` gets one zero column. ``freqs``
    (from :func:`embedding_freqs`, already multiplied by time_scale) skips recomputing them.
    """
    if freqs is None:
        freqs = embedding_freqs(dim, time_scale, max_period).to(t.device)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=1)
    return emb.to(t.dtype) if t.is_floating_point() else emb


def time_vector(t, n: int, like: Tensor) -> Tensor:
    """Broadcast t (float, 0-d or (n,) tensor) to shape (n,) with ``like``'s dtype and device."""
    if isinstance(t, Tensor):
        t = t.to(device=like.device, dtype=like.dtype)
        if t.dim() == 0:
            return t.expand(n)
        if t.shape != (n,):
            raise ValueError(f"t must be a float or have shape ({n},), got {tuple(t.shape)}")
        return t
    return torch.full((n,), float(t), device=like.device, dtype=like.dtype)


class MLPNet(nn.Module):
    """ε-prediction MLP for data of any event shape (flattened to ``dim`` features).

    Input layer on [x, sinusoidal(t)] (``time_embed_dim`` features, see
    :func:`sinusoidal_embedding`), then ``layers`` SiLU layers of width ``hidden`` in all
    (the input layer counts as the first), then a linear read-out of size ``dim``. Feeding
    the raw sinusoidal features (no extra time MLP) keeps a step cheap on CPU; the first layer
    learns the time map. Input of shape (n, *event) with prod(event) = dim; output has the
    input's shape.
    """

    def __init__(self, dim: int, hidden: int = 128, layers: int = 3, time_embed_dim: int = 64,
                 time_scale: float = 1000.0):
        super().__init__()
        if dim < 1 or hidden < 1 or layers < 1 or time_embed_dim < 2:
            raise ValueError("dim, hidden, layers must be >= 1 and time_embed_dim >= 2")
        self.config = dict(dim=dim, hidden=hidden, layers=layers, time_embed_dim=time_embed_dim,
                           time_scale=time_scale)
        self.dim, self.time_embed_dim, self.time_scale = dim, time_embed_dim, time_scale
        # Non-persistent: derived from the config, so not part of the state dict.
        self.register_buffer("freqs", embedding_freqs(time_embed_dim, time_scale), False)
        mods: list[nn.Module] = [nn.Linear(dim + time_embed_dim, hidden), nn.SiLU()]
        for _ in range(layers - 1):
            mods += [nn.Linear(hidden, hidden), nn.SiLU()]
        mods.append(nn.Linear(hidden, dim))
        self.mlp = nn.Sequential(*mods)

    def net_input(self, x: Tensor, t) -> Tensor:
        """The first layer's input [x flattened, sinusoidal(t)], of shape (n, dim + emb)."""
        n = x.shape[0]
        h = x.reshape(n, -1)
        if h.shape[1] != self.dim:
            raise ValueError(f"expected {self.dim} features per sample, got {h.shape[1]}")
        emb = sinusoidal_embedding(time_vector(t, n, h), self.time_embed_dim, freqs=self.freqs)
        return torch.cat([h, emb], dim=1)

    def forward(self, x: Tensor, t) -> Tensor:
        return self.mlp(self.net_input(x, t)).reshape(x.shape)


class NeuralScore:
    """Score protocol (:mod:`collapselab.scores.base`) for an ε-predicting network.

    ``score(x, t) = −net(x, t)/√var(t)`` (ε-parametrisation, see module docstring).
    ``t`` is a float or a (n,) tensor and must be > 0 (var(0) = 0). ``x`` may have any event
    shape and dtype: it is evaluated in the network's dtype and device, and the result is
    returned in ``x``'s dtype and device. The network is put in eval mode (dropout off): a score
    is an inference object.
    """

    def __init__(self, net: nn.Module, process):
        self.net = net.eval()
        self.process = process

    def _param(self) -> Tensor | None:
        return next(self.net.parameters(), None)

    def eps(self, x: Tensor, t) -> Tensor:
        """The network's noise prediction ε_θ(x, t), in ``x``'s dtype and device."""
        p = self._param()
        xin = x if p is None else x.to(device=p.device, dtype=p.dtype)
        tv = time_vector(t, x.shape[0], xin)
        return self.net(xin, tv).to(device=x.device, dtype=x.dtype)

    def __call__(self, x: Tensor, t) -> Tensor:
        eps = self.eps(x, t)
        if isinstance(t, Tensor) and t.dim() > 0:
            var = self.process.var(t.to(device=x.device, dtype=torch.float64))
            std = var.sqrt().to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
            return -eps / std
        return -eps / math.sqrt(self.process.var(float(t)))
