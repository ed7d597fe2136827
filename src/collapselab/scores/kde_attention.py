"""The KDE score as an attention operation (docs/paper.md §5, "KDE score, exactly").

A Gaussian KDE with centres ``c_j`` (N×d) and bandwidth ``h``, pushed through the forward
process to time ``t``, is the Gaussian mixture ``(1/N) Σ_j N(a·c_j, v I)``. For the paper's
Ornstein–Uhlenbeck process ``a = e^{−t/2}`` and ``v = h² e^{−t} + 1 − e^{−t}``; a VP process
with a β schedule gives other ``(a, v)``, so every function here takes ``scale = a`` and
``var = v`` directly. The score of that mixture is

    ∇log q_t(y) = (a · Σ_j w_j c_j − y) / v,     w = softmax_j(−‖y − a c_j‖² / (2v)),

which is softmax attention with queries ``y``, keys ``a·c_j`` and values ``c_j``.

Folding. ``−‖y − a c‖²/2 = y·(a c) − a²‖c‖²/2 − ‖y‖²/2``; the last term is the same for every
centre and cancels in the softmax, so with

    q = [a y, a²],    k_j = [c_j, −‖c_j‖²/2],    logits = q·k_j / v

the centre-norm term rides in one extra coordinate and no N-wide bias or mask is needed. The
keys do not depend on ``(a, v)``: one :class:`KDEKeys` per centre set serves every time step.
Centres are stored relative to their mean ``m`` (``y`` is shifted by ``a·m``), which is exact
and shrinks the float32 cancellation in ``q·k``. The values are the keys themselves (the last
output column is discarded): ``scaled_dot_product_attention`` on CPU keeps its fused, streaming
flash kernel only when values have the width of queries and keys (docs/paper.md §5); otherwise it
falls back to a path that materialises the n×N weight matrix.

Backends:

- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` restricted to its fused
  kernels (flash / memory-efficient / cuDNN; never the math path), computed in float32 for
  float32 and half inputs and in float64 for float64 inputs (the CPU flash kernel accepts
  float64). Memory is O((n + N)·d), never n×N.
- ``"chunked"``: a streaming online softmax over blocks of centres, in the input's dtype
  (float64 for exact comparisons). Memory is O(n_block · chunk) per step.
- ``"triton"``: the same attention through :mod:`collapselab.scores.kde_triton`, a Triton kernel
  that streams the centres with an online softmax and keeps the logits in float32 (for
  float32 / half inputs on CUDA, or on CPU under Triton's interpreter). Where it cannot run
  (Triton not installed, no CUDA tensor, float64 input) an explicit ``"triton"`` falls back
  to ``"sdpa"`` with a :class:`RuntimeWarning`.
- ``"auto"``: ``"triton"`` for float32 / half CUDA inputs when Triton imports, else ``"sdpa"``
  for float32 / half inputs and for any CUDA input, ``"chunked"`` for float64 on CPU; if no
  fused attention kernel accepts the inputs it falls back to ``"chunked"`` silently
  (explicit ``"sdpa"`` falls back with a :class:`RuntimeWarning`).

Gradients. ``kde_score`` is differentiable in ``y`` through a streamed backward
(``∂s/∂y = (a²/v²) Cov_w(c) − I/v``), about one chunked pass, O(block) memory; the fused CPU
SDPA backward is far slower than its forward, so it is not
used. Gradients in the centres go through plain autograd of the chunked stream, whose saved
tensors total n×N: fine for tests and small problems only.

Precision. The folded logits carry a rounding error of about ``eps·R²/v`` (R bounds the
centred ‖y‖ and a‖c‖), i.e. a score error of about ``eps·R²/v²``: in float32 ≈ 3e-4 relative
at the paper's sharpest point (t = 0.02, h = 0.1), ≈ 1e-6 for t ≳ 1; float64 is at ~1e-13.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["KDEKeys", "kde_log_prob", "kde_score", "ou_scale_var"]

_BACKENDS = ("auto", "sdpa", "chunked", "triton")
# Default number of centres per block for the chunked backend, and the number of
# (query, centre) logits one block may hold; the query block is sized to respect it.
_DEFAULT_CHUNK = 2048
_BLOCK_ELEMENTS = 1 << 21
_WIDTH_MULTIPLE = 8  # key width padded to a multiple of 8 (alignment of fused CUDA kernels)
# Exponent floor of the chunked backend (see _stream): e^{floor} stays a normal number.
_EXP_FLOOR = {torch.float64: -700.0, torch.float32: -80.0}


def ou_scale_var(t: float, bandwidth: float) -> tuple[float, float]:
    """Mean scale and variance of a KDE component under the OU forward process at time ``t``.

    docs/paper.md §2 and §5: ``X_t | X_0 = c ~ N(c e^{−t/2}, (1 − e^{−t}) I)``, so a KDE component
    ``N(c, h² I)`` becomes ``N(a c, v I)`` with ``a = e^{−t/2}``, ``v = h² e^{−t} + 1 − e^{−t}``.
    """
    if t < 0:
        raise ValueError(f"t must be >= 0, got {t}")
    if bandwidth < 0:
        raise ValueError(f"bandwidth must be >= 0, got {bandwidth}")
    decay = math.exp(-t)
    return math.exp(-0.5 * t), bandwidth * bandwidth * decay - math.expm1(-t)


@dataclass(frozen=True, eq=False)
class KDEKeys:
    """Centres prepared for the folded attention form; independent of ``(scale, var)``.

    ``keys`` is ``(N, w)`` with ``w = d + 1`` rounded up to a multiple of 8:
    ``[c_j − m, −‖c_j − m‖²/2, 0, …]`` where ``m = shift`` is the mean of the centres.
    Build once per centre set with :meth:`prepare` and pass it in place of ``centres`` to
    :func:`kde_score` / :func:`kde_log_prob` to skip the O(N·d) preparation per call.
    """

    keys: Tensor
    shift: Tensor
    dim: int

    @classmethod
    def prepare(cls, centres: Tensor, dtype: torch.dtype | None = None) -> KDEKeys:
        """Centre, fold the norm into an extra coordinate, pad the width; see class doc."""
        if not isinstance(centres, Tensor) or centres.dim() != 2:
            raise ValueError("centres must be a 2-D tensor of shape (N, d)")
        if centres.shape[0] == 0:
            raise ValueError("centres must hold at least one point")
        dtype = dtype or (centres.dtype if centres.is_floating_point() else torch.float32)
        if dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        n_centres, d = centres.shape
        # The shift is a constant (no gradient): any m gives the same exact result. It is
        # accumulated in float64; the keys are computed in their own dtype (rounding them from
        # a float64 computation would not be more accurate than the float32 rounding itself).
        shift = centres.detach().mean(0, dtype=torch.float64).to(dtype)
        width = -(-(d + 1) // _WIDTH_MULTIPLE) * _WIDTH_MULTIPLE
        if centres.requires_grad and torch.is_grad_enabled():  # differentiable form
            c = centres.to(dtype) - shift
            pieces = [c, -0.5 * (c * c).sum(1, keepdim=True)]
            if width > d + 1:
                pieces.append(c.new_zeros(n_centres, width - d - 1))
            return cls(keys=torch.cat(pieces, 1), shift=shift, dim=d)
        # Few passes over N×d (this runs once per centre set, but on large N every pass counts).
        keys = centres.new_zeros((n_centres, width), dtype=dtype)
        c = torch.sub(centres.detach(), shift, out=keys[:, :d])
        torch.linalg.vecdot(c, c, out=keys[:, d]).mul_(-0.5)
        return cls(keys=keys, shift=shift, dim=d)

    @property
    def n_centres(self) -> int:
        return self.keys.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def to(self, dtype: torch.dtype | None = None, device=None) -> KDEKeys:
        """The same keys in another dtype / on another device (no-op when nothing changes)."""
        if (dtype is None or dtype == self.dtype) and (
            device is None or torch.device(device) == self.device
        ):
            return self
        return KDEKeys(
            keys=self.keys.to(dtype=dtype, device=device),
            shift=self.shift.to(dtype=dtype, device=device),
            dim=self.dim,
        )


def _as_keys(centres: Tensor | KDEKeys, dtype: torch.dtype, device) -> KDEKeys:
    keys = centres if isinstance(centres, KDEKeys) else KDEKeys.prepare(centres, dtype)
    return keys.to(dtype=dtype, device=device)


def _check(y: Tensor, centres: Tensor | KDEKeys, scale: float, var: float) -> None:
    if not isinstance(y, Tensor) or y.dim() != 2:
        raise ValueError("y must be a 2-D tensor of shape (n, d)")
    if not y.is_floating_point():
        raise TypeError(f"y must be floating point, got {y.dtype}")
    d = centres.dim if isinstance(centres, KDEKeys) else centres.shape[-1]
    if y.shape[1] != d:
        raise ValueError(f"y has dimension {y.shape[1]} but the centres have dimension {d}")
    if not (math.isfinite(scale) and math.isfinite(var)) or var <= 0:
        raise ValueError(f"need finite scale and var > 0, got scale={scale}, var={var}")


def _queries(y: Tensor, keys: KDEKeys, scale: float) -> tuple[Tensor, Tensor]:
    """Shifted queries ``y' = y − a m`` and folded queries ``q = [a y', a², 0, …]``."""
    y_shift = y - scale * keys.shift
    width = keys.keys.shape[1]
    pieces = [scale * y_shift, y.new_full((y.shape[0], 1), scale * scale)]
    if width > keys.dim + 1:
        pieces.append(y.new_zeros(y.shape[0], width - keys.dim - 1))
    return y_shift, torch.cat(pieces, 1)


def _compute_dtype(y: Tensor) -> torch.dtype:
    return torch.float64 if y.dtype == torch.float64 else torch.float32


def _fused_attention(q: Tensor, k: Tensor, inv_var: float) -> Tensor | None:
    """Σ_j softmax_j(q·k_j / v) k_j through a fused SDPA kernel, or None if none applies."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        fused.append(SDPBackend.CUDNN_ATTENTION)
    q4, k4 = q[None, None], k[None, None]
    try:
        with warnings.catch_warnings(), sdpa_kernel(fused):
            warnings.simplefilter("ignore")  # the "kernel not used because ..." notices
            return F.scaled_dot_product_attention(q4, k4, k4, scale=inv_var)[0, 0]
    except RuntimeError:
        return None


