"""Plug-in models for the tests (importable as ``plugin_models``: tests/ is on sys.path)."""

from __future__ import annotations

import torch
from gaussian_mixture import GaussianMixtureModel


class Stateless:
    """The EM mixture without state_dict/load_state_dict: a resumed chain refits it."""

    def __init__(self, components: int = 1):
        self.inner = GaussianMixtureModel(components)

    def fit(self, x, *, seed, process):
        self.inner.fit(x, seed=seed, process=process)

    def sample(self, n, *, generator):
        return self.inner.sample(n, generator=generator)

    def log_prob(self, x):
        return self.inner.log_prob(x)


class Diverging(GaussianMixtureModel):
    """Draws NaN from generation ``at`` on when ``blowup`` is set (a diverged model)."""

    def __init__(self, blowup: bool = False, at: int = 1):
        super().__init__(components=1)
        self.blowup, self.at = bool(blowup), int(at)

    def fit(self, x, *, seed, process, generation):
        super().fit(x, seed=seed, process=process)
        self.nan = self.blowup and generation >= self.at

    def sample(self, n, *, generator):
        x = super().sample(n, generator=generator)
        return torch.full_like(x, float("nan")) if self.nan else x


class NoFit:
    def sample(self, n, *, generator):
        return torch.zeros(n, 2)


class FitOnly:
    def fit(self, x, *, seed, process):
        pass


def stateless(components: int = 1):
    return Stateless(components)


def diverging(blowup: bool = False, at: int = 1):
    return Diverging(blowup, at)


def no_fit():
    return NoFit()


def fit_only():
    return FitOnly()
