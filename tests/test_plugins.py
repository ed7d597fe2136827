"""Plug-in models through the loop: the contract, exact-density measurements against closed
forms, resume, executors, isolation of a diverging model, validation, the diffusers adapter."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _cli import cli
from scipy import integrate, stats

from collapselab.config import load_config
from collapselab.engine.executors import ChainFailed, prepare_run_dir, run_experiment
from collapselab.engine.loop import run_chain
from collapselab.errors import ConfigError
from collapselab.scores import registry
from collapselab.scores.plugin_state import load_state, state_meta

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TESTS = Path(__file__).resolve().parent
if str(EXAMPLES) not in sys.path:  # the user's modules are on sys.path (spawned workers too)
    sys.path.insert(0, str(EXAMPLES))

SMALL = [
    "loop.generations=2",
    "loop.n_train=300",
    "sampler.steps=30",
    "estimators.n_mc=20000",
    "estimators.n_eval=300",
    "pathwise.n_times=8",
    "pathwise.n_mc=200",
    "pathwise.n_paths=100",
    "pathwise.steps=20",
    "sweep.alphas=[0.5]",
    "sweep.seeds=[0]",
]
GAUSS_1D = ["target.kind=gmm", "target.dim=1", "target.means=[[0.0]]", "target.std=0.5"]
GM = ["score.kind=plugin", "score.factory=gaussian_mixture:make", "score.options={components: 1}"]


def _row(df, metric, g):
    sub = df[(df.metric == metric) & (df.generation == g) & (df.estimator == "monte_carlo")]
    assert len(sub) == 1, (metric, g)
    return sub.iloc[0]


def _gauss(path):
    st = load_state(path)
    return float(st["means"].reshape(-1)[0]), float(st["covs"].reshape(-1)[0])


def _chi2_gauss(m1, v1, m0, v0):
    """χ²(N(m1, v1) ‖ N(m0, v0)) = v0/(√v1 √(2 v0 − v1)) exp((m1 − m0)²/(2 v0 − v1)) − 1."""
    return v0 / math.sqrt(v1 * (2 * v0 - v1)) * math.exp((m1 - m0) ** 2 / (2 * v0 - v1)) - 1


def test_model_law_plugin_measures_d_and_i_against_closed_forms(tmp_path):
    """A one-Gaussian EM fit on a 1-D Gaussian p: D_1, D_2 against the closed-form χ² between
    Gaussians, I_1 = χ²(p̂_2 ‖ ½p + ½p̂_1) against quadrature, with the fitted parameters read
    back from the per-cell safetensors checkpoints; within 4 stderr."""
    cfg = load_config("quickstart", SMALL + GAUSS_1D + GM)
    store = prepare_run_dir(cfg, tmp_path / "gm")
    df = run_experiment(cfg, store)
    m1, v1 = _gauss(store.cell(0.5, 0, 0) / "model.safetensors")
    m2, v2 = _gauss(store.cell(0.5, 0, 1) / "model.safetensors")
    assert state_meta(store.cell(0.5, 0, 1) / "model.safetensors")["generation"] == 1
    for g, (m, v) in ((1, (m1, v1)), (2, (m2, v2))):
        r = _row(df, "accumulated_chi2", g)
        assert abs(r.value - _chi2_gauss(m, v, 0.0, 0.25)) < 4 * r.stderr
    a = stats.norm(m2, math.sqrt(v2))

    def b(x):
        return 0.5 * stats.norm(0, 0.5).pdf(x) + 0.5 * stats.norm(m1, math.sqrt(v1)).pdf(x)

    i1 = integrate.quad(lambda x: a.pdf(x) ** 2 / b(x), -10, 10, points=[0.0])[0] - 1
    r = _row(df, "intra_chi2", 1)
    assert abs(r.value - i1) < 4 * r.stderr
    # The model's own law: no ideal-reverse-process caveat, no pathwise rows without a score.
    assert "ideal reverse process" not in " ".join(df[df.estimator == "monte_carlo"].note)
    assert not df.metric.str.startswith(("score_energy", "bound_")).any()


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("factory", ["gaussian_mixture:make", "plugin_models:stateless"])
def test_plugin_chain_resumes_to_identical_results(tmp_path, factory):
    """Laws of earlier generations come back from the checkpoint (state_dict) or, without
    one, by refitting on the cell's training set with the same seed."""
    cfg = load_config("quickstart", SMALL + GAUSS_1D + GM + ["loop.generations=3",
                                                           f"score.factory={factory}"])
    full = run_experiment(cfg, prepare_run_dir(cfg, tmp_path / "full"))
    store = prepare_run_dir(cfg, tmp_path / "cut")

    def die(generation, seconds):
        if generation == 1:
            raise Boom("killed")

    with pytest.raises(Boom):
        run_chain(cfg, 0.5, 0, store, on_generation=die)
    assert store.completed(0.5, 0) == 2
    has_ckpt = (store.cell(0.5, 0, 0) / "model.safetensors").exists()
    assert has_ckpt == (factory == "gaussian_mixture:make")
    pd.testing.assert_frame_equal(full, run_experiment(cfg, store))


