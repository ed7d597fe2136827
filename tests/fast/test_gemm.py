"""collapselab.fast.gemm: the training step's products (oneDNN or torch.mm) against float64, the
rule that picks them, and the fallbacks.

Tolerance: the float32 rounding bound γ_n |a||b| (gemm.rounding_bound), valid for any
summation order; nothing is tuned to the backend."""

import pytest
import torch

from collapselab.fast import gemm, native


@pytest.fixture
def fresh_load():
    gemm.load.cache_clear()
    yield gemm.load
    gemm.load.cache_clear()


@pytest.mark.parametrize("rows,inner,outer", [(512, 128, 128), (512, 66, 128), (37, 45, 29),
                                              (1, 16, 3), (300, 18, 2)])
def test_products_within_float32_rounding(rows, inner, outer):
    gen = torch.Generator().manual_seed(rows + inner)
    a = torch.randn(rows, inner, generator=gen)
    w = torch.randn(inner, outer, generator=gen)
    g = torch.randn(rows, outer, generator=gen)
    for p in gemm.backends():
        f = p.forward(a, w, w.T, torch.empty(rows, outer))
        i = p.input_grad(g, w, w.T, torch.empty(rows, inner))
        gw = torch.full((inner, outer), float("nan"))
        p.weight_grad(a.T, g, gw)
        for got, x, y in ((f, a, w), (i, g, w.T), (gw, a.T, g)):
            assert got.shape == (x.shape[0], y.shape[1]) and got.dtype == torch.float32
            err = (got.double() - x.double() @ y.double()).abs()
            assert bool((err <= gemm.rounding_bound(x, y)).all()), p.name


def test_the_bound_rejects_reduced_precision():
    """The self-test's bound would catch a bf16 math mode: bf16 products exceed it."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(37, 45, generator=gen), torch.randn(45, 29, generator=gen)
    err = ((a.bfloat16() @ b.bfloat16()).double() - a.double() @ b.double()).abs()
    assert not bool((err <= gemm.rounding_bound(a, b)).all())


def test_forced_by_environment(fresh_load, monkeypatch):
    monkeypatch.setenv("COLLAPSELAB_GEMM", "torch")
    p = fresh_load()
    assert type(p) is gemm.Products and "COLLAPSELAB_GEMM=torch" in gemm.status()


def test_unknown_setting_falls_back_and_says_so(fresh_load, monkeypatch):
    monkeypatch.setenv("COLLAPSELAB_GEMM", "cublas")
    assert type(fresh_load()) is gemm.Products
    assert "unknown COLLAPSELAB_GEMM='cublas'" in gemm.status()


def test_without_onednn_uses_torch_mm(fresh_load, monkeypatch):
    monkeypatch.setenv("COLLAPSELAB_GEMM", "onednn")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert type(fresh_load()) is gemm.Products
    assert "no oneDNN" in gemm.status()


def test_native_gemm_first_where_it_builds(fresh_load, monkeypatch):
    """The order: collapselab.fast.native's GEMM (its AVX-512 build), then oneDNN, then torch.mm;
    without the native kernels, the library."""
    k = native.load()
    p = fresh_load()
    if k is not None and k.target == "avx512f":
        assert isinstance(p, gemm.NativeProducts)
        assert type(p.fallback) is type(gemm._library()[0])
    else:
        assert not isinstance(p, gemm.NativeProducts)
    gemm.load.cache_clear()
    monkeypatch.setattr(native, "load", lambda: None)
    assert not isinstance(fresh_load(), gemm.NativeProducts)


def test_failed_self_test_falls_back(fresh_load, monkeypatch):
    """oneDNN products that are off by 1e-4 relative (or a bf16 math mode) are never used."""
    monkeypatch.setenv("COLLAPSELAB_GEMM", "onednn")
    if not isinstance(gemm._library()[0], gemm.OneDNNProducts):
        pytest.skip(f"oneDNN unavailable here: {gemm._library()[1]}")
    right = gemm.OneDNNProducts.input_grad
    monkeypatch.setattr(gemm.OneDNNProducts, "input_grad",
                        lambda self, g, w, wt, out: right(self, g, w, wt, out) * (1 + 1e-4))
    assert type(fresh_load()) is gemm.Products
    assert "input grad is off" in gemm.status()


def test_failed_native_self_test_falls_back_to_the_library(fresh_load, monkeypatch):
    k = native.load()
    if k is None or k.target != "avx512f":
        pytest.skip("collapselab.fast.native's AVX-512 build is unavailable here")
    right = gemm.NativeProducts.weight_grad

    def off(self, at, g, out):
        right(self, at, g, out)
        out.mul_(1 + 1e-4)

    monkeypatch.setattr(gemm.NativeProducts, "weight_grad", off)
    p = fresh_load()
    assert not isinstance(p, gemm.NativeProducts)
    assert "native's GEMM failed" in gemm.status()


def test_strided_weights_give_the_same_products():
    """A weight that is a strided view (not the step's contiguous rows) is still multiplied
    correctly: the native products fall back where their layout assumptions fail."""
    gen = torch.Generator().manual_seed(5)
    a, g = torch.randn(40, 48, generator=gen), torch.randn(40, 32, generator=gen)
    w = torch.randn(32, 48, generator=gen).T  # (48, 32), not contiguous
    for p in gemm.backends():
        f = p.forward(a, w, w.T, torch.empty(40, 32))
        i = p.input_grad(g, w, w.T, torch.empty(40, 48))
        for got, x, y in ((f, a, w), (i, g, w.T)):
            err = (got.double() - x.double() @ y.double()).abs()
            assert bool((err <= gemm.rounding_bound(x, y)).all()), p.name
