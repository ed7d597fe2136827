"""report.html: one self-contained file that opens with the answer; every figure embedded."""

import base64
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from collapselab.config import load_config
from collapselab.engine.executors import prepare_run_dir, run_experiment
from collapselab.engine.store import atomic_save_npy, atomic_write_json
from collapselab.report.run import build_report, image_grid

SMALL = ["loop.generations=2", "loop.n_train=200", "sampler.steps=20", "estimators.n_mc=1000",
         "estimators.n_eval=200", "sweep.alphas=[0.1, 0.9]", "sweep.seeds=[0, 1]",
         "score.kind=population_kde", "sweep.score.bandwidth=[0.2, 0.4]"]
SECTIONS = ["answer", "drift", "intra", "pathwise", "bounds", "samples", "notes", "timing",
            "config", "appendix"]


def embedded(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img [^>]*src="data:image/png;base64,'
                                                    r'([A-Za-z0-9+/=]+)"', html)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cfg = load_config("quickstart", SMALL)
    store = prepare_run_dir(cfg, tmp_path_factory.mktemp("rep") / "run")
    df = run_experiment(cfg, store)
    # Rows other modules add (bounds, pathwise) and an infinite value: rendered generically.
    extra = []
    for (a, s, h), _ in df.groupby(["alpha", "seed", "score.bandwidth"]):
        for g in range(2):
            base = dict(alpha=a, seed=s, generation=g, stderr=0.0, **{"score.bandwidth": h})
            extra += [
                dict(base, metric="bound_kl_upper", estimator="exact", value=0.5, note="",
                     measured=0.4, held=g == 0),
                dict(base, metric="score_energy_ideal", estimator="monte_carlo", value=0.1,
                     note=""),
                dict(base, metric="observability", estimator="monte_carlo", value=0.7, note=""),
            ]
    extra.append(dict(alpha=0.1, seed=1, generation=2, metric="accumulated_chi2",
                      estimator="classifier", value=np.inf, stderr=np.nan,
                      note="density ratio unbounded", **{"score.bandwidth": 0.2}))
    full = pd.concat([df, pd.DataFrame(extra)], ignore_index=True)
    full.to_parquet(store.results_path, index=False)
    return store


def test_report_is_self_contained_and_opens_with_the_answer(run_dir):
    figs = build_report(run_dir.root)
    html = (run_dir.root / "report.html").read_text()
    names = {p.name for p in figs}
    assert {"final_drift.png", "accumulated.png", "intra.png", "bounds.png", "pathwise.png",
            "samples_0.png", "samples_1.png", "timings.png"} <= names
    # Every figure is on disk and embedded byte for byte; nothing is linked from outside.
    assert sorted(embedded(html)) == sorted(p.read_bytes() for p in figs)
    assert all(p.parent == run_dir.figures for p in figs)
    assert not re.search(r'src="(?!data:)', html)
    pos = [re.search(f"<section id=.{s}.", html).start() for s in SECTIONS]
    assert pos == sorted(pos)  # the answer comes first
    answer = re.search(r'class="answer">([^<]*)', html).group(1)
    assert "α" in answer and "generation 2" in answer
    assert "score.bandwidth=0.2" in answer and "score.bandwidth=0.4" in answer
    assert "density ratio unbounded" in html and "inf/NaN" in html
    assert "FAILED" in html and "held" in html  # the bound table's flag column
    for key in ("python", "torch", "collapselab", "numpy", "device"):
        assert f"<td>{key}</td>" in html
    summary = pd.read_csv(run_dir.root / "summary.csv")
    assert {"score.bandwidth", "alpha", "generation", "metric", "estimator", "mean", "ci_low",
            "ci_high", "n", "n_nonfinite"} <= set(summary.columns)
    row = summary[(summary.metric == "accumulated_chi2") & (summary.estimator == "classifier")]
    assert row.n_nonfinite.item() == 1 and row.n.item() == 0


def test_image_runs_get_sample_grids(tmp_path):
    cfg = load_config("quickstart", ["loop.generations=1", "sweep.alphas=[0.5]",
                                     "sweep.seeds=[0]"])
    store = prepare_run_dir(cfg, tmp_path / "img")
    rng = np.random.default_rng(0)
    cell = store.cell(0.5, 0, 0)
    atomic_save_npy(cell / "train.npy", rng.normal(size=(80, 1, 8, 8)).astype(np.float32))
    atomic_save_npy(cell / "samples.npy", rng.normal(size=(80, 1, 8, 8)).astype(np.float32))
    atomic_write_json(cell / "metrics.json", {"rows": [
        dict(alpha=0.5, seed=0, generation=g, metric=m, estimator="gaussian_features",
             value=0.1 * g + 0.2, stderr=0.0, note="")
        for g in (0, 1) for m in ("accumulated_kl", "fid_local", "kid", "precision", "recall")],
        "timings": {"fit": 1.0}})
    store.write_results()
    figs = build_report(store.root)
    # Image metrics are plotted over generations (generic: every metric gets a panel).
    assert {"grid.png", "samples.png", "other_metrics.png"} <= {p.name for p in figs}
    html = (store.root / "report.html").read_text()
    assert '<section id="grids"' in html and len(embedded(html)) == len(figs)
    g = image_grid(rng.normal(size=(64, 3, 4, 4)))
    assert g.shape == (8 * 5 + 1, 8 * 5 + 1, 3) and 0 <= g.min() and g.max() <= 1


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Written into the page after load: the page height at the window's width and every image that
# did not decode (naturalWidth 0), read back from --dump-dom.
PROBE = ("<script>window.addEventListener('load', () => {const imgs = [...document.images];"
         "const p = document.createElement('pre'); p.id = 'probe'; p.textContent = "
         "JSON.stringify({height: document.documentElement.scrollHeight, images: imgs.length,"
         "broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt)});"
         "document.body.appendChild(p);});</script>")


