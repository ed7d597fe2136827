"""The command line: exit codes, one-line errors, nothing written on bad input."""

import subprocess

import pandas as pd
import pytest
from _cli import cli

SMALL = ["--set", "loop.generations=2", "--set", "loop.n_train=200", "--set", "sampler.steps=20",
         "--set", "estimators.n_mc=1000", "--set", "estimators.n_eval=200",
         "--set", "sweep.alphas=[0.1,0.9]", "--set", "sweep.seeds=[0]"]


@pytest.mark.parametrize(
    "override, field",
    [
        ("sweep.alphas=[1.5]", "sweep.alphas"),
        ("sampler.steps=-1", "sampler.steps"),
        ("target.means=[[0,0,0]]", "target.means"),
        ("loop.unknown_key=3", "loop.unknown_key"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, override, field):
    extra = ["--set", "target.kind=gmm"] if "means" in override else []
    out = tmp_path / "run"
    r = cli("run", "quickstart", "--out", str(out), *extra, "--set", override)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_unknown_preset_and_bad_yaml(tmp_path):
    r = cli("run", "nope", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "no preset or file" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("loop: [unclosed\n")
    r = cli("run", str(bad), "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and "not valid YAML" in r.stderr


def test_presets_lists_one_line_each():
    r = cli("presets")
    assert r.returncode == 0
    names = [line.split()[0] for line in r.stdout.strip().splitlines()]
    assert {"quickstart", "paper-gmm", "paper-gmm-cpu"} <= set(names)


def test_run_then_report_then_resume(tmp_path):
    out = tmp_path / "run"
    r = cli("run", "quickstart", "--out", str(out), "--quiet", *SMALL)
    assert r.returncode == 0, r.stderr
    df = pd.read_parquet(out / "results.parquet")
    assert set(df.alpha) == {0.1, 0.9}
    for f in ["config.yaml", "report.html", "run.log", "figures/accumulated.png",
              "figures/samples.png"]:
        assert (out / f).exists(), f
    assert (out / "cells/alpha=0.1/seed=0/generation=1/metrics.json").exists()
    r = cli("report", str(out))
    assert r.returncode == 0, r.stderr
    # Resuming with another configuration is refused before anything is touched.
    r = cli("run", "quickstart", "--out", str(out), "--set", "loop.generations=5")
    assert r.returncode == 2 and "different configuration" in r.stderr
    r = cli("report", str(tmp_path / "missing"))
    assert r.returncode == 2 and "config.yaml" in r.stderr



def invoke(*args, env=None):
    """In-process CLI call (no interpreter start-up): exit code and the two streams."""
    from click.testing import CliRunner

    from collapselab.cli import main

    res = CliRunner().invoke(main, list(args), env=env)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return subprocess.CompletedProcess(args, res.exit_code, res.stdout, res.stderr)

def _plan(*args):
    r = invoke("plan", *args)
    assert r.returncode == 0, r.stderr
    return r, dict(line.split(": ", 1) for line in r.stdout.strip().splitlines())


def test_plan_prints_alpha_and_rejects_bad_numbers():
    r, out = _plan("--eps2", "0.01", "--tol", "0.05", "--horizon", "10")
    assert 0 < float(out["alpha"]) < 1 and out["feasible"] == "yes"
    assert float(out["predicted worst D"]) <= 0.05 + 1e-12 and out["reason"]
    # a prediction under a stated constant, with the conservative c = 4 beside it
    assert "not a bound" in out["what this is"] and "c = 1" in out["what this is"]
    assert float(out["alpha with c = 4 (conservative, the single-step bound I ≤ 4 ε⋆²)"]
                 .split()[0]) > float(out["alpha"])
    r = invoke("plan", "--eps2", "0.1", "--tol", "0.05")
    assert r.returncode == 0 and "feasible: no" in r.stdout
    for bad, field in [(["--eps2", "-1", "--tol", "0.05"], "--eps2"),
                       (["--eps2", "0.01", "--tol", "0"], "--tol"),
                       (["--eps2", "0.01", "--tol", "0.05", "--horizon", "0"], "--horizon"),
                       (["--eps2", "abc", "--tol", "0.05"], "--eps2"),
                       (["--eps2", "0.01", "--tol", "0.05", "--c", "0"], "--c"),
                       (["--eps2", "0.01", "--tol", "0.05", "--t0", "-1"], "--t0"),
                       (["--eps2", "0.01", "--tol", "0.05", "--target-std", "0"],
                        "--target-std"),
                       (["--tol", "0.05"], "--from"),
                       (["--eps2", "0.01", "--tol", "0.05", "--from", "/nonexistent"], "--from"),
                       (["--tol", "0.05", "--from", "/nonexistent"], "--from")]:
        r = invoke("plan", *bad)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and field in lines[0], r.stderr


def test_plan_constant_and_smoothing_drift():
    from collapselab import theory as th

    _, out = _plan("--eps2", "0.01", "--tol", "0.1", "--c", "2")
    assert float(out["alpha"]) == pytest.approx(th.plan_alpha(0.02, 0.1, None).alpha, rel=1e-5)
    # The default target is N(0, I), the OU stationary law: stopping at t0 adds nothing.
    assert "adds χ²(S p ‖ p) 0 " in out["t0 smoothing"]
    # A narrow off-centre target drifts even with exact scores (ε² = 0).
    _, out = _plan("--eps2", "0", "--tol", "0.05", "--horizon", "10", "--dim", "2",
                   "--target-std", "0.5", "--target-mean", "4")
    g = th.GaussianSmoothing(0.02, 2, 16.0, 0.25)
    step = th.smoothing_drift(1.0, g, 1)[0]
    assert f"{step:.4g}" in out["t0 smoothing"] and float(out["alpha"]) > 0
    assert float(out["predicted worst D"]) == pytest.approx(0.05, rel=1e-4)


def test_plan_from_a_pilot_run(tmp_path):
    import numpy as np

    from collapselab.config import load_config
    from collapselab.engine.executors import prepare_run_dir

    store = prepare_run_dir(load_config("quickstart"), tmp_path / "pilot")
    eps = np.array([0.010, 0.012, 0.011, 0.013])
    pd.DataFrame({"alpha": 0.5, "seed": 0, "generation": np.arange(4),
                  "metric": "score_energy_ideal", "estimator": "monte_carlo", "value": eps,
                  "stderr": 0.001}).to_parquet(store.results_path, index=False)
    _, out = _plan("--from", str(store.root), "--tol", "0.1", "--horizon", "5")
    mean, se = eps.mean(), eps.std(ddof=1) / 2
    assert out["eps2"].startswith(f"{mean:.6g} ± {se:.2g}")
    assert "4 score_energy_ideal" in out["eps2"]
    assert float(out["alpha at eps2 + 2 stderr"]) >= float(out["alpha"])
    # the quickstart's ring (8 components, std 0.5, radius 4, t0 = 0.02) drives the drift
    assert "ring" in out["t0 smoothing"] and "8 components" in out["t0 smoothing"]
    from collapselab import theory as th

    parts = [th.GaussianSmoothing(0.02, 2, 16.0, 0.25, 1 / 8)] * 8
    want = th.plan_alpha(mean, 0.1, 5, smoothing=parts)
    assert float(out["alpha"]) == pytest.approx(want.alpha, rel=1e-5)
    # a run without score energies is refused in one line
    pd.DataFrame({"alpha": [0.5], "seed": [0], "generation": [0], "metric": ["mmd"],
                  "estimator": ["x"], "value": [1.0], "stderr": [0.1]}).to_parquet(
        store.results_path, index=False)
    r = invoke("plan", "--from", str(store.root), "--tol", "0.1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "score_energy_ideal" in r.stderr


@pytest.mark.parametrize("args, field", [(["--workers", "0"], "--workers"),
                                         (["--address", "auto"], "--address"),
                                         (["--executor", "spark"], "--executor")])
def test_bad_executor_options_exit_2_before_writing(tmp_path, args, field):
    out = tmp_path / "run"
    r = invoke("run", "quickstart", "--out", str(out), *args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and field in lines[0], r.stderr
    assert not out.exists()


def test_failed_chain_exits_1_with_one_line_and_rerun_completes(tmp_path):
    import json

    from collapselab.cli import FAULT_ENV

    out = tmp_path / "run"
    fault = {"alpha": 0.9, "seed": 0, "generation": 1, "kind": "raise"}
    r = invoke("run", "quickstart", "--out", str(out), "--quiet", "--no-report", *SMALL,
               env={FAULT_ENV: json.dumps(fault)})  # the CLI's test hook (cli.py)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "alpha=0.9 seed=0" in lines[0] and "generation 1" in lines[0]
    assert str(out / "run.log") in lines[0] and "injected fault" in (out / "run.log").read_text()
    assert (out / "failures.json").exists() and (out / "summary.csv").exists()
    r = invoke("run", "quickstart", "--out", str(out), "--quiet", *SMALL)
    assert r.returncode == 0, r.stderr
    assert not (out / "failures.json").exists() and (out / "report.html").exists()


@pytest.mark.parametrize("fault", ['{"alpha": 0.9', '{"alpha": 0.9, "seed": 0}', '3',
                                   '{"alpha": 0.9, "seed": 0, "generation": 1, "kind": "x"}'])
def test_a_malformed_fault_hook_exits_2_before_writing(tmp_path, fault):
    from collapselab.cli import FAULT_ENV

    out = tmp_path / "run"
    r = invoke("run", "quickstart", "--out", str(out), "--quiet", *SMALL, env={FAULT_ENV: fault})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and FAULT_ENV in lines[0], r.stderr
    assert not out.exists()


def test_bare_overrides_plain_progress_end_message_and_resume(tmp_path):
    """Hydra-style key=value beside --set; without a TTY one plain line per generation; the
    end says where the results are and how to look; a re-run says what was already done."""
    out = tmp_path / "run"
    bare = [a for a in SMALL if a != "--set"]
    r = invoke("run", "quickstart", *bare, "--out", str(out), "--no-report")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    gen_lines = [line for line in lines if line.startswith("[")]
    assert len(gen_lines) == 4 and gen_lines[-1].startswith("[4/4]")
    assert "generation" in gen_lines[0]
    assert f"results: {out / 'results.parquet'}" in r.stdout
    assert f"collapselab report {out}" in r.stdout and "collapselab.load(" in r.stdout
    assert "interval" in r.stdout and "± nan" not in r.stdout
    # config.yaml holds the keys of the chosen kinds only (a KDE score: no network keys).
    cfg = (out / "config.yaml").read_text()
    assert "bandwidth:" in cfg and "hidden:" not in cfg and "beta_min:" not in cfg
    r = invoke("run", "quickstart", *bare, "--out", str(out), "--no-report")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout and "4 of 4 generations already done" in r.stdout
    r = invoke("run", "quickstart", "loop.generations", "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "loop.generations" in r.stderr and not (tmp_path / "bad").exists()


def test_show_presets_verbose_and_help_examples(tmp_path):
    r = invoke("show", "quickstart")
    assert r.returncode == 0 and r.stdout.startswith("#")
    saved = tmp_path / "mine.yaml"
    saved.write_text(r.stdout)
    import yaml

    from collapselab.config import load_config

    data = yaml.safe_load(saved.read_text())
    assert "notes" not in data and data["name"] == "quickstart"  # the notes became comments
    assert load_config(str(saved)).model_dump(exclude={"notes"}) == \
        load_config("quickstart").model_dump(exclude={"notes"})
    assert invoke("show", "nope").returncode == 2
    r = invoke("presets", "-v")
    assert r.returncode == 0 and "finite Gaussian KDE score" in r.stdout
    for cmd in ("run", "report", "bounds", "plan", "presets", "show"):
        h = invoke(cmd, "--help").stdout
        examples = h.split("Examples:")[-1].strip().splitlines()
        assert 2 <= len(examples) <= 3 and all("collapselab" in e for e in examples), cmd
    assert "default: runs/<name>" in invoke("run", "--help").stdout
