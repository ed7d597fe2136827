"""How generation i's training set is built (docs/paper.md §1), with per-point provenance.

Provenance code of a point: 0 = real (a draw from p); g ≥ 1 = synthetic, drawn from p̂_g (the
output of the model trained at generation g − 1).

Each policy also names the *law* its training set is drawn from, as weights over
(p, p̂_1, …, p̂_i): the exact-density estimators use it to compute I_i = χ²(p̂_{i+1} ‖ q_i).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

POLICIES = ("fresh_mixture", "replace", "accumulate", "accumulate_subsample", "augmentation")


@dataclass
class TrainingSet:
    x: np.ndarray  # (n, *event_shape) float32
    origin: np.ndarray  # (n,) int16 provenance codes (0 real, g synthetic from p̂_g)

    def __len__(self) -> int:
        return len(self.origin)

    @property
    def fraction_real(self) -> float:
        return float(np.mean(self.origin == 0))


def _pick(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n points of a pool: without replacement when it is large enough, else with."""
    return pool[rng.choice(len(pool), size=n, replace=n > len(pool))]


def _concat(parts: list[tuple[np.ndarray, int]]) -> TrainingSet:
    parts = [(x, g) for x, g in parts if len(x)]
    x = np.concatenate([x for x, _ in parts]).astype(np.float32, copy=False)
    origin = np.concatenate([np.full(len(x_), g, np.int16) for x_, g in parts])
    return TrainingSet(x, origin)


def build_training_set(
    policy: str,
    generation: int,
    *,
    alpha: float,
    n_train: int,
    draw_real: Callable[[int], np.ndarray],
    pools: dict[int, np.ndarray],
    previous: TrainingSet | None,
    rng: np.random.Generator,
    augmentation_lambda: float = 1.0,
) -> TrainingSet:
    """The training set of generation ``generation`` (q_i's sample).

    pools[g] holds the samples of p̂_g for g = 1..i. ``draw_real(n)`` draws fresh points of p.
    fresh_mixture(α): each of n points is fresh with probability α, else a sample of p̂_i —
    an exact n-sample of q_i = α p + (1 − α) p̂_i. replace: α = 0. accumulate: the previous
    set plus n new samples of p̂_i (Gerstgrasser et al. 2024). accumulate_subsample: that,
    subsampled back to n. augmentation(λ): generation 0's real set plus round(λ n) samples of
    p̂_i (Bertrand et al. 2024).
    """
    if generation == 0:
        return _concat([(draw_real(n_train), 0)])
    latest = pools[generation]
    if policy in ("fresh_mixture", "replace"):
        a = alpha if policy == "fresh_mixture" else 0.0
        n_fresh = int(rng.binomial(n_train, a))
        return _concat(
            [(draw_real(n_fresh), 0), (_pick(latest, n_train - n_fresh, rng), generation)]
        )
    if policy in ("accumulate", "accumulate_subsample"):
        grown = _concat([(previous.x, -1), (_pick(latest, n_train, rng), generation)])
        grown.origin[: len(previous)] = previous.origin
        if policy == "accumulate":
            return grown
        keep = np.sort(rng.choice(len(grown), size=n_train, replace=False))
        return TrainingSet(grown.x[keep], grown.origin[keep])
    if policy == "augmentation":
        real = previous.x[previous.origin == 0]
        n_syn = int(round(augmentation_lambda * n_train))
        return _concat([(real, 0), (_pick(latest, n_syn, rng), generation)])
    raise ValueError(f"unknown policy {policy!r}; allowed: {', '.join(POLICIES)}")


def training_law_weights(
    policy: str, generation: int, alpha: float, augmentation_lambda: float = 1.0
) -> dict[int, float]:
    """Weights of the law q_i over {0: p, g: p̂_g} the training set is drawn from.

    For accumulate the real part is a fixed finite sample of p; the weights describe the law
    it stands for (p), as in the paper's population view.
    """
    if generation == 0:
        return {0: 1.0}
    if policy == "fresh_mixture":
        return {0: alpha, generation: 1.0 - alpha}
    if policy == "replace":
        return {generation: 1.0}
    if policy in ("accumulate", "accumulate_subsample"):
        w = 1.0 / (generation + 1)
        return {g: w for g in range(generation + 1)}
    if policy == "augmentation":
        lam = augmentation_lambda
        return {0: 1.0 / (1.0 + lam), generation: lam / (1.0 + lam)}
    raise ValueError(f"unknown policy {policy!r}")
