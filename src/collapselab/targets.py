"""Analytic target laws: Gaussian mixtures and 2-D toys (docs/paper.md §1, §5).

Everything is float64 torch: these laws are the ground truth every estimate is compared with.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_LOG2PI = math.log(2 * math.pi)


def _to64(x) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


class GaussianMixture:
    """Σ_k w_k N(μ_k, Σ_k) on R^d.

    covs may be given as a scalar or (K,) (isotropic variances), (K, d) (diagonal variances) or
    (K, d, d) (full covariances); they are stored as full (K, d, d) matrices.
    """

    def __init__(self, weights, means, covs):
        means = _to64(means)
        if means.dim() != 2:
            raise ValueError("means must have shape (K, d)")
        K, d = means.shape
        weights = _to64(weights).reshape(-1)
        if weights.shape != (K,):
            raise ValueError(f"weights must have shape ({K},)")
        if (weights < 0).any() or not math.isclose(float(weights.sum()), 1.0, rel_tol=1e-9):
            raise ValueError("weights must be non-negative and sum to 1")
        covs = _to64(covs)
        eye = torch.eye(d, dtype=torch.float64)
        if covs.dim() == 0:
            covs = covs * eye.expand(K, d, d)
        elif covs.dim() == 1:
            covs = covs.reshape(K, 1, 1) * eye
        elif covs.dim() == 2:
            covs = torch.diag_embed(covs)
        covs = covs.expand(K, d, d).clone()
        self.weights, self.means, self.covs = weights, means, covs
        self._chol = None
        # Isotropic components (the paper's case) get a matmul fast path.
        diag = torch.diagonal(covs, dim1=1, dim2=2)
        iso = torch.allclose(covs, diag[:, :1, None] * eye, rtol=0, atol=0)
        self._iso_var = diag[:, 0].clone() if iso else None

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def isotropic(cls, means, std, weights=None) -> GaussianMixture:
        means = _to64(means)
        K = means.shape[0]
        w = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else weights
        std = _to64(std).reshape(-1).expand(K)
        return cls(w, means, std**2)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @property
    def chol(self) -> Tensor:
        if self._chol is None:
            self._chol = torch.linalg.cholesky(self.covs)
        return self._chol

    # ---- sampling and density -----------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, return_labels=False):
        """n i.i.d. draws (float64); with return_labels also the component of each draw."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        x = self.means[labels] + torch.einsum("nij,nj->ni", self.chol[labels], z)
        return (x, labels) if return_labels else x

    def component_log_prob(self, x: Tensor) -> Tensor:
        """log N(x; μ_k, Σ_k) for every component: shape (n, K)."""
        x = _to64(x)
        if self._iso_var is not None:
            v = self._iso_var
            sq = (x * x).sum(1, keepdim=True) - 2 * x @ self.means.T + (self.means**2).sum(1)
            return -0.5 * (sq.clamp_min(0) / v + self.dim * (torch.log(v) + _LOG2PI))
        diff = x.unsqueeze(0) - self.means.unsqueeze(1)  # (K, n, d)
        sol = torch.linalg.solve_triangular(self.chol, diff.transpose(1, 2), upper=False)
        maha = (sol**2).sum(1)  # (K, n)
        logdet = 2 * torch.log(torch.diagonal(self.chol, dim1=1, dim2=2)).sum(1)  # (K,)
        return (-0.5 * (maha + logdet[:, None] + self.dim * _LOG2PI)).T

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log density, shape (n,)."""
        return torch.logsumexp(self.component_log_prob(x) + self.weights.log(), dim=1)

    def score(self, x: Tensor) -> Tensor:
        """∇ log density: Σ_k r_k(x) Σ_k⁻¹ (μ_k − x), r = posterior responsibilities."""
        x = _to64(x)
        r = torch.softmax(self.component_log_prob(x) + self.weights.log(), dim=1)  # (n, K)
        if self._iso_var is not None:
            rv = r / self._iso_var
            return rv @ self.means - rv.sum(1, keepdim=True) * x
        diff = self.means.unsqueeze(1) - x.unsqueeze(0)  # (K, n, d)
        prec_diff = torch.cholesky_solve(diff.transpose(1, 2), self.chol).transpose(1, 2)
        return torch.einsum("nk,knd->nd", r, prec_diff)

    # ---- operations that keep the law a Gaussian mixture ---------------------------------
    def noised(self, scale: float, var: float) -> GaussianMixture:
        """Law of scale·X + √var·Z: the forward marginal N(scale·μ, scale²Σ + var I)."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        return GaussianMixture(self.weights, scale * self.means, scale**2 * self.covs + var * eye)

    def marginal(self, process, t: float) -> GaussianMixture:
        """q_t: this law pushed through the forward process to time t (docs/paper.md §2)."""
        return self.noised(process.scale(t), process.var(t))

    def convolve(self, h: float) -> GaussianMixture:
        """This law convolved with N(0, h² I) (the population KDE of bandwidth h)."""
        return self.noised(1.0, h * h)

    def mix(self, other: GaussianMixture, alpha: float) -> GaussianMixture:
        """α·self + (1 − α)·other (the training law q_i = α p + (1−α) p̂_i, docs/paper.md §1)."""
        if other.dim != self.dim:
            raise ValueError("cannot mix laws of different dimensions")
        if alpha >= 1.0:
            return self
        if alpha <= 0.0:
            return other
        w = torch.cat([alpha * self.weights, (1 - alpha) * other.weights])
        return GaussianMixture(
            w, torch.cat([self.means, other.means]), torch.cat([self.covs, other.covs])
        )

    def merged(self, tol: float = 1e-12) -> GaussianMixture:
        """The same law with identical components merged (keeps recursive mixtures small)."""
        keep_w, keep_m, keep_c = [], [], []
        for w, m, c in zip(self.weights, self.means, self.covs, strict=True):
            for j in range(len(keep_w)):
                if torch.allclose(keep_m[j], m, atol=tol) and torch.allclose(
                    keep_c[j], c, atol=tol
                ):
                    keep_w[j] = keep_w[j] + w
                    break
            else:
                keep_w.append(w)
                keep_m.append(m)
                keep_c.append(c)
        return GaussianMixture(torch.stack(keep_w), torch.stack(keep_m), torch.stack(keep_c))

    # ---- moments --------------------------------------------------------------------------
    def mean(self) -> Tensor:
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        mu = self.mean()
        second = torch.einsum("k,kij->ij", self.weights, self.covs) + torch.einsum(
            "k,ki,kj->ij", self.weights, self.means, self.means
        )
        return second - torch.outer(mu, mu)

    def to_dict(self) -> dict:
        return {
            "weights": self.weights.tolist(),
            "means": self.means.tolist(),
            "covs": self.covs.tolist(),
        }

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.n_components}, d={self.dim})"


