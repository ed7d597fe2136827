"""A score-only plug-in: the Gaussian KDE of the training set, written out in plain torch.

It has no ``sample``: the chain's configured sampler (Euler–Maruyama or DDPM) draws from it,
using the forward process handed to ``fit`` (``scale(t)``, ``var(t)``). The KDE
(1/N) Σ_j N(c_j, h² I) pushed to time t is (1/N) Σ_j N(a c_j, v I) with a = scale(t),
v = a² h² + var(t), whose score is (Σ_j w_j a c_j − x)/v with softmax weights w_j.

    score: {kind: plugin, factory: "kde_score:make", options: {bandwidth: 0.3}}
"""

from __future__ import annotations

import torch


class KDEScoreModel:
    def __init__(self, bandwidth: float = 0.3):
        self.h = float(bandwidth)

    def fit(self, x: torch.Tensor, *, seed: int, process) -> None:
        self.centres, self.process = x.reshape(len(x), -1).double(), process

    def score(self, x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)       # (1, 1) or (n, 1)
        a = self.process.scale(t)
        v = a * a * self.h**2 + self.process.var(t)
        y, c = x.reshape(len(x), -1).double(), self.centres
        logits = (a * (y @ c.T) - 0.5 * a * a * (c * c).sum(1)) / v       # −‖y − a c‖²/2v + const
        mean = a * (torch.softmax(logits, dim=1) @ c)
        return ((mean - y) / v).reshape(x.shape).to(x.dtype)


def make(bandwidth: float = 0.3) -> KDEScoreModel:
    return KDEScoreModel(bandwidth)
