"""collapselab.fast.native: the fused SiLU/bias kernels against the PyTorch ops they replace, and
the fallback when they are unavailable."""

import copy
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from collapselab.fast import gemm, native


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


@pytest.mark.parametrize("rows,n,d", [(512, 128, 2), (512, 128, 10), (37, 48, 3), (8, 16, 16),
                                      (5, 32, 1)])
def test_output_layer_kernels_equal_pytorch(rows, n, d):
    """The narrow output layer's two passes against the products and ops they replace, up to
    the 16 outputs the kernels take (they are used up to 10). Their sums run in another order
    than BLAS's: tolerances scale with the number of terms."""
    k = kernels_or_skip()
    gen = torch.Generator().manual_seed(rows * d)
    a = torch.nn.functional.silu(torch.randn(rows, n, generator=gen) * 3)
    w = torch.randn(n, d, generator=gen) / n**0.5
    b = torch.randn(1, d, generator=gen)
    e = torch.randn(rows, d, generator=gen)
    sd = torch.rand(rows, n, generator=gen)  # silu' of the layer below
    c = 2.0 / rows
    g, gb, sq = torch.empty(rows, d), torch.empty(1, d), torch.empty(1)
    k.out_fwd_(a, w, b, e, g, gb, sq, c)
    want_g = ((a @ w + b) - e) * c
    torch.testing.assert_close(g, want_g, rtol=1e-5, atol=1e-6 * n**0.5 * c)
    torch.testing.assert_close(gb, want_g.sum(0, keepdim=True), rtol=1e-5,
                               atol=1e-6 * (rows * n) ** 0.5 * c)
    torch.testing.assert_close(sq, want_g.double().square().sum()[None].float(), rtol=1e-5,
                               atol=0)
    h, gw, gh = sd.clone(), torch.empty(n, d), torch.empty(n)
    k.out_bwd_(a, g, w, h, gw, gh)
    want_h = (g @ w.T) * sd
    scale = g.abs().max().item()
    torch.testing.assert_close(h, want_h, rtol=1e-5, atol=1e-6 * d**0.5 * scale)
    torch.testing.assert_close(gh, want_h.sum(0), rtol=1e-5, atol=1e-6 * rows**0.5 * scale)
    torch.testing.assert_close(gw, a.T @ g, rtol=1e-5, atol=1e-6 * rows**0.5 * scale)


def test_output_layer_kernels_take_only_narrow_layers():
    k = kernels_or_skip()
    assert k.fits_output(torch.empty(128, 10)) and k.fits_output(torch.empty(2048, 1))
    assert not k.fits_output(torch.empty(128, 11))  # from here on BLAS is as fast or faster
    assert not k.fits_output(torch.empty(128, 17))  # wider than one vector
    assert not k.fits_output(torch.empty(100, 2))  # not whole vectors of hidden units
    assert not k.fits_output(torch.empty(4096, 2))  # its stack copies would be too large


def test_output_layer_propagates_nan_and_inf():
    """A NaN target or an infinite activation reaches the loss, the gradients and the bias
    gradients, so the divergence check sees it."""
    k = kernels_or_skip()
    rows, n, d = 9, 16, 2
    a = torch.ones(rows, n)
    a[3, 5] = float("inf")
    w, b, e = torch.full((n, d), 0.1), torch.zeros(1, d), torch.zeros(rows, d)
    e[6, 1] = float("nan")
    g, gb, sq = torch.empty(rows, d), torch.empty(1, d), torch.empty(1)
    k.out_fwd_(a, w, b, e, g, gb, sq, 1.0)
    want = (a @ w + b) - e
    torch.testing.assert_close(g, want, equal_nan=True)
    assert torch.isinf(g[3]).all() and torch.isnan(g[6, 1]) and torch.isnan(sq).all()
    torch.testing.assert_close(gb, want.sum(0, keepdim=True), equal_nan=True)  # [inf, nan]
    h, gw, gh = torch.ones(rows, n), torch.empty(n, d), torch.empty(n)
    k.out_bwd_(a, g, w, h, gw, gh)
    assert not torch.isfinite(h[3]).any() and not torch.isfinite(gw).all()
    assert not torch.isfinite(gh).all()


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
    if native.cpu_flags().isdisjoint(native._TARGETS):
        pytest.skip("no AVX2/AVX-512: the kernels are off before a compiler is looked for")
    assert fresh_load() is None
    assert "no C compiler" in native.status()


@pytest.mark.parametrize("right,wrong", [("1.0f - s", "1.5f - s"),
                                         ("t * hr[q];", "t * hr[q] * 1.001f;")])
def test_failed_self_test_falls_back(fresh_load, monkeypatch, right, wrong):
    """A library that computes something else (here: silu', or the output layer's input
    gradient off by 0.1%) is never used."""
    assert right in native._SOURCE
    monkeypatch.setattr(native, "_SOURCE", native._SOURCE.replace(right, wrong))
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


def test_avx2_build_passes_its_self_test(fresh_load, monkeypatch):
    """The AVX2 build (machines without AVX-512) compiles and computes the same; here it runs
    on a CPU that has both."""
    if "avx2" not in native.cpu_flags():
        pytest.skip("this CPU has no AVX2")
    monkeypatch.setattr(native, "cpu_flags", lambda: {"avx2", "fma"})
    k = fresh_load()
    if k is None:
        pytest.skip(f"native kernels unavailable here: {native.status()}")
    assert k.target == "avx2" and "avx2" in k.path.name


