"""The paper's bounds, recursions and regimes as pure functions of measured numbers.

Every function here implements one result of arXiv 2602.16601 as restated in docs/paper.md §4; its
docstring names the item. Nothing here runs a model: inputs are measured (or chosen) numbers —
score energies ε⋆², ε̂², observability η, fresh-data fraction α, divergences D_i, I_i.

Notation (docs/paper.md §3):
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

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

import numpy as np

__all__ = [
    "BoundCheck",
    "Cause",
    "GaussianSmoothing",
    "PlanResult",
    "PredictionCheck",
    "Regime",
    "RegimeLabel",
    "RegimeReason",
    "Status",
    "check_bound",
    "check_identity",
    "check_recursion",
    "check_recursion_step",
    "compare_prediction",
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
    "smoothing_drift",
    "smoothing_drift_mixture",
    "smoothing_kl_step",
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
    """Upper bound on KL(p̂_{i+1} ‖ q_i): ½ ε̂_i² (Prop 3.1, single generation, Girsanov +
    data processing along the *learned* reverse path).

    ``eps_hat_sq`` is the learned-path score energy ε̂_i² (scalar or array).
    """
    return _out(0.5 * _arr(eps_hat_sq))


def chi2_lower_bound(eta, eps_sq, C=0.0):
    """Lower bound on I_i = χ²(p̂_{i+1} ‖ q_i): ¼ η_i ε⋆,i² − C ε⋆,i⁴ (docs/paper.md §4, single
    generation, valid for i ≥ i₀ in the perturbative regime ε⋆,i² ≤ 1).

    ``C`` is the paper's moment constant (not given numerically); C = 0 gives the leading-order
    bound ¼ η ε⋆².
    """
    e = _arr(eps_sq)
    return _out(0.25 * _arr(eta) * e - _arr(C) * e * e)


def clean_regime(eta, eps_sq, C=0.0):
    """Whether ε⋆,i² ≤ min(1, η_i / (8C)) — the clean regime of docs/paper.md §4 in which
    ¼ η ε² − C ε⁴ ≥ η ε²/8 (because C ε² ≤ η/8 there). With C = 0 it is just ε⋆² ≤ 1.

    ``nan`` inputs give ``False`` (the premise cannot be confirmed).
    """
    e, et, c = np.broadcast_arrays(_arr(eps_sq), _arr(eta), _arr(C))
    with np.errstate(divide="ignore", invalid="ignore"):
        # C = 0: no quartic correction, so only the perturbative cap ε² ≤ 1 remains.
        cap = np.where(c > 0, np.minimum(1.0, et / (8.0 * np.where(c > 0, c, 1.0))), 1.0)
    return _out(np.asarray(e <= cap) & np.isfinite(et) & np.isfinite(c))


def chi2_lower_bound_clean(eta, eps_sq):
    """Clean-regime lower bound χ²(p̂_{i+1} ‖ q_i) ≥ η_i ε⋆,i² / 8 (docs/paper.md §4, single
    generation). Valid only where :func:`clean_regime` holds (and i ≥ i₀).
    """
    return _out(_arr(eta) * _arr(eps_sq) / 8.0)


def intra_upper_bound(eps_sq, c=0.0):
    """Upper half of the two-sided bound: I_i ≤ 4 ε⋆,i² + c ε⋆,i⁴ (docs/paper.md §4, single
    generation). ``c`` is the paper's moment constant; c = 0 gives the leading order 4 ε⋆².
    """
    e = _arr(eps_sq)
    return _out(4.0 * e + _arr(c) * e * e)


def two_sided_intra_bounds(eta, eps_sq, C=0.0, c=0.0):
    """Two-sided bound ¼ η ε⋆² − C ε⋆⁴ ≤ I_i ≤ 4 ε⋆² + c ε⋆⁴ (docs/paper.md §4, single generation),
    returned as ``(lower, upper)``. It shows I_i ≍ ε⋆,i² whenever η has a positive floor.
    """
    return chi2_lower_bound(eta, eps_sq, C), intra_upper_bound(eps_sq, c)


def perturbative(eps_sq):
    """Whether ε⋆,i² ≤ 1, the perturbative regime in which every single-generation bound of
    docs/paper.md §4 is claimed. ``nan`` gives ``False``.
    """
    return _out(np.asarray(_arr(eps_sq) <= 1.0))


# --------------------------------------------------------------------------- bound checks


class Status(StrEnum):
    """Verdict code of one bound check (docs/paper.md §4). The English lives with the renderers."""

    HELD = "held"  # on the bound's side, within noise
    FAILED = "failed"  # on the wrong side beyond noise
    NO_CLAIM = "no_claim"  # a premise fails, or the numbers cannot decide
    IDENTITY = "identity"  # the relation holds with equality for this model: no test
    CONSISTENT = "consistent"  # calibration: both sides of an identity agree within noise
    INCONSISTENT = "inconsistent"  # calibration: they disagree beyond noise
    COMPARED = "compared"  # a ≲ prediction set beside a measurement: compared, not tested


class Cause(StrEnum):
    """Why a check did not simply hold: a premise, an unusable number, or the likely reason a
    measurement sits on the wrong side of a correct theorem."""

    NONE = ""
    # premises (no claim)
    TRANSIENT = "transient"  # generation < i0
    NOT_PERTURBATIVE = "not_perturbative"  # ε⋆² > 1
    EPS_UNKNOWN = "eps_unknown"  # ε⋆² is NaN, so ε⋆² ≤ 1 cannot be checked
    NOT_CLEAN = "not_clean"  # outside ε⋆² ≤ min(1, η/(8C))
    # unusable numbers (no claim)
    MEASURED_NAN = "measured_nan"
    BOUND_NAN = "bound_nan"
    BOUND_INFINITE = "bound_infinite"
    MEASURED_INFINITE = "measured_infinite"  # +∞ against a finite upper bound
    MEASURED_NEG_INFINITE = "measured_neg_infinite"
    MEASURED_INFINITE_OK = "measured_infinite_ok"  # +∞ satisfies a lower bound (held)
    # identities (de Bruijn): nothing is tested
    EXACT_OWN_LAW = "exact_own_law"
    # likely reasons for a failure (the theorem is right; the measurement differs from it)
    VIOLATED = "violated"  # no specific reason known
    LEADING_ORDER_C = "leading_order_C"  # the −C ε⋆⁴ term of the χ² lower bound is unknown
    LEADING_ORDER_c = "leading_order_c"  # the + c ε⋆⁴ term of the χ² upper bound is unknown
    START_TERM = "start_term"  # KL(p̂_T ‖ q_T) of the start, not part of ½ ε̂²
    EPS_HAT_ESTIMATE = "eps_hat_estimate"  # ε̂² on a finite grid and finitely many paths
    NOT_T0 = "not_t0"  # measured against q_i, not q_i pushed to t0
    # calibration outcomes
    EPS_HAT_LOW = "eps_hat_low"  # ½ ε̂² below what the identity needs
    EPS_HAT_HIGH = "eps_hat_high"
    # recursion across generations
    BOTH_INFINITE = "both_infinite"  # ∞ on both sides: the comparison is undecidable
    INTRA_INFINITE = "intra_infinite"  # I_i = ∞ with D_{i+1}, D_i finite (violated)
    # discounted-sum prediction
    NO_FINITE_RATIO = "no_finite_ratio"  # measured or predicted D not finite and positive


@dataclass(frozen=True)
class BoundCheck:
    """One bound held against one measurement (a docs/paper.md §4 single-generation result).

    name: metric name, e.g. ``bound_kl_upper``.
    bound: the bound's value; measured / stderr: the measured quantity and one standard error.
    bound_stderr: one standard error of the bound (it is itself built from measured ε², η).
    direction: ``'upper'`` (measured should be ≤ bound), ``'lower'`` (≥ bound) or ``'equal'``
        (an identity used as a calibration).
    held: True / False, or None when the check cannot be decided, the bound makes no claim or
        the relation is an identity for this model (nothing is tested).
    status: a :class:`Status` code; cause: a :class:`Cause` code (``Cause.NONE`` when held).
    n_sigma: the tolerance used, in standard errors; gap: by how much the measurement lies on
        the wrong side (negative = right side); sigma: the combined standard error.
    detail: the numbers a premise code refers to (``eps_sq``, ``generation``, ``i0``, ``C``).
    """

    name: str
    bound: float
    measured: float
    stderr: float
    direction: Literal["upper", "lower", "equal"]
    held: bool | None
    status: Status
    cause: Cause = Cause.NONE
    bound_stderr: float = 0.0
    n_sigma: float = 2.0
    gap: float = float("nan")
    sigma: float = float("nan")
    stderr_known: bool = True
    detail: dict = field(default_factory=dict, compare=False)


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
    premises: Sequence[tuple[bool, Cause]] = (),
    n_sigma: float = 2.0,
    fail_cause: Cause = Cause.VIOLATED,
    detail: dict | None = None,
) -> BoundCheck:
    """Decide whether a docs/paper.md §4 bound held for one measurement, allowing for noise.

    Order of the decision (first that applies wins):

    1. Premises (pass ``generation``/``i0``/``eps_sq`` only for results that assume them).
       ``generation < i0`` → cause TRANSIENT; ``eps_sq`` NaN → EPS_UNKNOWN; ``eps_sq > 1`` →
       NOT_PERTURBATIVE; any ``premises`` entry ``(False, cause)`` → that cause. Status
       NO_CLAIM, held = None.
    2. Unusable numbers. A NaN measurement (MEASURED_NAN) or bound (BOUND_NAN), an infinite
       bound (BOUND_INFINITE) → NO_CLAIM. A measurement of +∞ satisfies any lower bound → HELD;
       against a finite upper bound it cannot be confirmed (MEASURED_INFINITE) → NO_CLAIM.
    3. Comparison with tolerance ``n_sigma · sqrt(stderr² + bound_stderr²)``: an upper bound
       holds if measured − tol ≤ bound, a lower bound if measured + tol ≥ bound; otherwise
       FAILED with ``fail_cause`` (the likely reason, chosen by the caller who knows which
       idealisation the measurement departs from). An unknown (NaN) stderr counts as 0 and
       ``stderr_known`` is False.
    """
    if direction not in ("upper", "lower"):
        raise ValueError(f"direction must be 'upper' or 'lower'; got {direction!r}")
    if n_sigma < 0:
        raise ValueError(f"n_sigma must be non-negative; got {n_sigma!r}")
    bound, measured = float(bound), float(measured)
    stderr, bound_stderr = float(stderr), float(bound_stderr)
    if stderr < 0 or bound_stderr < 0:
        raise ValueError("standard errors must be non-negative")
    info = dict(detail or {})
    if generation is not None:
        info.update(generation=int(generation), i0=int(i0))
    if eps_sq is not None:
        info["eps_sq"] = float(eps_sq)

    def result(held, status, cause=Cause.NONE, gap=float("nan"), sigma=float("nan"),
               known=True) -> BoundCheck:
        return BoundCheck(name, bound, measured, stderr, direction, held, status, cause,
                          bound_stderr, n_sigma, gap, sigma, known, info)

    if generation is not None and generation < i0:
        return result(None, Status.NO_CLAIM, Cause.TRANSIENT)
    if eps_sq is not None:
        if math.isnan(float(eps_sq)):
            return result(None, Status.NO_CLAIM, Cause.EPS_UNKNOWN)
        if float(eps_sq) > 1.0:
            return result(None, Status.NO_CLAIM, Cause.NOT_PERTURBATIVE)
    for ok, cause in premises:
        if not ok:
            return result(None, Status.NO_CLAIM, Cause(cause))

    if math.isnan(measured):
        return result(None, Status.NO_CLAIM, Cause.MEASURED_NAN)
    if math.isnan(bound):
        return result(None, Status.NO_CLAIM, Cause.BOUND_NAN)
    if math.isinf(bound):
        return result(None, Status.NO_CLAIM, Cause.BOUND_INFINITE)
    if math.isinf(measured):
        if measured > 0 and direction == "lower":
            return result(True, Status.HELD, Cause.MEASURED_INFINITE_OK)
        if measured > 0:
            return result(None, Status.NO_CLAIM, Cause.MEASURED_INFINITE)
        return result(None, Status.NO_CLAIM, Cause.MEASURED_NEG_INFINITE)

    known = not (math.isnan(stderr) or math.isnan(bound_stderr))
    s = math.hypot(0.0 if math.isnan(stderr) else stderr,
                   0.0 if math.isnan(bound_stderr) else bound_stderr)
    gap = measured - bound if direction == "upper" else bound - measured
    if gap <= n_sigma * s:
        return result(True, Status.HELD, Cause.NONE, gap, s, known)
    return result(False, Status.FAILED, Cause(fail_cause), gap, s, known)


def check_identity(
    name: str,
    lhs: float,
    lhs_stderr: float,
    rhs: float,
    rhs_stderr: float,
    n_sigma: float = 2.0,
    detail: dict | None = None,
) -> BoundCheck:
    """Compare the two sides of an identity within noise: a calibration, not a test of theory.

    ``measured`` = lhs (e.g. the exact-density KL(p̂_t0 ‖ q_t0)), ``bound`` = rhs (e.g.
    KL(p̂_T ‖ q_T) + ½ ε̂²). CONSISTENT when |lhs − rhs| ≤ n_sigma · sqrt(se_l² + se_r²), else
    INCONSISTENT with EPS_HAT_LOW (rhs too small) or EPS_HAT_HIGH; NO_CLAIM with
    MEASURED_NAN / BOUND_NAN / MEASURED_INFINITE / BOUND_INFINITE when a side is not finite.
    ``held`` is None throughout (an identity holds by mathematics; only the estimate is judged).
    """
    lhs, rhs = float(lhs), float(rhs)
    se_l = 0.0 if math.isnan(float(lhs_stderr)) else float(lhs_stderr)
    se_r = 0.0 if math.isnan(float(rhs_stderr)) else float(rhs_stderr)
    known = not (math.isnan(float(lhs_stderr)) or math.isnan(float(rhs_stderr)))

    def result(status, cause, gap=float("nan"), s=float("nan")):
        return BoundCheck(name, rhs, lhs, se_l, "equal", None, status, cause, se_r, n_sigma,
                          gap, s, known, dict(detail or {}))

    for v, nan_c, inf_c in ((lhs, Cause.MEASURED_NAN, Cause.MEASURED_INFINITE),
                            (rhs, Cause.BOUND_NAN, Cause.BOUND_INFINITE)):
        if math.isnan(v):
            return result(Status.NO_CLAIM, nan_c)
        if math.isinf(v):
            return result(Status.NO_CLAIM, inf_c)
    s = math.hypot(se_l, se_r)
    gap = lhs - rhs
    if abs(gap) <= n_sigma * s:
        return result(Status.CONSISTENT, Cause.NONE, gap, s)
    return result(Status.INCONSISTENT, Cause.EPS_HAT_LOW if gap > 0 else Cause.EPS_HAT_HIGH,
                  gap, s)


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
    kl_T: float | None = None,
    kl_T_stderr: float = 0.0,
    exact_own_law: bool = False,
    against_t0: bool = True,
    generation: int | None = None,
    i0: int = 0,
    C: float = 0.0,
    c: float = 0.0,
    n_sigma: float = 2.0,
) -> list[BoundCheck]:
    """Check every single-generation bound of docs/paper.md §4 that the given measurements allow.

    Returns, in this order and only when their inputs are given:

    ``bound_kl_upper`` — Prop 3.1 (Girsanov + data processing), KL(p̂_{i+1} ‖ q_{i,t0}) ≤ ½ ε̂².
        It needs only the score and regularity assumptions, so neither i ≥ i0 nor ε⋆² ≤ 1 is
        asked of it. When ``exact_own_law`` (the model's score is the exact score of its own law:
        analytic, population KDE, finite KDE), integrating d/dt KL(p̂_t ‖ q_t) = −½ β
        E‖∇log p̂_t − ∇log q_t‖² from t0 to T gives KL(p̂_t0 ‖ q_t0) = KL(p̂_T ‖ q_T) + ½ ε̂² with
        ε̂² along p̂'s own reverse paths (de Bruijn): the check is an identity, status IDENTITY,
        held None. A failure's likely cause is START_TERM when the measured gap is within
        noise of ``kl_T`` (the learned path started from p̂_T, not q_T), else EPS_HAT_ESTIMATE.
    ``calibration_eps_hat`` — only when ``exact_own_law`` and ``kl_T`` is given: the identity
        above as a calibration of the ε̂² estimator (:func:`check_identity`, lhs = KL_t0,
        rhs = KL_T + ½ ε̂²).
    ``bound_chi2_lower`` (I_i ≥ ¼ η ε⋆² − C ε⋆⁴; needs eta, intra_chi2),
    ``bound_chi2_lower_clean`` (I_i ≥ η ε⋆²/8 in the clean regime; needs eta, intra_chi2),
    ``bound_intra_upper`` (I_i ≤ 4 ε⋆² + c ε⋆⁴; needs intra_chi2) — these three carry the
    paper's premises: generation ≥ i0 (past the transient) and ε⋆² ≤ 1 (perturbative).
    ``against_t0`` False says the measurements are against q_i, not q_i pushed to t0; a
    failure then names NOT_T0 as the likely cause.
    The uncertainty of each bound is propagated to first order from the given stderrs.
    """
    e, se_e = float(eps_star_sq), float(eps_star_sq_stderr)
    common = dict(eps_sq=e, generation=generation, i0=i0, n_sigma=n_sigma)
    out: list[BoundCheck] = []
    if eps_hat_sq is not None and intra_kl is not None:
        half, half_se = kl_upper_bound(eps_hat_sq), 0.5 * float(eps_hat_sq_stderr)
        detail = {"eps_hat_sq": float(eps_hat_sq)}
        if generation is not None:
            detail["generation"] = int(generation)
        if exact_own_law:
            out.append(BoundCheck("bound_kl_upper", half, float(intra_kl), float(intra_kl_stderr),
                                  "upper", None, Status.IDENTITY, Cause.EXACT_OWN_LAW, half_se,
                                  n_sigma, float(intra_kl) - half, float("nan"), True, detail))
            if kl_T is not None:
                rhs = float(kl_T) + half
                out.append(check_identity(
                    "calibration_eps_hat", intra_kl, intra_kl_stderr, rhs,
                    math.hypot(float(kl_T_stderr), half_se), n_sigma,
                    {**detail, "kl_T": float(kl_T)},
                ))
        else:
            cause = Cause.EPS_HAT_ESTIMATE if against_t0 else Cause.NOT_T0
            if against_t0 and kl_T is not None and math.isfinite(float(kl_T)):
                gap = float(intra_kl) - half
                tol = n_sigma * math.hypot(float(intra_kl_stderr), half_se, float(kl_T_stderr))
                if gap <= float(kl_T) + tol:
                    cause = Cause.START_TERM
                detail["kl_T"] = float(kl_T)
            out.append(check_bound(
                "bound_kl_upper", half, intra_kl, intra_kl_stderr, "upper",
                bound_stderr=half_se, n_sigma=n_sigma, fail_cause=cause, detail=detail,
            ))
    if eta is not None and intra_chi2 is not None:
        et, se_et = float(eta), float(eta_stderr)
        # d/dε² (¼ηε² − Cε⁴) = ¼η − 2Cε²; d/dη = ¼ε².
        se_low = math.hypot((0.25 * et - 2 * C * e) * se_e, 0.25 * e * se_et)
        fail = Cause.LEADING_ORDER_C if against_t0 else Cause.NOT_T0
        out.append(check_bound(
            "bound_chi2_lower", chi2_lower_bound(et, e, C), intra_chi2, intra_chi2_stderr,
            "lower", bound_stderr=se_low, fail_cause=fail, detail={"C": C}, **common,
        ))
        clean = bool(clean_regime(et, e, C))
        out.append(check_bound(
            "bound_chi2_lower_clean", chi2_lower_bound_clean(et, e), intra_chi2,
            intra_chi2_stderr, "lower",
            bound_stderr=math.hypot(et * se_e, e * se_et) / 8.0,
            premises=[(clean, Cause.NOT_CLEAN)], fail_cause=fail, detail={"C": C}, **common,
        ))
    if intra_chi2 is not None:
        out.append(check_bound(
            "bound_intra_upper", intra_upper_bound(e, c), intra_chi2, intra_chi2_stderr,
            "upper", bound_stderr=abs(4.0 + 2 * c * e) * se_e,
            fail_cause=Cause.LEADING_ORDER_c if against_t0 else Cause.NOT_T0,
            detail={"c": c}, **common,
        ))
    return out


# --------------------------------------------------------------------------- across generations


def contraction_factor(alpha):
    """(1 − α)²: the exact factor by which mixing in a fraction α of fresh data contracts χ² to
    the target, χ²(α p + (1−α) r ‖ p) = (1−α)² χ²(r ‖ p) (docs/paper.md §4, exact contraction).
    """
    a = _check_alpha(alpha)
    return _out((1.0 - a) ** 2)


def mixture_chi2(alpha, chi2_r):
    """χ²(α p + (1−α) r ‖ p) = (1−α)² χ²(r ‖ p) (docs/paper.md §4, exact contraction); with r = p̂_i
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
    (docs/paper.md §4, recursion). At α = 0 the bound is 0 even for I_i = ∞.
    """
    a = _check_alpha(alpha)
    i = _arr(intra)
    a, i = np.broadcast_arrays(a, i)
    with np.errstate(invalid="ignore"):  # 0 · ∞ at α = 0 is replaced by 0 below
        return _out(np.where(a == 0.0, np.where(np.isnan(i), np.nan, 0.0), 0.5 * a * i))


def check_recursion(alpha: float, D, I) -> np.ndarray:
    """Per-generation slack of the recursion D_{i+1} + (1−α)² D_i ≥ (α/2) I_i (docs/paper.md §4).

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


