"""Executors: same results whatever ran them, generation 0 shared, failures isolated and resumed."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from collapselab.config import load_config
from collapselab.engine.executors import (
    ChainFailed,
    prepare_run_dir,
    run_experiment,
)
from collapselab.engine.hooks import Hooks
from collapselab.engine.store import failure_path, summarize

SMALL = [
    "loop.generations=3",
    "loop.n_train=200",
    "sampler.steps=20",
    "estimators.n_mc=1000",
    "estimators.n_eval=200",
    "sweep.alphas=[0.1, 0.9]",
    "sweep.seeds=[0, 1]",
]


def fits(path):
    """(alpha, seed, generation) of every score fit the workers logged."""
    if not path.exists():
        return []
    return sorted((float(a), int(s), int(g)) for a, s, g, _ in
                  (line.split(" ", 3) for line in path.read_text().splitlines()))


@pytest.fixture(scope="module")
def cfg():
    return load_config("quickstart", SMALL)


@pytest.fixture(scope="module")
def reference(cfg, tmp_path_factory, request):
    """An uninterrupted in-process run; counts generation-0 fits as it goes."""
    log = tmp_path_factory.mktemp("log") / "fits.txt"
    stats_ = {}
    store = prepare_run_dir(cfg, tmp_path_factory.mktemp("ref") / "run")
    run_experiment(cfg, store, stats=stats_, hooks=Hooks(fit_log=str(log)))
    return store, stats_, fits(log)


def test_generation_zero_is_trained_once_per_seed(reference):
    store, stats_, fitted = reference
    gen0 = [f for f in fitted if f[2] == 0]
    assert sorted(s for _, s, _ in gen0) == [0, 1]  # once per seed, not once per (α, seed)
    assert stats_["generation_zero_trained"] == 2
    assert [f for f in fitted if f[2] > 0] == sorted(
        (a, s, g) for a in (0.1, 0.9) for s in (0, 1) for g in (1, 2))
    shared = json.loads((store.cell(0.9, 0, 0) / "metrics.json").read_text())
    assert shared["shared_from_alpha"] == 0.1
    assert (store.root / "summary.parquet").exists() and (store.root / "summary.csv").exists()


def test_killed_worker_is_isolated_and_rerun_fills_exactly_the_gap(cfg, reference, tmp_path,
                                                                    fit_log):
    ref_store = reference[0]
    log = Path(fit_log.fit_log)
    # The worker running chain (α=0.9, seed=1) dies (os._exit) in the middle of generation 1.
    faulty = fit_log.with_faults({"alpha": 0.9, "seed": 1, "generation": 1, "kind": "exit"})
    store = prepare_run_dir(cfg, tmp_path / "run")
    stats_ = {}
    with pytest.raises(ChainFailed) as err:
        run_experiment(cfg, store, workers=2, stats=stats_, hooks=faulty)
    msg = str(err.value)
    assert "alpha=0.9 seed=1" in msg and "generation 1" in msg and "run.log" in msg
    assert "\n" not in msg and "worker process died" in msg
    assert [f for f in fits(log) if f[2] == 0] == [(0.1, 0, 0), (0.1, 1, 0)]  # shared in a pool
    for a, s in [(0.1, 0), (0.1, 1), (0.9, 0)]:
        assert store.completed(a, s) == 3
    assert store.completed(0.9, 1) == 1
    rec = json.loads(failure_path(store, 0.9, 1).read_text())
    assert rec["generation"] == 1 and "exit code 17" in rec["error"]
    assert json.loads((store.root / "failures.json").read_text())[0]["chain"] == rec["chain"]

    log.unlink()
    run_experiment(cfg, store, hooks=fit_log)  # the re-run: only the missing generations
    assert fits(log) == [(0.9, 1, 1), (0.9, 1, 2)]
    assert not failure_path(store, 0.9, 1).exists()
    assert not (store.root / "failures.json").exists()
    assert store.results_path.read_bytes() == ref_store.results_path.read_bytes()


def test_exception_and_nan_in_training_are_recorded_and_isolated(cfg, reference, tmp_path,
                                                                 fault_hooks):
    faults = fault_hooks(
        {"alpha": 0.1, "seed": 0, "generation": 1, "kind": "nan"},    # diverged DSM loss
        {"alpha": 0.1, "seed": 1, "generation": 0, "kind": "raise"},  # fails before gen 0
    )
    store = prepare_run_dir(cfg, tmp_path / "run")
    with pytest.raises(ChainFailed) as err:
        run_experiment(cfg, store, hooks=faults)
    assert "1 more chain(s) failed" in str(err.value)
    nan = json.loads(failure_path(store, 0.1, 0).read_text())
    assert nan["generation"] == 1 and "TrainingDivergedError" in nan["error"]
    assert "Traceback" in nan["traceback"]
    assert json.loads(failure_path(store, 0.1, 1).read_text())["generation"] == 0
    # The failed leader of seed 1 handed generation 0 to α = 0.9, which completed on its own.
    assert store.completed(0.9, 0) == 3 and store.completed(0.9, 1) == 3
    df = pd.read_parquet(store.results_path)
    bad = df[(df.alpha == 0.1) & (df.seed == 0)]
    assert bad.generation.max() <= 1 and np.isfinite(bad.value[bad.metric == "fraction_real"]).all()
    assert set(df[df.alpha == 0.1].seed) == {0}  # nothing of the chain that never finished gen 0

    run_experiment(cfg, store)
    assert not list((store.root / "cells").rglob("failure.json"))
    pd.testing.assert_frame_equal(pd.read_parquet(store.results_path),
                                  pd.read_parquet(reference[0].results_path))


def test_ray_executor_matches_local(cfg, reference, tmp_path):
    pytest.importorskip("ray")
    store = prepare_run_dir(cfg, tmp_path / "ray")
    run_experiment(cfg, store, executor="ray", workers=2)
    assert store.results_path.read_bytes() == reference[0].results_path.read_bytes()
    env = json.loads((store.root / "environment.json").read_text())
    assert env["executor"] == "ray" and env["resources_per_chain"]["num_cpus"] == 1.0


def test_summary_is_a_t_interval_over_seeds_that_counts_nonfinite_values():
    rows = []
    # A metric with a negative value (e.g. a kNN KL estimate): the plain t-interval.
    for seed, v in enumerate([-1.0, 2.0, 4.0, math.inf]):
        rows.append(dict(alpha=0.5, seed=seed, generation=1, metric="m", estimator="e",
                         value=v, stderr=0.0, note="", **{"score.bandwidth": 0.3}))
    s = summarize(pd.DataFrame(rows)).iloc[0]
    fin = np.array([-1.0, 2.0, 4.0])
    half = stats.t.ppf(0.975, 2) * fin.std(ddof=1) / math.sqrt(3)
    assert s["score.bandwidth"] == 0.3 and s.n == 3 and s.n_nonfinite == 1
    assert s["mean"] == pytest.approx(fin.mean()) and s.interval == "t"
    assert (s.ci_low, s.ci_high) == pytest.approx((fin.mean() - half, fin.mean() + half))
    one = summarize(pd.DataFrame(rows[:1])).iloc[0]
    assert one.interval == "none" and one.n == 1 and math.isnan(one.ci_low)


def test_summary_of_a_nonnegative_metric_never_reaches_below_zero():
    """Two seeds of a KL (0.01 and 1.0): the plain t-interval would be 0.505 ± 6.29; the
    log-scale interval is mean · exp(± t s / (mean √n)), positive, with the same t and s."""
    rows = [dict(alpha=0.5, seed=s, generation=1, metric="kl", estimator="e", value=v,
                 stderr=0.0, note="") for s, v in enumerate([0.01, 1.0])]
    rows += [dict(alpha=0.5, seed=s, generation=0, metric="kl", estimator="e", value=0.0,
                  stderr=0.0, note="") for s in range(2)]
    summ = summarize(pd.DataFrame(rows)).set_index("generation")
    s = summ.loc[1]
    f = np.exp(stats.t.ppf(0.975, 1) * np.std([0.01, 1.0], ddof=1) / (0.505 * math.sqrt(2)))
    assert s.interval == "log-t" and s["mean"] == pytest.approx(0.505)
    assert (s.ci_low, s.ci_high) == pytest.approx((0.505 / f, 0.505 * f))
    assert 0 < s.ci_low < 0.01 and s.ci_high > 1.0
    assert (summ.loc[0, "ci_low"], summ.loc[0, "ci_high"]) == (0.0, 0.0)  # every seed is 0
