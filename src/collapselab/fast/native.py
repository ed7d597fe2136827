"""Optional native kernels for the CPU step of MLP training.

The DSM step of a SiLU MLP has, per hidden layer, four elementwise passes in eager PyTorch:
the bias add, ``silu``, ``silu_backward`` (which computes the sigmoid again) and the bias
gradient's column sum. Two fused, vectorised C loops replace them:

- forward ``bias_silu``: ``z += b; a = silu(z); z ← silu'(z)`` (one exp per element; the
  pre-activation is only ever needed through silu', so its buffer keeps that instead);
- backward ``mul_colsum``: ``g *= d; gb = Σ_rows g`` (d = silu', or none for the output layer).

A narrow output layer (d ≤ 10 outputs, as in the GMM experiments) is a poor shape for BLAS (a
small fraction of the square products' rate), so two more passes do it: ``out_fwd`` (the layer,
the loss gradient, its column sums and the loss, eight rows at a time in vector registers like a
GEMM micro-kernel) and ``out_bwd`` (its weight gradient, and the input gradient of the layer
below times silu', with its column sums).
The products themselves:

- ``gemm``: C (+)= op(A) B in float32, op(A) = A or Aᵀ read in place; tiles of 6 rows x 64
  columns of C in 24 vector accumulators, 128 x 64 panels of B kept in L1, A broadcast.
  :mod:`collapselab.fast.gemm` uses it on AVX-512 builds only (the AVX2 build emulates its
  512-bit vectors);
- ``transpose`` (16 x 16 tiles in registers) and ``bias_silu_t`` (the forward pass that also
  writes its output transposed): dense transposed activations for oneDNN's products, which
  reorder a strided operand on every call.

And the step around them: ``mlp_fb``, one chain's whole forward/backward in one call (~20
ctypes calls per chain otherwise), and ``adam_ema``, gradient clipping + Adam(W) (torch's
fused formulas) + the EMA in one pass over the flat training state.
benchmarks/results/ has the measurements.

Nothing depends on them. The C source below is compiled once per machine with the system C
compiler (``$CC`` or ``cc``) into the cache (``$COLLAPSELAB_CACHE/native``, default
``~/.cache/collapselab/native``), loaded with ctypes, checked against the PyTorch ops on a test
input (NaN and ±inf included; the products and the one-call step against float64, the
optimizer pass against torch's fused Adam), and used only where all of that succeeds; otherwise
:func:`load` returns None and the caller keeps the PyTorch ops. ``COLLAPSELAB_NATIVE=0``
turns them off. The code is compiled without ``-ffast-math``: NaN and inf propagate exactly
as in PyTorch, so divergence checks see them. Only x86-64 with AVX2 or AVX-512, whose vector
``expf`` comes from glibc's libmvec; :func:`status` says why the kernels are off elsewhere.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["Kernels", "load", "status"]

log = logging.getLogger(__name__)

# simdlen is filled in per target: the vector variant of expf that libmvec provides
# (_ZGVdN8v_expf for AVX2, _ZGVeN16v_expf for AVX-512).
_SOURCE = (Path(__file__).with_name("kernels.c")).read_text()

# IEEE semantics: no -ffast-math (NaN and inf must propagate as in PyTorch).
_BASE_FLAGS = ["-O3", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math",
               "-fopenmp-simd"]

_TARGETS = {  # cpu flag -> (simdlen, compiler flags); the first one the CPU has is used
    "avx512f": (16, ["-mavx2", "-mfma", "-mavx512f", "-mprefer-vector-width=512"]),
    "avx2": (8, ["-mavx2", "-mfma"]),
}


class Kernels:
    """The loaded library. Arguments are contiguous float32 CPU tensors (unchecked in the hot
    path: :func:`load` hands these out only to callers that own such buffers)."""

    def __init__(self, lib: ctypes.CDLL, path: Path, target: str):
        self.path, self.target = path, target
        self._fwd, self._bwd = lib.bias_silu, lib.mul_colsum
        for f in (self._fwd, self._bwd):
            f.restype = None
            f.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 2
        self._fwdt = lib.bias_silu_t
        self._fwdt.restype = None
        self._fwdt.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 2
        self._tr = lib.transpose
        self._tr.restype = None
        self._tr.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long] * 2
        self._gemm = lib.gemm
        self._gemm.restype = None
        self._gemm.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                               ctypes.c_long, ctypes.c_void_p] + [ctypes.c_long] * 4 \
            + [ctypes.c_int]
        self._adam = lib.adam_ema
        self._adam.restype = None
        self._adam.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long] * 2 \
            + [ctypes.c_float] * 6 + [ctypes.c_int, ctypes.c_double, ctypes.c_float]
        self._mlp = lib.mlp_fb
        self._mlp.restype = None
        self._ofwd, self._obwd = lib.out_fwd, lib.out_bwd
        self._ofwd.restype = self._obwd.restype = None
        self._ofwd.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_long] * 3 + [ctypes.c_float]
        self._obwd.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_long] * 3

    def bias_silu_(self, z: Tensor, b: Tensor, a: Tensor) -> Tensor:
        """z += b (broadcast over rows), a = silu(z), z ← silu'(z), in place; returns a."""
        self._fwd(z.data_ptr(), b.data_ptr(), a.data_ptr(), z.shape[0], z.shape[1])
        return a

    def bias_silu_t_(self, z: Tensor, b: Tensor, a: Tensor, at: Tensor) -> Tensor:
        """:meth:`bias_silu_` that also writes ``at`` (n x rows) = a transposed (right after
        the pass, while a is in L2): the weight gradient's dense operand. Returns a."""
        self._fwdt(z.data_ptr(), b.data_ptr(), a.data_ptr(), at.data_ptr(), z.shape[0],
                   z.shape[1])
        return a

    def transpose_(self, a: Tensor, at: Tensor) -> Tensor:
        """at (n x rows) = a (rows x n) transposed; returns at."""
        self._tr(a.data_ptr(), at.data_ptr(), a.shape[0], a.shape[1])
        return at

    def gemm_(self, a: Tensor, b: Tensor, c: Tensor, accumulate: bool = False) -> Tensor:
        """c (+)= a @ b in float32 (FMA, register tiles of 6 x 64). ``b`` and ``c`` have rows
        of unit stride and c's width is a multiple of 16; ``a`` may be a row-major matrix or
        the transpose of one (``x.T``: the weight gradient xᵀg reads x in place). Returns c."""
        if a.stride(1) == 1:
            si, sk = a.stride(0), 1
        else:
            si, sk = 1, a.stride(1)
        self._gemm(a.data_ptr(), si, sk, b.data_ptr(), b.stride(0), c.data_ptr(), c.stride(0),
                   a.shape[0], a.shape[1], b.shape[1], int(accumulate))
        return c

    @staticmethod
    def fits_gemm(a: Tensor, b: Tensor, c: Tensor) -> bool:
        """Whether :meth:`gemm_` takes these operands (float32 CPU, unit strides where it
        needs them, c's width a multiple of 16)."""
        return (c.shape[1] % 16 == 0 and b.stride(1) == 1 and c.stride(1) == 1
                and (a.stride(1) == 1 or a.stride(0) == 1)
                and a.dtype == b.dtype == c.dtype == torch.float32)

    def fits_mlp(self, ws: list[Tensor]) -> bool:
        """Whether :meth:`mlp_plan` takes a net of these (in, out) weights: its AVX-512 build,
        hidden widths multiples of 16 (the GEMM's tiles), a narrow output layer."""
        return (self.target == "avx512f" and len(ws) >= 2
                and all(w.shape[1] % 16 == 0 for w in ws[:-1])
                and self.fits_output(ws[-1]))

    def mlp_plan(self, ws, bs, gws, gbs, inp, eps, z, act, out, sq, bsz):
        """One chain's forward/backward (C ``mlp_fb``) with its pointers bound once: returns
        a function of no arguments. Every tensor must keep its storage (the step's buffers
        and views of the flat state do); they are referenced here so they stay alive."""
        L = len(ws)
        widths = [ws[0].shape[0]] + [w.shape[1] for w in ws]
        ptrs = ctypes.c_void_p * L
        wt = torch.empty(max(w.shape[0] * w.shape[1] for w in ws[1:-1]) if L > 2 else 1)
        keep = (ws, bs, gws, gbs, inp, eps, z, act, out, sq, wt)
        args = ((ctypes.c_long * (L + 1))(*widths),
                ptrs(*[w.data_ptr() for w in ws]), ptrs(*[b.data_ptr() for b in bs]),
                ptrs(*[g.data_ptr() for g in gws]), ptrs(*[g.data_ptr() for g in gbs]),
                ctypes.c_void_p(inp.data_ptr()), ctypes.c_void_p(eps.data_ptr()),
                (ctypes.c_void_p * (L - 1))(*[t.data_ptr() for t in z[:L - 1]]),
                (ctypes.c_void_p * (L - 1))(*[t.data_ptr() for t in act[:L - 1]]),
                ctypes.c_void_p(out.data_ptr()), ctypes.c_void_p(wt.data_ptr()),
                ctypes.c_void_p(sq.data_ptr()), ctypes.c_long(bsz),
                ctypes.c_float(2.0 / bsz))
        fn = self._mlp

        def run(_keep=keep):
            fn(ctypes.c_long(L), *args)
        return run

    def adam_ema_(self, w: Tensor, g: Tensor, m: Tensor, v: Tensor, e: Tensor,
                  max_norm: float | None, lr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float, decoupled: bool, step: int, ema_weight: float) -> None:
        """Per row (chain) of the (rows x P) state: clip g to ``max_norm`` (None: no
        clipping), one Adam(W) step at ``step`` (1-based, after the increment), then
        e = lerp(e, w, ema_weight); w, m, v and e in place (g is left as it was)."""
        self._adam(w.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), e.data_ptr(),
                   w.shape[0], w.shape[1], -1.0 if max_norm is None else max_norm, lr, beta1,
                   beta2, eps, weight_decay, int(decoupled), float(step), ema_weight)

    def mul_colsum_(self, g: Tensor, d: Tensor | None, gb: Tensor) -> Tensor:
        """g *= d in place (skipped when d is None), gb = column sums of g; returns g."""
        self._bwd(g.data_ptr(), None if d is None else d.data_ptr(), gb.data_ptr(), g.shape[0],
                  g.shape[1])
        return g

    @staticmethod
    def fits_output(w: Tensor) -> bool:
        """Whether :meth:`out_fwd_` / :meth:`out_bwd_` take an output layer of weights w
        (n x d): a narrow one, d ≤ 10 (the kernels take up to 16 outputs, but their backward
        costs grow with d: beyond d = 10 the BLAS products are faster), n a multiple of 16 up
        to 2048 (the padded copies live on the stack)."""
        n, d = w.shape
        return d <= 10 and n % 16 == 0 and n <= 2048

    def out_fwd_(self, a: Tensor, w: Tensor, b: Tensor, e: Tensor, g: Tensor, gb: Tensor,
                 sq: Tensor, c: float) -> Tensor:
        """g = c((a w + b) − e), gb = column sums of g, sq (one element) = Σ g² (the output
        layer, the loss gradient and the loss in one pass); returns g."""
        self._ofwd(a.data_ptr(), w.data_ptr(), b.data_ptr(), e.data_ptr(), g.data_ptr(),
                   gb.data_ptr(), sq.data_ptr(), a.shape[0], a.shape[1], w.shape[1], c)
        return g

    def out_bwd_(self, a: Tensor, g: Tensor, w: Tensor, sh: Tensor, gw: Tensor,
                 gh: Tensor) -> Tensor:
        """gw = aᵀg; sh ← (g wᵀ) ⊙ sh (sh holds silu' of the layer below on entry: its
        input gradient on exit); gh = column sums of it. Returns sh."""
        self._obwd(a.data_ptr(), g.data_ptr(), w.data_ptr(), sh.data_ptr(), gw.data_ptr(),
                   gh.data_ptr(), a.shape[0], a.shape[1], w.shape[1])
        return sh


