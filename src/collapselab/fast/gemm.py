"""The matrix products of the CPU training step of :mod:`collapselab.fast.batched`.

Per chain and layer the step makes three float32 products of small shapes (batch 512, width
128): the forward ``a @ w``, the input gradient ``g @ wᵀ`` and the weight gradient ``aᵀ @ g``.
``torch.mm`` hands them to PyTorch's BLAS (MKL in the x86 wheels), whose speed depends on the
CPU (on some CPUs MKL takes a path far below the FMA peak; measurements in
benchmarks/results/). :func:`load` returns the first of these that is available and passes a
self-test against float64 products within the float32 rounding bound (:func:`rounding_bound`):

1. :class:`NativeProducts`: :mod:`collapselab.fast.native`'s register-tiled GEMM (its AVX-512
   build only), close to the FMA peak at the step's shapes, no per-call cost beyond ctypes', results
   written into the step's own buffers, the weight gradient reading the layer input in place;
2. :class:`OneDNNProducts`: oneDNN's fp32 inner product (``torch.ops.mkldnn._linear_pointwise``,
   x @ wᵀ, IEEE float32), which PyTorch ships and which picks its kernels by instruction set:
   a fixed per-call cost, fresh outputs;
3. :class:`Products`: ``torch.mm(out=)``.

``COLLAPSELAB_GEMM`` = native | onednn | torch picks one (falling back the same way where it
is unavailable). The choice is a rule, never a timing, so one machine always computes the
same bits; the backends agree to float32 rounding (tests/fast/test_gemm.py).
"""

from __future__ import annotations

import functools
import logging
import os
import platform

import torch
from torch import Tensor

__all__ = ["NativeProducts", "OneDNNProducts", "Products", "backends", "load", "rounding_bound",
           "status"]

log = logging.getLogger(__name__)

_status = "not loaded yet"


class Products:
    """``torch.mm`` into caller-owned buffers (the portable path)."""

    name = "torch.mm"
    #: whether weight_grad is faster with a dense transposed input (oneDNN reorders a
    #: strided first operand on every call; BLAS takes a transposed view as it is)
    dense_transpose = False

    def forward(self, a: Tensor, w: Tensor, wt: Tensor, out: Tensor) -> Tensor:
        """a @ w (w: (in, out); wt its transposed view); may write ``out`` and return it."""
        return torch.mm(a, w, out=out)

    def input_grad(self, g: Tensor, w: Tensor, wt: Tensor, out: Tensor) -> Tensor:
        """g @ wᵀ; may write ``out`` and return it."""
        return torch.mm(g, wt, out=out)

    def weight_grad(self, at: Tensor, g: Tensor, out: Tensor) -> None:
        """out = aᵀ @ g (``at`` is the transposed view of the layer's input a)."""
        torch.mm(at, g, out=out)


class OneDNNProducts(Products):
    """oneDNN's float32 inner product: ``linear(x, w) = x @ wᵀ``, fresh outputs."""

    name = "oneDNN"
    dense_transpose = True

    def __init__(self):
        self._lp = torch.ops.mkldnn._linear_pointwise

    def forward(self, a, w, wt, out):
        return self._lp(a, wt, None, "none", [], "")

    def input_grad(self, g, w, wt, out):
        return self._lp(g, w, None, "none", [], "")

    def weight_grad(self, at, g, out):
        out.copy_(self._lp(at, g.T, None, "none", [], ""))


class NativeProducts(Products):
    """:mod:`collapselab.fast.native`'s register-tiled float32 GEMM (AVX-512): products written
    straight into the caller's buffers, the weight gradient reading the layer input in place
    (no transposed copy), the input gradient through one transpose of the weights (64 KiB at
    width 128). Shapes it does not take (an output width not a multiple of 16) go to
    ``fallback``."""

    name = "collapselab.fast.native GEMM"

    def __init__(self, kernels, fallback: Products):
        self.k, self.fallback = kernels, fallback

    def forward(self, a, w, wt, out):
        if self.k.fits_gemm(a, w, out):
            return self.k.gemm_(a, w, out)
        return self.fallback.forward(a, w, wt, out)

    def input_grad(self, g, w, wt, out):
        if (w.is_contiguous() and out.shape[1] % 16 == 0 and g.stride(1) == 1
                and out.stride(1) == 1 and g.dtype == w.dtype == out.dtype == torch.float32):
            w_t = self.k.transpose_(w, torch.empty(w.shape[1], w.shape[0], dtype=w.dtype))
            return self.k.gemm_(g, w_t, out)
        return self.fallback.input_grad(g, w, wt, out)

    def weight_grad(self, at, g, out):
        if self.k.fits_gemm(at, g, out):
            self.k.gemm_(at, g, out)
        else:
            self.fallback.weight_grad(at, g, out)


