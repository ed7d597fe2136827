"""The command line: exit codes, one-line errors, nothing written on bad input."""

import subprocess
import sys

import pandas as pd
import pytest

SMALL = ["--set", "loop.generations=2", "--set", "loop.n_train=200", "--set", "sampler.steps=20",
         "--set", "estimators.n_mc=1000", "--set", "estimators.n_eval=200",
         "--set", "sweep.alphas=[0.1,0.9]", "--set", "sweep.seeds=[0]"]


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "collapselab.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


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