_status = "not loaded yet"


def status() -> str:
    """Why the kernels are on or off (after :func:`load`)."""
    return _status


def _cache_dir() -> Path:
    from ..measure.features import default_cache_dir  # one cache root for the project

    return default_cache_dir() / "native"


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it is unreadable)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compile(cc: str, source: str, flags: list[str], out: Path) -> None:
    out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / "kernels.c"
        src.write_text(source)
        so = Path(tmp) / "kernels.so"
        cmd = [cc, *_BASE_FLAGS, *flags, str(src), "-o", str(so), "-lm"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(r.stderr or r.stdout).strip()[:300]}")
        os.chmod(so, 0o700)
        digest = Path(tmp) / "kernels.sha256"
        digest.write_text(_sha256(so))
        os.chmod(digest, 0o600)
        # atomic: a concurrent loader sees the old files or the whole new ones (the digest
        # first: a library whose digest does not match is rebuilt, never loaded)
        os.replace(digest, _digest_path(out))
        os.replace(so, out)


def _digest_path(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256")


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def untrusted(path: Path) -> str | None:
    """Why ``path`` (file or directory) must not be trusted, or None: it must be owned by this
    user and not writable by group or others (else someone else could replace what we load).
    A symbolic link is not followed and not trusted."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"{path} is owned by uid {st.st_uid}, not by this user ({os.getuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def cached_library_problem(lib: Path) -> str | None:
    """Why the cached library ``lib`` must not be loaded (None: load it): its directory, the
    file and its recorded digest must be trusted (:func:`untrusted`) and the file's SHA-256
    must equal the digest recorded when this version built it."""
    digest = _digest_path(lib)
    for p in (lib.parent, lib, digest):
        why = untrusted(p)
        if why:
            return why
    if _sha256(lib) != digest.read_text().strip():
        return f"{lib.name} does not match the digest recorded when it was built"
    return None


def _mlp_case(k: Kernels, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """mlp_fb on a small net (widths 7 -> 16 -> 32 -> 3, 37 rows) and the float64 answer, as
    two flat tensors: loss, gradients and the loss gradient in the output."""
    widths, rows = [7, 16, 32, 3], 37
    shapes = list(zip(widths[:-1], widths[1:], strict=True))
    if not k.fits_mlp([torch.empty(i, o) for i, o in shapes]):
        return torch.zeros(1), torch.zeros(1)  # no AVX-512 build: mlp_fb is never called
    ws = [torch.randn(i, o, generator=gen) / i ** 0.5 for i, o in shapes]
    bs = [torch.randn(1, o, generator=gen) for o in widths[1:]]
    inp, eps = torch.randn(rows, widths[0], generator=gen), torch.randn(rows, 3, generator=gen)
    gws, gbs = [torch.empty_like(w) for w in ws], [torch.empty_like(b) for b in bs]
    z = [torch.empty(rows, o) for o in widths[1:-1]]
    act = [torch.empty(rows, o) for o in widths[1:-1]]
    out, sq = torch.empty(rows, 3), torch.empty(1)
    k.mlp_plan(ws, bs, gws, gbs, inp, eps, z, act, out, sq, rows)()
    # The reference in float64, backpropagated by hand (no autograd: load() may be called
    # under no_grad or inference_mode).
    w64, b64 = [w.double() for w in ws], [b.double() for b in bs]
    hs, zs64 = [inp.double()], []
    for i in range(3):
        zi = hs[-1] @ w64[i] + b64[i]
        zs64.append(zi)
        hs.append(torch.nn.functional.silu(zi) if i < 2 else zi)
    g = (hs[-1] - eps.double()) * (2.0 / rows)
    g_out, loss = g, (hs[-1] - eps.double()).square().sum() / rows
    gw64, gb64 = [None] * 3, [None] * 3
    for i in (2, 1, 0):
        gw64[i], gb64[i] = hs[i].T @ g, g.sum(0, keepdim=True)
        if i > 0:
            s_ = torch.sigmoid(zs64[i - 1])
            g = (g @ w64[i].T) * (s_ * (1 + zs64[i - 1] * (1 - s_)))
    got = torch.cat([sq * (rows / 4.0), out.flatten()] + [g.flatten() for g in gws + gbs])
    want = torch.cat([loss[None], g_out.flatten()] + [g.flatten() for g in gw64 + gb64]).float()
    return got, want


def _adam_case(k: Kernels, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """adam_ema against clipping + torch's fused Adam(W) + lerp, on a (3 x 40) state: Adam
    with L2 decay and an EMA weight below 1/2, AdamW with one above, clipping active for some
    rows only; two steps each. Flat (w, m, v, e) of both."""
    got, want = [], []
    for fused, decoupled, ew in ((torch._fused_adam_, False, 0.1),
                                 (torch._fused_adamw_, True, 0.8)):
        w = torch.randn(3, 40, generator=gen)
        m, v = torch.randn(3, 40, generator=gen) * 0.1, torch.rand(3, 40, generator=gen) * 0.1
        e = torch.randn(3, 40, generator=gen)
        ref = [t.clone() for t in (w, m, v, e)]
        for step in (3, 4):
            g = torch.randn(3, 40, generator=gen) * torch.tensor([[0.05], [1.0], [3.0]])
            k.adam_ema_(w, g, m, v, e, 1.0, 1e-2, 0.9, 0.999, 1e-8, 1e-2, decoupled, step, ew)
            gc = g.clone()
            gc.mul_((1.0 / (torch.linalg.vector_norm(gc, dim=1) + 1e-6)).clamp_(max=1.0)[:, None])
            fused([ref[0]], [gc], [ref[1]], [ref[2]], [], [torch.tensor(float(step))],
                  lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=1e-2, eps=1e-8,
                  amsgrad=False, maximize=False)
            ref[3].lerp_(ref[0], ew)
        got.append(torch.cat([t.flatten() for t in (w, m, v, e)]))
        want.append(torch.cat([t.flatten() for t in ref]))
    return torch.cat(got), torch.cat(want)


def _self_test(k: Kernels) -> None:
    """The kernels against the PyTorch ops they replace, NaN and ±inf included."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(37, 45, generator=gen) * 4
    z[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 90.0])
    b = torch.randn(45, generator=gen)
    g = torch.randn(37, 45, generator=gen)
    x = z + b
    want_a = torch.nn.functional.silu(x)
    want_g = torch.ops.aten.silu_backward(g, x)
    zz, a, gg, gb = z.clone(), torch.empty_like(z), g.clone(), torch.empty(45)
    k.bias_silu_(zz, b, a)
    k.mul_colsum_(gg, zz, gb)
    # The transposing variant, on 37 rows (two full blocks and a tail) of 45 columns (two full
    # tiles and a remainder).
    zt, at_, att = z.clone(), torch.empty_like(z), torch.full((45, 37), float("nan"))
    k.bias_silu_t_(zt, b, at_, att)
    gt = k.transpose_(g, torch.full((45, 37), float("nan")))
    # The products: 37 x 45 @ 45 x 32 (row tiles of 6 with a remainder, two vectors), the
    # transposed form (45 x 37 @ 37 x 32), and an accumulation; 21 x 160 @ 160 x 80 (a
    # second block of the reduction, a partial panel of 64 + 16 columns).
    bm = torch.randn(45, 32, generator=gen)
    gm = torch.randn(37, 32, generator=gen)
    p1 = k.gemm_(z[:, :45].nan_to_num(0, 0, 0), bm, torch.full((37, 32), float("nan")))
    p2 = k.gemm_(z[:, :45].nan_to_num(0, 0, 0).T, gm, torch.full((45, 32), float("nan")))
    p3 = k.gemm_(z[:, :45].nan_to_num(0, 0, 0).T, gm, p2.clone(), accumulate=True)
    xa, xb = torch.randn(21, 160, generator=gen), torch.randn(160, 80, generator=gen)
    p4 = k.gemm_(xa, xb, torch.empty(21, 80))
    gb2 = torch.empty(45)
    k.mul_colsum_(g.clone(), None, gb2)
    # The narrow output layer (45 -> 3), forward with the loss gradient, then backward into
    # the layer below (silu' = zz from above); e carries a NaN to the gradient.
    a48, s48 = torch.nn.functional.silu(z[:, :3].repeat(1, 16)), torch.rand(37, 48)
    w = torch.randn(48, 3, generator=gen)
    bo = torch.randn(1, 3, generator=gen)
    e = torch.randn(37, 3, generator=gen)
    e[5, 1] = float("nan")
    go, gbo, sq = torch.empty(37, 3), torch.empty(1, 3), torch.empty(1)
    k.out_fwd_(a48, w, bo, e, go, gbo, sq, 0.25)
    want_go = ((a48 @ w + bo) - e) * 0.25
    sh, gw, gh = s48.clone(), torch.empty(48, 3), torch.empty(48)
    k.out_bwd_(a48, go, w, sh, gw, gh)
    want_h = (go @ w.T) * s48
    got_mlp, want_mlp = _mlp_case(k, gen)
    got_opt, want_opt = _adam_case(k, gen)
    for got, want, what in ((got_mlp, want_mlp, "MLP forward/backward"),
                            (got_opt, want_opt, "clipping + Adam(W) + EMA"),
                            (a, want_a, "silu"), (gg, want_g, "silu_backward"),
                            (at_, want_a, "silu (transposing)"),
                            (att, want_a.T, "transposed silu"), (zt, zz, "silu' (transposing)"),
                            (gt, g.T, "transpose"),
                            (p1, z[:, :45].nan_to_num(0, 0, 0) @ bm, "product"),
                            (p2, z[:, :45].nan_to_num(0, 0, 0).T @ gm, "transposed product"),
                            (p3, 2 * p2, "accumulated product"), (p4, xa @ xb, "blocked product"),
                            (gb, want_g.sum(0), "column sum"),
                            (gb2, g.sum(0), "plain column sum"),
                            (go, want_go, "output layer"), (gbo, want_go.sum(0, True),
                                                            "output bias gradient"),
                            (sq, want_go.square().sum()[None], "loss"),
                            (gw, a48.T @ go, "output weight gradient"),
                            (sh, want_h, "output input gradient"),
                            (gh, want_h.sum(0), "hidden bias gradient")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True,
                                   msg=f"native {what} disagrees with PyTorch")