def test_score_only_plugin_is_sampled_by_our_sampler_like_the_builtin_kde(tmp_path):
    """The KDE score written as a score-only plug-in (float64 torch) against the built-in KDE
    (float32 kernels): same sampler, same streams, so the same samples up to float rounding,
    and the same ε⋆², ε̂² at generation 0 (q_0 = p exact)."""
    base = SMALL + ["score.bandwidth=0.3"]
    ref = run_experiment(c := load_config("quickstart", base + ["score.kind=kde"]),
                         prepare_run_dir(c, tmp_path / "kde"))
    cfg = load_config("quickstart", base + ["score.kind=plugin", "score.factory=kde_score:make",
                                            "score.options={bandwidth: 0.3}"])
    store = prepare_run_dir(cfg, tmp_path / "plugin")
    got = run_experiment(cfg, store)
    for g in range(2):
        a = np.load(store.cell(0.5, 0, g) / "samples.npy")
        b = np.load(tmp_path / "kde" / store.cell(0.5, 0, g).relative_to(store.root) /
                    "samples.npy")
        assert np.abs(a - b).max() < 1e-3
    x, y = (d[(d.metric == "score_energy_ideal") & (d.generation == 0)].iloc[0]
            for d in (got, ref))
    assert abs(x.value - y.value) < 1e-4 * abs(y.value) and x.stderr > 0
    # ε̂²'s paths start from the model's own T-marginal where its law is known (the built-in
    # KDE) and from N(0, I) for a score-only plug-in: two estimates of nearly the same path
    # energy (the two starts differ by e^{-T} in law), compared within their errors.
    x, y = (d[(d.metric == "score_energy_learned") & (d.generation == 0)].iloc[0]
            for d in (got, ref))
    assert x.stderr > 0 and abs(x.value - y.value) < 4 * math.hypot(x.stderr, y.stderr)
    # No exact output law: D_i by the sample-based estimator only.
    assert set(got[got.metric == "accumulated_kl"].estimator) == {"exact", "knn"}


def test_pool_executor_carries_the_factory_and_a_diverging_plugin_is_isolated(tmp_path):
    """Two chains in a process pool (the factory path travels in the configuration): the one
    whose model draws NaN at generation 1 fails alone and is recorded; the other completes
    with the numbers of an in-process run."""
    over = SMALL + GAUSS_1D + ["score.kind=plugin", "score.factory=plugin_models:diverging",
                               "sweep.score.options.blowup=[false, true]"]
    cfg = load_config("quickstart", over)
    store = prepare_run_dir(cfg, tmp_path / "pool")
    with pytest.raises(ChainFailed, match="generation 1"):
        run_experiment(cfg, store, workers=2)
    ok, bad = {"score.options.blowup": False}, {"score.options.blowup": True}
    assert store.completed(0.5, 0, ok) == 2 and store.completed(0.5, 0, bad) == 1
    recs = json.loads((store.root / "failures.json").read_text())
    assert len(recs) == 1 and recs[0]["params"] == bad and "NaN" in recs[0]["error"]
    single = load_config("quickstart", SMALL + GAUSS_1D + [
        "score.kind=plugin", "score.factory=plugin_models:diverging"])
    ref = run_experiment(single, prepare_run_dir(single, tmp_path / "local"))
    got = pd.read_parquet(store.results_path)
    got = got[got["score.options.blowup"] == False].drop(columns="score.options.blowup")  # noqa: E712
    pd.testing.assert_frame_equal(got.reset_index(drop=True), ref)


