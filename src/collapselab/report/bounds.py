"""The paper's bounds re-evaluated on a finished run's results table (`collapselab bounds`).

:func:`evaluate_bounds` turns the measured rows (score energies, observability, intra and
accumulated divergences) into one row per check of docs/paper.md §4 — the single-generation
bounds (Prop 3.1's KL upper bound, the χ² lower and two-sided bounds), the recursion, the
discounted-sum prediction and the regime — with theory's verdict codes
(:mod:`collapselab.theory`) and the sentence :mod:`collapselab.verdicts` renders from them; the
other functions count and summarise that table. No figures here: they are drawn by
:mod:`collapselab.report.run`.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..engine.store import RESULT_COLUMNS
from ..theory import Status
from ..verdicts import (
    STATUS_OF_TEXT,
    cause_tag,
    render_check,
    render_prediction,
    render_recursion,
    render_regime,
    status_text,
)

# Preference order when several estimators measured the same metric.
ESTIMATOR_ORDER = ["exact", "monte_carlo", "classifier", "knn", "gaussian_features"]


def swept_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in RESULT_COLUMNS and "." in c]


def bound_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df[df.metric.str.startswith("bound_")]


# ---- the paper's bounds, re-evaluated from the results table (`collapselab bounds`) ----------
# Rows of DIR/bounds.parquet. kind: single_generation | recursion | prediction | regime.
# held: True / False / None (the bound makes no claim, or the check cannot be decided);
# status: held / FAILED / no claim (checks), compared (prediction), the label (regime).
# slack: by how much the bound held (measured − bound for a lower bound, bound − measured for an
# upper one; negative = on the wrong side); cause: a short tag of why a check failed or made no
# claim (empty when it held), reason: the plain-English sentence.
BOUND_TABLE_COLUMNS = ["alpha", "seed", "generation", "kind", "check", "bound", "bound_stderr",
                       "measured", "measured_stderr", "measured_metric", "direction", "slack",
                       "held", "status", "cause", "reason"]
EXACT_DENSITY = ("exact", "monte_carlo")
SINGLE_CHECKS = {
    "bound_kl_upper": "KL(p̂_{i+1} ‖ q_{i,t0}) ≤ ½ ε̂_i²",
    "bound_chi2_lower": "χ²(p̂_{i+1} ‖ q_{i,t0}) ≥ ¼ η_i ε⋆,i² − C ε⋆,i⁴",
    "bound_chi2_lower_clean": "χ²(p̂_{i+1} ‖ q_{i,t0}) ≥ η_i ε⋆,i² / 8",
    "bound_intra_upper": "χ²(p̂_{i+1} ‖ q_{i,t0}) ≤ 4 ε⋆,i² + c ε⋆,i⁴",
    "recursion": "D_{i+1} + (1−α)² D_i ≥ (α/2) I_i",
    "calibration_eps_hat": "KL(p̂_{i+1} ‖ q_{i,t0}) = KL(p̂_T ‖ q_T) + ½ ε̂_i² (identity)",
}

BOUND_LABELS = {"bound_kl_upper": "½ ε̂²", "bound_chi2_lower": "¼ η ε⋆² − C ε⋆⁴",
                "bound_chi2_lower_clean": "η ε⋆²/8", "bound_intra_upper": "4 ε⋆² + c ε⋆⁴"}


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _pick_series(sub: pd.DataFrame, metric: str, estimators=None) -> dict[int, dict]:
    """generation → {value, stderr, note, estimator} of ``metric`` in one chain, from the most
    trusted estimator of each generation (ESTIMATOR_ORDER), optionally restricted."""
    rows = sub[sub.metric == metric]
    if estimators is not None:
        rows = rows[rows.estimator.isin(estimators)]
    if rows.empty:
        return {}
    rank = {e: k for k, e in enumerate(ESTIMATOR_ORDER)}
    rows = rows.assign(_r=rows.estimator.map(lambda e: rank.get(e, len(rank))))
    out = {}
    for g, grp in rows.sort_values("_r", kind="stable").groupby("generation"):
        r = grp.iloc[0]
        se = _num(r.stderr)
        out[int(g)] = {"value": _num(r.value), "stderr": 0.0 if math.isnan(se) else se,
                       "note": str(r.note) if isinstance(r.note, str) else "",
                       "estimator": r.estimator}
    return out


def _check_row(base: dict, chk, measured_metric: str) -> dict:
    """One bounds-table row from a theory.BoundCheck: status and cause are its codes, rendered
    (status) or kept (cause); the reason is worded from them by :mod:`collapselab.verdicts`."""
    if chk.direction == "upper":
        slack = chk.bound - chk.measured
    elif chk.direction == "lower":
        slack = chk.measured - chk.bound
    else:
        slack = -abs(chk.measured - chk.bound)
    return {**base, "kind": "single_generation", "check": chk.name, "bound": chk.bound,
            "bound_stderr": chk.bound_stderr, "measured": chk.measured,
            "measured_stderr": chk.stderr, "measured_metric": measured_metric,
            "direction": chk.direction, "slack": slack, "held": chk.held,
            "status": status_text(chk.status), "cause": chk.cause.value,
            "reason": render_check(chk)}


# Score models whose score is the exact score of their own law: Prop 3.1 is an identity there.
EXACT_OWN_LAW_KINDS = ("analytic", "population_kde", "kde")


def _single_rows(sub, base, cfg, i0, C, c, n_sigma) -> list[dict]:
    from .. import theory

    eps = _pick_series(sub, "score_energy_ideal")
    if not eps:
        return []
    eta = _pick_series(sub, "observability")
    hat = _pick_series(sub, "score_energy_learned")
    kl_T = _pick_series(sub, "intra_kl_T", EXACT_DENSITY)
    own = ((cfg.get("score", {}) or {}).get("kind") in EXACT_OWN_LAW_KINDS)
    meas = {}
    for key in ("intra_kl", "intra_chi2"):
        t0 = _pick_series(sub, f"{key}_t0", EXACT_DENSITY)
        raw = _pick_series(sub, key, EXACT_DENSITY)
        meas[key] = {g: (f"{key}_t0", v) for g, v in t0.items()}
        for g, v in raw.items():
            meas[key].setdefault(g, (key, v))
    out = []
    for g in sorted(eps):
        e = eps[g]
        kw = dict(eps_star_sq=e["value"], eps_star_sq_stderr=e["stderr"], generation=g, i0=i0,
                  C=C, c=c, n_sigma=n_sigma)
        names = {}
        if g in kl_T:
            kw.update(kl_T=kl_T[g]["value"], kl_T_stderr=kl_T[g]["stderr"])
        if g in eta:
            kw.update(eta=eta[g]["value"], eta_stderr=eta[g]["stderr"])
        if g in hat:
            kw.update(eps_hat_sq=hat[g]["value"], eps_hat_sq_stderr=hat[g]["stderr"])
        for key in ("intra_kl", "intra_chi2"):
            if g in meas[key]:
                mname, v = meas[key][g]
                kw.update({key: v["value"], f"{key}_stderr": v["stderr"]})
                names[key] = (mname, v)
        kl_name = names.get("intra_kl", ("",))[0]
        chi_name = names.get("intra_chi2", ("",))[0]
        # A measurement against q_i itself (no _t0 row) departs from what the bounds control.
        t0 = all(n.endswith("_t0") for n in (kl_name, chi_name) if n)
        kw["against_t0"] = t0
        kw["exact_own_law"] = own and kl_name.endswith("_t0")
        for chk in theory.check_single_generation(**kw):
            key = "intra_kl" if chk.name in ("bound_kl_upper", "calibration_eps_hat") \
                else "intra_chi2"
            mname, v = names[key]
            row = _check_row({**base, "generation": g}, chk, mname)
            if chk.cause is theory.Cause.MEASURED_NAN and v["note"]:
                row["reason"] += f" — the estimator says: {v['note']}"
            out.append(row)
    return out


def _recursion_rows(sub, base, alpha, n_sigma) -> list[dict]:
    from .. import theory

    D = _pick_series(sub, "accumulated_chi2")
    I = _pick_series(sub, "intra_chi2", EXACT_DENSITY) or _pick_series(sub, "intra_chi2")
    if not D or not I:
        return []
    G = max(max(D), max(I) + 1)
    nan = {"value": math.nan, "stderr": 0.0, "note": "", "estimator": ""}
    Dv = [D.get(g, nan) for g in range(G + 1)]
    Iv = [I.get(g, nan) for g in range(G)]
    out = []
    for g in range(G):
        if g not in I or g + 1 not in D:
            continue
        d1, d0, ii = Dv[g + 1], Dv[g], Iv[g]
        chk = theory.check_recursion_step(
            alpha, d1["value"], d0["value"], ii["value"], D_next_stderr=d1["stderr"],
            D_prev_stderr=d0["stderr"], intra_stderr=ii["stderr"], n_sigma=n_sigma,
            generation=g)
        est = {d1["estimator"], d0["estimator"], ii["estimator"]} - {""}
        reason = render_recursion(chk)
        if chk.cause is theory.Cause.MEASURED_NAN:
            series = {"D_{i+1}": d1, "D_i": d0, "I_i": ii}
            reason += "".join(f" — {n}: {series[n]['note']}" for n in chk.detail["missing"]
                              if series[n]["note"])
        out.append({**base, "generation": g, "kind": "recursion", "check": chk.name,
                    "bound": chk.bound, "bound_stderr": chk.bound_stderr,
                    "measured": chk.measured, "measured_stderr": chk.stderr,
                    "measured_metric": "accumulated_chi2", "direction": chk.direction,
                    "slack": chk.detail["slack"], "held": chk.held,
                    "status": status_text(chk.status), "cause": chk.cause.value,
                    "reason": f"{reason}; D from {'/'.join(sorted(est))} rows"})
    return out


def _prediction_rows(sub, base, alpha, i0) -> list[dict]:
    from .. import theory

    eps = _pick_series(sub, "score_energy_ideal")
    D = _pick_series(sub, "accumulated_chi2")
    if not eps or not D:
        return []
    L = max(eps) + 1
    e = [eps.get(g, {"value": math.nan})["value"] for g in range(L)]
    d_i0 = D.get(i0, {"value": 0.0 if i0 == 0 else math.nan})["value"]
    pred = theory.predicted_divergence(alpha, e, D_i0=d_i0, i0=min(i0, L))
    out = []
    for n in range(L):
        g = n + 1
        if g not in D or n < i0:
            continue
        cmp = theory.compare_prediction(pred[n], D[g]["value"], generation=g)
        reason = render_prediction(cmp)
        if cmp.cause is theory.Cause.NO_FINITE_RATIO and D[g]["note"] \
                and math.isnan(cmp.measured):
            reason += f" — {D[g]['note']}"
        out.append({**base, "generation": g, "kind": "prediction", "check": "discounted_sum",
                    "bound": cmp.predicted, "bound_stderr": math.nan, "measured": cmp.measured,
                    "measured_stderr": D[g]["stderr"], "measured_metric": "accumulated_chi2",
                    "direction": "", "slack": math.nan, "held": None,
                    "status": status_text(cmp.status), "cause": cmp.cause.value,
                    "reason": reason})
    return out


def seed_mean(values: list[float]) -> float:
    v = np.asarray(values, dtype=float)
    if np.any(np.isposinf(v)):
        return math.inf
    fin = v[np.isfinite(v)]
    return float(fin.mean()) if len(fin) else math.nan


def _regime_rows(group, base, alpha) -> list[dict]:
    from .. import theory

    per_seed_D, per_seed_e = [], []
    for _, sub in group.groupby("seed"):
        per_seed_D.append(_pick_series(sub, "accumulated_chi2"))
        per_seed_e.append(_pick_series(sub, "score_energy_ideal"))
    gens = sorted({g for s in per_seed_D for g in s})
    if not gens:
        return []
    D = [seed_mean([s.get(g, {"value": math.nan})["value"] for s in per_seed_D]) for g in gens]
    egens = sorted({g for s in per_seed_e for g in s})
    e = ([seed_mean([s.get(g, {"value": math.nan})["value"] for s in per_seed_e])
          for g in range(max(egens) + 1)] if egens else None)
    reg = theory.classify_regime(alpha, D, e)
    return [{**base, "seed": pd.NA, "generation": pd.NA, "kind": "regime", "check": "regime",
             "bound": reg.plateau, "bound_stderr": math.nan, "measured": D[-1],
             "measured_stderr": math.nan, "measured_metric": "accumulated_chi2",
             "direction": "", "slack": reg.slope, "held": None, "status": reg.label.value,
             "cause": reg.reason.value,
             "reason": f"{reg.label.value}: {render_regime(reg)} (D and ε⋆² averaged over "
                                    f"{len(per_seed_D)} seed(s))"}]


def evaluate_bounds(df: pd.DataFrame, cfg: dict | None = None, *, i0: int | None = None,
                    C: float | None = None, c: float | None = None,
                    n_sigma: float = 2.0) -> pd.DataFrame:
    """Re-evaluate every bound of docs/paper.md §4 on a results table (one row per check).

    Per (swept keys, α, seed, generation): the single-generation bounds
    (:func:`theory.check_single_generation`) from score_energy_ideal / score_energy_learned /
    observability against intra_kl_t0 / intra_chi2_t0 (q_i pushed to t0, what the Girsanov
    bounds control; falls back to intra_* against q_i with the t0 caveat in the reason); the
    recursion D_{i+1} + (1−α)² D_i ≥ (α/2) I_i (:func:`theory.check_recursion`) from the
    exact-density rows where available; the discounted-sum prediction of D_{N+1} from the
    measured ε⋆,i² (:func:`theory.predicted_divergence`). Per (swept keys, α): the regime
    (:func:`theory.classify_regime`) on the seed-mean D and ε⋆². ``i0``, ``C``, ``c`` default to
    the run's ``pathwise`` section.
    """
    cfg = cfg or {}
    pc = cfg.get("pathwise", {}) or {}
    i0 = int(pc.get("i0", 0) if i0 is None else i0)
    C = float(pc.get("C", 0.0) if C is None else C)
    c = float(pc.get("c", 0.0) if c is None else c)
    swept = swept_columns(df)
    cols = swept + BOUND_TABLE_COLUMNS
    rows: list[dict] = []
    if df.empty or "metric" not in df.columns:
        return pd.DataFrame(columns=cols)
    keys = swept + ["alpha"]
    for key, group in df.groupby(keys, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        kbase = dict(zip(keys, key, strict=True))
        alpha = float(kbase["alpha"])
        for seed, sub in group.groupby("seed", sort=True):
            base = {**kbase, "seed": int(seed)}
            rows += _single_rows(sub, base, cfg, i0, C, c, n_sigma)
            rows += _recursion_rows(sub, base, alpha, n_sigma)
            rows += _prediction_rows(sub, base, alpha, i0)
        rows += _regime_rows(group, kbase, alpha)
    out = pd.DataFrame(rows, columns=cols)
    if not out.empty:
        out["seed"] = out["seed"].astype("Int64")
        out["generation"] = out["generation"].astype("Int64")
        out["held"] = out["held"].astype("boolean")
    return out


def bound_checks(bt: pd.DataFrame) -> pd.DataFrame:
    """The rows of a bounds table that can hold or fail (single-generation and recursion)."""
    return bt[bt.kind.isin(["single_generation", "recursion"])] if len(bt) else bt


def status_codes(bt: pd.DataFrame) -> pd.Series:
    """The :class:`~collapselab.theory.Status` code of each row (the status column is its
    wording, :data:`~collapselab.verdicts.STATUS_TEXT`); NaN for a regime row, whose status is
    its label."""
    return bt.status.map(STATUS_OF_TEXT) if len(bt) else pd.Series(dtype=object)


def bounds_sentence(bt: pd.DataFrame, *, reasons: bool = True) -> str:
    """One sentence: how many checks held / failed / made no claim, and (``reasons``) the main
    reasons — counted on the status and cause codes."""
    chk = bound_checks(bt)
    if chk.empty:
        return ("No bound could be checked: the results hold no score_energy_ideal rows and no "
                "pair of accumulated/intra χ² rows (enable the pathwise section and exact "
                "estimators).")
    codes = status_codes(chk)
    counts = codes.value_counts()

    def k(code: Status) -> int:
        return int(counts.get(code, 0))

    held, failed, none, ident = k(Status.HELD), k(Status.FAILED), k(Status.NO_CLAIM), \
        k(Status.IDENTITY)
    cons, inc = k(Status.CONSISTENT), k(Status.INCONSISTENT)
    n = len(chk) - cons - inc
    s = f"Of {n} bound checks, {held} held, {failed} FAILED and {none} made no claim."
    if ident:
        s += (f" {ident} were identities for this model (score exact for its own law), "
              "used to calibrate ε̂² instead.")
    if cons + inc:
        s += f" ε̂² calibration: {cons} consistent, {inc} inconsistent."
    if not reasons:
        return s
    for code, what in ((Status.FAILED, "failures"), (Status.NO_CLAIM, "no-claim checks"),
                       (Status.INCONSISTENT, "inconsistent calibrations")):
        causes = chk[codes == code].cause.map(cause_tag).value_counts()
        if len(causes):
            top = ", ".join(f"{k} ({v})" for k, v in causes.head(3).items())
            s += f" Main reason for the {what}: {top}."
    return s


def bounds_overview(bt: pd.DataFrame) -> pd.DataFrame:
    """Counts of held / FAILED / no claim per (swept keys, α, check), counted on the status
    codes; the columns are their wording."""
    chk = bound_checks(bt)
    if chk.empty:
        return pd.DataFrame()
    keys = [k for k in swept_columns(chk)] + ["alpha", "check"]
    t = chk.assign(_code=status_codes(chk)).groupby(keys + ["_code"]).size() \
        .unstack(fill_value=0)
    codes = [Status.HELD, Status.FAILED, Status.NO_CLAIM]
    codes += [c for c in (Status.IDENTITY, Status.CONSISTENT, Status.INCONSISTENT)
              if c in t.columns]
    for c in codes:
        if c not in t.columns:
            t[c] = 0
    t = t[codes]
    t.columns = [status_text(c) for c in codes]
    return t.reset_index()
