"""Optional native kernels for the CPU step of MLP training (issue 6, part 3).

The DSM step of a SiLU MLP has, per hidden layer, four elementwise passes in eager PyTorch:
the bias add, ``silu``, ``silu_backward`` (which computes the sigmoid again) and the bias
gradient's column sum. Two fused, vectorised C loops replace them:

- forward ``bias_silu``: ``z += b; a = silu(z); z ← silu'(z)`` (one exp per element; the
  pre-activation is only ever needed through silu', so its buffer keeps that instead);
- backward ``mul_colsum``: ``g *= d; gb = Σ_rows g`` (d = silu', or none for the output layer).

At width 128 and batch 512 they take about half the time of the four PyTorch kernels. A
narrow output layer (d ≤ 10 outputs, as in the GMM experiments) is a poor shape for BLAS
(20-30 µs for a 512 × 128 × 2 product: ~10 GFLOP/s, a tenth of the square products' rate),
so two more passes do it: ``out_fwd`` (the layer, the loss gradient, its column sums and the loss,
eight rows at a time in vector registers like a GEMM micro-kernel) and ``out_bwd`` (its weight
gradient, and the input gradient of the layer below times silu', with its column sums).
The products themselves:

- ``gemm``: C (+)= op(A) B in float32, op(A) = A or Aᵀ read in place; tiles of 6 rows x 64
  columns of C in 24 vector accumulators, 128 x 64 panels of B kept in L1, A broadcast.
  210-224 GFLOP/s at the step's shapes on the AMD EPYC development machine, whose core peaks
  at 231-248 (MKL, PyTorch's BLAS, takes its AVX2 path there: ~95). :mod:`collapselab.gemm`
  uses it on AVX-512 builds only (the AVX2 build emulates its 512-bit vectors);
- ``transpose`` (16 x 16 tiles in registers) and ``bias_silu_t`` (the forward pass that also
  writes its output transposed): dense transposed activations for oneDNN's products, which
  reorder a strided operand on every call.

And the step around them: ``mlp_fb``, one chain's whole forward/backward in one call (~20
ctypes calls per chain otherwise), and ``adam_ema``, gradient clipping + Adam(W) (torch's
fused formulas) + the EMA in one pass over the flat training state.
docs/performance.md, "Batched chains", has the measurements.

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
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["Kernels", "load", "status"]

log = logging.getLogger(__name__)

# simdlen is filled in per target: the vector variant of expf that libmvec provides
# (_ZGVdN8v_expf for AVX2, _ZGVeN16v_expf for AVX-512).
_SOURCE = r"""
#include <math.h>
#pragma omp declare simd notinbranch simdlen(SIMDLEN)
extern float expf(float);

/* z (rows x n) += b (n); a = silu(z); z <- silu'(z) = s (1 + z (1 - s)), s = sigmoid(z). */
void bias_silu(float *restrict z, const float *restrict b, float *restrict a,
               long rows, long n) {
    for (long r = 0; r < rows; r++) {
        float *zr = z + r * n, *ar = a + r * n;
        #pragma omp simd
        for (long j = 0; j < n; j++) {
            float x = zr[j] + b[j];
            float s = 1.0f / (1.0f + expf(-x));
            ar[j] = x * s;
            zr[j] = s * (1.0f + x * (1.0f - s));
        }
    }
}

/* A 16 x 16 block transposed in registers: four perfect shuffles of the rows (row r, lane c
   go to row r', lane c' with the bits of r'c' those of rc rotated by one; four rotations swap
   r and c). */
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int v16i __attribute__((vector_size(64)));

static inline void transpose16(v16 *r) {
    const v16i lo = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
    const v16i hi = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    for (int stage = 0; stage < 4; stage++) {
        v16 s[16];
        for (int i = 0; i < 8; i++) {
            s[2 * i] = __builtin_shuffle(r[i], r[i + 8], lo);
            s[2 * i + 1] = __builtin_shuffle(r[i], r[i + 8], hi);
        }
        for (int i = 0; i < 16; i++) r[i] = s[i];
    }
}

/* at (n x rows) = a (rows x n) transposed, in 16 x 16 tiles, a column of tiles at a time:
   at's rows are then written one after another (a row of tiles at a time scatters the
   stores over all of at's rows: 3.4x slower). */
void transpose(const float *restrict a, float *restrict at, long rows, long n) {
    const long nq = n - n % 16, rq = rows - rows % 16;
    for (long c0 = 0; c0 < nq; c0 += 16)
        for (long r0 = 0; r0 < rq; r0 += 16) {
            v16 t[16];
            for (int i = 0; i < 16; i++) t[i] = *(const v16u *)(a + (r0 + i) * n + c0);
            transpose16(t);
            for (int i = 0; i < 16; i++) *(v16u *)(at + (c0 + i) * rows + r0) = t[i];
        }
    for (long j = 0; j < n; j++)  /* the remainders: last columns, last rows */
        for (long i = j < nq ? rq : 0; i < rows; i++) at[j * rows + i] = a[i * n + j];
}