def check_recursion_step(alpha: float, D_next: float, D_prev: float, intra: float, *,
                         D_next_stderr: float = 0.0, D_prev_stderr: float = 0.0,
                         intra_stderr: float = 0.0, n_sigma: float = 2.0,
                         generation: int | None = None) -> BoundCheck:
    """The recursion D_{i+1} + (1−α)² D_i ≥ (α/2) I_i (docs/paper.md §4) at one generation, as
    a :class:`BoundCheck` named ``recursion`` (direction ``'lower'``).

    measured = D_{i+1} + (1−α)² D_i, bound = (α/2) I_i; the slack (:func:`check_recursion`) is
    ``detail['slack']`` and ``gap = −slack``. It holds when slack + n_sigma·σ ≥ 0 with σ the
    combined standard error of both sides. Codes: NaN inputs → NO_CLAIM / MEASURED_NAN (the
    NaN ones named in ``detail['missing']``); ∞ on both sides → NO_CLAIM / BOTH_INFINITE;
    an infinite left side → HELD / MEASURED_INFINITE_OK; an infinite I_i with finite D →
    FAILED / INTRA_INFINITE; otherwise HELD, or FAILED / VIOLATED.
    """
    a = float(alpha)
    r = (1.0 - a) ** 2
    s = float(check_recursion(a, [D_prev, D_next], [intra])[0])
    lhs = D_next + (r * D_prev if r > 0 else 0.0)
    rhs = float(recursion_lower_bound(a, intra))
    m_se = math.sqrt(D_next_stderr ** 2 + r * r * D_prev_stderr ** 2)
    se = math.sqrt(D_next_stderr ** 2 + r * r * D_prev_stderr ** 2
                   + (a / 2) ** 2 * intra_stderr ** 2)
    detail = {"slack": s, "generation": generation, "missing": ()}
    if math.isnan(s):
        missing = tuple(n for n, x in (("D_{i+1}", D_next), ("D_i", D_prev), ("I_i", intra))
                        if math.isnan(x))
        detail["missing"] = missing
        status, cause, held = Status.NO_CLAIM, (Cause.MEASURED_NAN if missing
                                                else Cause.BOTH_INFINITE), None
    elif math.isinf(s):
        held = s > 0
        status = Status.HELD if held else Status.FAILED
        cause = Cause.MEASURED_INFINITE_OK if held else Cause.INTRA_INFINITE
    else:
        held = s + n_sigma * se >= 0
        status = Status.HELD if held else Status.FAILED
        cause = Cause.NONE if held else Cause.VIOLATED
    return BoundCheck("recursion", rhs, lhs, m_se, "lower", held, status, cause,
                      bound_stderr=a / 2 * intra_stderr, n_sigma=n_sigma, gap=-s, sigma=se,
                      detail=detail)