def ring(n_components: int = 8, radius: float = 4.0, std: float = 0.5) -> GaussianMixture:
    """2-D toy: equal-weight Gaussians evenly spaced on a circle."""
    angles = torch.arange(n_components, dtype=torch.float64) * (2 * math.pi / n_components)
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture.isotropic(means, std)


def paper_gmm_means(dim: int = 10, spread: float = 4.0) -> Tensor:
    """The layout this project chose for the paper's 5-component GMM (docs/paper.md §5: means are
    not given): one component at the origin and four at (±spread, ±spread, 0, …, 0)."""
    if dim < 2:
        raise ValueError("the paper layout needs dim >= 2")
    means = torch.zeros(5, dim, dtype=torch.float64)
    means[1:, :2] = spread * torch.tensor([[1, 1], [1, -1], [-1, 1], [-1, -1]], dtype=torch.float64)
    return means


class LawMixture:
    """Σ_m w_m law_m for laws with exact log densities (e.g. q_i = α p + (1 − α) p̂_i when p̂_i
    is a finite-KDE law): exact sampling and exact log density by logsumexp."""

    def __init__(self, parts):
        parts = [(float(w), law) for w, law in parts if w > 0]
        total = sum(w for w, _ in parts)
        self.weights = [w / total for w, _ in parts]
        self.laws = [law for _, law in parts]
        self.dim = self.laws[0].dim

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        w = torch.tensor(self.weights, dtype=torch.float64)
        labels = torch.multinomial(w, n, replacement=True, generator=generator)
        x = torch.empty(n, self.dim, dtype=torch.float64)
        for m, law in enumerate(self.laws):
            idx = (labels == m).nonzero().squeeze(1)
            if len(idx):
                x[idx] = law.sample(len(idx), generator).to(torch.float64)
        return x

    def _log_parts(self, x: Tensor) -> Tensor:
        pairs = zip(self.weights, self.laws, strict=True)
        return torch.stack([math.log(w) + law.log_prob(x) for w, law in pairs], 1)

    def log_prob(self, x: Tensor) -> Tensor:
        return torch.logsumexp(self._log_parts(x), dim=1)

    def score(self, x: Tensor) -> Tensor:
        """Σ_m r_m(x) ∇log law_m(x), r = posterior weights of the parts."""
        r = torch.softmax(self._log_parts(x), dim=1)
        return sum(r[:, m : m + 1] * law.score(x) for m, law in enumerate(self.laws))

    def marginal(self, process, t: float) -> LawMixture:
        """Each part pushed through the forward process (the weights do not change)."""
        pairs = zip(self.weights, self.laws, strict=True)
        return LawMixture([(w, law.marginal(process, t)) for w, law in pairs])


def mix_laws(parts):
    """Σ w_m law_m as a GaussianMixture when every part is one (keeps finiteness checks exact),
    else as a :class:`LawMixture`. ``parts``: (weight, law) pairs; weights sum to 1."""
    parts = [(float(w), law) for w, law in parts if w > 0]
    if len(parts) == 1:
        return parts[0][1]
    if all(isinstance(law, GaussianMixture) for _, law in parts):
        w = torch.cat([wt * law.weights for wt, law in parts])
        return GaussianMixture(
            w / w.sum(),
            torch.cat([law.means for _, law in parts]),
            torch.cat([law.covs for _, law in parts]),
        ).merged()
    return LawMixture(parts)


class EmpiricalTarget:
    """p for image experiments: the empirical law of a dataset's training split.

    ``sample`` draws real images with replacement (fresh data from a finite set is a resample
    of it); ``test`` is the held-out split the divergences compare against. No density: the
    loop measures images in the feature space of a classifier instead.
    """

    def __init__(self, train, test):
        self.train, self.test = train, test  # datasets.ImageData
        self.images = torch.from_numpy(train.images)
        self.event_shape = tuple(train.images.shape[1:])
        self.dim = int(math.prod(self.event_shape))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        idx = torch.randint(len(self.images), (n,), generator=generator)
        return self.images[idx]