/* bias_silu, then at = a transposed (the weight gradient's dense operand), while a is in
   L2. */
void bias_silu_t(float *restrict z, const float *restrict b, float *restrict a,
                 float *restrict at, long rows, long n) {
    bias_silu(z, b, a, rows, n);
    transpose(a, at, rows, n);
}

/* C[i][:] (+)= sum_k A[i*si + k*sk] B[k][:] for a tile of mr <= 6 rows and nv <= 4 vectors of
   16 columns: 24 accumulators in registers, B's rows loaded once per k, A broadcast. */
static inline __attribute__((always_inline)) void
gemm_tile(const float *restrict A, long si, long sk, const float *restrict B, long ldb,
          float *restrict C, long ldc, long K, const int mr, const int nv, int load) {
    v16 c[6][4];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nv; j++)
            c[i][j] = load ? *(const v16u *)(C + i * ldc + 16 * j) : (v16){0};
    for (long k = 0; k < K; k++) {
        v16 b[4];
        for (int j = 0; j < nv; j++) b[j] = *(const v16u *)(B + k * ldb + 16 * j);
        for (int i = 0; i < mr; i++) {
            const float s = A[i * si + k * sk];
            for (int j = 0; j < nv; j++) c[i][j] += s * b[j];
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nv; j++) *(v16u *)(C + i * ldc + 16 * j) = c[i][j];
}

#define TILE(MR, NV) gemm_tile(a, si, sk, b, ldb, c, ldc, kc, MR, NV, load)
#define ROWS(NV) switch (mr) { case 6: TILE(6, NV); break; case 5: TILE(5, NV); break; \
    case 4: TILE(4, NV); break; case 3: TILE(3, NV); break; case 2: TILE(2, NV); break; \
    default: TILE(1, NV); }

/* C (M x N, row stride ldc) (+)= op(A) B, B (K x N, row stride ldb), N a multiple of 16;
   op(A)[i][k] = A[i*si + k*sk]: (si, sk) = (lda, 1) for A, (1, lda) for A's transpose.
   Blocked: 128 rows of B by 64 columns (32 KiB) stay in L1 while every row tile of C passes. */
void gemm(const float *restrict A, long si, long sk, const float *restrict B, long ldb,
          float *restrict C, long ldc, long M, long K, long N, int accumulate) {
    for (long k0 = 0; k0 < K; k0 += 128) {
        const long kc = K - k0 < 128 ? K - k0 : 128;
        const int load = accumulate || k0 > 0;
        for (long j0 = 0; j0 < N; j0 += 64) {
            const int nv = (N - j0) >= 64 ? 4 : (int)((N - j0) / 16);
            const float *b = B + k0 * ldb + j0;
            for (long i0 = 0; i0 < M; i0 += 6) {
                const int mr = M - i0 < 6 ? (int)(M - i0) : 6;
                const float *a = A + i0 * si + k0 * sk;
                float *c = C + i0 * ldc + j0;
                switch (nv) { case 4: ROWS(4); break; case 3: ROWS(3); break;
                              case 2: ROWS(2); break; default: ROWS(1); }
            }
        }
    }
}

/* g (rows x n) *= d (if d is not NULL); gb (n) = column sums of g. */
void mul_colsum(float *restrict g, const float *restrict d, float *restrict gb,
                long rows, long n) {
    for (long j = 0; j < n; j++) gb[j] = 0.0f;
    for (long r = 0; r < rows; r++) {
        float *gr = g + r * n;
        if (d) {
            const float *dr = d + r * n;
            #pragma omp simd
            for (long j = 0; j < n; j++) { gr[j] *= dr[j]; gb[j] += gr[j]; }
        } else {
            #pragma omp simd
            for (long j = 0; j < n; j++) gb[j] += gr[j];
        }
    }
}

/* The output layer, of width d <= 16 (one vector: w's rows padded to 16 lanes), on the last
   activations a (rows x n), with the loss gradient: g = c ((a w + b) - e) (rows x d),
   gb = column sums of g, *sq = sum of g^2 (in double). w is n x d. Eight rows at a time in
   registers, like a GEMM kernel. */
