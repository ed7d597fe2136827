"""English for the verdict and cause codes of :mod:`collapselab.theory` (docs/paper.md §4 checks).

The theory layer decides (status and cause codes plus numbers); this module only words them,
so the loop's stored notes, the report and the CLI say the same thing and nothing downstream
has to parse English.
"""

from __future__ import annotations

import math

from .theory import BoundCheck, Cause, PredictionCheck, Regime, RegimeReason, Status

STATUS_TEXT = {
    Status.HELD: "held",
    Status.FAILED: "FAILED",
    Status.NO_CLAIM: "no claim",
    Status.IDENTITY: "identity",
    Status.CONSISTENT: "consistent",
    Status.INCONSISTENT: "inconsistent",
    Status.COMPARED: "compared",
}

# The status column of a bounds table holds STATUS_TEXT; this turns it back into codes.
STATUS_OF_TEXT = {v: k for k, v in STATUS_TEXT.items()}

# Short tags (tables, counts) for each cause code.
CAUSE_TAG = {
    Cause.NONE: "",
    Cause.TRANSIENT: "transient (i < i0)",
    Cause.NOT_PERTURBATIVE: "outside the perturbative regime (ε⋆² > 1)",
    Cause.EPS_UNKNOWN: "ε⋆² unknown (NaN)",
    Cause.NOT_CLEAN: "outside the clean regime",
    Cause.MEASURED_NAN: "unreliable estimate (NaN)",
    Cause.BOUND_NAN: "bound not evaluable (NaN input)",
    Cause.BOUND_INFINITE: "infinite bound",
    Cause.MEASURED_INFINITE: "infinite value",
    Cause.MEASURED_NEG_INFINITE: "invalid value (−∞)",
    Cause.MEASURED_INFINITE_OK: "",
    Cause.EXACT_OWN_LAW: "identity (score exact for its own law)",
    Cause.VIOLATED: "violated beyond noise",
    Cause.LEADING_ORDER_C: "leading-order bound (−C ε⋆⁴ unknown)",
    Cause.LEADING_ORDER_c: "leading-order bound (+c ε⋆⁴ unknown)",
    Cause.START_TERM: "start term KL(p̂_T ‖ q_T) outside ½ ε̂²",
    Cause.EPS_HAT_ESTIMATE: "ε̂² estimate (finite grid / paths)",
    Cause.NOT_T0: "measured against q_i, not q_i pushed to t0",
    Cause.EPS_HAT_LOW: "ε̂² estimate too low",
    Cause.EPS_HAT_HIGH: "ε̂² estimate too high",
    Cause.BOTH_INFINITE: "both sides infinite (undecidable)",
    Cause.INTRA_INFINITE: "I_i infinite while D is finite",
    Cause.NO_FINITE_RATIO: "no finite ratio",
}


def fmt(x: float, digits: int = 4) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "NaN"
    if isinstance(x, float) and math.isinf(x):
        return "infinity" if x > 0 else "-infinity"
    return f"{x:.{digits}g}"


def fmt_sym(x: float, digits: int = 4) -> str:
    """:func:`fmt` with ∞ / −∞ as symbols (the across-generation rows' convention)."""
    if isinstance(x, float) and math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return fmt(x, digits)


def status_text(status) -> str:
    return STATUS_TEXT[Status(status)]


def cause_tag(cause) -> str:
    return CAUSE_TAG[Cause(cause)]


def _premise(chk: BoundCheck) -> str:
    d = chk.detail
    c = chk.cause
    if c is Cause.TRANSIENT:
        return (f"generation {d.get('generation')} is inside the transient (before i0 = "
                f"{d.get('i0')}); the bound is only claimed from generation i0 on")
    if c is Cause.EPS_UNKNOWN:
        return "the score energy ε⋆² is unknown (NaN), so the premise ε⋆² ≤ 1 cannot be checked"
    if c is Cause.NOT_PERTURBATIVE:
        return (f"score energy ε⋆² = {fmt(d.get('eps_sq', math.nan))} exceeds 1: outside the "
                "perturbative regime, where the bound makes no claim")
    if c is Cause.NOT_CLEAN:
        return (f"premise not met: the clean regime ε⋆² ≤ min(1, η/(8C)) with C = "
                f"{d.get('C', 0.0):g}; the bound makes no claim here")
    if c is Cause.MEASURED_NAN:
        return "the measured value could not be estimated reliably (NaN), so it cannot be checked"
    if c is Cause.BOUND_NAN:
        return "the bound could not be evaluated (one of its inputs is NaN)"
    if c is Cause.BOUND_INFINITE:
        return f"the bound is {fmt(chk.bound)}, so it makes no claim"
    if c is Cause.MEASURED_INFINITE:
        return ("the measured value is infinite, so it cannot be compared with a finite bound; "
                "this usually means a premise fails (e.g. infinite score energy or a model tail "
                "heavier than the target's)")
    if c is Cause.MEASURED_NEG_INFINITE:
        return "the measured value is -infinity, which is not a valid divergence"
    return f"no claim ({c.value})"