def test_ray_executor_runs_a_plugin(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    # Ray's workers import the user's module from their PYTHONPATH, inherited from here.
    monkeypatch.setenv("PYTHONPATH", f"{EXAMPLES}:{TESTS}:" + ":".join(sys.path))
    cfg = load_config("quickstart", SMALL + GAUSS_1D + GM + ["loop.generations=1"])
    ref = run_experiment(cfg, prepare_run_dir(cfg, tmp_path / "local"))
    got = run_experiment(cfg, prepare_run_dir(cfg, tmp_path / "ray"), executor="ray", workers=1)
    pd.testing.assert_frame_equal(got, ref)


def test_entry_point_names_a_factory(tmp_path, monkeypatch):
    dist = tmp_path / "mymodels-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mymodels\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[collapselab.models]\nmy-gaussian = gaussian_mixture:make\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import gaussian_mixture

    assert registry.resolve_factory("my-gaussian") is gaussian_mixture.make
    cfg = load_config("quickstart", SMALL + GAUSS_1D + GM + ["score.factory=my-gaussian",
                                                           "loop.generations=1"])
    df = run_experiment(cfg, prepare_run_dir(cfg, tmp_path / "ep"))
    assert np.isfinite(_row(df, "accumulated_chi2", 1).value)
    with pytest.raises(ConfigError, match="my-gaussian"):
        registry.resolve_factory("no-such-model")


BAD_FACTORIES = [
    ("no_such_module_xyz:make", "cannot import 'no_such_module_xyz'"),
    ("gaussian_mixture:nope", "has no attribute 'nope'"),
    ("plugin_models:no_fit", "without a fit method"),
    ("plugin_models:fit_only", "neither a sample nor a score"),
    ("not-registered", "neither module:function nor a registered model name"),
]


@pytest.mark.parametrize("factory,words", BAD_FACTORIES)
def test_bad_factory_is_refused_before_anything_is_written(tmp_path, factory, words):
    cfg = load_config("quickstart", ["score.kind=plugin", f"score.factory={factory}"])
    with pytest.raises(ConfigError) as exc:
        prepare_run_dir(cfg, tmp_path / "never")
    assert exc.value.field == "score.factory" and words in str(exc.value)
    assert "\n" not in str(exc.value) and not (tmp_path / "never").exists()


@pytest.mark.parametrize("factory,words", [BAD_FACTORIES[0], BAD_FACTORIES[2]])
def test_bad_factory_exits_2_with_one_line_before_anything_is_written(tmp_path, monkeypatch,
                                                                      factory, words):
    monkeypatch.setenv("PYTHONPATH", f"{EXAMPLES}:{TESTS}:" + ":".join(sys.path))
    out = tmp_path / "never"
    r = cli("run", "quickstart", "--out", str(out), "--set", "score.kind=plugin",
            "--set", f"score.factory={factory}", "--quiet")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: score.factory:") and words in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("sets,field", [
    (["score.kind=plugin"], "score.factory"),
    (["score.factory=gaussian_mixture:make"], "score.factory"),
    (["score.options={bandwidth: 1}"], "score.options"),
    (["score.kind=diffusers"], "score.kind"),
    (["score.kind=plugin", "score.factory=gaussian_mixture:make",
      "score.options={no_such_option: 1}"], "score.options"),
])
def test_plugin_config_errors_name_the_field(tmp_path, sets, field):
    with pytest.raises(ConfigError) as exc:
        prepare_run_dir(load_config("quickstart", sets), tmp_path / "x")
    assert exc.value.field == field
    assert not (tmp_path / "x").exists()