static void out_rows(const float *restrict a, const v16 *restrict wp, const float *restrict b,
                     const float *restrict e, float *restrict g, float *restrict gb,
                     double *restrict sq, long m, long n, long d, float c) {
    v16 s[8] = {0};
    for (long k = 0; k < n; k++) {
        const v16 wk = wp[k];
        for (long i = 0; i < 8; i++) s[i] += a[i * n + k] * wk;
    }
    for (long i = 0; i < m; i++)
        for (long j = 0; j < d; j++) {
            float v = ((s[i][j] + b[j]) - e[i * d + j]) * c;
            g[i * d + j] = v;
            gb[j] += v;
            *sq += (double)v * v;
        }
}

void out_fwd(const float *restrict a, const float *restrict w, const float *restrict b,
             const float *restrict e, float *restrict g, float *restrict gb,
             float *restrict sq, long rows, long n, long d, float c) {
    v16 wp[n];
    double acc = 0.0;
    for (long k = 0; k < n; k++) {
        v16 t = {0};
        for (long j = 0; j < d; j++) t[j] = w[k * d + j];
        wp[k] = t;
    }
    for (long j = 0; j < d; j++) gb[j] = 0.0f;
    long r = 0;
    for (; r + 8 <= rows; r += 8)
        out_rows(a + r * n, wp, b, e + r * d, g + r * d, gb, &acc, 8, n, d, c);
    if (r < rows) {  /* the last rows, through a zero-padded copy */
        float tail[8 * n];
        for (long i = 0; i < 8 * n; i++) tail[i] = r * n + i < rows * n ? a[r * n + i] : 0.0f;
        out_rows(tail, wp, b, e + r * d, g + r * d, gb, &acc, rows - r, n, d, c);
    }
    *sq = (float)acc;
}

/* Back through the output layer (w: n x d, d <= 16, n a multiple of 16) into the hidden
   layer below it: gw (n x d) = a^T g; h = (g w^T) * silu', written over silu' (sh: rows x n,
   in: silu', out: h); gh (n) = column sums of h. */
void out_bwd(const float *restrict a, const float *restrict g, const float *restrict w,
             float *restrict sh, float *restrict gw, float *restrict gh,
             long rows, long n, long d) {
    const long nb = n / 16;
    v16 wt[d * nb], gwt[d * nb], ghv[nb];
    for (long j = 0; j < d; j++)
        for (long q = 0; q < nb; q++) {
            v16 t;
            for (long l = 0; l < 16; l++) t[l] = w[(q * 16 + l) * d + j];
            wt[j * nb + q] = t;
            gwt[j * nb + q] = (v16){0};
        }
    for (long q = 0; q < nb; q++) ghv[q] = (v16){0};
    for (long r = 0; r < rows; r++) {
        const float *gr = g + r * d;
        const v16u *ar = (const v16u *)(a + r * n);
        v16u *hr = (v16u *)(sh + r * n);
        for (long q = 0; q < nb; q++) {
            const v16 av = ar[q];
            v16 t = {0};
            for (long j = 0; j < d; j++) {
                gwt[j * nb + q] += av * gr[j];
                t += gr[j] * wt[j * nb + q];
            }
            const v16 h = t * hr[q];
            hr[q] = h;
            ghv[q] += h;
        }
    }
    for (long q = 0; q < nb; q++)
        for (long l = 0; l < 16; l++) {
            gh[q * 16 + l] = ghv[q][l];
            for (long j = 0; j < d; j++) gw[(q * 16 + l) * d + j] = gwt[j * nb + q][l];
        }
}

/* One chain's forward/backward of the DSM step of a SiLU MLP whose output layer is narrow
   (out_fwd / out_bwd), all in this library: what batched._forward_backward_2d computes with
   these kernels, in one call (the Python of ~20 calls per chain was ~0.08 ms). L weight
   layers; widths w[0..L], w[1..L-1] multiples of 16, w[L] <= 16; W[l] (w[l] x w[l+1]) and
   b[l] the weights, GW[l] and GB[l] their gradients; inp (rows x w[0]), eps (rows x w[L]);
   work space z[l], act[l] (rows x w[l+1], l < L - 1) and wt (w x w for the widest hidden
   layer); out (rows x w[L]) receives the loss gradient c (net - eps), sq its sum of squares. */
