"""Tests of the KDE score kernel (PAPER.md §5) against float64 references.

Tolerances. The float64 reference forms the full n×N softmax of −‖y − a c_j‖²/(2v) directly.
The folded attention form computes the logits as (a y'·c' − a²‖c'‖²/2)/v with y', c' centred;
its rounding error is about eps·R²/v per logit (R bounds ‖y'‖ and a‖c'‖), which moves the score
by about that much times the spread of the centres (≤ R) over v. The stated bound is therefore

    max |s − s_ref| ≤ 10 · eps(dtype) · R² / v²,

with eps = 1.19e-7 (float32) or 2.2e-16 (float64). In the sharp regime (t = 0.02, h = 0.1,
v ≈ 0.03) that is ≈ 1e-2 absolute on scores of size ≈ 50 in float32, and ≈ 1e-11 in float64.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from collapselab.scores import kde_attention as kernels
from collapselab.scores.kde_attention import KDEKeys, kde_log_prob, kde_score, ou_scale_var

D = 10
# The paper's GMM layout (PAPER.md §5): one mean at the origin, four at (±4, ±4, 0, ...).
MEANS = torch.zeros(5, D, dtype=torch.float64)
MEANS[1:, :2] = torch.tensor([[4.0, 4.0], [4.0, -4.0], [-4.0, 4.0], [-4.0, -4.0]])


def gmm_sample(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 5, (n,), generator=g)
    return MEANS[idx] + 0.6 * torch.randn(n, D, generator=g, dtype=torch.float64)


def noised_queries(n: int, t: float, seed: int) -> torch.Tensor:
    """Draws from the GMM pushed to time t by the OU process (where the sampler evaluates)."""
    g = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(n, D, generator=g, dtype=torch.float64)
    return math.exp(-t / 2) * gmm_sample(n, seed) + math.sqrt(-math.expm1(-t)) * noise


def ref_score(y: torch.Tensor, c: torch.Tensor, a: float, v: float) -> torch.Tensor:
    """Direct float64 softmax form of PAPER.md §5, materialising the n×N matrix."""
    y, c = y.double(), c.double()
    logits = -((y[:, None, :] - a * c[None]) ** 2).sum(-1) / (2 * v)
    w = torch.softmax(logits, 1)
    return (a * w @ c - y) / v


def tolerance(y, c, a, v, dtype) -> float:
    m = c.double().mean(0)
    r = max((y.double() - a * m).norm(dim=1).max(), a * (c.double() - m).norm(dim=1).max())
    return 10 * torch.finfo(dtype).eps * float(r) ** 2 / v**2


CENTRES = gmm_sample(1500, seed=0)
CASES = [(0.0, 0.1), (0.02, 0.1), (0.02, 0.6), (0.3, 0.1), (1.0, 0.6), (4.0, 0.1), (4.0, 0.6)]
VARIANTS = [
    ("auto", torch.float32),
    ("sdpa", torch.float32),
    ("chunked", torch.float32),
    ("auto", torch.float64),
    ("sdpa", torch.float64),
]


@pytest.mark.parametrize("t,h", CASES)
@pytest.mark.parametrize("backend,dtype", VARIANTS)
def test_score_matches_float64_reference(t, h, backend, dtype):
    a, v = ou_scale_var(t, h)
    y = noised_queries(300, t, seed=1)
    ref = ref_score(y, CENTRES, a, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit sdpa request must not fall back here
        out = kde_score(y.to(dtype), CENTRES.to(dtype), a, v, backend=backend)
    assert out.dtype == dtype and out.shape == y.shape
    err = (out.double() - ref).abs().max().item()
    assert err <= tolerance(y, CENTRES, a, v, dtype), (err, ref.abs().max().item())


def test_ou_scale_var_formula():
    a, v = ou_scale_var(0.7, 0.6)
    assert a == pytest.approx(math.exp(-0.35), rel=1e-15)
    assert v == pytest.approx(0.36 * math.exp(-0.7) + 1 - math.exp(-0.7), rel=1e-15)
    assert ou_scale_var(0.0, 0.1) == pytest.approx((1.0, 0.01), rel=1e-15)
    with pytest.raises(ValueError):
        ou_scale_var(-1.0, 0.1)


def test_far_queries_sharp_weights_no_overflow():
    """Queries far outside the data at v = h² = 1e-4: logits ~ 1e7, one centre dominates."""
    a, v = 1.0, 1e-4
    y = torch.tensor([[60.0] * D, [-45.0] + [0.0] * (D - 1)], dtype=torch.float64)
    ref = ref_score(y, CENTRES, a, v)
    nearest = CENTRES[torch.cdist(y, CENTRES).argmin(1)]
    assert torch.allclose(ref, (a * nearest - y) / v, rtol=1e-12)
    for backend in ("sdpa", "chunked"):
        out = kde_score(y.float(), CENTRES.float(), a, v, backend=backend)
        assert torch.isfinite(out).all()
        assert ((out.double() - ref).abs().max() / ref.abs().max()).item() < 1e-6
        out64 = kde_score(y, CENTRES, a, v, backend=backend)
        assert torch.allclose(out64, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("t,h", [(0.02, 0.1), (1.0, 0.6)])
def test_log_prob_matches_scipy(t, h):
    a, v = ou_scale_var(t, h)
    c = CENTRES[:60]
    y = noised_queries(40, t, seed=2)
    per_centre = np.stack(
        [multivariate_normal(a * cj.numpy(), v * np.eye(D)).logpdf(y.numpy()) for cj in c]
    )
    ref = logsumexp(per_centre, axis=0) - math.log(len(c))
    out = kde_log_prob(y, c, a, v)
    assert out.dtype == torch.float64 and out.shape == (40,)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-9)
    # float32: the folded logits carry ~eps·R²/v absolute error.
    out32 = kde_log_prob(y.float(), c.float(), a, v)
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.double().numpy(), ref, rtol=0, atol=100 * 1.2e-7 * 60 / v)


def test_score_is_gradient_of_log_prob():
    a, v = ou_scale_var(0.1, 0.3)
    y = noised_queries(50, 0.1, seed=3).requires_grad_()
    (grad,) = torch.autograd.grad(kde_log_prob(y, CENTRES[:200], a, v).sum(), y)
    score = kde_score(y.detach(), CENTRES[:200], a, v, backend="chunked")
    torch.testing.assert_close(score, grad, rtol=1e-10, atol=1e-10)


def test_chunk_size_invariance():
    a, v = ou_scale_var(0.02, 0.1)
    c = CENTRES[:257]
    y = noised_queries(33, 0.02, seed=4)
    base = kde_score(y, c, a, v, backend="chunked")
    base_lp = kde_log_prob(y, c, a, v)
    for chunk in (1, 3, 64, 256, 257, 10_000):
        torch.testing.assert_close(
            kde_score(y, c, a, v, backend="chunked", chunk=chunk), base, rtol=1e-12, atol=1e-10
        )
        torch.testing.assert_close(
            kde_log_prob(y, c, a, v, chunk=chunk), base_lp, rtol=1e-13, atol=1e-11
        )
    for chunk in (1, 7, 32, None):  # sdpa: queries per fused call
        torch.testing.assert_close(
            kde_score(y, c, a, v, backend="sdpa", chunk=chunk), base, rtol=1e-12, atol=1e-10
        )


def test_prepared_keys_serve_every_time_step():
    keys = KDEKeys.prepare(CENTRES)
    assert keys.n_centres == len(CENTRES) and keys.dim == D and keys.keys.shape[1] % 8 == 0
    y = noised_queries(64, 0.5, seed=5)
    for t in (0.02, 0.5, 3.0):
        a, v = ou_scale_var(t, 0.6)
        for backend in ("sdpa", "chunked"):
            torch.testing.assert_close(
                kde_score(y, keys, a, v, backend=backend),
                kde_score(y, CENTRES, a, v, backend=backend),
                rtol=0,
                atol=0,
            )
        torch.testing.assert_close(kde_log_prob(y, keys, a, v), kde_log_prob(y, CENTRES, a, v))
    keys32 = keys.to(torch.float32)
    assert keys32.dtype == torch.float32 and keys.to(torch.float64) is keys


def test_auto_backend_choice():
    a, v = ou_scale_var(0.5, 0.6)
    y = noised_queries(20, 0.5, seed=6)
    c = CENTRES[:100]
    assert torch.equal(kde_score(y, c, a, v), kde_score(y, c, a, v, backend="chunked"))
    y32, c32 = y.float(), c.float()
    assert torch.equal(kde_score(y32, c32, a, v), kde_score(y32, c32, a, v, backend="sdpa"))


def test_explicit_sdpa_falls_back_with_warning(monkeypatch):
    monkeypatch.setattr(kernels, "_fused_attention", lambda *args: None)
    a, v = ou_scale_var(0.5, 0.6)
    y, c = noised_queries(20, 0.5, seed=7).float(), CENTRES[:100].float()
    with pytest.warns(RuntimeWarning, match="chunked"):
        out = kde_score(y, c, a, v, backend="sdpa", chunk=5)
    torch.testing.assert_close(out, kde_score(y, c, a, v, backend="chunked"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kde_score(y, c, a, v)  # auto falls back silently


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_and_shape_contract(dtype):
    a, v = ou_scale_var(1.0, 0.6)
    y = noised_queries(9, 1.0, seed=8).to(dtype)
    out = kde_score(y, CENTRES[:50], a, v)
    assert out.dtype == dtype and out.shape == (9, D)
    assert kde_log_prob(y, CENTRES[:50], a, v).shape == (9,)
    empty = torch.zeros(0, D, dtype=dtype)
    assert kde_score(empty, CENTRES[:50], a, v).shape == (0, D)
    assert kde_log_prob(empty, CENTRES[:50], a, v).shape == (0,)


def test_invalid_arguments():
    c = CENTRES[:10]
    y = torch.zeros(3, D)
    with pytest.raises(ValueError, match="dimension"):
        kde_score(torch.zeros(3, D + 1), c, 1.0, 1.0)
    with pytest.raises(ValueError, match="var"):
        kde_score(y, c, 1.0, 0.0)
    with pytest.raises(ValueError, match="backend"):
        kde_score(y, c, 1.0, 1.0, backend="flash")
    with pytest.raises(ValueError, match="chunk"):
        kde_score(y, c, 1.0, 1.0, chunk=0)
    with pytest.raises(TypeError):
        kde_score(torch.zeros(3, D, dtype=torch.int64), c, 1.0, 1.0)
    with pytest.raises(ValueError):
        KDEKeys.prepare(torch.zeros(0, D))


@pytest.mark.parametrize("backend", ["sdpa", "chunked"])
def test_gradient_in_y_float64_gradcheck(backend):
    a, v = ou_scale_var(0.05, 0.2)
    c = CENTRES[:7, :3].clone()
    y = (a * c[:5] + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda y_: kde_score(y_, c, a, v, backend=backend, chunk=3 if backend == "chunked" else 2),
        (y,),
    )


def test_gradient_in_centres_gradcheck():
    a, v = ou_scale_var(0.3, 0.4)
    c = CENTRES[:6, :3].clone().requires_grad_()
    y = CENTRES[10:14, :3].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda y_, c_: kde_score(y_, c_, a, v, chunk=4), (y, c))
    assert torch.autograd.gradcheck(lambda y_, c_: kde_log_prob(y_, c_, a, v), (y, c))


def test_float32_sdpa_gradient_matches_float64_reference():
    """The streamed backward (Cov_w(c) g) against autograd of the direct float64 form."""
    a, v = ou_scale_var(0.02, 0.6)
    y = noised_queries(100, 0.02, seed=9)
    g = torch.randn(100, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y_ref = y.clone().requires_grad_()
    (ref,) = torch.autograd.grad(ref_score(y_ref, CENTRES, a, v), y_ref, g)
    y32 = y.float().requires_grad_()
    (out,) = torch.autograd.grad(kde_score(y32, CENTRES.float(), a, v), y32, g.float())
    scale = ref.abs().max().item()
    assert (out.double() - ref).abs().max().item() < 1e-4 * scale


def _peak_rss_growth_mb(fn) -> float:
    """Peak resident-set growth while ``fn`` runs (Linux: VmHWM reset via clear_refs)."""

    def field(name: str) -> float:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(name):
                    return int(line.split()[1]) / 1024
        raise OSError(name)

    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        start = field("VmRSS:")
    except OSError:
        pytest.skip("peak-RSS reset (/proc/self/clear_refs) unavailable")
    fn()
    return field("VmHWM:") - start


@pytest.mark.parametrize("backend,dtype", [("sdpa", torch.float32), ("chunked", torch.float64)])
def test_never_materialises_n_by_N(backend, dtype):
    """N = 100,000 centres, n = 2,000 queries: an n×N matrix would be 800 MB (f32)/1.6 GB."""
    g = torch.Generator().manual_seed(10)
    c = torch.randn(100_000, D, generator=g, dtype=dtype)
    y = torch.randn(2_000, D, generator=g, dtype=dtype)
    a, v = ou_scale_var(0.5, 0.6)
    with torch.no_grad():
        grown = _peak_rss_growth_mb(lambda: kde_score(y, c, a, v, backend=backend))
    assert grown < 150, grown
