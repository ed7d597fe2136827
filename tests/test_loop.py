"""The recursive loop: resume after an interruption gives the same results; laws are exact."""

import math

import pandas as pd
import pytest
import torch

from collapselab.config import load_config
from collapselab.engine.executors import prepare_run_dir, run_experiment
from collapselab.engine.loop import run_chain
from collapselab.engine.store import RunStore

SMALL = [
    "loop.generations=3",
    "loop.n_train=300",
    "sampler.steps=30",
    "estimators.n_mc=2000",
    "estimators.n_eval=300",
    "sweep.alphas=[0.5]",
    "sweep.seeds=[0]",
]


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("kind", ["kde", "population_kde"])
def test_interrupted_run_resumes_to_identical_results(tmp_path, kind):
    cfg = load_config("quickstart", SMALL + [f"score.kind={kind}"])
    full = run_experiment(cfg, prepare_run_dir(cfg, tmp_path / "full"))

    store = prepare_run_dir(cfg, tmp_path / "cut")

    def die_after_first(generation, seconds):
        if generation == 1:
            raise Boom("killed")

    with pytest.raises(Boom):
        run_chain(cfg, 0.5, 0, store, on_generation=die_after_first)
    # Generation 1's files were written but the chain died before moving on; simulate a kill
    # mid-generation too: a stray temporary file and a half-written generation without
    # metrics.json must not count as done.
    g2 = store.cell(0.5, 0, 2)
    g2.mkdir(parents=True)
    (g2 / "samples.npy").write_bytes(b"garbage")
    assert store.completed(0.5, 0) == 2
    resumed = run_experiment(cfg, store)
    pd.testing.assert_frame_equal(full, resumed)
    assert (store.results_path).exists()


def test_rerun_recomputes_nothing(tmp_path):
    cfg = load_config("quickstart", SMALL)
    store = prepare_run_dir(cfg, tmp_path / "r")
    run_experiment(cfg, store)
    assert run_chain(cfg, 0.5, 0, store) == 0


def test_rows_follow_the_metric_contract(tmp_path):
    cfg = load_config("quickstart", SMALL + ["score.kind=population_kde"])
    df = run_experiment(cfg, prepare_run_dir(cfg, tmp_path / "c"))
    assert list(df.columns[:8]) == [
        "alpha",
        "seed",
        "generation",
        "metric",
        "estimator",
        "value",
        "stderr",
        "note",
    ]
    got = set(zip(df.metric, df.generation, strict=True))
    G = cfg.loop.generations
    for g in range(G + 1):
        assert ("accumulated_kl", g) in got and ("accumulated_chi2", g) in got
    for g in range(G):
        assert ("intra_kl", g) in got and ("intra_chi2", g) in got
    d0 = df[(df.generation == 0) & (df.metric == "accumulated_chi2")]
    assert (d0.value == 0).all() and (d0.estimator == "exact").all()
    # Every finite value has a finite standard error; non-finite values carry a note.
    bad = df[~df.value.map(math.isfinite)]
    assert (bad.note.str.len() > 0).all()


def test_analytic_chain_d1_is_the_t0_shrink(tmp_path):
    """With the oracle score, p̂_1 is p pushed to t0 exactly: D_1 = χ²((p)_t0 ‖ p) closed form
    in 1-D (one Gaussian N(0, s²)): var1 = a² s² + 1 − a² and χ² = s²/(√var1 √(2s² − var1)) − 1."""
    cfg = load_config(
        "quickstart",
        SMALL
        + [
            "score.kind=analytic",
            "target.kind=gmm",
            "target.dim=1",
            "target.means=[[0.0]]",
            "target.std=0.5",
            "estimators.n_mc=50000",
            "loop.generations=1",
        ],
    )
    df = run_experiment(cfg, prepare_run_dir(cfg, tmp_path / "a"))
    row = df[
        (df.metric == "accumulated_chi2") & (df.generation == 1) & (df.estimator == "monte_carlo")
    ].iloc[0]
    s2, a2 = 0.25, math.exp(-0.02)
    v1 = a2 * s2 + 1 - a2
    exact = s2 / (math.sqrt(v1) * math.sqrt(2 * s2 - v1)) - 1
    assert abs(row.value - exact) < 4 * row.stderr + 1e-12