def _likely(chk: BoundCheck) -> str:
    d = chk.detail
    c = chk.cause
    if c is Cause.LEADING_ORDER_C:
        return (f"the −C ε⋆⁴ correction is unknown (C = {d.get('C', 0.0):g} used) and "
                f"ε⋆² = {fmt(d.get('eps_sq', math.nan))} is not small; η is itself a "
                "regression estimate")
    if c is Cause.LEADING_ORDER_c:
        return f"the + c ε⋆⁴ term is unknown (c = {d.get('c', 0.0):g} used)"
    if c is Cause.START_TERM:
        return (f"the learned path starts from the model's T-marginal, not q_T: the start term "
                f"KL(p̂_T ‖ q_T) = {fmt(d.get('kl_T', math.nan))} is not part of ½ ε̂²")
    if c is Cause.EPS_HAT_ESTIMATE:
        return ("½ ε̂² is an estimate on a finite reverse-time grid (left-point sums) over "
                "finitely many paths; the KL side uses exact densities and involves no sampler")
    if c is Cause.NOT_T0:
        return ("the measurement is against q_i itself, not q_i pushed to t0: the bound "
                "controls the ideal reverse process's output q_{i,t0}, and the t0 shrink adds "
                "a divergence the bound does not see")
    return "no specific reason is known"


def render_check(chk: BoundCheck) -> str:
    """One plain-English sentence for a :class:`~collapselab.theory.BoundCheck`."""
    s = chk.status
    pm = f" ± {fmt(chk.stderr)}" if chk.stderr > 0 else ""
    if s is Status.IDENTITY:
        return (f"identity, not a test: the model's score is exact for its own law, so "
                f"KL(p̂_t0 ‖ q_t0) = KL(p̂_T ‖ q_T) + ½ ε̂² holds with equality (de Bruijn); "
                f"measured {fmt(chk.measured)}{pm} against ½ ε̂² = {fmt(chk.bound)} — see "
                "calibration_eps_hat for what the comparison says about the ε̂² estimator")
    if s in (Status.CONSISTENT, Status.INCONSISTENT):
        if chk.cause not in (Cause.NONE, Cause.EPS_HAT_LOW, Cause.EPS_HAT_HIGH):
            return "calibration not possible: " + _premise(chk)
        desc = (f"KL(p̂_t0 ‖ q_t0) = {fmt(chk.measured)}{pm} against KL(p̂_T ‖ q_T) + ½ ε̂² = "
                f"{fmt(chk.bound)} ± {fmt(chk.bound_stderr, 2)} (KL_T = "
                f"{fmt(chk.detail.get('kl_T', math.nan))})")
        if s is Status.CONSISTENT:
            return f"{desc}: the ε̂² estimator is consistent with the identity within " \
                   f"{chk.n_sigma:g} standard errors"
        z = f" ({abs(chk.gap) / chk.sigma:.1f} standard errors)" if chk.sigma > 0 else ""
        word = "low" if chk.cause is Cause.EPS_HAT_LOW else "high"
        return (f"{desc}: off by {fmt(abs(chk.gap))}{z}; ½ ε̂² reads {word} (time grid, "
                "path count or a stderr that misses the skew of the path energies)")
    if s is Status.NO_CLAIM:
        return _premise(chk)
    word = {"upper": "upper", "lower": "lower"}.get(chk.direction, "")
    side = "below" if chk.direction == "upper" else "above"
    desc = f"measured {fmt(chk.measured)}{pm} against the {word} bound {fmt(chk.bound)}"
    tail = "" if chk.stderr_known else "; no standard error was available, so the point " \
                                       "values were compared"
    if s is Status.HELD:
        if chk.cause is Cause.MEASURED_INFINITE_OK:
            return "the measured value is infinite, which satisfies any lower bound"
        if chk.gap <= 0:
            return f"{desc}: it lies {side} the bound{tail}"
        return (f"{desc}: on the wrong side by {fmt(chk.gap)}, which is within "
                f"{chk.n_sigma:g} standard errors, so consistent with the bound{tail}")
    sig = f" ({chk.gap / chk.sigma:.1f} standard errors)" if chk.sigma > 0 else ""
    return f"{desc}: violated by {fmt(chk.gap)}{sig}{tail}; likely cause: {_likely(chk)}"


def render_recursion(chk: BoundCheck) -> str:
    """One sentence for a recursion check (:func:`~collapselab.theory.check_recursion_step`)."""
    c = chk.cause
    if c is Cause.MEASURED_NAN:
        return ("cannot be checked: " + ", ".join(chk.detail.get("missing", ()))
                + " could not be estimated reliably (NaN)")
    if c is Cause.BOTH_INFINITE:
        return "both sides are infinite, so the comparison is undecidable"
    if c is Cause.MEASURED_INFINITE_OK:
        return ("the left side is infinite (D infinite: the model's tails have outgrown the "
                "target's), which satisfies the recursion")
    if c is Cause.INTRA_INFINITE:
        return ("I_i is infinite while D_{i+1} and D_i are finite: the recursion is violated "
                "(or the χ² estimates disagree about the tails)")
    s = chk.detail.get("slack", -chk.gap)
    desc = (f"D_(i+1) + (1−α)² D_i = {fmt_sym(chk.measured)} against (α/2) I_i = "
            f"{fmt_sym(chk.bound)} (slack {fmt_sym(s)} ± {fmt_sym(chk.sigma, 2)})")
    if chk.status is Status.FAILED:
        return f"{desc}: the recursion is violated beyond {chk.n_sigma:g} standard errors"
    if s >= 0:
        return f"{desc}: it holds"
    return f"{desc}: on the wrong side, within {chk.n_sigma:g} standard errors"