@functools.cache
def load() -> Kernels | None:
    """The compiled kernels, or None where they are unavailable (see :func:`status`)."""
    global _status
    if os.environ.get("COLLAPSELAB_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        _status = "off: COLLAPSELAB_NATIVE=0"
        return None
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        _status = f"off: needs Linux on x86-64, this is {platform.system()} {platform.machine()}"
        return None
    have = cpu_flags()
    target = next((t for t in _TARGETS if t in have), None)
    if target is None:
        _status = "off: the CPU has neither AVX2 nor AVX-512"
        return None
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        _status = f"off: no C compiler ({cc!r} not found)"
        return None
    simdlen, flags = _TARGETS[target]
    source = _SOURCE.replace("SIMDLEN", str(simdlen))
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout.splitlines()[:1]
        # Everything that shapes the library keys its cache entry (flags included).
        key = hashlib.sha256("\n".join([source, *_BASE_FLAGS, *flags, *version]).encode()
                             ).hexdigest()[:16]
        path = _cache_dir() / f"kernels-{target}-{key}.so"
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        unsafe = untrusted(path.parent)
        if unsafe:  # others could swap the library: do not build or load anything there
            raise RuntimeError(f"cache not trusted: {unsafe}")
        problem = cached_library_problem(path) if path.exists() else "not built yet"
        if problem:
            if path.exists():
                log.warning("collapselab.fast: rebuilding %s (%s)", path.name, problem)
            _compile(cc, source, flags, path)
            problem = cached_library_problem(path)
            if problem:
                raise RuntimeError(f"the library just built is not trusted: {problem}")
        kernels = Kernels(ctypes.CDLL(str(path)), path, target)
        _self_test(kernels)
    except Exception as exc:  # noqa: BLE001 - any failure means: use the PyTorch ops
        _status = f"off: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        (log.warning if "not trusted" in _status else log.info)(
            "collapselab native kernels unavailable (%s); using PyTorch ops", _status)
        return None
    _status = f"on: {target}, {path}"
    return kernels
