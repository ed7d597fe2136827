"""Injected score errors (scores/perturbed.py): each kind has its stated form and magnitude."""

import math

import torch

from collapselab.processes import OU
from collapselab.scores.analytic import AnalyticScore
from collapselab.scores.perturbed import (
    PerturbedScore,
    affine_parts,
    aligned,
    custom,
    random_linear,
    time_constant,
    time_only,
    time_oscillating,
)
from collapselab.targets import GaussianMixture


def _base():
    law = GaussianMixture.isotropic(torch.tensor([[1.0, -1.0], [-2.0, 0.5]]), 0.6)
    return AnalyticScore(law, OU())


def _y(n=64, d=2, seed=0):
    return torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_zero_magnitude_is_the_base_score():
    base, y = _base(), _y()
    for err in [aligned(2.0), random_linear(2, torch.Generator().manual_seed(1)),
                time_constant(torch.tensor([1.0, 2.0])), custom(lambda x, t: x**3)]:
        assert torch.equal(PerturbedScore(base, err, 0.0)(y, 0.7), base(y, 0.7))


def test_magnitude_scales_the_error_exactly():
    base, y = _base(), _y()
    err = random_linear(2, torch.Generator().manual_seed(2))
    s = PerturbedScore(base, err, 0.25)
    torch.testing.assert_close(s(y, 1.3) - base(y, 1.3), 0.25 * err(y, 1.3), rtol=0, atol=1e-12)
    torch.testing.assert_close(s.error_fn(y, 1.3), 0.25 * err(y, 1.3), rtol=0, atol=0)


def test_aligned_is_the_scaled_state():
    y = _y()
    e = aligned(-0.7)
    torch.testing.assert_close(e(y, 0.1), -0.7 * y)
    assert torch.allclose(e(y, 0.1).norm(dim=1), 0.7 * y.norm(dim=1))
    W, b = affine_parts(e, 0.5, 2)
    torch.testing.assert_close(W, -0.7 * torch.eye(2, dtype=torch.float64))
    assert torch.count_nonzero(b) == 0


def test_random_linear_has_unit_rms_gain_and_is_fixed_linear():
    d = 5
    e = random_linear(d, torch.Generator().manual_seed(3))
    A = e.matrix
    # ‖A‖_F = √d, i.e. E‖A z‖² = ‖A‖_F² = d = E‖z‖² for z ~ N(0, I).
    assert math.isclose(float(torch.linalg.matrix_norm(A)), math.sqrt(d), rel_tol=1e-12)
    y1, y2 = _y(8, d, 1), _y(8, d, 2)
    torch.testing.assert_close(e(2.0 * y1 + y2, 0.3), 2.0 * e(y1, 0.3) + e(y2, 0.3))
    torch.testing.assert_close(e(y1, 0.3), e(y1, 3.0))  # time-independent
    torch.testing.assert_close(e(y1, 0.3), y1 @ A.T)
    # Same generator seed, same matrix (reproducible injected errors).
    assert torch.equal(random_linear(d, torch.Generator().manual_seed(3)).matrix, A)


def test_time_only_depends_on_time_only():
    xi = lambda t: torch.tensor([math.sin(t), t * t], dtype=torch.float64)  # noqa: E731
    e = time_only(xi)
    y = _y()
    out = e(y, 0.8)
    assert torch.equal(out, xi(0.8).expand(64, 2))
    assert torch.equal(e(10 * y + 3, 0.8), out)
    ts = torch.tensor([0.1, 2.0, 0.1], dtype=torch.float64)
    torch.testing.assert_close(e(y[:3], ts), torch.stack([xi(0.1), xi(2.0), xi(0.1)]))
    W, b = affine_parts(e, 0.8, 2)
    assert torch.count_nonzero(W) == 0 and torch.equal(b, xi(0.8))


def test_time_constant_and_oscillating_magnitudes():
    u = torch.tensor([3.0, 4.0], dtype=torch.float64)
    c = time_constant(u)
    assert torch.allclose(c(_y(), 2.5).norm(dim=1), torch.full((64,), 5.0, dtype=torch.float64))
    f = 3.0
    osc = time_oscillating(u, f)
    # Over whole periods the time average of ‖e‖² is ‖u‖² (√2 cos has mean square 1).
    ts = torch.linspace(0.0, 2.0, 20001, dtype=torch.float64)  # 6 periods
    sq = torch.stack([osc.vector(float(t)).pow(2).sum() for t in ts])
    avg = float(torch.trapezoid(sq, ts)) / 2.0
    assert math.isclose(avg, 25.0, rel_tol=1e-6)


def test_affine_parts_reproduce_each_affine_error_and_custom_has_none():
    y = _y(16, 3, 4)
    for e in [aligned(0.4), random_linear(3, torch.Generator().manual_seed(5)),
              time_oscillating(torch.tensor([1.0, 0.0, -1.0]), 2.0)]:
        W, b = affine_parts(e, 1.7, 3)
        torch.testing.assert_close(e(y, 1.7), y @ W.T + b)
    assert affine_parts(custom(lambda x, t: x**2), 1.0, 3) is None
    # A plain callable is accepted as an error.
    s = PerturbedScore(lambda x, t: torch.zeros_like(x), lambda x, t: x * t, 2.0)
    torch.testing.assert_close(s(y, 0.5), y)