def status() -> str:
    """Which products the step uses, and why (after :func:`load`)."""
    return _status


def rounding_bound(a: Tensor, b: Tensor) -> Tensor:
    """Worst-case float32 error of a @ b in any summation order (Higham, Thm 3.5):
    |fl(a b) − a b| ≤ γ_n |a| |b| elementwise, γ_n = n u / (1 − n u), u = 2⁻²⁴, n the inner
    dimension. FMA and blocked sums stay within it; a reduced-precision math mode (bf16,
    tf32) does not."""
    n, u = a.shape[1], 2.0 ** -24
    return (n * u / (1 - n * u)) * (a.double().abs() @ b.double().abs())


def _self_test(p: Products) -> None:
    """The three products against float64 ones within :func:`rounding_bound`, on odd shapes
    and strided operands."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(37, 45, generator=gen)
    w = torch.randn(45, 29, generator=gen)
    g = torch.randn(37, 29, generator=gen)
    got_f = p.forward(a, w, w.T, torch.empty(37, 29))
    got_i = p.input_grad(g, w, w.T, torch.empty(37, 45))
    got_w = torch.empty(45, 29)
    p.weight_grad(a.T, g, got_w)
    for got, x, y, what in ((got_f, a, w, "forward"), (got_i, g, w.T, "input grad"),
                            (got_w, a.T, g, "weight grad")):
        err = (got.double() - x.double() @ y.double()).abs()
        if not bool((err <= rounding_bound(x, y)).all()):
            raise ArithmeticError(f"{p.name} {what} is off by more than float32 rounding "
                                  f"(max error {float(err.max()):.3g})")


def _library() -> tuple[Products, str]:
    """oneDNN where PyTorch has it and it passes the self-test, else torch.mm (and why)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return Products(), f"oneDNN's fp32 path is used on x86-64 only, this is " \
                           f"{platform.machine()}"
    if not (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return Products(), "this PyTorch has no oneDNN linear"
    try:
        p = OneDNNProducts()
        _self_test(p)
    except Exception as exc:  # noqa: BLE001 - any failure means: use torch.mm
        return Products(), f"oneDNN failed ({type(exc).__name__}: " \
                           f"{str(exc).splitlines()[0][:200]})"
    return p, "oneDNN (torch.ops.mkldnn._linear_pointwise, float32)"


def backends() -> list[Products]:
    """Every backend this machine has (torch.mm, then oneDNN and the native GEMM where they
    pass their self-tests; the native one falling back to torch.mm): for tests and
    benchmarks that compare them. The step itself uses :func:`load`."""
    out = [Products()]
    lib, _ = _library()
    if isinstance(lib, OneDNNProducts):
        out.append(lib)
    from . import native

    k = native.load()
    if k is not None and k.target == "avx512f":
        p = NativeProducts(k, Products())
        try:
            _self_test(p)
            out.append(p)
        except ArithmeticError:
            pass
    return out


@functools.cache
def load() -> Products:
    """The products of the CPU float32 step, the first of these that is available and passes
    its self-test: collapselab.fast.native's GEMM (AVX-512 builds), oneDNN, torch.mm.
    ``COLLAPSELAB_GEMM`` = native | onednn | torch picks one (falling back likewise)."""
    global _status
    forced = os.environ.get("COLLAPSELAB_GEMM", "").strip().lower()
    if forced in ("torch", "mm", "blas"):
        _status = "torch.mm: COLLAPSELAB_GEMM=torch"
        return Products()
    if forced not in ("", "auto", "native", "onednn"):
        _status = f"torch.mm: unknown COLLAPSELAB_GEMM={forced!r} (allowed: native, " \
                  f"onednn, torch)"
        log.warning("collapselab: %s", _status)
        return Products()
    lib, why = _library()
    if forced == "onednn":
        _status = f"{lib.name}: COLLAPSELAB_GEMM=onednn" + ("" if lib.name == "oneDNN"
                                                            else f"; {why}")
        return lib
    from . import native  # here: native imports torch-heavy helpers of its own

    k = native.load()
    if k is None or k.target != "avx512f":
        _status = f"{why} (collapselab.fast.native's GEMM needs its AVX-512 build: " \
                  f"{native.status() if k is None else k.target})"
        return lib
    try:
        p = NativeProducts(k, lib)
        _self_test(p)
    except Exception as exc:  # noqa: BLE001
        _status = f"{why} (collapselab.fast.native's GEMM failed: {type(exc).__name__}: " \
                  f"{str(exc).splitlines()[0][:200]})"
        return lib
    _status = f"collapselab.fast.native GEMM (AVX-512), else {why}"
    return p