def test_a_builtin_kind_named_as_a_plugin_factory_is_that_kind(tmp_path):
    ref = run_experiment(c := load_config("quickstart", SMALL + ["score.bandwidth=0.3"]),
                         prepare_run_dir(c, tmp_path / "kde"))
    cfg = load_config("quickstart", SMALL + ["score.kind=plugin", "score.factory=kde",
                                             "score.options={bandwidth: 0.3}"])
    pd.testing.assert_frame_equal(ref, run_experiment(cfg, prepare_run_dir(cfg, tmp_path / "p")))
    bad = load_config("quickstart", ["score.kind=plugin", "score.factory=kde",
                                     "score.options={bandwidth: -1}"])
    with pytest.raises(ConfigError, match="bandwidth"):
        prepare_run_dir(bad, tmp_path / "bad")


def test_builtin_kinds_follow_the_contract():
    for kind in ("analytic", "population_kde", "kde", "mlp", "unet"):
        model = registry.make_model(load_config("quickstart").score.model_copy(
            update={"kind": kind}))
        assert registry.contract_problem(model) is None


# ---- diffusers ---------------------------------------------------------------------------------
DIFFUSERS_TINY = [
    "score.kind=diffusers",
    "score.options={block_out_channels: [8, 16], norm_num_groups: 4, train_steps: 4, "
    "batch_size: 16, num_train_timesteps: 20, inference_steps: 5}",
    "loop.generations=2",
    "loop.n_train=60",
    "loop.n_samples=40",
    "estimators.n_eval=40",
    "estimators.feature_dim=8",
    "estimators.feature_epochs=2",
    "estimators.extra=[]",
    "sweep.alphas=[0.5]",
    "sweep.seeds=[0]",
]


def test_diffusers_adapter_runs_through_the_loop_and_resumes(tmp_path):
    pytest.importorskip("diffusers")
    cfg = load_config("digits", DIFFUSERS_TINY)
    full = run_experiment(cfg, prepare_run_dir(cfg, tmp_path / "full"))
    assert set(full[full.generation == 2].metric) >= {"accumulated_chi2", "accumulated_kl"}
    store = prepare_run_dir(cfg, tmp_path / "cut")

    def die(generation, seconds):
        raise Boom("killed")

    with pytest.raises(Boom):
        run_chain(cfg, 0.5, 0, store, on_generation=die)
    pd.testing.assert_frame_equal(full, run_experiment(cfg, store))
    # The checkpoint is the sampling network: loaded into a fresh model it draws the same
    # images from the same generator.
    from collapselab.scores.hf_diffusers import DiffusersModel

    opts = cfg.score.options
    cell = store.cell(0.5, 0, 1)
    fitted = DiffusersModel(**opts)
    train = torch.from_numpy(np.load(cell / "train.npy"))
    fitted.fit(train, seed=3, process=None)
    fresh = DiffusersModel(**opts)
    fresh.load_state_dict(fitted.state_dict())
    fresh.event_shape = fitted.event_shape
    x, y = (m.sample(6, generator=torch.Generator().manual_seed(1)) for m in (fitted, fresh))
    assert x.shape == (6, 1, 8, 8) and torch.equal(x, y)
    assert registry.contract_problem(fresh) is None


def test_digits_diffusers_preset_validates():
    pytest.importorskip("diffusers")
    cfg = load_config("digits-diffusers")
    assert cfg.score.kind == "diffusers" and cfg.target.kind == "dataset"
    registry.check_model(cfg)