@dataclass(frozen=True)
class PredictionCheck:
    """The discounted-sum prediction of D_{N+1} (docs/paper.md §4) set beside its measurement.

    The decomposition is a ≲ relation with unknown constants, so nothing is tested: status is
    ``Status.COMPARED``; cause ``Cause.NO_FINITE_RATIO`` when measured or predicted is not
    finite and positive (then ratio is NaN), else ``Cause.NONE``.
    """

    predicted: float
    measured: float
    ratio: float
    status: Status = Status.COMPARED
    cause: Cause = Cause.NONE
    generation: int | None = None


def compare_prediction(predicted: float, measured: float,
                       generation: int | None = None) -> PredictionCheck:
    """Measured D_{N+1} against the discounted sum :func:`predicted_divergence` (a ratio)."""
    p, m = float(predicted), float(measured)
    if math.isfinite(p) and math.isfinite(m) and p > 0:
        return PredictionCheck(p, m, m / p, generation=generation)
    return PredictionCheck(p, m, float("nan"), cause=Cause.NO_FINITE_RATIO,
                           generation=generation)


def persistence_floor(alpha, eta_f, eps_f):
    """limsup D_i ≥ α η_f ε_f / (16 (1 + (1−α)²)) (docs/paper.md §4, persistence), given an eventual
    floor ε⋆,i² ≥ ε_f on the *squared* score energy and η_i ≥ η_f on the observability.
    """
    a = _check_alpha(alpha)
    return _out(a * _arr(eta_f) * _arr(eps_f) / (16.0 * (1.0 + (1.0 - a) ** 2)))


