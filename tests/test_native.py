"""collapselab.native: the fused SiLU/bias kernels against the PyTorch ops they replace, and
the fallback when they are unavailable."""

import pytest
import torch

from collapselab import native


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
    """native.load() with its cache cleared (and a throw-away cache directory)."""
    monkeypatch.setenv("COLLAPSELAB_CACHE", str(tmp_path))
    native.load.cache_clear()
    yield native.load
    native.load.cache_clear()


def kernels_or_skip():
    k = native.load()
    if k is None:
        pytest.skip(f"native kernels unavailable here: {native.status()}")
    return k


@pytest.mark.parametrize("rows,n", [(512, 128), (7, 3), (33, 17)])
def test_kernels_equal_pytorch_ops(rows, n):
    k = kernels_or_skip()
    gen = torch.Generator().manual_seed(rows)
    z = torch.randn(rows, n, generator=gen) * 5
    b = torch.randn(1, n, generator=gen)
    g = torch.randn(rows, n, generator=gen)
    x = z + b
    a = torch.empty_like(z)
    zz = z.clone()
    k.bias_silu_(zz, b, a)
    # float32 rounding of exp and the divisions: a few ulp
    torch.testing.assert_close(a, torch.nn.functional.silu(x), rtol=2e-6, atol=1e-6)
    want = torch.ops.aten.silu_backward(g, x)
    gb = torch.empty(1, n)
    gg = k.mul_colsum_(g.clone(), zz, gb)
    torch.testing.assert_close(gg, want, rtol=2e-6, atol=1e-6)
    # a column sum of `rows` terms, summed in another order than torch.sum
    torch.testing.assert_close(gb, want.sum(0, keepdim=True), rtol=1e-5, atol=1e-5 * rows**0.5)
    gb2 = torch.empty(1, n)
    g2 = g.clone()
    k.mul_colsum_(g2, None, gb2)
    assert torch.equal(g2, g)  # no d: g untouched
    torch.testing.assert_close(gb2, g.sum(0, keepdim=True), rtol=1e-5, atol=1e-5 * rows**0.5)


def test_nan_and_inf_propagate_as_in_pytorch():
    """Compiled without -ffast-math: a diverging network's NaN/inf reach the loss check."""
    k = kernels_or_skip()
    z = torch.tensor([[float("nan"), float("inf"), -float("inf"), 100.0, -100.0, 0.0, 3e38,
                       -3e38]])
    b = torch.zeros(1, 8)
    a = torch.empty_like(z)
    zz = z.clone()
    k.bias_silu_(zz, b, a)
    torch.testing.assert_close(a, torch.nn.functional.silu(z), equal_nan=True)
    g = torch.ones_like(z)
    torch.testing.assert_close(k.mul_colsum_(g, zz, torch.empty(1, 8)),
                               torch.ops.aten.silu_backward(torch.ones_like(z), z),
                               equal_nan=True)


def test_disabled_by_environment(fresh_load, monkeypatch):
    monkeypatch.setenv("COLLAPSELAB_NATIVE", "0")
    assert fresh_load() is None
    assert native.status() == "off: COLLAPSELAB_NATIVE=0"


def test_missing_compiler_falls_back(fresh_load, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    if native._cpu_flags().isdisjoint(native._TARGETS):
        pytest.skip("no AVX2/AVX-512: the kernels are off before a compiler is looked for")
    assert fresh_load() is None
    assert "no C compiler" in native.status()


def test_failed_self_test_falls_back(fresh_load, monkeypatch):
    """A library that computes something else is never used."""
    monkeypatch.setattr(native, "_SOURCE", native._SOURCE.replace("1.0f - s", "1.5f - s"))
    if fresh_load() is not None:
        pytest.fail("a wrong kernel passed the self-test")
    assert native.status().startswith("off:")


def test_compiled_once_into_the_cache(fresh_load, tmp_path):
    k = fresh_load()
    if k is None:
        pytest.skip(f"native kernels unavailable here: {native.status()}")
    assert k.path.parent == tmp_path / "native" and k.path.exists()
    mtime = k.path.stat().st_mtime_ns
    native.load.cache_clear()
    assert fresh_load().path == k.path and k.path.stat().st_mtime_ns == mtime