def render_in_chromium(report: Path, tmp_path: Path, width: int = 1400) -> tuple[dict, list]:
    """Open a copy of ``report`` (with PROBE) in headless Chromium at ``width`` px: the probe's
    result and the console messages the page produced."""
    import json

    page = tmp_path / "probe.html"
    page.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                        "--enable-logging=stderr", "--v=0", f"--window-size={width},1000",
                        "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r'<pre id="probe">([^<]*)</pre>', r.stdout)
    assert m, "the probe did not run: " + r.stderr[-2000:]
    console = [line for line in r.stderr.splitlines() if ":CONSOLE" in line]
    return json.loads(html_unescape(m.group(1))), console


def html_unescape(text: str) -> str:
    import html

    return html.unescape(text)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install "
                                             "chromium): report.html was not rendered")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    """Every image decodes in a real browser, the page logs nothing to the console, and the
    report of a run without other swept keys (the fixture's chains of one bandwidth) stays
    under 10,000 px at 1,400 px: long tables are collapsed, notes aggregated."""
    figs = build_report(run_dir.root)
    probe, console = render_in_chromium(run_dir.root / "report.html", tmp_path)
    assert probe["images"] == len(figs) and probe["broken"] == []
    assert console == []
    one = tmp_path / "one"
    shutil.copytree(run_dir.root, one)
    df = pd.read_parquet(one / "results.parquet")
    df[df["score.bandwidth"] == 0.2].to_parquet(one / "results.parquet", index=False)
    build_report(one)
    probe, console = render_in_chromium(one / "report.html", tmp_path)
    assert probe["broken"] == [] and console == []
    assert probe["height"] < 10_000, probe
    # The decoded images are the figures: each embedded PNG is a valid image.
    from PIL import Image

    for data in embedded((run_dir.root / "report.html").read_text()):
        import io

        assert min(Image.open(io.BytesIO(data)).size) > 50


def test_final_table_answers_at_the_newest_generation():
    """A network model has no exact law: χ² exists only as the convention D_0 = 0, KL by kNN at
    every generation. The answer is KL at the last generation, not χ² at generation 0."""
    from collapselab.report.run import answer_sentence, final_table

    rows = []
    for a in (0.1, 0.9):
        for s in (0, 1):
            for m in ("accumulated_chi2", "accumulated_kl"):
                rows.append(dict(alpha=a, seed=s, generation=0, metric=m, estimator="exact",
                                 value=0.0, stderr=0.0, note=""))
            for g in (1, 2):
                rows.append(dict(alpha=a, seed=s, generation=g, metric="accumulated_kl",
                                 estimator="knn", value=g * (1 - a) + 0.01 * s, stderr=0.01,
                                 note=""))
    table = final_table(pd.DataFrame(rows))
    assert set(table.metric) == {"accumulated_kl"} and set(table.generation) == {2}
    assert table.set_index("alpha")["mean"].to_dict() == pytest.approx({0.1: 1.805, 0.9: 0.205})
    assert "no estimate at generation 2" in answer_sentence(table)


def test_final_table_falls_back_when_chi2_is_flagged_unreliable():
    """χ² finite for every seed but with an infinite uncertainty for one (the feature proxy
    near its finiteness boundary): it cannot rank α, so the answer is KL, and says why."""
    from collapselab.report.run import answer_sentence, final_table

    rows = []
    for a in (0.1, 0.9):
        for s in (0, 1):
            chi2_err = math.inf if (a, s) == (0.9, 0) else 1.0
            rows.append(dict(alpha=a, seed=s, generation=3, metric="accumulated_chi2",
                             estimator="gaussian_features", value=1e4 * (1 + s), stderr=chi2_err,
                             note=""))
            rows.append(dict(alpha=a, seed=s, generation=3, metric="accumulated_kl",
                             estimator="gaussian_features", value=2 * (1 - a), stderr=0.01,
                             note=""))
    table = final_table(pd.DataFrame(rows))
    assert set(table.metric) == {"accumulated_kl"}
    sentence = answer_sentence(table)
    assert "flagged unreliable (infinite uncertainty) for 1 of 4 seed values" in sentence
    assert sentence.count("Drift falls as the fresh-data fraction α grows") == 1
    # Without the flag the χ² answer stands.
    df = pd.DataFrame(rows)
    df.loc[df.stderr == math.inf, "stderr"] = 1.0
    assert set(final_table(df).metric) == {"accumulated_chi2"}
