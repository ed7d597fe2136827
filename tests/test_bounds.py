"""`collapselab bounds DIR` and the report's bound sections, on a tiny population-KDE run."""

import math
import shutil

import numpy as np
import pandas as pd
import pytest
from _cli import cli

from collapselab import theory
from collapselab.config import load_config
from collapselab.engine.executors import prepare_run_dir, run_experiment
from collapselab.report.bounds import evaluate_bounds
from collapselab.report.run import build_report, write_bounds

TINY = ["loop.generations=3", "loop.n_train=200", "sampler.steps=20", "estimators.n_mc=2000",
        "estimators.n_eval=200", "estimators.sample_based=[]", "estimators.extra=[]",
        "sweep.alphas=[0.1, 0.9]", "sweep.seeds=[0]", "score.kind=population_kde",
        "pathwise.n_paths=200", "pathwise.min_paths=200", "pathwise.n_mc=200",
        "pathwise.n_times=7", "pathwise.steps=20",
        "pathwise.observability=false"]
ETA = 0.5  # η rows added by hand: the loop's η (an expensive regression) is tested elsewhere


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cfg = load_config("quickstart", TINY)
    store = prepare_run_dir(cfg, tmp_path_factory.mktemp("bounds") / "run")
    df = run_experiment(cfg, store)
    eps = df[df.metric == "score_energy_ideal"]
    eta = eps.assign(metric="observability", estimator="cross_fit_regression", value=ETA,
                     stderr=0.05, note="added by the test")
    pd.concat([df, eta], ignore_index=True).to_parquet(store.results_path, index=False)
    return store.root


def _value(df, alpha, g, metric, estimators=("exact", "monte_carlo")):
    r = df[(df.alpha == alpha) & (df.generation == g) & (df.metric == metric)
           & df.estimator.isin(estimators)]
    order = {e: k for k, e in enumerate(estimators)}
    return float(r.assign(o=r.estimator.map(order)).sort_values("o").value.iloc[0])


def test_bounds_writes_the_table_and_figures(run_dir):
    write_bounds(run_dir)
    bt = pd.read_parquet(run_dir / "bounds.parquet")
    assert (run_dir / "bounds.csv").exists()
    assert {"single_generation", "recursion", "prediction", "regime"} <= set(bt.kind)
    assert {"alpha", "seed", "generation", "check", "bound", "measured", "measured_metric",
            "slack", "held", "status", "cause", "reason"} <= set(bt.columns)
    sg = bt[bt.kind == "single_generation"]
    assert set(sg.check) == {"bound_kl_upper", "calibration_eps_hat", "bound_chi2_lower",
                             "bound_chi2_lower_clean", "bound_intra_upper"}
    # Girsanov bounds are checked against q_i pushed to t0 (the paper's idealisation).
    assert set(sg.measured_metric) == {"intra_kl_t0", "intra_chi2_t0"}
    assert set(bt.status) <= {"held", "FAILED", "no claim", "compared", "stable", "saturating",
                              "collapsing", "undetermined", "identity", "consistent",
                              "inconsistent"}
    # population KDE is exact for its own law: Prop 3.1 is an identity, not a test
    kl = sg[sg.check == "bound_kl_upper"]
    assert (kl.status == "identity").all() and kl.held.isna().all()
    assert (kl.cause == "exact_own_law").all()
    cal = sg[sg.check == "calibration_eps_hat"]
    assert set(cal.status) <= {"consistent", "inconsistent"} and len(cal) == len(kl)
    for name in ("bound_checks", "recursion", "prediction", "discount_heatmap",
                 "observability_generations"):
        assert (run_dir / "figures" / f"{name}.png").exists(), name