def test_population_kde_law_stays_a_gaussian_mixture_and_grows_linearly(tmp_path):
    from collapselab.engine.loop import ChainContext, _law_history

    cfg = load_config("quickstart", SMALL + ["score.kind=population_kde"])
    ctx = ChainContext(cfg, 0.5, 0, RunStore(tmp_path))
    laws = _law_history(ctx, 3)
    k = ctx.target.n_components
    assert [laws[g].n_components for g in (1, 2, 3)] == [k, 2 * k, 3 * k]
    # p̂_1 = (p * N(0, h²))_t0: component variance a²(s² + h²) + 1 − a².
    a2 = math.exp(-cfg.sampler.t0)
    v = a2 * (0.25 + cfg.score.bandwidth**2) + 1 - a2
    torch.testing.assert_close(laws[1].covs[0], v * torch.eye(2, dtype=torch.float64))


def test_swept_keys_become_columns_and_directories(tmp_path):
    cfg = load_config(
        "quickstart",
        SMALL
        + ["loop.generations=1", "score.kind=population_kde", "sweep.score.bandwidth=[0.2, 0.4]"],
    )
    store = prepare_run_dir(cfg, tmp_path / "s")
    df = run_experiment(cfg, store)
    assert set(df["score.bandwidth"]) == {0.2, 0.4}
    assert store.is_done(0.5, 0, 0, {"score.bandwidth": 0.4})
    d1 = df[
        (df.metric == "accumulated_kl") & (df.generation == 1) & (df.estimator == "monte_carlo")
    ]
    small, large = (d1[d1["score.bandwidth"] == h].value.item() for h in (0.2, 0.4))
    assert large > small  # a wider population KDE drifts further from p


def test_generation_zero_is_shared_across_alpha(tmp_path, fit_log):
    from collapselab.engine import loop

    cfg = load_config("quickstart", SMALL + ["loop.generations=2", "sweep.alphas=[0.1, 0.9]"])
    ref = run_experiment(cfg, prepare_run_dir(cfg, tmp_path / "ref"))
    store = prepare_run_dir(cfg, tmp_path / "shared")
    run_chain(cfg, 0.1, 0, store, hooks=fit_log)
    assert loop.adopt_generation_zero(store, 0.1, 0.9, 0)
    run_chain(cfg, 0.9, 0, store, hooks=fit_log)
    fits = [int(line.split()[2]) for line in open(fit_log.fit_log).read().splitlines()]
    assert fits.count(0) == 1 and fits.count(1) == 2
    pd.testing.assert_frame_equal(ref, store.write_results())


def test_mlp_chain_with_warm_start_resumes_identically(tmp_path):
    over = SMALL + [
        "score.kind=mlp",
        "score.train_steps=40",
        "score.batch_size=128",
        "score.warm_start=true",
        "loop.generations=2",
    ]
    cfg = load_config("quickstart", over)
    full = run_experiment(cfg, prepare_run_dir(cfg, tmp_path / "full"))
    store = prepare_run_dir(cfg, tmp_path / "cut")
    with pytest.raises(Boom):
        run_chain(cfg, 0.5, 0, store, on_generation=lambda g, s: (_ for _ in ()).throw(Boom()))
    assert store.completed(0.5, 0) == 1
    assert (store.cell(0.5, 0, 0) / "model.safetensors").exists()
    pd.testing.assert_frame_equal(full, run_experiment(cfg, store))