def _sanitized_run(tmp_path, source: str) -> subprocess.CompletedProcess:
    """Build ``source`` (the kernels' C) with tests/fast/data/native_sanitize.c under
    AddressSanitizer and UBSan, and run it; skips where there is no compiler, no AVX2/AVX-512 or
    no sanitizer runtime."""
    cc = os.environ.get("CC") or "cc"
    have = native.cpu_flags()
    target = next((t for t in native._TARGETS if t in have), None)
    if shutil.which(cc) is None or target is None:
        pytest.skip("needs a C compiler and AVX2 or AVX-512")
    simdlen, flags = native._TARGETS[target]
    src = tmp_path / "kernels.c"
    src.write_text(source.replace("SIMDLEN", str(simdlen)))
    exe = tmp_path / "sanitized"
    build = subprocess.run(
        [cc, "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
         "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd", *flags, str(src),
         str(Path(__file__).parent / "data" / "native_sanitize.c"), "-o", str(exe), "-lm"],
        capture_output=True, text=True)
    if build.returncode != 0:
        if "sanitize" in build.stderr or "asan" in build.stderr:
            pytest.skip(f"no sanitizer runtime here: {build.stderr.strip()[:200]}")
        pytest.fail(f"the kernels do not build: {build.stderr.strip()[:500]}")
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)


def test_kernels_clean_under_sanitizers(tmp_path):
    """Every kernel over many shapes (rows not a multiple of 8, widths with a vector
    remainder, output widths 1-16) under AddressSanitizer and UBSan: no out-of-bounds access,
    no undefined behaviour, results as double-precision loops (tests/fast/data/native_sanitize.c).
    Value checks in Python cannot see a read past a buffer; this can."""
    run = _sanitized_run(tmp_path, native._SOURCE)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr[-2000:]


def test_sanitizer_run_catches_an_over_read(tmp_path):
    """The same harness on kernels whose last-rows copy reads past the activations fails."""
    right = "tail[i] = r * n + i < rows * n ? a[r * n + i] : 0.0f;"
    assert right in native._SOURCE
    run = _sanitized_run(tmp_path, native._SOURCE.replace(right, "tail[i] = a[r * n + i];"))
    assert run.returncode != 0 and "AddressSanitizer" in run.stderr


@pytest.mark.parametrize("m,k,n", [(512, 128, 128), (512, 66, 128), (1, 1, 16), (7, 300, 80),
                                   (37, 45, 32), (6, 129, 64), (13, 5, 48)])
def test_gemm_within_float32_rounding(m, k, n):
    """The native GEMM (row tiles of 6 with remainders, 1-4 vectors of columns, reduction
    blocks of 128 with a remainder) and its transposed-A form, against float64 within the
    float32 rounding bound γ_k |a||b| of any summation order."""
    kern = kernels_or_skip()
    gen = torch.Generator().manual_seed(m * n + k)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    at = torch.randn(k, m, generator=gen).T  # a transposed view, read in place
    for x in (a, at):
        c = kern.gemm_(x, b, torch.full((m, n), float("nan")))
        err = (c.double() - x.double() @ b.double()).abs()
        assert bool((err <= gemm.rounding_bound(x, b)).all())
    c0 = torch.randn(m, n, generator=gen)
    c = kern.gemm_(a, b, c0.clone(), accumulate=True)
    err = (c.double() - (c0.double() + a.double() @ b.double())).abs()
    assert bool((err <= gemm.rounding_bound(a, b) + 2.0 ** -24 * c.double().abs()).all())


def test_transpose_and_transposing_silu():
    kern = kernels_or_skip()
    gen = torch.Generator().manual_seed(3)
    for rows, n in ((512, 128), (37, 45), (16, 16), (5, 3), (33, 17)):
        a = torch.randn(rows, n, generator=gen)
        assert torch.equal(kern.transpose_(a, torch.empty(n, rows)), a.T)
        z, b = torch.randn(rows, n, generator=gen), torch.randn(n, generator=gen)
        z2, a1, a2, at = z.clone(), torch.empty(rows, n), torch.empty(rows, n), torch.empty(n, rows)
        kern.bias_silu_t_(z, b, a1, at)
        kern.bias_silu_(z2, b, a2)
        assert torch.equal(a1, a2) and torch.equal(z, z2) and torch.equal(at, a1.T)


def test_one_call_forward_backward_equals_the_per_op_path(monkeypatch):
    """mlp_fb (one C call per chain) and the per-op native path compute the same bits."""
    import collapselab.fast.batched as batched_mod
    from collapselab.processes import VPProcess
    from collapselab.scores.mlp import MLPNet
    from collapselab.scores.training import TrainConfig

    kern = kernels_or_skip()
    if not isinstance(gemm.load(), gemm.NativeProducts):
        pytest.skip(f"the native GEMM is not used here: {gemm.status()}")
    torch.manual_seed(0)
    nets = [MLPNet(2, hidden=32, layers=3, time_embed_dim=16) for _ in range(2)]
    datas = [torch.randn(300, 2), torch.randn(300, 2) + 1]
    cfg = TrainConfig(steps=30, batch_size=64, grad_clip=0.5)

    def run():
        return batched_mod.train_dsm_batched([copy.deepcopy(n) for n in nets], datas,
                                             VPProcess(), cfg, [1, 2], threads=1)

    planned = run()
    monkeypatch.setattr(type(kern), "fits_mlp", lambda self, ws: False)
    per_op = run()
    for a, b in zip(planned, per_op, strict=True):
        assert a.loss_history == b.loss_history
        for p, q in zip(a.net.parameters(), b.net.parameters(), strict=True):
            assert torch.equal(p, q)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_loads_under_no_grad_and_inference_mode(fresh_load, context):
    """The self-test must not need autograd: the first load may happen inside a sampler's
    no_grad or inference_mode block."""
    if native.load() is None:
        pytest.skip(f"native kernels unavailable here: {native.status()}")
    native.load.cache_clear()
    with context():
        assert fresh_load() is not None, native.status()