def test_recursion_slack_and_prediction_by_hand(run_dir):
    df = pd.read_parquet(run_dir / "results.parquet")
    bt = evaluate_bounds(df)
    for a in (0.1, 0.9):
        rec = bt[(bt.kind == "recursion") & (bt.alpha == a)].sort_values("generation")
        pr = bt[(bt.kind == "prediction") & (bt.alpha == a)].sort_values("generation")
        assert len(rec) == 3 and len(pr) == 3
        for row in rec.itertuples():
            g = int(row.generation)
            d1, d0 = _value(df, a, g + 1, "accumulated_chi2"), _value(df, a, g, "accumulated_chi2")
            i = _value(df, a, g, "intra_chi2")
            want = d1 + (1 - a) ** 2 * d0 - a / 2 * i
            if math.isfinite(want):
                assert row.slack == pytest.approx(want, rel=1e-12, abs=1e-15)
                se = math.hypot(row.measured_stderr, row.bound_stderr)
                assert row.held == (row.slack + 2 * se >= 0)
            elif math.isnan(want):
                assert row.status == "no claim" and "NaN" in row.reason
        eps = [_value(df, a, g, "score_energy_ideal", ("exact", "monte_carlo")) for g in range(3)]
        # Discounted sum by hand: D_{N+1} ≈ Σ_i (1−α)^{2(N−i)} ε⋆,i² (D_0 = 0, i0 = 0).
        for row in pr.itertuples():
            n = int(row.generation) - 1
            want = sum((1 - a) ** (2 * (n - i)) * eps[i] for i in range(n + 1))
            assert row.bound == pytest.approx(want, rel=1e-12)
            assert row.measured == pytest.approx(_value(df, a, n + 1, "accumulated_chi2"),
                                                 nan_ok=True)
        assert np.allclose(pr.bound, theory.predicted_divergence(a, eps))


