"""Triton kernel for the KDE score's attention (PAPER.md §5, "KDE score, exactly").

The KDE score ``(a · Σ_j w_j c_j − y) / v`` with ``w = softmax_j(−‖y − a c_j‖² / (2v))`` is
softmax attention of folded queries ``q = [a y', a², 0, …]`` against folded keys
``k_j = [c_j', −‖c_j'‖²/2, 0, …]`` (``'`` = centred on the centres' mean; see
:mod:`collapselab.scores.kde_attention`). This module computes

    out_i = Σ_j softmax_j(q_i · k_j / v) k_j

in one pass over the centres, flash-attention style: a program owns a block of queries, loops
over blocks of centres, forms the block's logits ``q·k / v`` in float32 (``tl.dot`` with
``input_precision="ieee"`` by default: no TF32 or bf16 rounding of the logits, which the
softmax over ``‖y − a c‖²/2v`` cannot afford at small v), and keeps a running maximum, a
running sum of weights and a running ``Σ w k`` (online softmax, rescaled when the maximum
grows). Memory is O((n + N)·w); no n×N array exists anywhere.

Rounding: the logits carry the same ``eps·R²/v`` error as the fused SDPA path (same folded
form, float32 accumulation), so the error bound of :mod:`collapselab.scores.kde_attention` applies.
Exponentials are taken base 2 with ``log2(e)/v`` folded into the query scale (one multiply
per pair fewer; the relative rounding of the scale is eps, far below the logits' own error).

Head width: the keys' width (``d + 1`` rounded up to a multiple of 8) is padded here to a
power of two ≥ 16, what ``tl.dot`` accepts; the padded columns are zero and change nothing.

Without a GPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1`` in the
environment before Triton is first imported) on CPU tensors, which is how the tests check
it. Importing this module raises ImportError when Triton is not installed.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["interpreting", "kde_attention"]

_LOG2E = 1.0 / math.log(2.0)
# Tile sizes tried on a GPU (Triton autotunes over them per (n, N, width)); the interpreter
# uses one fixed tile (its cost is per block, so not a tiny one) unless ``blocks`` is given.
_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (64, 64, 4, 2),
        (128, 64, 4, 2),
        (128, 64, 8, 3),
        (128, 128, 8, 2),
        (256, 64, 8, 2),
        (64, 128, 4, 3),
        (128, 32, 4, 3),
    ]
]
_INTERPRET_BLOCKS = (64, 128)


def interpreting() -> bool:
    """Whether Triton runs its interpreter (kernels on CPU tensors, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _kde_attention_kernel(
    q_ptr,
    k_ptr,
    out_ptr,
    n,
    n_centres,
    qk_scale,
    stride_q,
    stride_k,
    stride_o,
    WIDTH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One block of queries against all centres: online softmax, base-2 exponent."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, WIDTH)
    row_ok = rows < n
    q = tl.load(q_ptr + rows[:, None] * stride_q + cols[None, :], mask=row_ok[:, None], other=0.0)
    q = q * qk_scale  # logits come out in log2 units: q·k · log2(e)/v
    run_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, WIDTH], dtype=tl.float32)
    for start in range(0, n_centres, BLOCK_N):
        centres = start + tl.arange(0, BLOCK_N)
        col_ok = centres < n_centres
        k = tl.load(
            k_ptr + centres[:, None] * stride_k + cols[None, :], mask=col_ok[:, None], other=0.0
        )
        logits = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, 1))
        # The first block holds at least one real centre, so new_max is finite from then on
        # and exp2(-inf - finite) = 0 clears the empty initial state.
        rescale = tl.exp2(run_max - new_max)
        p = tl.exp2(logits - new_max[:, None])
        run_sum = run_sum * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p, k, input_precision=PRECISION)
        run_max = new_max
    out = acc / run_sum[:, None]
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], out, mask=row_ok[:, None])


_autotuned = triton.autotune(configs=_CONFIGS, key=["n", "n_centres", "WIDTH"])(
    _kde_attention_kernel
)


def _padded(x: Tensor, width: int) -> Tensor:
    x = x.to(torch.float32)
    if x.shape[1] == width and x.is_contiguous():
        return x
    out = x.new_zeros((x.shape[0], width))
    out[:, : x.shape[1]] = x
    return out


def kde_attention(
    q: Tensor,
    keys: Tensor,
    inv_var: float,
    precision: str = "ieee",
    blocks: tuple[int, int] | None = None,
) -> Tensor:
    """``Σ_j softmax_j(q_i·k_j · inv_var) k_j`` for every row of ``q``, in float32.

    PAPER.md §5 (the KDE score as attention; see the module docstring). ``q`` is ``(n, w)``,
    ``keys`` ``(N, w)``, both on one CUDA device (or on CPU under the interpreter).
    ``precision`` is ``tl.dot``'s input precision for both products: ``"ieee"`` (float32
    FMAs, the default) or ``"tf32x3"`` (three TF32 tensor-core products, about float32
    accuracy; for measurement). ``blocks = (BLOCK_M, BLOCK_N)`` (powers of two ≥ 16) fixes
    the tile instead of autotuning it. Returns an ``(n, w)`` float32 tensor.
    """
    if precision not in ("ieee", "tf32x3"):
        raise ValueError(f"precision must be 'ieee' or 'tf32x3', got {precision!r}")
    if q.dim() != 2 or keys.dim() != 2 or q.shape[1] != keys.shape[1]:
        raise ValueError("q and keys must be 2-D with the same width")
    if keys.shape[0] == 0:
        raise ValueError("keys must hold at least one centre")
    if q.device != keys.device:
        raise ValueError(f"q on {q.device} but keys on {keys.device}")
    n, width = q.shape
    if n == 0:
        return q.new_zeros((0, width), dtype=torch.float32)
    wide = max(16, 1 << (width - 1).bit_length())
    qp, kp = _padded(q, wide), _padded(keys, wide)
    out = torch.empty((n, wide), dtype=torch.float32, device=q.device)
    args = (qp, kp, out, n, keys.shape[0], float(inv_var) * _LOG2E,
            qp.stride(0), kp.stride(0), out.stride(0))
    if blocks is None and interpreting():
        blocks = _INTERPRET_BLOCKS
    if blocks is not None:
        bm, bn = blocks
        if min(bm, bn) < 16 or bm & (bm - 1) or bn & (bn - 1):
            raise ValueError(f"blocks must be powers of two >= 16, got {blocks}")
        _kde_attention_kernel[(triton.cdiv(n, bm),)](
            *args, WIDTH=wide, PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn
        )
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)  # noqa: E731
        _autotuned[grid](*args, WIDTH=wide, PRECISION=precision)
    return out[:, :width]
