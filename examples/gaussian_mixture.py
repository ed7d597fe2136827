"""A plug-in model that is not a diffusion: a Gaussian mixture fitted by EM.

It draws its own samples (``sample``) and knows their exact density (``log_prob``), so the loop
measures D_i and I_i with the exact-density estimators; ``state_dict`` makes checkpoints.

    score: {kind: plugin, factory: "gaussian_mixture:make", options: {components: 8}}

(run with this directory on PYTHONPATH).
"""

from __future__ import annotations

import math

import torch
from sklearn.mixture import GaussianMixture as EM


class GaussianMixtureModel:
    def __init__(self, components: int = 8, reg_covar: float = 1e-6):
        self.components, self.reg_covar = int(components), float(reg_covar)

    def fit(self, x: torch.Tensor, *, seed: int, process) -> None:
        em = EM(self.components, covariance_type="full", reg_covar=self.reg_covar,
                random_state=seed).fit(x.reshape(len(x), -1).double().numpy())
        self.load_state_dict({"weights": torch.from_numpy(em.weights_),
                              "means": torch.from_numpy(em.means_),
                              "covs": torch.from_numpy(em.covariances_)})

    def sample(self, n: int, *, generator: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], dtype=torch.float64, generator=generator)
        return (self.means[k] + (self.chol[k] @ z.unsqueeze(-1)).squeeze(-1)).float()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        y = x.reshape(len(x), -1).double()
        diff = (y[:, None, :] - self.means[None]).unsqueeze(-1)            # (n, K, d, 1)
        sol = torch.linalg.solve_triangular(self.chol[None], diff, upper=False).squeeze(-1)
        logdet = 2 * torch.log(torch.diagonal(self.chol, dim1=-2, dim2=-1)).sum(-1)
        d = y.shape[1]
        comp = -0.5 * ((sol**2).sum(-1) + logdet + d * math.log(2 * math.pi))
        return torch.logsumexp(comp + torch.log(self.weights), dim=1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"weights": self.weights, "means": self.means, "covs": self.covs}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.weights, self.means, self.covs = (state[k].double() for k in ("weights", "means",
                                                                          "covs"))
        self.chol = torch.linalg.cholesky(self.covs)


def make(components: int = 8, reg_covar: float = 1e-6) -> GaussianMixtureModel:
    return GaussianMixtureModel(components, reg_covar)
