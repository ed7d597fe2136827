"""The Python API: collapselab.run / collapselab.load from a plain script (no __main__ guard)."""

import subprocess
import sys
import textwrap

import pandas as pd
import pytest

TINY = ["loop.generations=2", "loop.n_train=200", "sampler.steps=20", "estimators.n_mc=1000",
        "estimators.n_eval=200", "sweep.alphas=[0.1,0.9]", "sweep.seeds=[0]",
        "pathwise.score_energy=false"]


def test_run_from_a_script_without_main_guard_with_two_workers(tmp_path):
    """Spawned workers must not re-import the caller's script: without the guard a re-import
    would start the run again inside every worker, and the workers die."""
    out = tmp_path / "run"
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import json
        import collapselab

        events = []
        run = collapselab.run("quickstart", out={str(out)!r}, overrides={TINY!r}, workers=2,
                              on_generation=lambda ev: events.append(
                                  [ev.alpha, ev.generation, ev.done, ev.total, len(ev.rows)]))
        print(json.dumps({{"events": sorted(events), "rows": len(run.results),
                          "report": str(run.report), "dir": str(run.dir)}}))
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    got = json.loads(r.stdout.strip().splitlines()[-1])
    # Generation 0 is computed once (α = 0.1) and adopted by α = 0.9: four cells in all.
    assert [e[:2] for e in got["events"]] == [[0.1, 0], [0.1, 1], [0.9, 0], [0.9, 1]]
    assert sorted(e[2] for e in got["events"]) == [1, 2, 3, 4]
    assert {e[3] for e in got["events"]} == {4}
    assert all(e[4] > 0 for e in got["events"])
    assert got["report"] == str(out / "report.html") and got["dir"] == str(out)
    log = (out / "run.log").read_text()
    assert "workers=2" in log and "failed" not in log
    import collapselab

    run = collapselab.load(out)
    assert len(run.results) == got["rows"] and set(run.results.alpha) == {0.1, 0.9}
    assert {"mean", "ci_low", "ci_high", "interval"} <= set(run.summary.columns)
    assert run.config["loop"]["generations"] == 2


def test_load_and_run_reject_bad_input_before_writing(tmp_path):
    import collapselab
    from collapselab.errors import CollapselabError

    with pytest.raises(CollapselabError, match="config.yaml"):
        collapselab.load(tmp_path / "nothing")
    with pytest.raises(CollapselabError, match="sweep.alphas"):
        collapselab.run("quickstart", out=tmp_path / "bad", overrides=["sweep.alphas=[2]"])
    assert not (tmp_path / "bad").exists()


def test_one_estimator_per_metric_recipe_of_the_docs():
    """docs/api.md's pandas recipe: one estimator per metric before pivoting (a naive pivot
    would average kNN with Monte Carlo)."""
    rows = [dict(alpha=0.5, seed=0, generation=1, metric="accumulated_kl", estimator=e,
                 value=v, stderr=0.0, note="") for e, v in (("knn", 1.0), ("monte_carlo", 3.0))]
    results = pd.DataFrame(rows)
    preferred = ["exact", "monte_carlo", "classifier", "knn", "gaussian_features"]
    rank = results.estimator.map({e: k for k, e in enumerate(preferred)}).fillna(len(preferred))
    best = results[rank == rank.groupby([results.metric, results.alpha, results.generation])
                   .transform("min")]
    table = best.pivot_table(index=["alpha", "generation"], columns="metric", values="value")
    assert table["accumulated_kl"].item() == 3.0