# ---- monitor -----------------------------------------------------------------------------------
def test_monitor_measures_a_users_own_loop_and_report_renders(tmp_path):
    """A user's loop (EM Gaussian fits, fresh-mixture training sets) measured by the monitor:
    D_1 against the closed-form χ² between Gaussians; ε⋆²_0 of the fitted model's exact
    noised score against the closed-form integrand ∫ V(1/V̂ − 1/V)² + (a m̂/V̂)² dt
    integrated by scipy; bound rows present; ``collapselab report`` renders the directory."""
    from gaussian_mixture import make

    from collapselab.monitor import Monitor
    from collapselab.processes import OU
    from collapselab.scores.analytic import AnalyticScore
    from collapselab.targets import GaussianMixture

    p = GaussianMixture.isotropic(torch.zeros(1, 1, dtype=torch.float64),
                                  torch.tensor(0.5, dtype=torch.float64))
    process = OU(T=4.0)
    mon = Monitor(tmp_path / "mine", p, alpha=0.5, seed=0, process=process, n_mc=20000,
                  n_eval=400, n_times=10, n_mc_path=400)
    g = torch.Generator().manual_seed(0)
    train, fitted = p.sample(300, g).float(), []
    for i in range(2):
        model = make(components=1)
        model.fit(train, seed=i, process=process)
        fitted.append(model)
        x = model.sample(300, generator=g)
        law = GaussianMixture(model.weights, model.means, model.covs)
        # (No train=: q_i's law is known; the report's scatter plot needs 2-D data.)
        mon.record(i, x, law=model, score=AnalyticScore(law, process))
        fresh = p.sample(150, g).float()
        train = torch.cat([fresh, x[:150]])
    df = pd.read_parquet(tmp_path / "mine" / "results.parquet")
    m, v = float(fitted[0].means[0, 0]), float(fitted[0].covs[0, 0, 0])
    r = _row(df, "accumulated_chi2", 1)
    assert abs(r.value - _chi2_gauss(m, v, 0.0, 0.25)) < 4 * r.stderr

    def integrand(t):
        a2, var = math.exp(-t), -math.expm1(-t)
        V, Vh = a2 * 0.25 + var, a2 * v + var
        return V * (1 / Vh - 1 / V) ** 2 + a2 * m * m / Vh**2

    eps = integrate.quad(integrand, 0.02, 4.0, limit=200)[0]
    e = df[(df.metric == "score_energy_ideal") & (df.generation == 0)].iloc[0]
    assert abs(e.value - eps) < 4 * e.stderr
    assert "bound_intra_upper" in set(df[df.generation == 0].metric)
    assert {("intra_chi2", 1), ("accumulated_kl", 2)} <= set(zip(df.metric, df.generation,
                                                                 strict=True))
    r = cli("report", str(tmp_path / "mine"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "mine" / "report.html").exists()


def test_monitor_without_a_law_uses_the_sample_based_estimators(tmp_path):
    from collapselab.monitor import Monitor
    from collapselab.targets import ring

    p = ring(8, 4.0, 0.5)
    g = torch.Generator().manual_seed(1)
    mon = Monitor(tmp_path / "s", p, alpha=0.5, n_eval=400)
    train = p.sample(400, g)
    rows = mon.record(0, p.sample(400, g).float(), train=train)
    got = {(r["metric"], r["generation"], r["estimator"]) for r in rows}
    assert ("accumulated_kl", 1, "knn") in got and ("intra_kl", 0, "knn") in got
    assert any(m == "accumulated_chi2" and g_ == 1 and e != "monte_carlo" for m, g_, e in got)
    # q_1 = ½ p + ½ p̂_1 is unknown without p̂_1's law: I_1 from the training samples.
    rows = mon.record(1, p.sample(400, g).float(), train=train)
    assert {r["metric"] for r in rows if r["generation"] == 1} >= {"intra_kl", "intra_chi2"}
    assert (tmp_path / "s" / "cells" / "alpha=0.5" / "seed=0" / "generation=1" /
            "train.npy").exists()
    df = pd.read_parquet(tmp_path / "s" / "results.parquet")
    assert set(df.generation) == {0, 1, 2}