def discount_matrix(alpha: float, N: int) -> np.ndarray:
    """Weights of the discounted decomposition (docs/paper.md §4; the heat-map of Fig. 5).

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
    """Memory of the recursion in generations (docs/paper.md §4: "memory of about 1/α generations").

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
    """Additive discounted decomposition (docs/paper.md §4):

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
    ε² / (α(2−α)) (docs/paper.md §4, discounted decomposition). α = 0 → ∞ for ε² > 0 (no discount);
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


class RegimeLabel(StrEnum):
    """Regime of a chain (docs/paper.md §4 "Regimes"); equal to its plain string value."""

    STABLE = "stable"
    SATURATING = "saturating"
    COLLAPSING = "collapsing"
    UNDETERMINED = "undetermined"


class RegimeReason(StrEnum):
    """Which decision rule of :func:`classify_regime` gave the label (its numbers are in
    ``Regime.detail``); the English lives with the renderers."""

    TOO_SHORT = "too_short"  # R0: fewer than min_length values of D
    D_INFINITE = "d_infinite"  # R1: D = +∞ in the last half
    FEW_FINITE_D = "few_finite_d"  # R0: fewer than 3 finite D in the last half
    FEW_INNOVATIONS = "few_innovations"  # R0: fewer than 3 finite innovations there
    INNOVATION_GROWS = "innovation_grows"  # R2: growing innovations
    DISCOUNTED_DECAY = "discounted_decay"  # R3: α > 0, decaying innovations
    DISCOUNTED_SLOW_DECAY = "discounted_slow_decay"  # R3: same, no faster than 1/i
    INNOVATION_FLOOR = "innovation_floor"  # R3: α > 0 with an innovation floor
    NO_FRESH_RATE_UNKNOWN = "no_fresh_rate_unknown"  # R4: α = 0, decay rate not judged
    NO_FRESH_RISING = "no_fresh_rising"  # R4: α = 0, noisy increments, D rises
    NO_FRESH_SUMMABLE = "no_fresh_summable"  # R4: α = 0, summable increments
    NO_FRESH_NOT_SUMMABLE = "no_fresh_not_summable"  # R4: α = 0, floor or slow decay


@dataclass(frozen=True)
class Regime:
    """Outcome of :func:`classify_regime`.

    label: a :class:`RegimeLabel` (``"stable"``, ``"saturating"``, ``"collapsing"`` or
        ``"undetermined"``); reason: the :class:`RegimeReason` code of the rule that decided.
    slope, slope_stderr: least-squares slope of the last half of D per generation (NaN if unused).
    decay_exponent: p in innovation ∝ (i+1)^p fitted on the last half (NaN if unused).
    plateau: steady state of the fitted recursion, mean innovation/(α(2−α)) (NaN if unused).
    innovation_constant, innovation_constant_stderr: c in innovation = c·ε⋆², fitted on the
        last half when ε⋆² is given (NaN otherwise).
    detail: the numbers the reason refers to (``alpha``, ``length``, ``min_length``,
        ``first_infinite``, ``n_tail``, ``trend`` (the innovations' tail fit), ``memory``,
        ``last_D``). :func:`collapselab.verdicts.render_regime` words it.
    """

    label: RegimeLabel
    reason: RegimeReason
    slope: float = float("nan")
    slope_stderr: float = float("nan")
    decay_exponent: float = float("nan")
    plateau: float = float("nan")
    innovation_constant: float = float("nan")
    innovation_constant_stderr: float = float("nan")
    detail: dict = field(default_factory=dict, compare=False)


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

    Returns None with fewer than 3 finite values, else (kind, p, level, fit) with kind
    one of ``growing``, ``summable`` (decaying faster than 1/i), ``decaying_slowly`` (decaying,
    but not faster than 1/i: Σε² = ∞), ``decaying`` (decaying at an unknown rate), ``floor``.
    With all finite values positive the rate comes from a log-log fit ε² ∝ (i+1)^p; otherwise
    (noisy or implied errors can be ≤ 0) from a linear trend, which cannot judge summability.
    fit: the numbers behind it, ``method`` ``infinite`` / ``loglog`` (``p``, ``se``) /
    ``linear`` (``slope``, ``se``), plus ``kind`` and ``level``.
    """
    if np.any(np.isposinf(errs)):
        return "floor", float("nan"), float("inf"), {"method": "infinite", "kind": "floor",
                                                     "level": float("inf")}
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
        return kind, p, level, {"method": "loglog", "kind": kind, "p": p, "se": se_p,
                                "level": level}
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
    return kind, float("nan"), level, {"method": "linear", "kind": kind, "slope": bi, "se": sei,
                                       "level": level}


def _innovation_constant(innov: np.ndarray, eps: np.ndarray) -> tuple[float, float]:
    """c with innovation ≈ c·ε² (least squares through the origin) and its standard error;
    NaN without at least 2 finite pairs with ε² > 0."""
    ok = np.isfinite(innov) & np.isfinite(eps)
    x, y = eps[ok], innov[ok]
    if len(x) < 2 or float(x @ x) <= 0:
        return float("nan"), float("nan")
    cfit = float(x @ y) / float(x @ x)
    resid = y - cfit * x
    se = math.sqrt(max(float(resid @ resid), 0.0) / max(len(x) - 1, 1) / float(x @ x))
    return cfit, se


def classify_regime(
    alpha: float,
    D_seq,
    eps_sq_seq=None,
    *,
    min_length: int = 6,
    n_sigma: float = 2.0,
) -> Regime:
    """Classify a chain into the regimes of docs/paper.md §4 ("Regimes" and "Persistence") by
    whether the series D saturates — not by comparing it with a plateau that assumes a unit
    constant in front of ε² (the single-step bounds allow any constant between ¼η and 4).

    The recursion D_{i+1} = (1−α)² D_i + c·ε_i² is fitted to the series itself: its
    innovations ẽ_i = D_{i+1} − (1−α)² D_i are the per-generation additions c·ε_i², whatever c
    is. With α > 0 the recursion forgets at rate (1−α)², so D stays bounded exactly when the
    innovations stay bounded, and converges to (mean innovation)/(α(2−α)); with α = 0 nothing
    is forgotten, so ẽ_i = D_{i+1} − D_i are the increments and D converges iff they are
    summable. Measured ε⋆² (``eps_sq_seq``, aligned with D by generation) only estimate c
    (``innovation_constant``, least squares ẽ ≈ c ε² on the last half); they do not decide the
    label.

    Labels (what they say about D_i = χ²(p̂_i ‖ p)):
      stable       D tends to 0 — α > 0 and the innovations decay.
      saturating   D converges to a positive plateau — α > 0 with an innovation floor, or
                   α = 0 with summable increments.
      collapsing   D grows without bound — growing innovations, D infinite, or α = 0 with
                   non-summable increments (a floor or a decay no faster than 1/i).
      undetermined too little data, or a decay whose rate cannot be judged at α = 0.

    Decision rules on the last half (generations ≥ ⌊L/2⌋), first match wins:
      R0 fewer than ``min_length`` values of D, or fewer than 3 finite ones in the last half
         → undetermined.
      R1 D = +∞ anywhere in the last half → collapsing.
      R2 The innovations' last half is judged by ``_error_trend`` (all positive: log-log fit
         ẽ ∝ (i+1)^p, "growing" if p > n_sigma·se, "summable" if p + n_sigma·se < −1,
         "decaying slowly" if significantly negative but not provably below −1, else a
         "floor"; some ≤ 0: linear trend, "growing" / "decaying" / "floor" (mean beyond
         n_sigma stderr) / "summable" (indistinguishable from 0)). Growing → collapsing.
      R3 α > 0: decaying (any rate) → stable; a floor → saturating, plateau
         mean(ẽ)/(α(2−α)).
      R4 α = 0: summable → saturating, unless the increments are noisy (some ≤ 0) and the
         last half of D rises significantly (slope > n_sigma·se) → collapsing; decaying at an
         unknown rate → undetermined; a floor or slow decay → collapsing.
    Trends need significance: beyond n_sigma standard errors and beyond round-off (1e-9 of
    the values' scale), so noise-free synthetic chains classify cleanly.
    """
    a = float(_check_alpha(alpha))
    if math.isnan(a):
        raise ValueError("alpha must be a number in [0, 1]; got NaN")
    D = _arr(D_seq)
    if D.ndim != 1:
        raise ValueError("D_seq must be a one-dimensional sequence over generations")
    L = len(D)
    R, Lb = RegimeReason, RegimeLabel
    det: dict = {"alpha": a, "length": L, "min_length": min_length}
    if L < min_length:
        return Regime(Lb.UNDETERMINED, R.TOO_SHORT, detail=det)
    start = L // 2
    gens = np.arange(L, dtype=np.float64)
    tail = D[start:]
    det["n_tail"] = len(tail)
    if np.any(np.isposinf(tail)):
        det["first_infinite"] = start + int(np.argmax(np.isposinf(tail)))
        return Regime(Lb.COLLAPSING, R.D_INFINITE, detail=det)
    ok = np.isfinite(tail)
    if ok.sum() < 3:
        return Regime(Lb.UNDETERMINED, R.FEW_FINITE_D, detail=det)
    b, se = _ols(gens[start:][ok], tail[ok])
    scale = float(np.max(np.abs(tail[ok])))

    r = (1.0 - a) ** 2
    # r = 0 (α = 1): nothing carries over; avoids 0 · ∞ = nan.
    innov = D[1:] - (r * D[:-1] if r > 0 else 0.0)
    e_start = len(innov) // 2
    errs = _error_trend(np.arange(e_start, len(innov), dtype=np.float64), innov[e_start:],
                        n_sigma)
    if errs is None:
        return Regime(Lb.UNDETERMINED, R.FEW_INNOVATIONS, b, se, detail=det)
    kind, p, level, fit = errs
    det["trend"] = fit
    cfit = cse = float("nan")
    if eps_sq_seq is not None:
        e = _arr(eps_sq_seq)
        if e.ndim != 1:
            raise ValueError("eps_sq_seq must be a one-dimensional sequence over generations")
        n = min(len(e), len(innov))
        cfit, cse = _innovation_constant(innov[e_start:n], e[e_start:n])

    def out(label, reason, plateau=float("nan")):
        return Regime(label, reason, b, se, p, plateau, cfit, cse, detail=det)

    if kind == "growing":
        return out(Lb.COLLAPSING, R.INNOVATION_GROWS)
    if a > 0:
        plateau = float(steady_state(a, max(level, 0.0)))
        det["memory"] = float(memory_length(a))
        if kind in ("summable", "decaying", "decaying_slowly"):
            return out(Lb.STABLE, R.DISCOUNTED_SLOW_DECAY if kind == "decaying_slowly"
                       else R.DISCOUNTED_DECAY, plateau)
        det["last_D"] = float(tail[ok][-1])
        return out(Lb.SATURATING, R.INNOVATION_FLOOR, plateau)
    if kind == "decaying":
        return out(Lb.UNDETERMINED, R.NO_FRESH_RATE_UNKNOWN)
    if kind == "summable" and math.isnan(p) and _rises(b, se, n_sigma, scale):
        # Noisy increments indistinguishable from 0, yet D itself rises significantly: the
        # slope of D over the last half is the better-determined statistic.
        return out(Lb.COLLAPSING, R.NO_FRESH_RISING)
    if kind == "summable":
        return out(Lb.SATURATING, R.NO_FRESH_SUMMABLE)
    return out(Lb.COLLAPSING, R.NO_FRESH_NOT_SUMMABLE)


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
    c: the constant assumed in front of ε² (a prediction under it, not a bound).
    smoothing_D: the t0-smoothing part of worst_D at that α (0 when not modelled).
    """

    alpha: float
    worst_D: float
    feasible: bool
    horizon: int | None
    reason: str
    c: float = 1.0
    smoothing_D: float = 0.0


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


def _plan_additive(eps_sq: float, tolerance: float, horizon: int | None,
               D0: float = 0.0) -> PlanResult:
    """Smallest α ∈ [0, 1] keeping the predicted D ≤ ``tolerance`` at every generation 1 … horizon
    (docs/paper.md §4, discounted decomposition with a constant per-generation innovation ε²; the
    caller passes c·ε²).

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


# --------------------------------------------------------------------------- t0 smoothing drift


@dataclass(frozen=True)
class GaussianSmoothing:
    """Target N(μ, s² I_d) and stopping time t0 of the OU reverse process, for the drift that
    stopping at t0 adds in every generation even with exact scores (docs/paper.md §5: the ideal
    reverse process stopped at t0 outputs its training law pushed to t0 — shrunk by
    a = e^{−t0/2}, with variance 1 − e^{−t0} added).

    mean_sq: ‖μ‖²; var: s² per coordinate; dim: d; weight: share in a mixture (see
    :func:`smoothing_drift_mixture`).
    """

    t0: float
    dim: int
    mean_sq: float = 0.0
    var: float = 1.0
    weight: float = 1.0

    def __post_init__(self):
        if not (math.isfinite(self.t0) and self.t0 > 0):
            raise ValueError(f"t0 must be a finite positive number; got {self.t0!r}")
        if isinstance(self.dim, bool) or int(self.dim) != self.dim or self.dim < 1:
            raise ValueError(f"dim must be a positive integer; got {self.dim!r}")
        if not (math.isfinite(self.mean_sq) and self.mean_sq >= 0):
            raise ValueError(f"mean_sq must be a finite non-negative number; got {self.mean_sq!r}")
        if not (math.isfinite(self.var) and self.var > 0):
            raise ValueError(f"var must be a finite positive number; got {self.var!r}")


@functools.lru_cache(maxsize=8)
def _smoothing_log_gram(g: GaussianSmoothing, N: int) -> np.ndarray:
    """log G_jk = log ∫ g_j g_k / p for j, k = 1 … N, g_k = S^k p = N(a^k μ, v_k I),
    v_k = a^{2k} s² + 1 − a^{2k}; +∞ where 1/v_j + 1/v_k ≤ 1/s² (the integral diverges).

    Per coordinate the integrand is exp(−½ λ x² + β m x − ½ γ m²) with
    λ = 1/v_j + 1/v_k − 1/s², β = a^j/v_j + a^k/v_k − 1/s², γ = a^{2j}/v_j + a^{2k}/v_k − 1/s²
    along μ (m = ‖μ‖), so log G = −(d/2) log(λ v_j v_k / s²) + ‖μ‖² (β²/λ − γ)/2.
    """
    a = math.exp(-0.5 * g.t0)
    k = np.arange(1, N + 1, dtype=np.float64)
    ak = a**k
    v = ak * ak * g.var + (1.0 - ak * ak)
    s2 = g.var
    lam = 1.0 / v[:, None] + 1.0 / v[None, :] - 1.0 / s2
    beta = ak[:, None] / v[:, None] + ak[None, :] / v[None, :] - 1.0 / s2
    gam = (ak * ak / v)[:, None] + (ak * ak / v)[None, :] - 1.0 / s2
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (-0.5 * g.dim * np.log(lam * v[:, None] * v[None, :] / s2)
               + 0.5 * g.mean_sq * (beta * beta / lam - gam))
    return np.where(lam > 0, out, np.inf)


def smoothing_drift(alpha: float, g: GaussianSmoothing, N: int) -> np.ndarray:
    """χ²(p̂_n ‖ p) for n = 1 … N of the chain whose every model is exact (ε⋆² = 0) but stops
    at t0: p̂_{n+1} = S(α p + (1−α) p̂_n), p̂_0 = p, S = the OU push to t0, for the Gaussian
    target p = N(μ, s² I) of ``g`` (closed form, docs/paper.md §4 contraction + §5 t0 step).

    S is linear on laws, so p̂_n = Σ_{k=1}^{n} w_k S^k p with w_k = α(1−α)^{k−1} (k < n) and
    w_n = (1−α)^{n−1}; each S^k p = N(a^k μ, v_k I) is Gaussian and
    χ²(p̂_n ‖ p) = Σ_{j,k} w_j w_k G_jk − 1 with G_jk of :func:`_smoothing_log_gram`.
    Returns +∞ where some G_jk is (a component more than twice as wide as p in a direction).
    """
    a_ = float(_check_alpha(alpha))
    if isinstance(N, bool) or int(N) != N or N < 1:
        raise ValueError(f"N must be a positive integer; got {N!r}")
    N = int(N)
    logG = _smoothing_log_gram(g, N)[:N, :N]
    k = np.arange(1, N + 1, dtype=np.float64)
    u = a_ * (1.0 - a_) ** (k - 1.0)  # weight of S^k p once it is no longer the newest term
    out = np.empty(N)
    G = np.exp(np.minimum(logG, 700.0))
    G = np.where(np.isinf(logG), np.inf, G)
    with np.errstate(invalid="ignore"):
        W = u[:, None] * u[None, :] * G
        W = np.where(u[:, None] * u[None, :] == 0, 0.0, W)  # 0 · ∞ terms carry no mass
        A = np.cumsum(np.cumsum(W, axis=0), axis=1)  # A[m, m] = Σ_{j,k ≤ m+1} u_j u_k G_jk
        B = np.cumsum(np.where(u[:, None] == 0, 0.0, u[:, None] * G), axis=0)
    for n in range(1, N + 1):
        last = (1.0 - a_) ** (n - 1)  # weight of the newest component S^n p
        val = (A[n - 2, n - 2] if n >= 2 else 0.0) - 1.0
        if last > 0:  # a zero weight carries no mass even against an infinite G
            with np.errstate(invalid="ignore", over="ignore"):
                val += (last * last * G[n - 1, n - 1]
                        + (2.0 * last * B[n - 2, n - 1] if n >= 2 else 0.0))
        out[n - 1] = np.inf if np.isnan(val) else val  # positive mass on an infinite term
    # Σ w w G − 1 cancels to round-off (~1e-15 per term) when S barely moves p.
    return np.where(np.abs(out) < 1e-12, 0.0, np.maximum(out, 0.0))


def smoothing_drift_mixture(alpha: float, parts: Sequence[GaussianSmoothing],
                            N: int) -> np.ndarray:
    """Upper bound Σ_m π_m χ²(p̂_n^{(m)} ‖ p_m) on the t0 drift of a Gaussian-mixture target
    p = Σ π_m p_m (``parts`` with ``weight`` π_m): the smoothing chain is linear in its start
    and fresh data, so p̂_n = Σ π_m p̂_n^{(m)} (each component's own chain), and χ² is jointly
    convex. Close to equality when the components are well separated."""
    tot = sum(float(p.weight) for p in parts)
    if not parts or not tot > 0:
        raise ValueError("parts must be a non-empty sequence with positive total weight")
    # Components with the same (t0, d, ‖μ‖², s²) have the same chain: compute it once.
    groups: dict[tuple, float] = {}
    for p in parts:
        key = (p.t0, p.dim, p.mean_sq, p.var)
        groups[key] = groups.get(key, 0.0) + float(p.weight)
    return sum(w / tot * smoothing_drift(alpha, GaussianSmoothing(*k), N)
               for k, w in groups.items())


def smoothing_kl_step(g: GaussianSmoothing) -> float:
    """KL(S p ‖ p) for p = N(μ, s² I): the KL drift one t0 stop adds to an exact model,
    ½ [d v/s² + (1−a)² ‖μ‖²/s² − d + d log(s²/v)] with a = e^{−t0/2}, v = a² s² + 1 − a²."""
    a = math.exp(-0.5 * g.t0)
    v = a * a * g.var + 1.0 - a * a
    d, s2 = g.dim, g.var
    return 0.5 * (d * v / s2 + (1.0 - a) ** 2 * g.mean_sq / s2 - d + d * math.log(s2 / v))


def _smoothing_horizon(t0: float, horizon: int | None) -> int:
    # S^k p is within e^{−12} of N(0, I) once k t0 ≥ 12: later generations add nothing new.
    cap = min(2000, max(10, math.ceil(12.0 / t0)))
    return cap if horizon is None else min(int(horizon), cap)


def _worst_with_smoothing(alpha: float, inn: float, D0: float, horizon: int | None,
                          parts: Sequence[GaussianSmoothing]) -> tuple[float, float]:
    """(worst over n of P_n + S_n, S at that n): P_n the additive prediction with innovation
    ``inn``, S_n the exact t0-smoothing drift (:func:`smoothing_drift_mixture`)."""
    N = _smoothing_horizon(parts[0].t0, horizon)
    S = smoothing_drift_mixture(alpha, parts, N)
    n = np.arange(1, N + 1, dtype=np.float64)
    r = (1.0 - alpha) ** 2
    P = r**n * D0 + (inn * n if r == 1.0 else inn * (1.0 - r**n) / (1.0 - r))
    tot = P + S
    k = int(np.argmax(tot))
    worst, s_at = float(tot[k]), float(S[k])
    if horizon is None or horizon > N:
        # Beyond N the smoothing part has converged; the additive part tends to its supremum.
        p_sup = _worst_D(alpha, inn, D0, horizon)
        if p_sup + float(S[-1]) > worst:
            worst, s_at = p_sup + float(S[-1]), float(S[-1])
    return worst, s_at


def plan_alpha(eps_sq: float, tolerance: float, horizon: int | None, D0: float = 0.0,
               c: float = 1.0, smoothing: Sequence[GaussianSmoothing] | None = None
               ) -> PlanResult:
    """Smallest α ∈ [0, 1] keeping the *predicted* D ≤ ``tolerance`` at every generation
    1 … horizon (docs/paper.md §4, discounted decomposition). A prediction under a stated constant,
    not a bound: the recursion D_{i+1} = (1−α)² D_i + c·ε² is assumed with the constant ``c``
    (1 = the additive picture; the single-step upper bound I ≤ 4 ε⋆² allows up to 4).

    Prediction: P_n = (1−α)^{2n} D0 + c ε² Σ_{k<n} (1−α)^{2k}, plus — when ``smoothing`` is
    given (the target's Gaussian parts, :class:`GaussianSmoothing`) — the exact drift S_n that
    stopping every generation at t0 adds with exact scores (:func:`smoothing_drift_mixture`),
    added to P_n (the two are combined additively: an approximation).

    Without smoothing, monotonicity in α makes bisection exact (see :func:`_plan_additive`).
    With it, feasibility is scanned on a grid of 21 values of α and refined by bisection
    between the last infeasible and the first feasible grid value above which all are
    feasible.
    """
    c = float(c)
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"c must be a finite positive number; got {c!r}")
    eps_sq = float(eps_sq)
    if not (math.isfinite(eps_sq) and eps_sq >= 0):
        raise ValueError(f"eps_sq must be a finite non-negative number; got {eps_sq!r}")
    if not smoothing:
        res = _plan_additive(c * eps_sq, tolerance, horizon, D0)
        return PlanResult(res.alpha, res.worst_D, res.feasible, res.horizon, res.reason, c, 0.0)
    base = _plan_additive(c * eps_sq, tolerance, horizon, D0)  # validates the other inputs
    tol, D0, inn = float(tolerance), float(D0), c * eps_sq
    parts = list(smoothing)

    def ok(a):
        return _worst_with_smoothing(a, inn, D0, horizon, parts)[0] <= tol

    grid = np.linspace(0.0, 1.0, 21)
    feas = [ok(float(a)) for a in grid]
    span = "all generations" if horizon is None else f"generations 1 to {horizon}"
    if not feas[-1]:
        w, s = _worst_with_smoothing(1.0, inn, D0, horizon, parts)
        return PlanResult(
            1.0, w, False, base.horizon,
            f"infeasible: even all-fresh data (α = 1) gives a predicted D of {_fmt(w)} (c·ε² = "
            f"{_fmt(inn)} plus t0 smoothing {_fmt(s)}) above the tolerance {_fmt(tol)}",
            c, s,
        )
    j = len(grid) - 1
    while j > 0 and feas[j - 1]:
        j -= 1
    if j == 0:
        alpha = 0.0
    else:
        lo, hi = float(grid[j - 1]), float(grid[j])
        while hi - lo > 1e-7:
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if ok(mid) else (mid, hi)
        alpha = hi
    w, s = _worst_with_smoothing(alpha, inn, D0, horizon, parts)
    return PlanResult(
        alpha, w, True, base.horizon,
        f"α = {alpha:.4g} (fraction of fresh data) keeps the predicted D at or below "
        f"{_fmt(tol)} over {span} under the constant c = {c:g}; the worst predicted D is "
        f"{_fmt(w)}, of which {_fmt(s)} is t0 smoothing",
        c, s,
    )