void mlp_fb(long L, const long *w, float *const *W, float *const *b, float *const *GW,
            float *const *GB, const float *inp, const float *eps, float *const *z,
            float *const *act, float *out, float *wt, float *sq, long rows, float c) {
    const float *a = inp;
    for (long l = 0; l + 1 < L; l++) {
        gemm(a, w[l], 1, W[l], w[l + 1], z[l], w[l + 1], rows, w[l], w[l + 1], 0);
        bias_silu(z[l], b[l], act[l], rows, w[l + 1]);
        a = act[l];
    }
    const long h = L - 2;  /* the last hidden layer */
    out_fwd(a, W[L - 1], b[L - 1], eps, out, GB[L - 1], sq, rows, w[L - 1], w[L], c);
    out_bwd(a, out, W[L - 1], z[h], GW[L - 1], GB[h], rows, w[L - 1], w[L]);
    float *g = z[h];  /* the loss gradient in layer h's pre-activation */
    for (long l = h; l >= 0; l--) {
        const float *x = l == 0 ? inp : act[l - 1];
        gemm(x, 1, w[l], g, w[l + 1], GW[l], w[l + 1], w[l], rows, w[l + 1], 0);  /* x^T g */
        if (l > 0) {  /* into the activation buffer of layer l - 1: last needed just above */
            transpose(W[l], wt, w[l], w[l + 1]);
            gemm(g, w[l + 1], 1, wt, w[l], act[l - 1], w[l], rows, w[l + 1], w[l], 0);
            mul_colsum(act[l - 1], z[l - 1], GB[l - 1], rows, w[l]);
            g = act[l - 1];
        }
    }
}

/* The update of a (rows x P) chain-major training state, one row per chain: clip the row's
   gradient to global norm max_norm (max_norm <= 0: no clipping; factor max_norm / (norm +
   1e-6), at most 1, as batched._clip_per_chain_), one Adam or AdamW step with torch's fused
   formulas (bias corrections of step `step`; wd: L2 in the gradient, or decoupled), then the
   EMA e = lerp(e, w, ew). One pass over the state instead of four (norm, scale, Adam, lerp):
   the state of three width-128 chains (2.5 MB) does not fit L2 beside the step's buffers. */
void adam_ema(float *restrict w, const float *restrict g, float *restrict m,
              float *restrict v, float *restrict e, long rows, long P, float max_norm,
              float lr, float beta1, float beta2, float eps, float wd, int decoupled,
              double step, float ew) {
    const double bc1 = 1.0 - pow(beta1, step), bc2 = 1.0 - pow(beta2, step);
    const float step_size = (float)(lr / bc1), bc2s = (float)sqrt(bc2);
    const float c1 = 1.0f - beta1, c2 = 1.0f - beta2, shrink = 1.0f - lr * wd;
    const float l2 = decoupled ? 0.0f : wd;
    for (long r = 0; r < rows; r++) {
        float *wr = w + r * P, *mr = m + r * P, *vr = v + r * P, *er = e + r * P;
        const float *gr = g + r * P;
        float f = 1.0f;
        if (max_norm > 0.0f) {
            float s = 0.0f;
            #pragma omp simd reduction(+:s)
            for (long j = 0; j < P; j++) s += gr[j] * gr[j];
            const float fac = max_norm / (sqrtf(s) + 1e-6f);
            f = fac < 1.0f ? fac : 1.0f;
        }
        #pragma omp simd
        for (long j = 0; j < P; j++) {
            float wj = wr[j];
            const float gj = gr[j] * f + l2 * wj;
            if (decoupled) wj *= shrink;
            const float mj = mr[j] + c1 * (gj - mr[j]);
            const float vj = beta2 * vr[j] + c2 * gj * gj;
            wj -= step_size * mj / (sqrtf(vj) / bc2s + eps);
            mr[j] = mj;
            vr[j] = vj;
            wr[j] = wj;
            /* torch.lerp: from the nearer end */
            er[j] = ew < 0.5f ? er[j] + ew * (wj - er[j]) : wj - (wj - er[j]) * (1.0f - ew);
        }
    }
}
"""

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
        costs grow with d: against the BLAS products they measured 1.14x / 1.07x / 1.00x /
        0.94x / 0.80x as fast at d = 8 / 10 / 12 / 14 / 16), n a multiple of 16 up to 2048
        (the padded copies live on the stack)."""
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
    from .features import default_cache_dir  # one cache root for the project

    return default_cache_dir() / "native"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compile(cc: str, source: str, flags: list[str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / "kernels.c"
        src.write_text(source)
        so = Path(tmp) / "kernels.so"
        cmd = [cc, *_BASE_FLAGS, *flags, str(src), "-o", str(so), "-lm"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(r.stderr or r.stdout).strip()[:300]}")
        os.replace(so, out)  # atomic: a concurrent loader sees the old file or the whole new one


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
    have = _cpu_flags()
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
        if not path.exists():
            _compile(cc, source, flags, path)
        kernels = Kernels(ctypes.CDLL(str(path)), path, target)
        _self_test(kernels)
    except Exception as exc:  # noqa: BLE001 - any failure means: use the PyTorch ops
        _status = f"off: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        log.info("collapselab native kernels unavailable (%s); using PyTorch ops", _status)
        return None
    _status = f"on: {target}, {path}"
    return kernels