def test_pathwise_rows_match_closed_forms_on_a_gaussian_population_kde(tmp_path):
    """p = N(0, s²) in 2-D, population KDE of bandwidth h: the model score is exact for
    N(0, s² + h²), so with V_h(t) = a²(s²+h²) + 1 − a², V(t) = a²s² + 1 − a² (a² = e^{−t}):
    ε⋆² = ∫ d a⁴h⁴ / (V_h² V) dt, ε̂² = ∫ d a⁴h⁴ / (V_h V²) dt (along p̂'s own paths) and
    KL(p̂_t0 ‖ q_t0) = KL(p̂_T ‖ q_T) + ½ ε̂² (de Bruijn)."""
    from scipy.integrate import quad

    s2, h = 0.25, 0.3
    cfg = load_config(
        "quickstart",
        SMALL
        + [
            "score.kind=population_kde",
            f"score.bandwidth={h}",
            "target.kind=gmm",
            "target.means=[[0.0, 0.0]]",
            f"target.std={s2**0.5}",
            "loop.generations=1",
            "pathwise.n_paths=3000",
            "estimators.n_mc=20000",
        ],
    )
    df = run_experiment(cfg, prepare_run_dir(cfg, tmp_path / "g"))

    def vh(t):
        return math.exp(-t) * (s2 + h * h) + 1 - math.exp(-t)

    def v(t):
        return math.exp(-t) * s2 + 1 - math.exp(-t)

    def num(t):
        return 2 * (math.exp(-t) * h * h) ** 2

    star = quad(lambda t: num(t) / (vh(t) ** 2 * v(t)), 0.02, 4.0)[0]
    hat = quad(lambda t: num(t) / (vh(t) * v(t) ** 2), 0.02, 4.0)[0]

    def row(metric):
        return df[(df.metric == metric) & (df.generation == 0)].iloc[0]

    e_star, e_hat = row("score_energy_ideal"), row("score_energy_learned")
    assert abs(e_star.value - star) < 4 * e_star.stderr + 1e-3 * star
    # Euler–Maruyama on a geometric 100-step grid: 4 stderr plus a 2% discretisation allowance.
    assert abs(e_hat.value - hat) < 4 * e_hat.stderr + 0.02 * hat
    # The model is exact for its own law: Prop 3.1 is the de Bruijn identity
    # KL(p̂_t0 ‖ q_t0) = KL(p̂_T ‖ q_T) + ½ ε̂² (closed forms for these Gaussians), so the bound
    # row is labelled an identity and the calibration row compares the two sides.
    def kl(t):
        r = vh(t) / v(t)
        return 0.5 * 2 * (r - 1 - math.log(r))

    assert kl(0.02) - kl(4.0) == pytest.approx(0.5 * hat, rel=1e-6)
    kl_bound = row("bound_kl_upper")
    assert kl_bound.status == "identity" and kl_bound.cause == "exact_own_law"
    assert kl_bound.held is None or pd.isna(kl_bound.held)
    assert row("intra_kl_T").value == pytest.approx(kl(4.0), abs=4 * row("intra_kl_T").stderr)
    cal = row("calibration_eps_hat")
    assert cal.status == "consistent", cal.note
    assert cal.measured == pytest.approx(row("intra_kl_t0").value)


def test_cuda_chains_switch_on_deterministic_kernels(monkeypatch, tmp_path):
    """A chain on CUDA makes the process's kernels deterministic before any CUDA work (a
    resumed U-Net chain differed by 1% on an H200 without it); CPU chains leave torch alone."""
    import os

    from collapselab.engine import loop

    calls = []
    monkeypatch.setattr(loop, "deterministic_cuda", lambda: calls.append(1))
    cpu = load_config("quickstart")
    store = prepare_run_dir(cpu, tmp_path / "run")
    loop.ChainContext(cpu, 0.5, 0, store)
    assert calls == []
    loop.ChainContext(load_config("quickstart", ["device=cuda"]), 0.5, 0, store)
    assert calls == [1]
    monkeypatch.undo()

    had = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    prev = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled())
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    try:
        loop.deterministic_cuda()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:  # process-wide settings: put them back for the other tests of this worker
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[:2]
        torch.use_deterministic_algorithms(prev[2], warn_only=prev[3])
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        if had is not None:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = had