def render_prediction(cmp: PredictionCheck) -> str:
    """One sentence for :func:`~collapselab.theory.compare_prediction` (D_g, g = N + 1)."""
    g, m, p = cmp.generation, cmp.measured, cmp.predicted
    if cmp.cause is Cause.NO_FINITE_RATIO:
        return f"measured D_{g} = {fmt_sym(m)}, predicted {fmt_sym(p)}: no finite ratio"
    return (f"measured D_{g} = {fmt_sym(m)} against the discounted sum Σ (1−α)^(2(N−i)) "
            f"ε⋆,i² = {fmt_sym(p)} (ratio {fmt_sym(cmp.ratio, 3)}); the decomposition is a ≲ "
            "relation (constants and C_bias unknown)")


def _trend_text(fit: dict) -> str:
    m, kind = fit.get("method"), fit.get("kind", "")
    if m == "infinite":
        return "infinite values in the last half (floor)"
    if m == "loglog":
        return (f"decay exponent {fmt(fit['p'])} ± {fmt(fit['se'])}, mean {fmt(fit['level'])} "
                f"({kind.replace('_', ' ')})")
    return (f"linear trend {fmt(fit['slope'])} ± {fmt(fit['se'])} per generation, "
            f"mean {fmt(fit['level'])} ({kind})")


def render_regime(reg: Regime) -> str:
    """The evidence behind a :func:`~collapselab.theory.classify_regime` label, in English."""
    d, R = reg.detail, RegimeReason
    a = d.get("alpha", math.nan)
    c = reg.reason
    if c is R.TOO_SHORT:
        return (f"only {d['length']} generations of D; at least {d['min_length']} are needed "
                "to judge a trend")
    if c is R.D_INFINITE:
        return (f"D is infinite at generation {d['first_infinite']}: the model's tails have "
                "outgrown the target's")
    if c is R.FEW_FINITE_D:
        return f"fewer than 3 finite values of D among the last {d['n_tail']} generations"
    what = "innovation D_(i+1) − (1−α)² D_i" if a > 0 else "increment D_(i+1) − D_i"
    if c is R.FEW_INNOVATIONS:
        return f"fewer than 3 finite values of the {what} in the last half of the chain"
    src = f"{what}: {_trend_text(d['trend'])}"
    if math.isfinite(reg.innovation_constant):
        src += (f"; fitted constant c = {fmt(reg.innovation_constant)} ± "
                f"{fmt(reg.innovation_constant_stderr)} in innovation = c·ε⋆² (1 is the "
                "additive picture's unit constant)")
    trend = f"last-half slope of D {fmt(reg.slope)} ± {fmt(reg.slope_stderr)} per generation"
    if c is R.INNOVATION_GROWS:
        text = ("the per-generation innovation grows, so D outruns any discount and does not "
                "saturate")
    elif c in (R.DISCOUNTED_DECAY, R.DISCOUNTED_SLOW_DECAY):
        text = (f"α = {a:g} > 0 discounts past errors (memory ≈ {fmt(d['memory'])} "
                "generations) and the innovations decay, so D tends to 0")
        if c is R.DISCOUNTED_SLOW_DECAY:
            return (f"{text}; {src}; {trend}; the decay is no faster than 1/i, so Σε² = ∞ and "
                    "by the persistence result ΣD_i = ∞ even as D_i → 0")
    elif c is R.INNOVATION_FLOOR:
        text = (f"α = {a:g} > 0 with an innovation floor: the fitted recursion converges to "
                f"the plateau mean innovation/(α(2−α)) = {fmt(reg.plateau)} (memory ≈ "
                f"{fmt(d['memory'])} generations; last D {fmt(d['last_D'])})")
    elif c is R.NO_FRESH_RATE_UNKNOWN:
        text = ("α = 0: no fresh data, so D converges only if its increments are summable, "
                "and they decay at a rate that cannot be judged from these values")
    elif c is R.NO_FRESH_RISING:
        text = ("α = 0: no fresh data, and D keeps rising although its noisy increments "
                "cannot be told from 0 one by one")
    elif c is R.NO_FRESH_SUMMABLE:
        text = "α = 0: no fresh data, but the increments look summable, so D levels off"
    else:
        text = ("α = 0: no fresh data, and the increments are not summable (a floor or a decay "
                "no faster than 1/i): D grows without bound")
    return f"{text}; {src}; {trend}"