def _chunk_sizes(n: int, n_centres: int, chunk: int | None) -> tuple[int, int]:
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    centre_block = min(n_centres, chunk or _DEFAULT_CHUNK)
    query_block = max(1, min(n, _BLOCK_ELEMENTS // centre_block))
    return query_block, centre_block


def _stream(
    q: Tensor,
    keys: Tensor,
    inv_var: float,
    chunk: int | None,
    values: bool,
    probe: Tensor | None = None,
    offset: Tensor | None = None,
):
    """Online softmax of ``q·k_j / v`` over centre blocks (streamed logsumexp merge).

    Returns ``(lse, mean)``: ``lse_i = log Σ_j exp(q_i·k_j / v)`` and, if ``values``,
    ``mean_i = Σ_j w_ij k_j`` with ``w_i = softmax_j(q_i·k_j / v)`` (else None). With a
    ``probe`` (n, w) and ``offset`` (n,), the accumulated value is instead
    ``Σ_j w_ij (probe_i·k_j − offset_i) k_j`` (a weighted covariance times a vector, used by
    the backward pass). Works in q's dtype and is differentiable (in-place arithmetic only when
    no gradient is recorded). Exponents below ``_EXP_FLOOR`` are clamped there: the weights
    they stand for are < e^{−80} relative to the largest, far below rounding, and clamping
    keeps subnormal numbers (slow on x86) out of the exp and the matmuls.
    """
    n, n_centres = q.shape[0], keys.shape[0]
    query_block, centre_block = _chunk_sizes(n, n_centres, chunk)
    floor = _EXP_FLOOR.get(q.dtype, _EXP_FLOOR[torch.float32])
    inplace = not (torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad))
    q = q * inv_var
    lse_parts, mean_parts = [], []
    for i in range(0, n, query_block):
        qi = q[i : i + query_block]
        run_max = run_sum = acc = None
        for j in range(0, n_centres, centre_block):
            kj = keys[j : j + centre_block]
            logits = qi @ kj.T
            block_max = logits.detach().amax(1, keepdim=True)
            new_max = block_max if run_max is None else torch.maximum(run_max, block_max)
            if inplace:
                p = logits.sub_(new_max).clamp_(min=floor).exp_()
            else:
                p = torch.exp((logits - new_max).clamp(min=floor))
            block_sum = p.sum(1, keepdim=True)
            if probe is not None:  # backward only: never recorded, always in place
                weighted = (probe[i : i + query_block] @ kj.T).sub_(
                    offset[i : i + query_block, None]
                )
                p = weighted.mul_(p)
            if run_max is None:
                run_sum = block_sum
                acc = p @ kj if values else None
            else:
                rescale = torch.exp((run_max - new_max).clamp(min=floor))
                if inplace:
                    run_sum.mul_(rescale).add_(block_sum)
                    if values:
                        acc.mul_(rescale).addmm_(p, kj)
                else:
                    run_sum = run_sum * rescale + block_sum
                    acc = acc * rescale + p @ kj if values else None
            run_max = new_max
        lse_parts.append((run_max + torch.log(run_sum))[:, 0])
        if values:
            mean_parts.append(acc / run_sum)
    lse = torch.cat(lse_parts)
    return lse, (torch.cat(mean_parts) if values else None)


def _weighted_mean(
    q: Tensor, keys: KDEKeys, inv_var: float, mode: str, backend: str, chunk: int | None
) -> Tensor:
    """``Σ_j softmax_j(q·k_j / v) k_j`` through the chosen backend (sdpa falls back)."""
    if mode == "triton":
        return _kde_triton().kde_attention(q, keys.keys, inv_var).to(q.dtype)
    if mode == "sdpa":
        step = chunk or q.shape[0]
        parts = []
        for i in range(0, q.shape[0], step):
            out = _fused_attention(q[i : i + step], keys.keys, inv_var)
            if out is None:
                break
            parts.append(out)
        else:
            return torch.cat(parts) if len(parts) > 1 else parts[0]
        if backend == "sdpa":
            warnings.warn(
                "kde_score: no fused scaled_dot_product_attention kernel accepts "
                f"dtype={q.dtype} on {q.device}; using the chunked backend",
                RuntimeWarning,
                stacklevel=4,
            )
        chunk = None  # the sdpa chunk counts queries, not centres
    return _stream(q, keys.keys, inv_var, chunk, values=True)[1]


class _KDEScore(torch.autograd.Function):
    """kde_score with a streamed backward in ``y`` (the fused CPU SDPA backward is far slower
    than its forward; this one costs about one chunked forward pass and O(block) memory).

    ∂s_i/∂y_i = (a²/v²) Cov_{w_i}(c) − I/v (docs/paper.md §5 score differentiated in y), so the
    vector–Jacobian product is ``(a²/v²) Σ_j w_ij ((c_j − μ_i)·g_i) c_j − g_i/v``.
    """

    @staticmethod
    def forward(ctx, y, keys, scale, var, mode, backend, chunk):
        y_shift, q = _queries(y, keys, scale)
        mean = _weighted_mean(q, keys, 1.0 / var, mode, backend, chunk)[:, : keys.dim]
        ctx.save_for_backward(y, mean)
        ctx.keys, ctx.scale, ctx.var = keys, scale, var
        ctx.chunk = chunk if mode == "chunked" else None
        return (scale * mean - y_shift) / var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        y, mean = ctx.saved_tensors
        keys, scale, var = ctx.keys, ctx.scale, ctx.var
        grad = grad.to(y.dtype)
        _, q = _queries(y, keys, scale)
        probe = torch.zeros_like(q)
        probe[:, : keys.dim] = grad
        offset = (mean * grad).sum(1)
        _, cov_g = _stream(q, keys.keys, 1.0 / var, ctx.chunk, True, probe, offset)
        grad_y = (scale * scale / (var * var)) * cov_g[:, : keys.dim] - grad / var
        return grad_y, None, None, None, None, None, None


def _triton_runs(y: Tensor) -> bool:
    """Whether the Triton kernel can take ``y``: Triton imports, float32 / half compute, and a
    CUDA tensor (or Triton's interpreter for CPU tensors)."""
    if y.dtype == torch.float64:
        return False
    module = _kde_triton()
    if module is None:
        return False
    return y.is_cuda or (y.device.type == "cpu" and module.interpreting())


@functools.cache
def _kde_triton():
    """The Triton kernel's module, or None when Triton is not installed (an optional extra);
    looked up once, not at every score evaluation."""
    try:
        from collapselab.scores import kde_triton
    except ImportError:
        return None
    return kde_triton


def _resolve_backend(backend: str, y: Tensor) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        if y.is_cuda and _triton_runs(y):
            return "triton"
        return "sdpa" if (y.is_cuda or y.dtype != torch.float64) else "chunked"
    if backend == "triton" and not _triton_runs(y):
        warnings.warn(
            f"kde_score: the Triton kernel cannot run dtype={y.dtype} on {y.device} "
            "(needs Triton and a float32 / half CUDA tensor); using the sdpa backend",
            RuntimeWarning,
            stacklevel=3,
        )
        return "sdpa"
    return backend


def kde_score(
    y: Tensor,
    centres: Tensor | KDEKeys,
    scale: float,
    var: float,
    *,
    backend: str = "auto",
    chunk: int | None = None,
) -> Tensor:
    """Score of the noised KDE ``(1/N) Σ_j N(a c_j, v I)`` at the rows of ``y``.

    docs/paper.md §5: ``s(y) = (a · Σ_j w_j c_j − y) / v`` with
    ``w = softmax_j(−‖y − a c_j‖² / (2v))``; for the OU process at time t with bandwidth h,
    ``a = e^{−t/2}`` and ``v = h² e^{−t} + 1 − e^{−t}`` (see :func:`ou_scale_var`).

    Args:
        y: ``(n, d)`` query points.
        centres: ``(N, d)`` KDE centres, or a :class:`KDEKeys` prepared from them.
        scale: ``a``, the factor on the centres. var: ``v > 0``, the component variance.
        backend: ``"auto"``, ``"sdpa"``, ``"chunked"`` or ``"triton"`` (see the module
            docstring).
        chunk: for ``"chunked"``, centres per block (default 2048); for ``"sdpa"``, queries
            per fused call (default: all); ignored by ``"triton"``. Results do not depend on
            it beyond rounding.

    Returns:
        ``(n, d)`` tensor in ``y``'s dtype and on its device, differentiable in ``y`` (and in
        ``centres`` when passed as a tensor). Never forms the n×N weight matrix.
    """
    _check(y, centres, scale, var)
    mode = _resolve_backend(backend, y)
    if y.shape[0] == 0:
        return y.new_zeros(y.shape)
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    dtype = _compute_dtype(y)
    keys = _as_keys(centres, dtype, y.device)
    y_c = y.to(dtype)
    if torch.is_grad_enabled() and keys.keys.requires_grad:
        # Gradient wanted in the centres: plain autograd through the chunked stream
        # (its saved tensors total n×N; use only at small sizes).
        y_shift, q = _queries(y_c, keys, scale)
        _, mean = _stream(q, keys.keys, 1.0 / var, chunk if mode == "chunked" else None, True)
        score = (scale * mean[:, : keys.dim] - y_shift) / var
    else:
        score = _KDEScore.apply(y_c, keys, scale, var, mode, backend, chunk)
    return score.to(y.dtype)


def kde_log_prob(
    y: Tensor,
    centres: Tensor | KDEKeys,
    scale: float,
    var: float,
    *,
    chunk: int | None = None,
) -> Tensor:
    """Exact log density of the noised KDE: ``log (1/N) Σ_j N(y; a c_j, v I)``.

    docs/paper.md §5 (the finite-KDE law at time t is this Gaussian mixture). Computed as
    ``logsumexp_j(q·k_j / v) − ‖y − a m‖²/(2v) − log N − (d/2) log(2π v)`` with the folded
    queries/keys of the module docstring, streamed over blocks of ``chunk`` centres
    (logsumexp merge), in ``y``'s dtype (pass float64 for exact divergences).

    Returns an ``(n,)`` tensor in ``y``'s dtype, differentiable in ``y``.
    """
    _check(y, centres, scale, var)
    if y.shape[0] == 0:
        return y.new_zeros(0)
    dtype = _compute_dtype(y)
    keys = _as_keys(centres, dtype, y.device)
    y_shift, q = _queries(y.to(dtype), keys, scale)
    inv_var = 1.0 / var
    lse, _ = _stream(q, keys.keys, inv_var, chunk, values=False)
    d = keys.dim
    const = math.log(keys.n_centres) + 0.5 * d * math.log(2.0 * math.pi * var)
    out = lse - 0.5 * inv_var * (y_shift * y_shift).sum(1) - const
    return out.to(y.dtype)
