"""The observability experiment (`collapselab run observability`): rows, ordering, exit codes."""

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from _cli import cli
from click.testing import CliRunner

from collapselab.cli import main
from collapselab.errors import ConfigError
from collapselab.experiments.observability import (
    load_observability_config,
    ordering_verdicts,
    pca_quadratic_features,
    pooled_eta,
    prepare_dir,
    run_observability,
)
from collapselab.report.observability import build_observability_report

TINY = ["targets=[gmm]", "magnitudes=[0.1, 1.0]", "seeds=[0, 1]", "paths.n_paths=600",
        "paths.steps=40"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = load_observability_config("observability", TINY)
    root = prepare_dir(cfg, tmp_path_factory.mktemp("obs") / "run")
    return cfg, root, run_observability(cfg, root)


def test_rows_and_columns(tiny):
    cfg, root, df = tiny
    assert (root / "config.yaml").exists() and (root / "results.parquet").exists()
    assert {"alpha", "seed", "generation", "metric", "estimator", "value", "stderr", "note",
            "target", "error_type", "magnitude"} <= set(df.columns)
    assert df.alpha.isna().all() and (df.generation == 0).all()
    assert set(df.metric) == {"observability", "score_energy_ideal", "regression_r2_oos"}
    assert set(df.error_type) == {"aligned", "random_linear", "time_oscillating"}
    # one row per (error type, magnitude, seed, metric)
    assert len(df) == 3 * 2 * 2 * 3
    eps = df[df.metric == "score_energy_ideal"]
    assert (eps.estimator == "exact").all()
    # ε⋆² ∝ c² for e = c·e₁ (same error, same seed: the random matrix is drawn per seed).
    for (k, _s), g in eps.groupby(["error_type", "seed"]):
        v = g.sort_values("magnitude").value.to_numpy()
        assert v[1] / v[0] == pytest.approx(100.0, rel=1e-6), k


def test_aligned_above_oscillating_time_only_within_error_bars(tiny):
    _, _, df = tiny
    pooled = pooled_eta(df).set_index("error_type")
    a, t = pooled.loc["aligned"], pooled.loc["time_oscillating"]
    assert a.eta - t.eta > 3 * math.hypot(a.eta_se, t.eta_se), pooled
    assert abs(t.eta) <= 3 * t.eta_se + 0.02, pooled  # the fast time-only error is unobservable
    assert a.eta > 0.15
    verdict = ordering_verdicts(pooled.reset_index())["gmm"]
    assert "time_oscillating ≈ 0 holds" in verdict


def test_report_and_resume(tiny):
    cfg, root, df = tiny
    figs = build_observability_report(root)
    assert [p.name for p in figs] == ["eta_vs_magnitude.png"]
    html = (root / "report.html").read_text()
    assert "Fig. 2" in html and "data:image/png;base64," in html
    assert "observable" in html  # the smooth time-only caveat is stated
    again = run_observability(cfg, root)  # every cell is done: nothing is recomputed
    pd.testing.assert_frame_equal(df, again)


def test_pca_quadratic_features_shape():
    Y = np.random.default_rng(0).normal(size=(300, 12))
    F = pca_quadratic_features(Y, k_full=4)
    assert F.shape == (300, 12 + 12 + 6)
    assert np.allclose(F[:, :12].std(0), 1.0)


@pytest.mark.parametrize("override, field", [
    ("magnitudes=[-1]", "magnitudes"),
    ("targets=[cifar]", "targets"),
    ("bogus=1", "bogus"),
    ("paths.t0=9", "paths.t0"),
    ("experiment=other", "experiment"),
])
def test_bad_config_exits_2_with_one_line_before_compute(tmp_path, override, field):
    out = tmp_path / "run"
    if field == "magnitudes":  # once through a real process, the others in-process (fast)
        r = cli("run", "observability", "--out", str(out), "--set", override)
    else:
        res = CliRunner().invoke(main, ["run", "observability", "--out", str(out), "--set",
                                        override])
        r = SimpleNamespace(returncode=res.exit_code, stderr=res.stderr)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in r.stderr
    assert not out.exists()


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="seeds"):
        load_observability_config("observability", ["seeds=[]"])