def test_failures_are_explained(run_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    df = pd.read_parquet(bad / "results.parquet")
    sel = (df.alpha == 0.9) & (df.generation == 1)
    df.loc[sel & (df.metric == "intra_kl_t0"), "value"] = 50.0  # far above KL_T + ½ ε̂²
    df.loc[sel & (df.metric == "intra_chi2_t0"), ["value", "stderr"]] = [0.0, 0.0]  # < ¼ηε⋆²
    df.loc[(df.alpha == 0.9) & (df.generation == 2) & (df.metric == "score_energy_ideal"),
           "value"] = 3.0  # outside the perturbative regime
    df.loc[(df.alpha == 0.1) & (df.generation == 1) & (df.metric == "intra_chi2_t0"),
           ["value", "note"]] = [np.nan, "unreliable: heavy tail of the importance weights"]
    df.to_parquet(bad / "results.parquet", index=False)
    r = cli("bounds", str(bad), "--i0", "1", "--no-figures")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "bound checks" in out and "regime alpha=0.1" in out
    assert "FAILED: bound_chi2_lower at alpha=0.9 seed=0 generation=1" in out
    assert "likely cause" in out and "−C ε⋆⁴ correction is unknown" in out
    assert "inconsistent: calibration_eps_hat at alpha=0.9 seed=0 generation=1" in out
    assert "Euler" not in out
    assert "outside the perturbative regime" in out
    assert "transient" in out
    assert "heavy tail" in out
    bt = pd.read_parquet(bad / "bounds.parquet")
    kl = bt[(bt.check == "bound_kl_upper") & (bt.alpha == 0.9) & (bt.generation == 1)].iloc[0]
    assert kl.status == "identity" and pd.isna(kl.held)
    cal = bt[(bt.check == "calibration_eps_hat") & (bt.alpha == 0.9) & (bt.generation == 1)]
    assert cal.iloc[0].status == "inconsistent" and cal.iloc[0].cause == "eps_hat_low"
    low = bt[(bt.check == "bound_chi2_lower") & (bt.alpha == 0.9) & (bt.generation == 1)].iloc[0]
    assert low.status == "FAILED" and low.slack < 0 and low.cause == "leading_order_C"
    # the chi2 upper bound at generation 2 (ε⋆² = 3): no claim, named by its code
    up = bt[(bt.check == "bound_intra_upper") & (bt.alpha == 0.9) & (bt.generation == 2)].iloc[0]
    assert up.status == "no claim" and up.cause == "not_perturbative"
    # Prop 3.1 has no perturbative premise: its row at ε⋆² = 3 is still the identity
    kl2 = bt[(bt.check == "bound_kl_upper") & (bt.alpha == 0.9) & (bt.generation == 2)].iloc[0]
    assert kl2.status == "identity"
    head = out.splitlines()[0]
    assert "FAILED" in head and "Main reason for the failures" in head


def test_not_a_run_directory_exits_2_with_one_line(tmp_path):
    r = cli("bounds", str(tmp_path / "nothing"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a run directory" in lines[0]


def test_report_has_the_bound_sections(run_dir):
    build_report(run_dir)
    html = (run_dir / "report.html").read_text()
    for sid in ("bound-checks", "prediction", "discount", "observability-generations",
                "regimes"):
        assert f'<section id="{sid}"' in html, sid
    assert "bound checks" in html and "Fig. 5" in html
    pos = [html.index(f'<section id="{s}"') for s in ("bounds", "bound-checks", "samples")]
    assert pos == sorted(pos)


def test_every_row_carries_codes(run_dir):
    from collapselab.verdicts import STATUS_OF_TEXT

    bt = evaluate_bounds(pd.read_parquet(run_dir / "results.parquet"))
    for kind, rows in bt.groupby("kind"):
        for r in rows.itertuples():
            if kind == "regime":
                assert theory.RegimeLabel(r.status) and theory.RegimeReason(r.cause), r
            else:
                assert r.status in STATUS_OF_TEXT and isinstance(theory.Cause(r.cause),
                                                                 theory.Cause), r
    pr = bt[bt.kind == "prediction"]
    assert set(pr.status) == {"compared"}
    assert set(pr.cause) <= {"", "no_finite_ratio"}
    assert ((pr.cause == "no_finite_ratio") == ~(np.isfinite(pr.bound) & np.isfinite(pr.measured)
                                                  & (pr.bound > 0))).all()


def test_counts_come_from_codes_not_from_the_wording():
    from collapselab.report.bounds import bounds_overview, bounds_sentence
    from collapselab.theory import Cause, Status
    from collapselab.verdicts import cause_tag, status_text

    def row(kind, status, cause, reason):
        return {"alpha": 0.5, "seed": 0, "generation": 1, "kind": kind, "check": kind,
                "status": status_text(status) if isinstance(status, Status) else status,
                "cause": cause.value, "reason": reason}

    bt = pd.DataFrame([
        row("single_generation", Status.HELD, Cause.NONE, "FAILED? no: it held"),
        row("recursion", Status.HELD, Cause.MEASURED_INFINITE_OK, "no claim in this text"),
        row("recursion", Status.FAILED, Cause.INTRA_INFINITE, "held, says the text"),
        row("recursion", Status.NO_CLAIM, Cause.BOTH_INFINITE, "FAILED"),
        row("single_generation", Status.CONSISTENT, Cause.NONE, "inconsistent"),
        row("prediction", Status.COMPARED, Cause.NO_FINITE_RATIO, "FAILED"),
        row("regime", "collapsing", theory.RegimeReason.D_INFINITE, "FAILED"),
    ])
    s = bounds_sentence(bt)
    assert s.startswith("Of 4 bound checks, 2 held, 1 FAILED and 1 made no claim.")
    assert "ε̂² calibration: 1 consistent, 0 inconsistent." in s
    assert f"Main reason for the failures: {cause_tag(Cause.INTRA_INFINITE)} (1)." in s
    assert f"no-claim checks: {cause_tag(Cause.BOTH_INFINITE)} (1)." in s
    short = bounds_sentence(bt, reasons=False)
    assert s.startswith(short) and "Main reason" not in short
    over = bounds_overview(bt).set_index("check")
    assert over.loc["recursion", ["held", "FAILED", "no claim"]].tolist() == [1, 1, 1]
    assert over.loc["single_generation", ["held", "consistent"]].tolist() == [1, 1]
