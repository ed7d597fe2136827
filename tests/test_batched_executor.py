"""The batched executor: MLP chains of a group in lockstep, one train_dsm_ensemble call per
generation; the same results as the local executor to the last bit, generation 0 shared,
resumable, failures isolated, other score kinds through run_chain's own fit."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from collapselab.config import load_config
from collapselab.engine.executors import (
    ChainFailed,
    prepare_run_dir,
    run_experiment,
)
from collapselab.engine.hooks import Hooks
from collapselab.engine.store import failure_path
from collapselab.errors import ConfigError

TINY = [  # 2 α × 2 seeds × 3 generations of a width-16 MLP: about a second per run
    "score.kind=mlp",
    "score.hidden=16",
    "score.layers=2",
    "score.train_steps=30",
    "score.batch_size=64",
    "score.warm_start=true",
    "loop.generations=3",
    "loop.n_train=200",
    "sampler.steps=20",
    "estimators.n_mc=500",
    "estimators.n_eval=200",
    "pathwise.n_mc=50",
    "pathwise.n_paths=50",
    "pathwise.n_times=5",
    "pathwise.steps=20",
    "sweep.alphas=[0.1, 0.9]",
    "sweep.seeds=[0, 1]",
]
CHAINS = [(a, s) for a in (0.1, 0.9) for s in (0, 1)]
KEYS = ["alpha", "seed", "generation", "metric", "estimator"]

# The local executor trains each MLP with train_dsm, the batched executor all chains of a group
# at once with train_dsm_ensemble (vmap over the chains): the same draws, and at these sizes
# the same arithmetic per chain (the vmapped products and the fused Adam are per chain), so the
# values agree exactly.


def fits(path):
    """(alpha, seed, generation) of every score fit the hooks logged, sorted."""
    if not path.exists():
        return []
    return sorted((float(a), int(s), int(g)) for a, s, g, _ in
                  (line.split(" ", 3) for line in path.read_text().splitlines()))


def assert_same(got: pd.DataFrame, want: pd.DataFrame):
    """Same rows (keys, estimators, finiteness) and the same values up to float32 rounding.

    The ensemble trains K nets with vmapped (batched) products where the local executor runs
    K separate ones; the two may sum in another order, so a net can differ in the last float32
    bit, which a few generations of training and sampling carry to ~1e-7 relative."""
    assert list(got.columns) == list(want.columns)
    pd.testing.assert_frame_equal(got[KEYS].reset_index(drop=True),
                                  want[KEYS].reset_index(drop=True))
    a, b = got.value.to_numpy(float), want.value.to_numpy(float)
    assert np.array_equal(np.isfinite(a), np.isfinite(b)) and np.array_equal(np.isnan(a),
                                                                             np.isnan(b))
    fin = np.isfinite(b)
    np.testing.assert_allclose(a[fin], b[fin], rtol=1e-5, atol=1e-7)


def chain_rows(df, alpha, seed):
    return df[(df.alpha == alpha) & (df.seed == seed)].reset_index(drop=True)


def invoke(*args, env=None):
    """In-process CLI call: exit code and the two streams."""
    from click.testing import CliRunner

    from collapselab.cli import main

    res = CliRunner().invoke(main, list(args), env=env)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return subprocess.CompletedProcess(args, res.exit_code, res.stdout, res.stderr)


@pytest.fixture(scope="module")
def cfg():
    return load_config("quickstart", TINY)


@pytest.fixture(scope="module")
def local(cfg, tmp_path_factory):
    store = prepare_run_dir(cfg, tmp_path_factory.mktemp("local") / "run")
    return run_experiment(cfg, store, workers=1)


@pytest.fixture(scope="module")
def batched(cfg, tmp_path_factory):
    """An uninterrupted batched run; logs every fit and keeps the stats."""
    log = tmp_path_factory.mktemp("log") / "fits.txt"
    stats_ = {}
    store = prepare_run_dir(cfg, tmp_path_factory.mktemp("batched") / "run")
    df = run_experiment(cfg, store, executor="batched", workers=1, stats=stats_,
                        hooks=Hooks(fit_log=str(log)))
    return store, df, stats_, fits(log)


def test_cli_batched_run_equals_local_to_the_bit(local, batched, tmp_path, monkeypatch):
    from collapselab.scores import neural

    real_train, calls = neural.train_dsm_ensemble, []

    def train(nets, datas, *args, seeds, **kwargs):
        calls.append(len(seeds))
        return real_train(nets, datas, *args, seeds=seeds, **kwargs)

    monkeypatch.setattr(neural, "train_dsm_ensemble", train)
    out = tmp_path / "run"
    sets = [x for o in TINY for x in ("--set", o.replace(" ", ""))]
    r = invoke("run", "quickstart", "--out", str(out), "--quiet", "--no-report",
               "--executor", "batched", "--workers", "1", *sets)
    assert r.returncode == 0, r.stderr
    # One batched fit per generation: generation 0 for the two seeds, then all four chains.
    assert calls == [2, 4, 4]
    df = pd.read_parquet(out / "results.parquet")
    assert_same(df, local)
    # Deterministic: the same executor gives the same bytes.
    assert (out / "results.parquet").read_bytes() == batched[0].results_path.read_bytes()
    env = json.loads((out / "environment.json").read_text())
    assert env["executor"] == "batched" and env["workers"] == 1
    assert "executor=batched" in (out / "run.log").read_text()
    assert (out / "cells/alpha=0.9/seed=1/generation=2/model.safetensors").exists()


def test_generation_zero_is_trained_once_per_seed(batched):
    store, _, stats_, fitted = batched
    assert stats_ == {"generation_zero_trained": 2, "failed": []}
    assert [f for f in fitted if f[2] == 0] == [(0.1, 0, 0), (0.1, 1, 0)]
    assert [f for f in fitted if f[2] > 0] == sorted((a, s, g) for a, s in CHAINS for g in (1, 2))
    shared = json.loads((store.cell(0.9, 1, 0) / "metrics.json").read_text())
    assert shared["shared_from_alpha"] == 0.1


def test_resume_from_different_generations_reproduces_the_run(cfg, batched, tmp_path,
                                                              fit_log):
    store0, df0 = batched[0], batched[1]
    root = tmp_path / "run"
    shutil.copytree(store0.root, root)
    store = prepare_run_dir(cfg, root)
    # A kill after generation 1 of every chain, with (α=0.9, seed=1) further behind: it lost
    # generation 1 too, and a half-written generation 1 (no metrics.json) must be redone.
    for a, s in CHAINS:
        shutil.rmtree(store.cell(a, s, 2))
    (store.cell(0.9, 1, 1) / "metrics.json").unlink()
    log = Path(fit_log.fit_log)
    seen = []
    stats_ = {}
    df = run_experiment(cfg, store, executor="batched", workers=1, stats=stats_, hooks=fit_log,
                        on_generation=lambda c, g, s: seen.append((c.alpha, c.seed, g)))
    # The lagging chain catches up alone, then all four run generation 2 in one batch.
    assert fits(log) == sorted([(0.9, 1, 1)] + [(a, s, 2) for a, s in CHAINS])
    assert seen == [(0.9, 1, 1)] + [(a, s, 2) for a, s in CHAINS]
    assert stats_["generation_zero_trained"] == 0
    # Every chain gives the same bytes, also the one that ran generation 1 in a batch of one.
    for a, s in CHAINS:
        pd.testing.assert_frame_equal(chain_rows(df, a, s), chain_rows(df0, a, s))
    assert run_experiment(cfg, store, executor="batched", workers=1).equals(df)  # nothing left


def test_injected_faults_are_recorded_and_isolated(cfg, batched, tmp_path, fault_hooks):
    faults = fault_hooks(
        {"alpha": 0.1, "seed": 0, "generation": 1, "kind": "nan"},    # diverged DSM loss
        {"alpha": 0.1, "seed": 1, "generation": 0, "kind": "raise"},  # fails before gen 0
    )
    store = prepare_run_dir(cfg, tmp_path / "run")
    stats_ = {}
    with pytest.raises(ChainFailed) as err:
        run_experiment(cfg, store, executor="batched", workers=1, stats=stats_, hooks=faults)
    msg = str(err.value)
    assert "1 more chain(s) failed" in msg and "\n" not in msg and "run.log" in msg
    nan = json.loads(failure_path(store, 0.1, 0).read_text())
    assert nan["generation"] == 1 and "TrainingDivergedError" in nan["error"]
    assert "Traceback" in nan["traceback"]
    assert json.loads(failure_path(store, 0.1, 1).read_text())["generation"] == 0
    assert len(json.loads((store.root / "failures.json").read_text())) == 2
    # The failed leader of seed 1 handed generation 0 to α = 0.9, which completed on its own.
    assert store.completed(0.9, 0) == 3 and store.completed(0.9, 1) == 3
    assert stats_["generation_zero_trained"] == 2 and len(stats_["failed"]) == 2
    assert "injected fault" in json.loads(failure_path(store, 0.1, 1).read_text())["error"]

    run_experiment(cfg, store, executor="batched", workers=1)
    assert not list((store.root / "cells").rglob("failure.json"))
    assert not (store.root / "failures.json").exists()
    assert_same(pd.read_parquet(store.results_path), batched[1])


def test_divergence_inside_a_batched_fit_and_nan_samples_drop_only_their_chain(
        cfg, batched, tmp_path, monkeypatch):
    from collapselab.engine import loop
    from collapselab.scores import neural
    from collapselab.scores.training import TrainingDivergedError

    real_train, calls = neural.train_dsm_ensemble, []

    def train(nets, datas, *args, seeds, **kwargs):
        calls.append(len(seeds))
        if len(calls) == 2:  # generation 1's batch of four: chain 2 (α=0.9, seed=0) diverges
            err = TrainingDivergedError(7, float("nan"))
            err.chain = 2
            raise err
        return real_train(nets, datas, *args, seeds=seeds, **kwargs)

    real_draw = loop.draw_samples

    def draw(ctx, score, n, generation):
        x = real_draw(ctx, score, n, generation)
        if (ctx.alpha, ctx.seed, generation) == (0.1, 1, 2):
            x[0, 0] = np.nan
        return x

    monkeypatch.setattr(neural, "train_dsm_ensemble", train)
    monkeypatch.setattr(loop, "draw_samples", draw)
    store = prepare_run_dir(cfg, tmp_path / "run")
    with pytest.raises(ChainFailed) as err:
        run_experiment(cfg, store, executor="batched", workers=1)
    assert "alpha=0.9 seed=0" in str(err.value) and "generation 1" in str(err.value)
    assert calls == [2, 4, 3, 3]  # gen 0 (two seeds), gen 1 (four, then three), gen 2
    rec = json.loads(failure_path(store, 0.9, 0).read_text())
    assert rec["generation"] == 1 and "TrainingDivergedError" in rec["error"]
    rec = json.loads(failure_path(store, 0.1, 1).read_text())
    assert rec["generation"] == 2 and "NonFiniteSamples" in rec["error"]
    assert not store.cell(0.1, 1, 2).exists()  # nothing of the NaN generation was written
    assert [store.completed(a, s) for a, s in CHAINS] == [3, 2, 1, 3]
    df, ref = pd.read_parquet(store.results_path), batched[1]
    for a, s in [(0.1, 0), (0.9, 1)]:
        assert_same(chain_rows(df, a, s), chain_rows(ref, a, s))


def test_batched_fit_matches_fit_neural_with_warm_start(cfg):
    from collapselab.processes import OU
    from collapselab.scores.neural import fit_neural, fit_neural_batched

    g = torch.Generator().manual_seed(0)
    datas = [torch.randn(120, 2, generator=g) for _ in range(3)]
    warm = fit_neural(cfg.score, OU(T=4.0), datas[0], generation=0, seed=5, t_min=0.02)[1]
    inits = [None, warm.net.state_dict(), warm.net.state_dict()]
    got = fit_neural_batched(cfg.score, OU(T=4.0), datas, generation=1, seeds=[1, 2, 3],
                             t_min=0.02, init_states=inits, threads=1)
    for k in range(3):
        _, want = fit_neural(cfg.score, OU(T=4.0), datas[k], generation=1, seed=k + 1,
                             t_min=0.02, init_state=inits[k])
        score, res = got[k]
        assert res.steps == want.steps and res.config == want.config
        # the vmapped ensemble against train_dsm: the same draws and, at this size, the same bits
        assert res.loss_history == want.loss_history
        for name, w in want.ema_net.state_dict().items():
            assert torch.equal(res.ema_net.state_dict()[name], w), name
        assert score.net is res.ema_net


def test_other_score_kinds_fit_as_run_chain_does(tmp_path):
    cfg = load_config("quickstart", ["score.kind=kde", "loop.generations=2", "loop.n_train=200",
                                     "sampler.steps=20", "estimators.n_mc=500",
                                     "estimators.n_eval=200", "pathwise.n_mc=50",
                                     "pathwise.n_paths=50", "pathwise.n_times=5",
                                     "pathwise.steps=20", "sweep.alphas=[0.1, 0.9]",
                                     "sweep.seeds=[0]"])
    ref = prepare_run_dir(cfg, tmp_path / "local")
    run_experiment(cfg, ref, workers=1)
    store = prepare_run_dir(cfg, tmp_path / "batched")
    stats_ = {}
    run_experiment(cfg, store, executor="batched", workers=1, stats=stats_)
    # No network: the fallback is run_chain's own fit, so the results are the same bytes.
    assert store.results_path.read_bytes() == ref.results_path.read_bytes()
    assert stats_["generation_zero_trained"] == 1


def test_batched_with_address_is_refused_before_anything_is_written(cfg, tmp_path):
    out = tmp_path / "run"
    r = invoke("run", "quickstart", "--out", str(out), "--executor", "batched",
               "--address", "auto")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--address" in lines[0], r.stderr
    assert not out.exists()
    store = prepare_run_dir(cfg, tmp_path / "lib")
    with pytest.raises(ConfigError, match="--address"):
        run_experiment(cfg, store, executor="batched", address="auto")
    assert not (store.root / "environment.json").exists()


# ---- workers > 1: the (params, seed) groups dealt over spawned processes ---------------------
def test_partition_keeps_every_alpha_of_a_seed_together_round_robin():
    from collapselab.engine.executors import ChainSpec
    from collapselab.engine.lockstep import partition

    specs = [ChainSpec(a, s, (("score.hidden", h),)) for h in (16, 32) for a in (0.1, 0.9)
             for s in (0, 1, 2)]
    parts = partition(specs, 4)
    # Six (params, seed) groups over four parts, in order of first appearance.
    assert [sorted({(c.params[0][1], c.seed) for c in p}) for p in parts] == [
        [(16, 0), (32, 1)], [(16, 1), (32, 2)], [(16, 2)], [(32, 0)]]
    assert all(p == [c for c in specs if c in p] for p in parts)  # the order of specs
    assert partition(specs, 100) == [[c for c in specs if (c.params, c.seed) == g]
                                     for g in dict.fromkeys((c.params, c.seed) for c in specs)]
    assert partition(specs, 1) == [specs] and partition([], 3) == [[]]


@pytest.fixture(scope="module")
def two_processes(cfg, tmp_path_factory):
    """workers=2 with two seeds: one spawned process per seed; logs every fit (in the
    children, through the hooks) and every on_generation call."""
    log = tmp_path_factory.mktemp("log2") / "fits.txt"
    stats_, seen = {}, []
    store = prepare_run_dir(cfg, tmp_path_factory.mktemp("two") / "run")
    df = run_experiment(cfg, store, executor="batched", workers=2, stats=stats_,
                        hooks=Hooks(fit_log=str(log)),
                        on_generation=lambda c, g, s: seen.append((c.alpha, c.seed, g, s)))
    return store, df, stats_, fits(log), seen


def test_two_workers_give_the_one_process_results(cfg, batched, two_processes, tmp_path):
    store, df = two_processes[:2]
    # The one-process run batched generation 0 of both seeds together: the same values.
    assert_same(df, batched[1])
    env = json.loads((store.root / "environment.json").read_text())
    assert env["executor"] == "batched" and env["workers"] == 2
    # Each part is exactly a one-process run of its chains (same threads, same batches).
    one = load_config("quickstart", [*TINY, "sweep.seeds=[0]"])
    ref = run_experiment(one, prepare_run_dir(one, tmp_path / "seed0"), executor="batched",
                         workers=1)
    pd.testing.assert_frame_equal(df[df.seed == 0].reset_index(drop=True), ref)


def test_two_workers_train_generation_zero_once_per_seed(two_processes):
    _, _, stats_, fitted, _ = two_processes
    assert stats_ == {"generation_zero_trained": 2, "failed": []}
    assert [f for f in fitted if f[2] == 0] == [(0.1, 0, 0), (0.1, 1, 0)]
    assert [f for f in fitted if f[2] > 0] == sorted((a, s, g) for a, s in CHAINS for g in (1, 2))


def test_two_workers_report_each_cell_once(two_processes):
    store, _, _, _, seen = two_processes
    # Every cell once, adopted generations 0 included (a progress bar counts every cell).
    cells = [(a, s, g) for a, s in CHAINS for g in (0, 1, 2)]
    assert sorted(x[:3] for x in seen) == sorted(cells)
    for a, s, g, secs in seen:  # the seconds are the cell's own timings
        meta = json.loads((store.cell(a, s, g) / "metrics.json").read_text())
        assert secs == pytest.approx(sum(meta["timings"].values())) and secs > 0


def test_a_dead_worker_fails_only_its_part_and_a_rerun_fills_the_gaps(cfg, two_processes,
                                                                       tmp_path, fault_hooks,
                                                                       fit_log):
    # Seed 1's process: α=0.1 fails (recorded by the child), then the process dies (os._exit)
    # at α=0.9's fit of generation 1, losing its outcome; seed 0's process is not disturbed.
    faults = fault_hooks(
        {"alpha": 0.1, "seed": 1, "generation": 1, "kind": "raise"},
        {"alpha": 0.9, "seed": 1, "generation": 1, "kind": "exit"},
    )
    store = prepare_run_dir(cfg, tmp_path / "run")
    stats_ = {}
    with pytest.raises(ChainFailed) as err:
        run_experiment(cfg, store, executor="batched", workers=2, stats=stats_, hooks=faults)
    assert "1 more chain(s) failed" in str(err.value) and "\n" not in str(err.value)
    assert [store.completed(a, s) for a, s in CHAINS] == [3, 1, 3, 1]
    raised = json.loads(failure_path(store, 0.1, 1).read_text())
    assert "injected fault" in raised["error"] and raised["generation"] == 1
    died = json.loads(failure_path(store, 0.9, 1).read_text())
    assert "worker process died (exit code 17)" in died["error"] and died["generation"] == 1
    assert len(json.loads((store.root / "failures.json").read_text())) == 2
    assert stats_ == {"generation_zero_trained": 2,
                      "failed": ["alpha=0.1 seed=1", "alpha=0.9 seed=1"]}

    log = Path(fit_log.fit_log)
    df = run_experiment(cfg, store, executor="batched", workers=2, hooks=fit_log)
    assert fits(log) == sorted((a, 1, g) for a in (0.1, 0.9) for g in (1, 2))
    assert not list((store.root / "cells").rglob("failure.json"))
    assert not (store.root / "failures.json").exists()
    # Both seed-1 chains resumed at generation 1 in their part: the same batches, same bytes.
    pd.testing.assert_frame_equal(df, two_processes[1])


def test_a_dead_part_keeps_the_records_it_wrote_and_replaces_stale_ones(cfg, tmp_path):
    from collapselab.engine.executors import chains
    from collapselab.engine.lockstep import Grouped, LockstepOutcome, partition
    from collapselab.engine.store import record_failure

    store = prepare_run_dir(cfg, tmp_path / "run")
    parts = partition(chains(cfg), 2)

    def record(alpha, error):
        record_failure(store, alpha, 1, {}, label=f"alpha={alpha:g} seed=1", generation=0,
                       error=error)

    record(0.1, "an earlier run's failure")
    record(0.9, "an earlier run's failure")
    lockstep = Grouped(cfg, store, parts, None, {}, threads=1)
    record(0.9, "written by the part")  # while its process ran
    outcome = LockstepOutcome()
    lockstep._merge(outcome, parts[1], {"ok": False, "error": "worker process died"})
    assert [(c.alpha, c.seed, rec["error"]) for c, rec in outcome.failed.items()] == [
        (0.1, 1, "worker process died"), (0.9, 1, "written by the part")]
    assert json.loads(failure_path(store, 0.1, 1).read_text())["error"] == "worker process died"
