"""The paper's bounds, recursions and regimes as pure functions of measured numbers.

Every function here implements one result of arXiv 2602.16601 as restated in PAPER.md §4; its
docstring names the item. Nothing here runs a model: inputs are measured (or chosen) numbers —
score energies ε⋆², ε̂², observability η, fresh-data fraction α, divergences D_i, I_i.

Notation (PAPER.md §3):
    D_i   = χ²(p̂_i ‖ p)          accumulated divergence of generation i (D_0 = 0)
    I_i   = χ²(p̂_{i+1} ‖ q_i)    intra-generation divergence, q_i = α p + (1 − α) p̂_i
    ε⋆,i² ideal-path score energy of generation i, ε̂_i² its learned-path twin
    η_i   observability coefficient in [0, 1]

Conventions: functions of α accept α ∈ [0, 1] and raise ``ValueError`` outside it. Element-wise
functions accept scalars or arrays and return a ``float`` (``bool``) for scalar input and an
``ndarray`` otherwise. ``nan`` inputs propagate to ``nan`` outputs; ``inf`` follows the
mathematics (e.g. χ² = ∞ stays ∞ under contraction unless α = 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "BoundCheck",
    "PlanResult",
    "Regime",
    "check_bound",
    "check_recursion",
    "check_single_generation",
    "chi2_lower_bound",
    "chi2_lower_bound_clean",
    "classify_regime",
    "clean_regime",
    "contraction_factor",
    "discount_matrix",
    "intra_upper_bound",
    "kl_upper_bound",
    "memory_length",
    "mixture_chi2",
    "persistence_floor",
    "perturbative",
    "plan_alpha",
    "predicted_divergence",
    "recursion_lower_bound",
    "steady_state",
    "two_sided_intra_bounds",
]


# --------------------------------------------------------------------------- helpers


def _arr(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _out(x: np.ndarray):
    """Scalar in, scalar out: a 0-d result becomes a Python float/bool."""
    x = np.asarray(x)
    if x.ndim == 0:
        return bool(x) if x.dtype == np.bool_ else float(x)
    return x


def _check_alpha(alpha) -> np.ndarray:
    a = _arr(alpha)
    # nan is let through (it propagates); only a definite value outside [0, 1] is an error.
    if np.any((a < 0.0) | (a > 1.0)):
        raise ValueError(f"alpha must lie in [0, 1] (fraction of fresh data); got {alpha!r}")
    return a


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "infinity" if x > 0 else "-infinity"
    return f"{x:.4g}"


# --------------------------------------------------------------------------- single generation


def kl_upper_bound(eps_hat_sq):
    """Upper bound on KL(p̂_{i+1} ‖ q_i): ½ ε̂_i² (PAPER.md §4, single generation, Girsanov +
    data processing along the *learned* reverse path).

    ``eps_hat_sq`` is the learned-path score energy ε̂_i² (scalar or array).
    """
    return _out(0.5 * _arr(eps_hat_sq))


def chi2_lower_bound(eta, eps_sq, C=0.0):
    """Lower bound on I_i = χ²(p̂_{i+1} ‖ q_i): ¼ η_i ε⋆,i² − C ε⋆,i⁴ (PAPER.md §4, single
    generation, valid for i ≥ i₀ in the perturbative regime ε⋆,i² ≤ 1).

    ``C`` is the paper's moment constant (not given numerically); C = 0 gives the leading-order
    bound ¼ η ε⋆².
    """
    e = _arr(eps_sq)
    return _out(0.25 * _arr(eta) * e - _arr(C) * e * e)


def clean_regime(eta, eps_sq, C=0.0):
    """Whether ε⋆,i² ≤ min(1, η_i / (8C)) — the clean regime of PAPER.md §4 in which
    ¼ η ε² − C ε⁴ ≥ η ε²/8 (because C ε² ≤ η/8 there). With C = 0 it is just ε⋆² ≤ 1.

    ``nan`` inputs give ``False`` (the premise cannot be confirmed).
    """
    e, et, c = np.broadcast_arrays(_arr(eps_sq), _arr(eta), _arr(C))
    with np.errstate(divide="ignore", invalid="ignore"):
        # C = 0: no quartic correction, so only the perturbative cap ε² ≤ 1 remains.
        cap = np.where(c > 0, np.minimum(1.0, et / (8.0 * np.where(c > 0, c, 1.0))), 1.0)
    return _out(np.asarray(e <= cap) & np.isfinite(et) & np.isfinite(c))


def chi2_lower_bound_clean(eta, eps_sq):
    """Clean-regime lower bound χ²(p̂_{i+1} ‖ q_i) ≥ η_i ε⋆,i² / 8 (PAPER.md §4, single
    generation). Valid only where :func:`clean_regime` holds (and i ≥ i₀).
    """
    return _out(_arr(eta) * _arr(eps_sq) / 8.0)


def intra_upper_bound(eps_sq, c=0.0):
    """Upper half of the two-sided bound: I_i ≤ 4 ε⋆,i² + c ε⋆,i⁴ (PAPER.md §4, single
    generation). ``c`` is the paper's moment constant; c = 0 gives the leading order 4 ε⋆².
    """
    e = _arr(eps_sq)
    return _out(4.0 * e + _arr(c) * e * e)


def two_sided_intra_bounds(eta, eps_sq, C=0.0, c=0.0):
    """Two-sided bound ¼ η ε⋆² − C ε⋆⁴ ≤ I_i ≤ 4 ε⋆² + c ε⋆⁴ (PAPER.md §4, single generation),
    returned as ``(lower, upper)``. It shows I_i ≍ ε⋆,i² whenever η has a positive floor.
    """
    return chi2_lower_bound(eta, eps_sq, C), intra_upper_bound(eps_sq, c)


def perturbative(eps_sq):
    """Whether ε⋆,i² ≤ 1, the perturbative regime in which every single-generation bound of
    PAPER.md §4 is claimed. ``nan`` gives ``False``.
    """
    return _out(np.asarray(_arr(eps_sq) <= 1.0))


# --------------------------------------------------------------------------- bound checks


@dataclass(frozen=True)
class BoundCheck:
    """One bound held against one measurement (a PAPER.md §4 single-generation result).

    name: metric name, e.g. ``bound_kl_upper``.
    bound: the bound's value; measured / stderr: the measured quantity and one standard error.
    bound_stderr: one standard error of the bound (it is itself built from measured ε², η).
    direction: ``'upper'`` (measured should be ≤ bound) or ``'lower'`` (measured ≥ bound).
    held: True / False, or None when the check cannot be decided or the bound makes no claim.
    reason: a plain-English sentence for the report.
    """

    name: str
    bound: float
    measured: float
    stderr: float
    direction: Literal["upper", "lower"]
    held: bool | None
    reason: str
    bound_stderr: float = 0.0


def check_bound(
    name: str,
    bound: float,
    measured: float,
    stderr: float = 0.0,
    direction: Literal["upper", "lower"] = "upper",
    *,
    bound_stderr: float = 0.0,
    eps_sq: float | None = None,
    generation: int | None = None,
    i0: int = 0,
    premises: Sequence[tuple[bool, str]] = (),
    n_sigma: float = 2.0,
) -> BoundCheck:
    """Decide whether a PAPER.md §4 bound held for one measurement, allowing for noise.

    Order of the decision (first that applies wins):

    1. Premises. ``generation < i0`` (the bounds hold only past the transient i₀), ``eps_sq > 1``
       (outside the perturbative regime ε⋆² ≤ 1) or any ``premises`` entry ``(False, text)``
       (``text`` names the premise, e.g. ``"ε⋆² ≤ min(1, η/(8C)) (clean regime)"``) →
       held = None: the bound makes no claim.
    2. Unusable numbers. A NaN measurement or bound (including a NaN ``eps_sq``) → None. An
       infinite bound is vacuous → None. A measurement of +∞ satisfies any lower bound → True;
       against a finite upper bound it cannot be confirmed (it usually means a premise such as
       finite score energy fails, or the estimator flagged a divergent tail) → None.
    3. Comparison with tolerance ``n_sigma · sqrt(stderr² + bound_stderr²)``: an upper bound
       holds if measured − tol ≤ bound, a lower bound if measured + tol ≥ bound. An unknown
       (NaN) stderr counts as 0, and the reason says so.
    """
    if direction not in ("upper", "lower"):
        raise ValueError(f"direction must be 'upper' or 'lower'; got {direction!r}")
    if n_sigma < 0:
        raise ValueError(f"n_sigma must be non-negative; got {n_sigma!r}")
    bound, measured = float(bound), float(measured)
    stderr, bound_stderr = float(stderr), float(bound_stderr)
    if stderr < 0 or bound_stderr < 0:
        raise ValueError("standard errors must be non-negative")

    def result(held: bool | None, reason: str) -> BoundCheck:
        return BoundCheck(name, bound, measured, stderr, direction, held, reason, bound_stderr)

    if generation is not None and generation < i0:
        return result(
            None,
            f"generation {generation} is inside the transient (before i0 = {i0}); "
            "the bound is only claimed from generation i0 on",
        )
    if eps_sq is not None:
        eps_sq = float(eps_sq)
        if math.isnan(eps_sq):
            return result(None, "the score energy ε⋆² is unknown (NaN), so the bound's premise "
                                "ε⋆² ≤ 1 cannot be checked")
        if eps_sq > 1.0:
            return result(
                None,
                f"score energy ε⋆² = {_fmt(eps_sq)} exceeds 1: outside the perturbative regime, "
                "where the bound makes no claim",
            )
    for ok, text in premises:
        if not ok:
            return result(None, f"premise not met: {text}; the bound makes no claim here")

    if math.isnan(measured):
        return result(None, "the measured value could not be estimated reliably (NaN), so the "
                            "bound cannot be checked")
    if math.isnan(bound):
        return result(None, "the bound could not be evaluated (one of its inputs is NaN)")
    if math.isinf(bound):
        return result(None, f"the bound is {_fmt(bound)}, so it makes no claim")
    if math.isinf(measured):
        if measured > 0 and direction == "lower":
            return result(True, "the measured value is infinite, which satisfies any lower bound")
        if measured > 0:
            return result(
                None,
                "the measured value is infinite, so it cannot be compared with a finite upper "
                "bound; this usually means a premise fails (e.g. infinite score energy or a "
                "model tail heavier than the target's)",
            )
        return result(None, "the measured value is -infinity, which is not a valid divergence")

    unknown_se = math.isnan(stderr) or math.isnan(bound_stderr)
    s = math.hypot(0.0 if math.isnan(stderr) else stderr,
                   0.0 if math.isnan(bound_stderr) else bound_stderr)
    tol = n_sigma * s
    pm = f" ± {_fmt(stderr)}" if stderr > 0 else ""
    if direction == "upper":
        gap, point_ok, word, side = measured - bound, measured <= bound, "upper", "below"
    else:
        gap, point_ok, word, side = bound - measured, measured >= bound, "lower", "above"
    held = gap <= tol
    desc = f"measured {_fmt(measured)}{pm} against the {word} bound {_fmt(bound)}"
    if point_ok:
        reason = f"{desc}: it lies {side} the bound"
    elif held:
        reason = (f"{desc}: on the wrong side by {_fmt(gap)}, which is within "
                  f"{n_sigma:g} standard errors, so consistent with the bound")
    else:
        sig = f" ({gap / s:.1f} standard errors)" if s > 0 else ""
        reason = f"{desc}: violated by {_fmt(gap)}{sig}"
    if unknown_se:
        reason += "; no standard error was available, so the point values were compared"
    return result(bool(held), reason)


def check_single_generation(
    *,
    eps_star_sq: float,
    eta: float | None = None,
    eps_hat_sq: float | None = None,
    intra_kl: float | None = None,
    intra_chi2: float | None = None,
    intra_kl_stderr: float = 0.0,
    intra_chi2_stderr: float = 0.0,
    eps_star_sq_stderr: float = 0.0,
    eps_hat_sq_stderr: float = 0.0,
    eta_stderr: float = 0.0,
    generation: int | None = None,
    i0: int = 0,
    C: float = 0.0,
    c: float = 0.0,
    n_sigma: float = 2.0,
) -> list[BoundCheck]:
    """Check every single-generation bound of PAPER.md §4 that the given measurements allow.

    Every check carries the paper's premises: generation ≥ i0 (past the transient) and
    ε⋆² ≤ 1 (perturbative); where they fail the check's ``held`` is None.
    Returns, in this order and only when their inputs are given:
    ``bound_kl_upper`` (KL(p̂_{i+1}‖q_i) ≤ ½ ε̂²; needs eps_hat_sq, intra_kl),
    ``bound_chi2_lower`` (I_i ≥ ¼ η ε⋆² − C ε⋆⁴; needs eta, intra_chi2),
    ``bound_chi2_lower_clean`` (I_i ≥ η ε⋆²/8 in the clean regime; needs eta, intra_chi2),
    ``bound_intra_upper`` (I_i ≤ 4 ε⋆² + c ε⋆⁴; needs intra_chi2).
    The uncertainty of each bound is propagated to first order from the given stderrs.
    """
    e, se_e = float(eps_star_sq), float(eps_star_sq_stderr)
    common = dict(eps_sq=e, generation=generation, i0=i0, n_sigma=n_sigma)
    out: list[BoundCheck] = []
    if eps_hat_sq is not None and intra_kl is not None:
        out.append(check_bound(
            "bound_kl_upper", kl_upper_bound(eps_hat_sq), intra_kl, intra_kl_stderr, "upper",
            bound_stderr=0.5 * float(eps_hat_sq_stderr), **common,
        ))
    if eta is not None and intra_chi2 is not None:
        et, se_et = float(eta), float(eta_stderr)
        # d/dε² (¼ηε² − Cε⁴) = ¼η − 2Cε²; d/dη = ¼ε².
        se_low = math.hypot((0.25 * et - 2 * C * e) * se_e, 0.25 * e * se_et)
        out.append(check_bound(
            "bound_chi2_lower", chi2_lower_bound(et, e, C), intra_chi2, intra_chi2_stderr,
            "lower", bound_stderr=se_low, **common,
        ))
        clean = bool(clean_regime(et, e, C))
        out.append(check_bound(
            "bound_chi2_lower_clean", chi2_lower_bound_clean(et, e), intra_chi2,
            intra_chi2_stderr, "lower",
            bound_stderr=math.hypot(et * se_e, e * se_et) / 8.0,
            premises=[(clean, f"the clean regime ε⋆² ≤ min(1, η/(8C)) with C = {C:g}")],
            **common,
        ))
    if intra_chi2 is not None:
        out.append(check_bound(
            "bound_intra_upper", intra_upper_bound(e, c), intra_chi2, intra_chi2_stderr,
            "upper", bound_stderr=abs(4.0 + 2 * c * e) * se_e, **common,
        ))
    return out


# --------------------------------------------------------------------------- across generations


def contraction_factor(alpha):
    """(1 − α)²: the exact factor by which mixing in a fraction α of fresh data contracts χ² to
    the target, χ²(α p + (1−α) r ‖ p) = (1−α)² χ²(r ‖ p) (PAPER.md §4, exact contraction).
    """
    a = _check_alpha(alpha)
    return _out((1.0 - a) ** 2)


def mixture_chi2(alpha, chi2_r):
    """χ²(α p + (1−α) r ‖ p) = (1−α)² χ²(r ‖ p) (PAPER.md §4, exact contraction); with r = p̂_i
    it gives χ²(q_i ‖ p) = (1−α)² D_i.

    χ²(r‖p) = ∞ stays ∞ for α < 1; at α = 1 the mixture *is* p, so the result is 0 even then.
    """
    a = _check_alpha(alpha)
    x = _arr(chi2_r)
    a, x = np.broadcast_arrays(a, x)
    # 0 · ∞ would be nan; the mixture with α = 1 is exactly p whatever r is.
    with np.errstate(invalid="ignore"):
        return _out(np.where(a == 1.0, np.where(np.isnan(x), np.nan, 0.0), (1.0 - a) ** 2 * x))


def recursion_lower_bound(alpha, intra):
    """Right-hand side (α/2) I_i of the recursion D_{i+1} + (1−α)² D_i ≥ (α/2) I_i
    (PAPER.md §4, recursion). At α = 0 the bound is 0 even for I_i = ∞.
    """
    a = _check_alpha(alpha)
    i = _arr(intra)
    a, i = np.broadcast_arrays(a, i)
    with np.errstate(invalid="ignore"):  # 0 · ∞ at α = 0 is replaced by 0 below
        return _out(np.where(a == 0.0, np.where(np.isnan(i), np.nan, 0.0), 0.5 * a * i))


def check_recursion(alpha: float, D, I) -> np.ndarray:
    """Per-generation slack of the recursion D_{i+1} + (1−α)² D_i ≥ (α/2) I_i (PAPER.md §4).

    D: D_0 … D_N (length N+1). I: I_0 … I_{N−1} (length N), or length N+1 with the last entry
    (which would need generation N+1) ignored.
    Returns slack[i] = D_{i+1} + (1−α)² D_i − (α/2) I_i for i = 0 … N−1; the recursion holds at
    generation i when slack[i] ≥ 0 (compare with the measurements' uncertainty). Infinite inputs
    give ±∞ slack; ∞ on both sides gives NaN (undecidable).
    """
    D, I = _arr(D), _arr(I)
    if D.ndim != 1 or I.ndim != 1:
        raise ValueError("D and I must be one-dimensional sequences over generations")
    if len(I) not in (len(D) - 1, len(D)):
        raise ValueError(
            f"I must have len(D) - 1 or len(D) entries (I_i needs D_{{i+1}}); "
            f"got len(D) = {len(D)}, len(I) = {len(I)}"
        )
    n = len(D) - 1
    lhs = D[1:] + mixture_chi2(alpha, D[:-1])
    with np.errstate(invalid="ignore"):
        return np.asarray(lhs - recursion_lower_bound(alpha, I[:n]), dtype=np.float64)


def persistence_floor(alpha, eta_f, eps_f):
    """limsup D_i ≥ α η_f ε_f / (16 (1 + (1−α)²)) (PAPER.md §4, persistence), given an eventual
    floor ε⋆,i² ≥ ε_f on the *squared* score energy and η_i ≥ η_f on the observability.
    """
    a = _check_alpha(alpha)
    return _out(a * _arr(eta_f) * _arr(eps_f) / (16.0 * (1.0 + (1.0 - a) ** 2)))


def discount_matrix(alpha: float, N: int) -> np.ndarray:
    """Weights of the discounted decomposition (PAPER.md §4; the heat-map of the paper's Fig. 5).

    Returns W of shape (N, N), float64, lower triangular:
        W[n, i] = (1−α)^{2(n−i)} for i ≤ n,  0 for i > n.
    Row n is the target D_{n+1} (the model p̂_{n+1} trained at generation n); column i is
    generation i's score error ε⋆,i². Hence, with i₀ = 0, D_0 = 0 and no bias term,
    ``W @ eps_sq == predicted_divergence(alpha, eps_sq)``. The diagonal is 1 (the newest error
    counts fully); α = 1 gives the identity (no memory), α = 0 all ones below the diagonal.
    """
    a = float(_check_alpha(alpha))
    if isinstance(N, bool) or int(N) != N or N < 0:
        raise ValueError(f"N must be a non-negative integer; got {N!r}")
    N = int(N)
    lag = np.arange(N)[:, None] - np.arange(N)[None, :]
    r = (1.0 - a) ** 2
    # 0.0 ** 0 == 1 keeps the diagonal at 1 when α = 1.
    return np.where(lag >= 0, r ** np.maximum(lag, 0).astype(np.float64), 0.0)


def memory_length(alpha, threshold: float = math.exp(-1.0)):
    """Memory of the recursion in generations (PAPER.md §4: "memory of about 1/α generations").

    Defined as the lag m at which an error's weight (1−α)^{2m} falls to ``threshold`` (1/e by
    default): m = ln(threshold) / (2 ln(1−α)). For small α this is ≈ 1/(2α) — the paper's
    "about 1/α" up to the factor 2 that comes from the squared (1−α). α = 0 → ∞ (nothing is
    forgotten), α = 1 → 0 (only the current generation counts). Real-valued, not rounded.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie in (0, 1); got {threshold!r}")
    a = _check_alpha(alpha)
    with np.errstate(divide="ignore"):
        # log(1−α) is 0 at α = 0 (→ ∞) and −∞ at α = 1 (→ 0): the limits come out right.
        m = np.where(a == 0.0, np.inf, math.log(threshold) / (2.0 * np.log1p(-a)))
    return _out(m + 0.0)  # + 0.0 turns −0.0 (α = 1) into 0.0


def predicted_divergence(alpha: float, eps_sq_seq, D_i0: float = 0.0, i0: int = 0,
                         C_bias: float = 0.0) -> np.ndarray:
    """Additive discounted decomposition (PAPER.md §4):

        D_{N+1} ≈ Σ_{i=i₀}^{N} (1−α)^{2(N−i)} ε⋆,i² + (1−α)^{2(N+1−i₀)} D_{i₀} + C_bias.

    eps_sq_seq[i] is ε⋆,i² of generation i = 0, 1, …, L−1. Returns an array ``out`` of length
    L, index-aligned with the errors: out[N] is the predicted D_{N+1}; entries N < i₀ are NaN
    (no prediction inside the transient). Computed by the equivalent recursion
    P_{N+1} = (1−α)² P_N + ε⋆,N², P_{i₀} = D_{i₀}, then + C_bias.
    An infinite error stays infinite in every later prediction unless α = 1.
    """
    a = float(_check_alpha(alpha))
    e = _arr(eps_sq_seq)
    if e.ndim != 1:
        raise ValueError("eps_sq_seq must be a one-dimensional sequence over generations")
    if isinstance(i0, bool) or int(i0) != i0 or i0 < 0:
        raise ValueError(f"i0 must be a non-negative integer; got {i0!r}")
    r = (1.0 - a) ** 2
    out = np.full(e.shape, np.nan)
    p = float(D_i0)
    for n in range(int(i0), len(e)):
        # r = 0 (α = 1): the past is forgotten exactly; avoids 0 · ∞ = nan.
        p = e[n] if r == 0.0 else r * p + e[n]
        out[n] = p
    return out + float(C_bias)


def steady_state(alpha, eps_sq):
    """Saturation level of the discounted sum with a constant error ε²: ε² / (1 − (1−α)²) =
    ε² / (α(2−α)) (PAPER.md §4, discounted decomposition). α = 0 → ∞ for ε² > 0 (no discount);
    α = 0 with ε² = 0 → 0 (nothing accumulates beyond the starting D).
    """
    a = _check_alpha(alpha)
    e = _arr(eps_sq)
    a, e = np.broadcast_arrays(a, e)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = e / (a * (2.0 - a))
    s = np.where((a == 0.0) & (e == 0.0), 0.0, s)
    s = np.where((a == 0.0) & (e > 0.0), np.inf, s)
    return _out(s)


# --------------------------------------------------------------------------- regimes


@dataclass(frozen=True)
class Regime:
    """Outcome of :func:`classify_regime`.

    label: ``"stable"``, ``"saturating"``, ``"collapsing"`` or ``"undetermined"``.
    evidence: plain-English account of the evidence used.
    slope, slope_stderr: least-squares slope of the last half of D per generation (NaN if unused).
    decay_exponent: p in ε⋆² ∝ (i+1)^p fitted on the last half of the errors (NaN if unused).
    plateau: predicted steady state ε²/(α(2−α)) from the tail's mean error (NaN if unused).
    """

    label: Literal["stable", "saturating", "collapsing", "undetermined"]
    evidence: str
    slope: float = float("nan")
    slope_stderr: float = float("nan")
    decay_exponent: float = float("nan")
    plateau: float = float("nan")


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope and its standard error (residual-based; needs ≥ 3 points)."""
    xc = x - x.mean()
    sxx = float(xc @ xc)
    b = float(xc @ (y - y.mean())) / sxx
    resid = y - y.mean() - b * xc
    return b, math.sqrt(max(float(resid @ resid), 0.0) / (len(x) - 2) / sxx)


def _rises(b: float, se: float, n_sigma: float, scale: float) -> bool:
    # The relative floor stops round-off in exact (noise-free) sequences counting as a trend.
    return b > n_sigma * se and b > 1e-9 * max(scale, 1e-300)


def _error_trend(gens: np.ndarray, errs: np.ndarray, n_sigma: float):
    """Characterise the tail of per-generation errors for :func:`classify_regime`.

    Returns None with fewer than 3 finite values, else (kind, p, level, description) with kind
    one of ``growing``, ``summable`` (decaying faster than 1/i), ``decaying_slowly`` (decaying,
    but not faster than 1/i: Σε² = ∞), ``decaying`` (decaying at an unknown rate), ``floor``.
    With all finite values positive the rate comes from a log-log fit ε² ∝ (i+1)^p; otherwise
    (noisy or implied errors can be ≤ 0) from a linear trend, which cannot judge summability.
    """
    if np.any(np.isposinf(errs)):
        return "floor", float("nan"), float("inf"), "infinite values in the last half (floor)"
    fin = np.isfinite(errs)
    g, x = gens[fin], errs[fin]
    if len(x) < 3:
        return None
    level = float(np.mean(x))
    if np.all(x > 0):
        p, se_p = _ols(np.log(g + 1.0), np.log(x))
        if _rises(p, se_p, n_sigma, 1.0):
            kind = "growing"
        elif _rises(-p, se_p, n_sigma, 1.0):
            # Σ (i+1)^p < ∞ needs p < −1; demand it beyond the fit's uncertainty.
            kind = "summable" if p + n_sigma * se_p < -1.0 - 1e-9 else "decaying_slowly"
        else:
            kind = "floor"
        return kind, p, level, f"decay exponent {_fmt(p)} ± {_fmt(se_p)}, mean {_fmt(level)} " \
                               f"({kind.replace('_', ' ')})"
    bi, sei = _ols(g, x)
    sem = float(np.std(x, ddof=1)) / math.sqrt(len(x))
    scale = float(np.max(np.abs(x)))
    if _rises(bi, sei, n_sigma, scale):
        kind = "growing"
    elif _rises(-bi, sei, n_sigma, scale):
        kind = "decaying"
    elif level > n_sigma * sem and level > 1e-9 * max(scale, 1e-300):
        kind = "floor"
    else:
        kind = "summable"  # indistinguishable from zero
    return kind, float("nan"), level, (f"linear trend {_fmt(bi)} ± {_fmt(sei)} per generation, "
                                       f"mean {_fmt(level)} ({kind})")


def classify_regime(
    alpha: float,
    D_seq,
    eps_sq_seq=None,
    *,
    min_length: int = 6,
    n_sigma: float = 2.0,
    rel_tol: float = 0.25,
) -> Regime:
    """Classify a chain into the regimes of PAPER.md §4 ("Regimes" and "Persistence").

    Labels (what they predict for D_i = χ²(p̂_i ‖ p)):
      stable       D stays bounded and tends to 0 — α > 0 and the errors ε⋆² decay.
      saturating   D converges to a positive plateau — α > 0 with an error floor (plateau
                   ε_f²/(α(2−α))), or α = 0 with summable errors (plateau ≈ D₀ + Σε²).
      collapsing   D grows without bound — α = 0 with non-summable errors (Σε² = ∞: a floor or a
                   decay no faster than 1/i), D infinite, or D rising above the plateau the
                   theory predicts (the additive picture fails there).
      undetermined too little data, or the evidence conflicts.

    Inputs: D_seq = D_0 … D_N; eps_sq_seq = ε⋆,0² … (optional, aligned with D by generation).
    The "tail" is the last half of each sequence (generations ≥ ⌊L/2⌋), where transients fade.

    Decision rules, first match wins:
      R0 fewer than ``min_length`` values of D, or fewer than 3 finite tail values → undetermined.
      R1 D = +∞ anywhere in the tail → collapsing.
      R2 Per-generation errors: ``eps_sq_seq`` if given, else those implied by the additive model,
         ε̃_i² = D_{i+1} − (1−α)² D_i. Their last half (finite values, at least 3, else
         undetermined) is judged by ``_error_trend``:
         - all positive: log-log fit ε² ∝ (i+1)^p with standard error se(p). "growing" if
           p > n_sigma·se(p); "summable" if p < −n_sigma·se(p) and p + n_sigma·se(p) < −1
           (Σ (i+1)^p < ∞ needs p < −1); "decaying slowly" if significantly decreasing but not
           provably faster than 1/i (Σε² = ∞); otherwise a "floor".
         - some ≤ 0 (noisy or implied errors): linear trend b ± se. "growing" if b > n_sigma·se;
           "decaying" (rate unknown) if −b > n_sigma·se; a "floor" if the mean exceeds
           n_sigma standard errors of the mean; else indistinguishable from 0 ("summable").
         Growing errors → collapsing. Plateau S = steady_state(α, mean tail error).
      R3 α > 0, the last half of D rises significantly (slope > n_sigma·se) and the last D
         exceeds S·(1 + rel_tol) → collapsing (D climbs past the predicted plateau).
      R4 α > 0: decaying errors (any rate) → stable; a floor → saturating (towards S).
      R5 α = 0 (no discount): summable → saturating; decaying at an unknown rate →
         undetermined; a floor or slow decay → collapsing.
    Trends need significance: a slope counts only beyond n_sigma standard errors (and beyond
    round-off, 1e-9 of the values' scale), so noise-free synthetic chains classify cleanly.
    """
    a = float(_check_alpha(alpha))
    if math.isnan(a):
        raise ValueError("alpha must be a number in [0, 1]; got NaN")
    D = _arr(D_seq)
    if D.ndim != 1:
        raise ValueError("D_seq must be a one-dimensional sequence over generations")
    L = len(D)
    if L < min_length:
        return Regime("undetermined", f"only {L} generations of D; at least {min_length} are "
                                      "needed to judge a trend")
    start = L // 2
    gens = np.arange(L, dtype=np.float64)
    tail = D[start:]
    if np.any(np.isposinf(tail)):
        first = start + int(np.argmax(np.isposinf(tail)))
        return Regime("collapsing", f"D is infinite at generation {first}: the model's tails "
                                    "have outgrown the target's")
    ok = np.isfinite(tail)
    if ok.sum() < 3:
        return Regime("undetermined", "fewer than 3 finite values of D among the last "
                                      f"{len(tail)} generations")
    b, se = _ols(gens[start:][ok], tail[ok])
    scale = float(np.max(np.abs(tail[ok])))
    d_rises = _rises(b, se, n_sigma, scale)
    trend = f"last-half slope of D {_fmt(b)} ± {_fmt(se)} per generation"

    # R2: characterise the per-generation errors over their last half.
    if eps_sq_seq is not None:
        e = _arr(eps_sq_seq)
        if e.ndim != 1:
            raise ValueError("eps_sq_seq must be a one-dimensional sequence over generations")
        what = "measured ε⋆²"
    else:
        r = (1.0 - a) ** 2
        # r = 0 (α = 1): nothing carries over; avoids 0 · ∞ = nan.
        e = D[1:] - (r * D[:-1] if r > 0 else 0.0)
        what = "error implied by D (D_(i+1) − (1−α)² D_i)"
    e_start = len(e) // 2
    errs = _error_trend(np.arange(e_start, len(e), dtype=np.float64), e[e_start:], n_sigma)
    if errs is None:
        return Regime("undetermined", f"fewer than 3 finite values of the {what} in the last "
                                      "half of the chain", b, se)
    kind, p, level, how = errs
    src = f"{what}: {how}"
    if kind == "growing":
        return Regime(
            "collapsing",
            f"the per-generation error grows, so D outruns any discount; {src}; {trend}",
            b, se, p,
        )

    plateau = float(steady_state(a, max(level, 0.0)))
    last = float(tail[ok][-1])
    if a > 0:
        mem = float(memory_length(a))
        if d_rises and last > plateau * (1.0 + rel_tol):
            return Regime(
                "collapsing",
                f"D keeps rising ({trend}) and its last value {_fmt(last)} exceeds the predicted "
                f"plateau ε²/(α(2−α)) = {_fmt(plateau)} by more than {rel_tol:.0%}; {src}",
                b, se, p, plateau,
            )
        if kind in ("summable", "decaying", "decaying_slowly"):
            return Regime(
                "stable",
                f"α = {a:g} > 0 discounts past errors (memory ≈ {_fmt(mem)} generations) and the "
                f"errors decay, so D tends to 0; {src}; {trend}"
                + ("; the decay is no faster than 1/i, so Σε² = ∞ and by the persistence result "
                   "ΣD_i = ∞ even as D_i → 0" if kind == "decaying_slowly" else ""),
                b, se, p, plateau,
            )
        return Regime(
            "saturating",
            f"α = {a:g} > 0 with an error floor: D approaches the plateau ε²/(α(2−α)) = "
            f"{_fmt(plateau)} (memory ≈ {_fmt(mem)} generations; last D {_fmt(last)}); "
            f"{src}; {trend}",
            b, se, p, plateau,
        )
    if kind == "decaying":
        return Regime(
            "undetermined",
            f"α = 0: no fresh data, so whether D stays bounded depends on whether Σε² is finite, "
            f"and the errors decay at a rate that cannot be judged from these values; {src}; "
            f"{trend}",
            b, se, p, plateau,
        )
    if kind == "summable":
        return Regime(
            "saturating",
            f"α = 0: no fresh data, so errors are never discounted, but Σε² looks summable and D "
            f"levels off near D_0 + Σε²; {src}; {trend}",
            b, se, p, plateau,
        )
    return Regime(
        "collapsing",
        f"α = 0: no fresh data, so errors are never discounted, and Σε² does not look summable "
        f"(an error floor or a decay no faster than 1/i): D grows like Σε²; {src}; {trend}",
        b, se, p, plateau,
    )


# --------------------------------------------------------------------------- α planner


@dataclass(frozen=True)
class PlanResult:
    """Outcome of :func:`plan_alpha`.

    alpha: smallest fresh-data fraction meeting the tolerance (1.0 when infeasible).
    worst_D: predicted worst D over generations 1 … horizon (the supremum for horizon=None)
        at that α.
    feasible: whether any α ∈ [0, 1] meets the tolerance.
    horizon: the horizon planned for (None = infinite).
    reason: plain-English summary.
    """

    alpha: float
    worst_D: float
    feasible: bool
    horizon: int | None
    reason: str


def _worst_D(alpha: float, eps_sq: float, D0: float, horizon: int | None) -> float:
    """max_{1≤n≤H} P_n with P_n = r^n D0 + ε² (1 − r^n)/(1 − r), r = (1−α)².

    P_{n+1} − P_n = r^n (ε² − (1−r) D0) has a fixed sign, so P_n is monotone in n and its
    maximum over 1…H is max(P_1, P_H); for H = ∞, max(P_1, steady state).
    """
    r = (1.0 - alpha) ** 2
    p1 = r * D0 + eps_sq
    if horizon is None:
        # steady_state is ∞ at α = 0 with ε² > 0, and 0 with ε² = 0 (then D stays at D0 = P_1).
        return max(p1, float(steady_state(alpha, eps_sq)))
    if r == 1.0:
        ph = D0 + horizon * eps_sq
    else:
        rh = r**horizon
        ph = rh * D0 + eps_sq * (1.0 - rh) / (1.0 - r)
    return max(p1, ph)


def plan_alpha(eps_sq: float, tolerance: float, horizon: int | None,
               D0: float = 0.0) -> PlanResult:
    """Smallest α ∈ [0, 1] keeping the predicted D ≤ ``tolerance`` at every generation 1 … horizon
    (PAPER.md §4, discounted decomposition with a constant per-generation error ε²).

    Prediction: P_n = (1−α)^{2n} D0 + ε² Σ_{k<n} (1−α)^{2k}, the additive decomposition started
    from D0 (the starting D itself is not constrained: α cannot change it).

    Monotonicity (why bisection is valid): with r = (1−α)², every P_n is a sum of the
    non-negative terms r^n D0 and ε² r^k, each non-decreasing in r; r is decreasing in α on
    [0, 1]. So every P_n, and hence max_n P_n, is non-increasing in α, and the feasible set is an
    interval [α*, 1]. We bisect on α for ``max_n P_n ≤ tolerance`` (the max is max(P_1, P_H), see
    the monotonicity in n noted in the code).

    At α = 1, P_n = ε² for all n, so the plan is feasible iff ε² ≤ tolerance.

    horizon=None plans for all generations: sup_n P_n = max(P_1, ε²/(α(2−α))), which gives the
    closed form α* = max(1 − sqrt(1 − ε²/tol), 1 − sqrt(min(1, (tol − ε²)/D0))) (the second term
    only when D0 > 0); with D0 = 0 this is α solving ε²/(α(2−α)) = tol.
    """
    eps_sq, tol, D0 = float(eps_sq), float(tolerance), float(D0)
    if not (math.isfinite(eps_sq) and eps_sq >= 0):
        raise ValueError(f"eps_sq must be a finite non-negative number; got {eps_sq!r}")
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tolerance must be a finite positive number; got {tolerance!r}")
    if not (math.isfinite(D0) and D0 >= 0):
        raise ValueError(f"D0 must be a finite non-negative number; got {D0!r}")
    if horizon is not None:
        if isinstance(horizon, bool) or int(horizon) != horizon or horizon < 1:
            raise ValueError(f"horizon must be a positive integer or None; got {horizon!r}")
        horizon = int(horizon)
    span = "all generations" if horizon is None else f"generations 1 to {horizon}"

    if eps_sq > tol:
        return PlanResult(
            1.0, eps_sq, False, horizon,
            f"infeasible: the per-generation error ε² = {_fmt(eps_sq)} alone exceeds the "
            f"tolerance {_fmt(tol)}; even all-fresh data (α = 1) gives D = ε² each generation. "
            "Reduce the score error (more data, a better model) or relax the tolerance.",
        )
    if horizon is None:
        a_ss = 1.0 - math.sqrt(max(0.0, 1.0 - eps_sq / tol))
        a_1 = 1.0 - math.sqrt(min(1.0, (tol - eps_sq) / D0)) if D0 > 0 else 0.0
        alpha = min(1.0, max(a_ss, a_1, 0.0))
    elif _worst_D(0.0, eps_sq, D0, horizon) <= tol:
        alpha = 0.0
    else:
        lo, hi = 0.0, 1.0  # invariant: lo infeasible, hi feasible
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if _worst_D(mid, eps_sq, D0, horizon) <= tol:
                hi = mid
            else:
                lo = mid
            if hi - lo <= 1e-13:
                break
        alpha = hi
    # The closed form can overshoot the tolerance by round-off; step up to the next float.
    for _ in range(64):
        if alpha >= 1.0 or _worst_D(alpha, eps_sq, D0, horizon) <= tol:
            break
        alpha = math.nextafter(alpha, 2.0)
    worst = _worst_D(alpha, eps_sq, D0, horizon)
    return PlanResult(
        alpha, worst, True, horizon,
        f"α = {alpha:.4g} (fraction of fresh data) keeps the predicted D at or below "
        f"{_fmt(tol)} over {span}; the worst predicted D is {_fmt(worst)}",
    )
