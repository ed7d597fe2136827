"""Figures and a self-contained report.html from a run directory (results.parquet + cells).

The report opens with the answer to the question a sweep asks — how does the drift at the last
generation depend on α — then shows D_i and I_i per α with seed bands, bound/regime rows when
present, samples per generation, sample grids for image runs, timings, configuration and the
environment. Every figure is also written to DIR/figures as PNG and embedded in the HTML as
base64, so report.html is one file that opens anywhere.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from ..engine.store import (  # noqa: E402
    RunStore,
    atomic_write_bytes,
    atomic_write_text,
    failures,
    load_npy,
    read_json,
    summarize,
    write_summary,
)
from ..environment import environment  # noqa: E402,F401  (re-exported: report.environment)
from ..theory import Status  # noqa: E402
from ..verdicts import status_text  # noqa: E402
from .bounds import (  # noqa: E402
    BOUND_LABELS,
    ESTIMATOR_ORDER,
    bound_checks,
    bound_rows,
    bounds_overview,
    bounds_sentence,
    evaluate_bounds,
    seed_mean,
    status_codes,
    swept_columns,
)
from .html import fmt as _fmt  # noqa: E402
from .html import img as _img  # noqa: E402
from .html import save_figure as _save  # noqa: E402
from .html import section as _section  # noqa: E402
from .html import table as _table  # noqa: E402

# Whose law each estimator's number describes: exact densities are of the ideal reverse
# process's law; sample-based estimators see what the sampler actually produced.
LAW_OF = {"monte_carlo": "ideal law", "knn": "sampler's samples",
          "classifier": "sampler's samples", "gaussian_features": "sampler's samples",
          "knn_paired": "sampler's samples vs ideal law"}
# A bound row's measured counterpart when the row carries no ``measured`` column.
BOUND_TARGETS = {"bound_kl_upper": "intra_kl", "bound_chi2_lower": "intra_chi2",
                 "bound_chi2_lower_clean": "intra_chi2", "bound_intra_upper": "intra_chi2"}
PATHWISE_PREFIXES = ("score_energy_", "observability")


def combos(df: pd.DataFrame) -> list[dict]:
    """The distinct assignments of swept keys other than α and seed ([{}] when none)."""
    cols = swept_columns(df)
    if not cols or df.empty:
        return [{}]
    uniq = df[cols].drop_duplicates().sort_values(cols)
    return [dict(zip(cols, row, strict=True)) for row in uniq.itertuples(index=False)]


def _select(df: pd.DataFrame, params: dict) -> pd.DataFrame:
    for k, v in params.items():
        df = df[df[k] == v]
    return df


def _label(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def pick_estimator(df: pd.DataFrame, metric: str) -> str | None:
    have = df.loc[df.metric == metric, "estimator"].unique().tolist()
    for e in ESTIMATOR_ORDER:
        if e in have and (e != "exact" or len(have) == 1):
            return e
    return have[0] if have else None


def best_rows(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The rows of ``metric`` from the most trusted estimator available in each (swept keys, α,
    generation) cell (ESTIMATOR_ORDER; exact first): estimators can differ between cells (a
    closed form where the law allows it, Monte Carlo elsewhere; D_0 = 0 is exact)."""
    sub = df[df.metric == metric]
    if sub.empty:
        return sub
    rank = {e: k for k, e in enumerate(ESTIMATOR_ORDER)}
    r = sub.estimator.map(lambda e: rank.get(e, len(rank)))
    keys = swept_columns(sub) + ["alpha", "generation"]
    best = r.groupby([sub[k] for k in keys], dropna=False).transform("min")
    return sub[r == best]


def _mark_nonfinite(ax, summ: pd.DataFrame, x: str = "generation") -> None:
    """A red × near the top edge (axes coordinates, so it is visible whatever the data range)
    wherever some seeds gave inf/NaN, annotated with how many."""
    bad = summ[summ.nonfinite > 0]
    if not len(bad):
        return
    trans = ax.get_xaxis_transform()
    labelled = any(t == "inf/NaN seeds" for t in ax.get_legend_handles_labels()[1])
    ax.plot(bad[x], np.full(len(bad), 0.96), "x", color="red", ms=8, mew=2, transform=trans,
            label=None if labelled else "inf/NaN seeds")
    for g, k in zip(bad[x], bad.nonfinite, strict=True):
        ax.annotate(f"{k} inf/NaN", (g, 0.96), xycoords=trans, fontsize=6, color="red",
                    textcoords="offset points", xytext=(0, -11), ha="center")


# Words for the figures and tables; a metric or estimator not listed is shown by its name with
# spaces (the report is generic over metrics: every metric of results.parquet gets a panel).
METRIC_LABELS = {
    "accumulated_chi2": ("accumulated drift D_i = χ²(p̂_i ‖ p)", "χ²(p̂_i ‖ p)"),
    "accumulated_kl": ("accumulated drift in KL", "KL(p̂_i ‖ p)"),
    "intra_chi2": ("one-generation error I_i = χ²(p̂_(i+1) ‖ q_i)", "χ²(p̂_(i+1) ‖ q_i)"),
    "intra_kl": ("one-generation error in KL", "KL(p̂_(i+1) ‖ q_i)"),
    "intra_chi2_t0": ("one-generation error against q_i pushed to t0 (χ²)",
                      "χ²(p̂_(i+1) ‖ q_i,t0)"),
    "intra_kl_t0": ("one-generation error against q_i pushed to t0 (KL)", "KL(p̂_(i+1) ‖ q_i,t0)"),
    "score_energy_ideal": ("ideal score energy ε⋆,i²", "ε⋆,i²"),
    "score_energy_learned": ("learned score energy ε̂_i²", "ε̂_i²"),
    "observability": ("observability η_i", "η_i"),
    "sampler_gap_kl": ("the sampler's own error: KL(samples' law ‖ ideal reverse law)", "KL"),
    "second_moment": ("second moment of the samples", "E‖x‖²"),
    "sliced_w2": ("sliced Wasserstein-2 distance to p", "sliced W2"),
    "fraction_real": ("fraction of fresh data in q_i's training set", "fraction"),
    "fid_local": ("FID in the in-project feature space", "FID"),
    "kid": ("KID in the in-project feature space", "KID"),
    "precision": ("precision (samples near the data)", "precision"),
    "recall": ("recall (data near the samples)", "recall"),
    "density": ("density (samples near the data, counted)", "density"),
    "coverage": ("coverage (data near a sample)", "coverage"),
    "mmd": ("MMD to p", "MMD²"),
    "feature_test_accuracy": ("feature classifier's test accuracy", "accuracy"),
}
ESTIMATOR_LABELS = {
    "exact": "closed form", "monte_carlo": "Monte Carlo on the exact densities",
    "knn": "k-nearest-neighbour estimate from samples", "classifier": "classifier density ratio",
    "gaussian_features": "Gaussian fit in feature space", "theory": "the paper's formula",
    "sample_mean": "sample mean", "sliced_wasserstein": "random projections",
    "flow_likelihood": "the ODE model's likelihood", "knn_paired": "paired kNN estimate",
}
# Fewer seeds than this: each seed's line is drawn, no band (an interval from 2–4 seeds says
# little); from this many on, the mean with its interval over seeds (store.seed_interval).
FEW_SEEDS = 5
SEEDS_NOTE = ("Every curve is one α. With fewer than 5 seeds each seed is a thin line and the "
              "mean a bold one; with 5 or more, the mean with a 95% band over seeds. A red × "
              "marks generations where some seeds gave inf/NaN (left out of the mean; see the "
              "notes).")
LAW_NOTE = ("Exact-density estimates (Monte Carlo) describe the <b>ideal law</b> of the reverse "
            "process stopped at t0; kNN and classifier estimates describe the <b>sampler's "
            "samples</b>, which the next generation trains on. sampler_gap_kl is "
            "KL(sampler's law ‖ ideal law) (sampler_gap.png).")
INTERVAL_NOTE = ("Curves over seeds: with fewer than 5 seeds every seed is drawn as a thin line "
                 "and the mean as a bold one (no band); with 5 or more, the mean and a 95% "
                 "interval over seeds. Intervals (figures, tables, summary.parquet) are Student-t "
                 "intervals; for a metric whose values are all ≥ 0 (divergences, energies, "
                 "distances) the t-interval is taken on the log scale of the mean "
                 "(mean · exp(± t s / (mean √n)), the delta method), so it never reaches below "
                 "0. The summary's <code>interval</code> column says which was used.")


def metric_label(metric: str) -> str:
    """A metric's name in words (METRIC_LABELS, else the name with spaces)."""
    if metric in METRIC_LABELS:
        return METRIC_LABELS[metric][0]
    return metric.replace("_", " ")


def metric_axis(metric: str) -> str:
    return METRIC_LABELS[metric][1] if metric in METRIC_LABELS else metric.replace("_", " ")


def estimator_label(est: str) -> str:
    return "/".join(ESTIMATOR_LABELS.get(e, e.replace("_", " ")) for e in str(est).split("/"))


def _int_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def draw_over_seeds(ax, rows: pd.DataFrame, color, label: str, *, x: str = "generation",
                    y: str = "value", style: str = "-", nonnegative: bool = False) -> str:
    """One series (one α) over ``x`` from per-seed ``rows``: with fewer than FEW_SEEDS seeds,
    each seed's line (thin) and the mean (bold); otherwise the mean with its 95% interval over
    seeds (store.seed_interval: log-scale t for a non-negative metric). Non-finite values are
    left out (the caller marks them). Returns what the spread shows, for the title."""
    from ..engine.store import seed_interval

    v = rows[y].to_numpy(float)
    rows = rows.assign(_v=np.where(np.isfinite(v), v, np.nan))
    seeds = rows["seed"].nunique() if "seed" in rows else 1
    stats = [(g, seed_interval(grp["_v"], nonnegative=nonnegative))
             for g, grp in rows.groupby(x, sort=True)]
    xs = np.array([g for g, _ in stats], dtype=float)
    mean = np.array([s["mean"] for _, s in stats])
    if seeds < FEW_SEEDS:
        for _, grp in rows.groupby("seed"):
            grp = grp.sort_values(x)
            ax.plot(grp[x], grp["_v"], style, color=color, lw=0.8, alpha=0.5)
        ax.plot(xs, mean, style, marker="o", ms=3, lw=2, color=color, label=label)
        return "thin: each seed, bold: mean" if seeds > 1 else "one seed"
    lo = np.array([s["ci_low"] for _, s in stats])
    hi = np.array([s["ci_high"] for _, s in stats])
    ax.plot(xs, mean, style, marker="o", ms=3, lw=1.5, color=color, label=label)
    ax.fill_between(xs, lo, hi, color=color, alpha=0.2, lw=0)
    return f"mean of {seeds} seeds, 95% band"


def plot_metric(df: pd.DataFrame, metric: str, title: str, ax, params: dict | None = None) -> bool:
    """The metric per generation and α over seeds (draw_over_seeds); seeds with inf/NaN marked
    by a red ×. Returns False (nothing drawn) when no finite value exists."""
    sub = best_rows(_select(df, params or {}), metric)
    if sub.empty or not np.isfinite(sub.value.to_numpy(float)).any():
        return False
    est = "/".join(dict.fromkeys(e for e in ESTIMATOR_ORDER + sorted(set(sub.estimator))
                                 if e in set(sub.estimator)))
    v = df.loc[df.metric == metric, "value"].to_numpy(float)
    nonneg = not (np.isfinite(v) & (v < 0)).any()
    spread = ""
    for k, (a, grp) in enumerate(sub.groupby("alpha")):
        spread = draw_over_seeds(ax, grp, f"C{k}", f"α = {a:g}", nonnegative=nonneg)
    summ = summarize(sub.assign(estimator=est)).rename(columns={"n_nonfinite": "nonfinite"})
    _mark_nonfinite(ax, summ.groupby("generation", as_index=False).nonfinite.sum())
    pos = summ["mean"][np.isfinite(summ["mean"]) & (summ["mean"] > 0)]
    if len(pos) > 1 and pos.max() / pos.min() > 1e3:
        ax.set_yscale("symlog", linthresh=float(pos.min()))  # χ² can span many decades
    ax.set_xlabel("generation i")
    ax.set_ylabel(metric_axis(metric))
    _int_ticks(ax)
    extra = f" — {_label(params)}" if params else ""
    laws = "/".join(dict.fromkeys(LAW_OF[e] for e in est.split("/") if e in LAW_OF))
    whose = f": {laws}" if laws else ""
    ax.set_title(f"{title}{extra}\n({estimator_label(est)}{whose})", fontsize=8)
    ax.text(0.99, 0.01, spread, transform=ax.transAxes, ha="right", va="bottom", fontsize=6,
            color="0.4")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return True


def _metric_figure(df, pairs, path, ncols: int | None = None) -> bool:
    """One panel per (swept-key combination, metric) with data; panels without a finite value
    are left out rather than drawn empty. ``pairs``: (metric, title)."""
    cs = combos(df)
    panels = []
    for params in cs:
        sel = _select(df, params)
        for metric, title in pairs:
            v = sel.loc[sel.metric == metric, "value"].to_numpy(float)
            if np.isfinite(v).any():
                panels.append((metric, title, params))
    if not panels:
        return False
    ncols = ncols or min(len(pairs), 3)
    if len(panels) > 2 * ncols:
        ncols += 1  # many swept combinations: one more column rather than another row
    ncols = min(ncols, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols if ncols < 3 else 4.4 * ncols,
                                                    3.1 * nrows), squeeze=False)
    for ax, (metric, title, params) in zip(axes.flat, panels, strict=False):
        plot_metric(df, metric, title, ax, params)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    fig.tight_layout()
    _save(fig, path)
    return True


FIGURED = ("accumulated_chi2", "accumulated_kl", "intra_chi2", "intra_kl", "sampler_gap_kl")


def other_metrics(df: pd.DataFrame) -> list[str]:
    """Every metric of the table not shown by the drift, intra, bound and pathwise figures, in
    a stable order (image runs: fid_local, kid, precision, recall, …)."""
    return [m for m in sorted(df.metric.unique()) if m not in FIGURED
            and not m.startswith(("bound_",) + PATHWISE_PREFIXES)] if len(df) else []


# ---- samples -----------------------------------------------------------------------------
def _flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).astype(np.float64)


def _project(x: np.ndarray, basis) -> np.ndarray:
    if basis is None:
        return x
    mean, comps = basis
    return (x - mean) @ comps.T


def _columns(G: int) -> list[int]:
    return sorted(set(np.linspace(0, G, min(G + 1, 6)).round().astype(int).tolist()))


def plot_scatter(store: RunStore, cfg: dict, path, params: dict | None = None) -> bool:
    """Samples per generation (columns) and α (rows), first seed; PCA of p to 2-D when d > 2
    (the paper's Fig. 1). ``params``: the swept keys' values of the chains to show."""
    params = params or {}
    alphas, seed = cfg["sweep"]["alphas"], cfg["sweep"]["seeds"][0]
    cols = _columns(cfg["loop"]["generations"])
    src = next((store.cell(a, seed, 0, params) for a in alphas
                if (store.cell(a, seed, 0, params) / "train.npy").exists()), None)
    if src is None:
        return False
    real = _flat(load_npy(src / "train.npy"))
    basis = None
    if real.shape[1] > 2:
        from sklearn.decomposition import PCA

        pca = PCA(2).fit(real[:5000])
        basis = (pca.mean_, pca.components_)
    ref = _project(real[:1000], basis)
    fig, axes = plt.subplots(len(alphas), len(cols), figsize=(2.2 * len(cols), 2.2 * len(alphas)),
                             squeeze=False, sharex=True, sharey=True)
    for r, a in enumerate(alphas):
        for c, g in enumerate(cols):
            ax = axes[r][c]
            ax.scatter(ref[:, 0], ref[:, 1], s=1, c="0.8")
            cell = store.cell(a, seed, g - 1, params) / "samples.npy"
            if g > 0 and cell.exists():
                x = _project(_flat(load_npy(cell)[:1000]), basis)
                ax.scatter(x[:, 0], x[:, 1], s=1, c="C0")
            elif g > 0:
                ax.text(0.5, 0.5, "not run", transform=ax.transAxes, ha="center")
            if r == 0:
                ax.set_title("p (data)" if g == 0 else f"p̂_{g}", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"α = {a:g}")
    extra = f" — {_label(params)}" if params else ""
    shown = ", ".join(str(g) for g in cols if g > 0)
    fig.suptitle(f"samples of p̂_g for generations g = {shown} (blue) over the data p (grey), "
                 f"seed {seed}{extra}" + (" — PCA of p" if basis else ""), fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return True


def image_grid(x: np.ndarray, rows: int = 8, cols: int = 8) -> np.ndarray:
    """First rows·cols images of an (n, C, H, W) array tiled into one (H', W'[, 3]) image in
    [0, 1] (scaled by the grid's 1st–99th percentile, so any value range displays)."""
    x = np.asarray(x[: rows * cols], dtype=np.float64)
    n, C, H, W = x.shape
    lo, hi = np.nanpercentile(x, [1, 99]) if np.isfinite(x).any() else (0.0, 1.0)
    x = np.clip((np.nan_to_num(x, nan=lo) - lo) / max(hi - lo, 1e-12), 0, 1)
    grid = np.ones((rows * (H + 1) + 1, cols * (W + 1) + 1, C))
    for k in range(n):
        r, c = divmod(k, cols)
        grid[1 + r * (H + 1): 1 + r * (H + 1) + H, 1 + c * (W + 1): 1 + c * (W + 1) + W] = \
            x[k].transpose(1, 2, 0)
    return grid[..., 0] if C == 1 else grid[..., :3]


def plot_image_grids(store: RunStore, cfg: dict, path, params: dict | None = None) -> bool:
    """8×8 image grids for runs whose samples are images: the first column is real data (q_0's
    training set, drawn from p), then p̂_g for the shown generations g (columns) × α (rows)."""
    params = params or {}
    alphas, seed = cfg["sweep"]["alphas"], cfg["sweep"]["seeds"][0]
    cols = [g for g in _columns(cfg["loop"]["generations"]) if g > 0]
    cells = {(a, g): store.cell(a, seed, g - 1, params) / "samples.npy" for a in alphas
             for g in cols}
    shapes = [np.load(p, mmap_mode="r").shape for p in cells.values() if p.exists()]
    if not shapes or len(shapes[0]) != 4:
        return False
    real = next((store.cell(a, seed, 0, params) / "train.npy" for a in alphas
                 if (store.cell(a, seed, 0, params) / "train.npy").exists()), None)
    real_x = load_npy(real) if real is not None else None
    if real_x is not None and real_x.ndim != 4:
        real_x = None
    lead = [0] if real_x is not None else []
    fig, axes = plt.subplots(len(alphas), len(lead) + len(cols),
                             figsize=(2.4 * (len(lead) + len(cols)), 2.4 * len(alphas)),
                             squeeze=False)
    for r, a in enumerate(alphas):
        for c, g in enumerate(lead + cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if g == 0:
                ax.imshow(image_grid(real_x), cmap="gray", vmin=0, vmax=1)
            elif cells[(a, g)].exists():
                ax.imshow(image_grid(load_npy(cells[(a, g)])), cmap="gray", vmin=0, vmax=1)
            else:
                ax.text(0.5, 0.5, "not run", transform=ax.transAxes, ha="center")
            if r == 0:
                ax.set_title("real data (p)" if g == 0 else f"p̂_{g}", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"α = {a:g}")
    extra = f" — {_label(params)}" if params else ""
    shown = ", ".join(str(g) for g in cols)
    fig.suptitle(f"real data, then samples of p̂_g for generations g = {shown}, seed {seed}"
                 f"{extra}", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return True


# ---- bounds, regimes, pathwise quantities ---------------------------------------------------
def errorbar_over_seeds(ax, rows: pd.DataFrame, col: str, se_col: str | None, color,
                        label: str, style: str = "-", x: str = "generation") -> bool:
    """Seed mean of ``col`` per ``x`` with error bars of ± 2 standard errors of that mean from
    the estimates' own standard errors (√Σ se² / n: the noise a bound check allows), and each
    seed as a thin line when there are fewer than FEW_SEEDS seeds. False if nothing finite."""
    v = rows[col].to_numpy(float)
    if not np.isfinite(v).any():
        return False
    rows = rows.assign(_v=np.where(np.isfinite(v), v, np.nan))
    if se_col is not None and se_col in rows:
        rows["_se"] = pd.to_numeric(rows[se_col], errors="coerce")
    else:
        rows["_se"] = np.nan
    xs, m, e = [], [], []
    for g, grp in rows.groupby(x, sort=True):
        fin = grp[np.isfinite(grp["_v"])]
        xs.append(int(g))
        m.append(fin["_v"].mean() if len(fin) else np.nan)
        se = fin["_se"].to_numpy(float)
        e.append(2 * math.sqrt(np.nansum(se ** 2)) / len(fin) if len(fin) and
                 np.isfinite(se).any() else 0.0)
    if "seed" in rows and 1 < rows["seed"].nunique() < FEW_SEEDS:
        for _, grp in rows.groupby("seed"):
            grp = grp.sort_values(x)
            ax.plot(grp[x].astype(int), grp["_v"], style, color=color, lw=0.7, alpha=0.45)
    ax.errorbar(xs, m, yerr=e, fmt=style, marker="o", ms=3, color=color, capsize=2, lw=1.5,
                label=label)
    return True


def plot_bounds(df: pd.DataFrame, path) -> bool:
    """Each bound_* metric against what it bounds, per α: bound dashed, measured solid, seed
    means with ± 2 standard errors (errorbar_over_seeds). The measured value is the row's
    ``measured`` column when present, else the metric it bounds (BOUND_TARGETS)."""
    b = bound_rows(df)
    if b.empty:
        return False
    names = sorted(b.metric.unique())
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        rows = b[b.metric == name]
        for k, (a, grp) in enumerate(rows.groupby("alpha")):
            errorbar_over_seeds(ax, grp, "value", "stderr", f"C{k}", f"bound, α = {a:g}", "--")
            if "measured" in grp.columns and grp["measured"].notna().any():
                errorbar_over_seeds(ax, grp, "measured", None, f"C{k}", f"measured, α = {a:g}")
            elif name in BOUND_TARGETS:
                # The loop checks the Girsanov bounds against q_i pushed to t0 when it can.
                metric = BOUND_TARGETS[name]
                if (df.metric == f"{metric}_t0").any():
                    metric = f"{metric}_t0"
                tgt = df[(df.metric == metric) & (df.alpha == a)]
                est = pick_estimator(tgt, metric)
                errorbar_over_seeds(ax, tgt[tgt.estimator == est], "value", "stderr",
                                    f"C{k}", f"measured, α = {a:g}")
        ax.set_title(f"{name.replace('_', ' ')}: {BOUND_LABELS.get(name, '')}\n"
                     "(dashed: bound, solid: measured; seed means ± 2 s.e.)", fontsize=8)
        ax.set_xlabel("generation i")
        ax.set_ylabel("divergence")
        _int_ticks(ax)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_pathwise(df: pd.DataFrame, path) -> bool:
    """ε⋆², ε̂² (and any other score_energy_* row) and η per generation and α over seeds."""
    names = sorted(m for m in df.metric.unique() if m.startswith(PATHWISE_PREFIXES))
    return _metric_figure(df, [(n, metric_label(n)) for n in names], path,
                          ncols=min(3, max(1, len(names))))


def _bounds_table(df: pd.DataFrame) -> str:
    b = bound_rows(df)
    if b.empty:
        return "<p>No bound_* rows in results.parquet (the bounds were not evaluated).</p>"
    keep = [c for c in swept_columns(b) + ["alpha", "seed", "generation", "metric", "value",
                                           "measured", "direction", "held", "status", "note"]
            if c in b.columns]
    t = b[keep].rename(columns={"value": "bound"}).copy()
    if "status" in t.columns and t["status"].notna().all():
        # The theory layer's verdict code (identity rows are neither held nor failed).
        t["held"] = t.pop("status").map(status_text)
    elif "held" in t.columns:
        t = t.drop(columns=["status"], errors="ignore")
        t["held"] = t["held"].map(lambda h: status_text(
            Status.HELD if h is True or h == 1 else
            Status.FAILED if h is False or h == 0 else Status.NO_CLAIM))
    if "held" in t.columns:
        counts = t.groupby(["metric", "held"]).size().unstack(fill_value=0)
        head = "<h3>Held / failed per bound</h3>" + counts.to_html()
    else:
        head = ""
    return head + "<h3>Every bound row</h3>" + _table(t, 400)


# ---- tables ---------------------------------------------------------------------------------
def final_table(df: pd.DataFrame) -> pd.DataFrame:
    """D at the last generation per (swept keys, α): the answer to 'how does drift depend on
    α?'. Columns: swept keys, alpha, generation, metric, estimator, mean, ci_low, ci_high (the
    95% interval over seeds, store.seed_interval), half ((high − low)/2), n, nonfinite."""
    out, fallback = pd.DataFrame(), None
    acc = df[df.metric.isin(["accumulated_chi2", "accumulated_kl"])]
    newest = int(acc.generation.max()) if len(acc) else 0
    for metric in ("accumulated_chi2", "accumulated_kl"):
        sub = best_rows(df, metric)
        if sub.empty:
            continue
        if int(sub.generation.max()) < newest:
            # E.g. χ² of a network model: only the convention D_0 = 0 exists (no exact law,
            # no sample-based χ² estimator configured); the answer is at the newest generation.
            fallback = f"{metric} has no estimate at generation {newest}"
            continue
        swept = swept_columns(sub)
        last_g = sub.groupby(swept, dropna=False).generation.transform("max") if swept else \
            sub.generation.max()
        sub = sub[sub.generation == last_g]
        # A finite value whose own uncertainty is infinite (e.g. the feature χ² proxy near its
        # finiteness boundary, where bootstrap replicates diverge) cannot rank α.
        flagged = int((np.isfinite(sub.value) & np.isinf(sub.stderr)).sum()) \
            if "stderr" in sub else 0
        summ = summarize(sub).rename(columns={"half_width": "half", "n_nonfinite": "nonfinite"})
        cols = swept + ["alpha", "generation", "metric", "estimator", "mean", "ci_low",
                        "ci_high", "half", "n", "nonfinite"]
        out = summ[cols].reset_index(drop=True)
        out.attrs["seeds"] = sub  # the per-seed values, for the figure
        finite = np.isfinite(out["mean"].to_numpy(float)).all()
        if finite and not flagged:
            break
        # χ² infinite or unreliable for some α at the last generation (heavy tails): the answer
        # must compare like with like across α, so fall back to KL (where KL exists).
        fallback = f"{metric} has no finite mean at the last generation for every α" \
            if not finite else (f"{metric} is flagged unreliable (infinite uncertainty) for "
                                f"{flagged} of {len(sub)} seed values at the last generation")
    if fallback and len(out) and out.metric.iloc[0] != "accumulated_chi2":
        out.attrs["fallback"] = fallback
    return out


def value_with_interval(r) -> str:
    """'0.81 (95% interval 0.52–1.3, 2 seeds)' for a final_table row; no interval from one
    seed (never '± nan')."""
    d = r._asdict() if hasattr(r, "_asdict") else dict(r)
    n, mean = int(d.get("n", 0)), float(d["mean"])
    lo, hi = float(d.get("ci_low", math.nan)), float(d.get("ci_high", math.nan))
    if n < 2 or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{_fmt(mean)} ({n} finite seed{'s' if n != 1 else ''}, no interval)"
    return f"{_fmt(mean)} (95% interval {_fmt(lo, 2)}–{_fmt(hi, 2)}, {n} seeds)"


def answer_sentence(table: pd.DataFrame) -> str:
    """One sentence per swept-key combination on how the last-generation drift depends on α."""
    if table.empty:
        return "No drift measurements yet: results.parquet holds no accumulated_* rows."
    out = []
    if table.attrs.get("fallback") and table.metric.iloc[0] == "accumulated_kl":
        out.append(f"({table.attrs['fallback']}, so KL is shown.)")
    swept = swept_columns(table)
    groups = table.groupby(swept) if swept else [((), table)]
    for key, grp in groups:
        grp = grp.sort_values("alpha")
        where = ""
        if swept:
            key = key if isinstance(key, tuple) else (key,)
            where = " (" + ", ".join(f"{k}={v}" for k, v in zip(swept, key, strict=True)) + ")"
        name = "D" if grp.metric.iloc[0] == "accumulated_chi2" else "KL(p̂ ‖ p)"
        g = int(grp.generation.iloc[0])
        vals = ", ".join(f"{value_with_interval(r)} at α = {r.alpha:g}"
                         for r in grp.itertuples(index=False))
        m = grp["mean"].to_numpy(float)
        if len(grp) == 1:
            trend = f"Only α = {grp.alpha.iloc[0]:g} was run"
        elif not np.isfinite(m).all():
            trend = "Some α have no finite mean, so no trend can be stated"
        elif (np.diff(m) < 0).all():
            trend = "Drift falls as the fresh-data fraction α grows"
        elif (np.diff(m) > 0).all():
            trend = "Drift rises as the fresh-data fraction α grows"
        else:
            trend = "Drift does not change monotonically with α"
        overlap = ""
        if len(grp) > 1 and np.isfinite(m).all():
            lo, hi = grp.iloc[0], grp.iloc[-1]
            a_lo, a_hi = sorted([lo, hi], key=lambda r: r["mean"])
            if np.isfinite([a_lo.ci_high, a_hi.ci_low]).all() and a_lo.ci_high >= a_hi.ci_low:
                overlap = " (the 95% intervals of the extreme α overlap)"
        bad = int(grp.nonfinite.sum())
        flag = f"; {bad} seed value(s) are inf/NaN and are left out of the means" if bad else ""
        out.append(f"{trend}{where}{overlap}: {name} at generation {g} is {vals}{flag}.")
    return " ".join(out)


def timing_table(store: RunStore) -> pd.DataFrame:
    """Seconds per generation (fit, sample, measure) from every computed cell's metrics.json;
    generation-0 cells adopted from another α are left out (they were not computed)."""
    rows = []
    cells = store.root / "cells"
    for path in sorted(cells.rglob("metrics.json")) if cells.exists() else []:
        meta = read_json(path)
        if "shared_from_alpha" in meta or not meta.get("timings"):
            continue
        g = int(re.sub(r"^generation=", "", path.parent.name))
        rows.append({"generation": g, **{k: float(v) for k, v in meta["timings"].items()}})
    if not rows:
        return pd.DataFrame()
    t = pd.DataFrame(rows)
    parts = [c for c in t.columns if c != "generation"]
    t["total"] = t[parts].sum(axis=1)
    agg = t.groupby("generation").agg(["mean", "count"])
    out = pd.DataFrame({f"{c} (s, mean)": agg[(c, "mean")] for c in parts + ["total"]})
    out["cells"] = agg[("total", "count")]
    return out.reset_index()


def plot_timings(table: pd.DataFrame, path) -> bool:
    if table.empty:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 2.5))
    bottom = np.zeros(len(table))
    for col in [c for c in table.columns if c.endswith("(s, mean)") and not c.startswith("total")]:
        ax.bar(table.generation, table[col], bottom=bottom, label=col.split(" ")[0])
        bottom += table[col].to_numpy()
    ax.set_xlabel("generation i")
    _int_ticks(ax)
    ax.set_ylabel("seconds (mean over chains)")
    ax.set_title("time per generation", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_final(table: pd.DataFrame, path) -> bool:
    """Last-generation drift against α: each seed's value and the mean with fewer than
    FEW_SEEDS seeds, else the mean with its 95% interval over seeds: the answer at a glance."""
    if table.empty:
        return False
    fig, ax = plt.subplots(figsize=(5.4, 3.4))
    swept = swept_columns(table)
    groups = table.groupby(swept) if swept else [((), table)]
    seeds = table.attrs.get("seeds")
    few = int(table.n.max()) < FEW_SEEDS
    for k, (key, grp) in enumerate(groups):
        grp = grp.sort_values("alpha")
        key = key if isinstance(key, tuple) else (key,)
        lab = ", ".join(f"{c}={v}" for c, v in zip(swept, key, strict=True)) or "mean"
        if few:
            ax.plot(grp.alpha, grp["mean"], marker="o", color=f"C{k}", lw=2, label=lab)
            if seeds is not None and len(seeds):
                pts = _select(seeds, dict(zip(swept, key, strict=True)))
                v = pts.value.to_numpy(float)
                ax.plot(pts.alpha[np.isfinite(v)], v[np.isfinite(v)], "o", mfc="none",
                        color=f"C{k}", ms=5, alpha=0.7,
                        label="each seed" if k == 0 else None)
        else:
            m = grp["mean"].to_numpy(float)
            err = np.vstack([m - grp.ci_low.to_numpy(float), grp.ci_high.to_numpy(float) - m])
            ax.errorbar(grp.alpha, m, yerr=np.nan_to_num(err), marker="o", capsize=3,
                        color=f"C{k}", label=lab)
        _mark_nonfinite(ax, grp, x="alpha")
    metric, est = table.metric.iloc[0], table.estimator.iloc[0]
    ax.set_xlabel("fresh-data fraction α")
    ax.set_ylabel(metric_axis(metric))
    spread = "each seed and the mean" if few else "mean and 95% interval over seeds"
    ax.set_title(f"{metric_label(metric)} at generation {int(table.generation.max())}\n"
                 f"({estimator_label(est)}; {spread})", fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return True


# ---- samplers and models side by side (ODE vs SDE vs flow matching) ---------------------------
ARM_KEYS = ("score.objective", "sampler.kind")


def _arm_of(row, cfg: dict | None) -> str:
    base = {"score.objective": ((cfg or {}).get("score") or {}).get("objective", "dsm"),
            "sampler.kind": ((cfg or {}).get("sampler") or {}).get("kind", "euler_maruyama")}
    vals = {k: row[k] if k in row and pd.notna(row[k]) else base[k] for k in ARM_KEYS}
    return f"{vals['score.objective']} + {vals['sampler.kind']}"


def sampler_comparison(df: pd.DataFrame, cfg: dict | None = None) -> pd.DataFrame:
    """Per arm (objective + sampler), α and generation i (seed means): KL(p̂_{i+1} ‖ p) by kNN
    and by flow_likelihood (ODE arms), χ²(p̂_{i+1} ‖ p) by flow_likelihood, the score error
    against p (score_energy_target), and their ratios KL(p̂_{i+1} ‖ p) / ε_p,i² — the fraction
    of the score error visible in the output, the role η plays for the SDE (docs/paper.md §3-4) —
    with kNN's KL (every arm, one estimator's bias for all) and flow_likelihood's (ODE arms).
    Empty without such rows."""
    want = {("accumulated_kl", "knn"): "D_kl_knn", ("accumulated_kl", "flow_likelihood"):
            "D_kl_flow", ("accumulated_chi2", "flow_likelihood"): "D_chi2_flow",
            ("score_energy_target", "monte_carlo"): "eps2_target",
            ("score_energy_ideal", "monte_carlo"): "eps_star2",
            ("score_energy_learned", "monte_carlo"): "eps_hat2"}
    sub = df[[(m, e) in want for m, e in zip(df.metric, df.estimator, strict=True)]]
    if sub.empty or not (sub.metric == "score_energy_target").any():
        return pd.DataFrame()
    sub = sub.assign(arm=[_arm_of(r, cfg) for _, r in sub.iterrows()],
                     col=[want[(m, e)] for m, e in zip(sub.metric, sub.estimator, strict=True)])
    # D of generation i+1 is compared with the score error of generation i.
    shift = sub.col.str.startswith("D_")
    sub = sub.assign(generation=sub.generation - shift.astype(int))
    sub = sub[sub.generation >= 0]
    wide = sub.pivot_table(index=["arm", "alpha", "generation"], columns="col", values="value",
                           aggfunc="mean").reset_index()
    se = sub.pivot_table(index=["arm", "alpha", "generation"], columns="col", values="stderr",
                         aggfunc=lambda v: float(np.sqrt(np.mean(np.square(v))) / np.sqrt(len(v))))
    se = se.reset_index()
    for c in ("D_kl_knn", "D_kl_flow", "D_chi2_flow", "eps2_target", "eps_star2", "eps_hat2"):
        if c not in wide:
            wide[c], se[c] = np.nan, np.nan
    for est_ in ("knn", "flow"):  # delta-method stderr of a ratio of independent estimates
        num, num_se = wide[f"D_kl_{est_}"], se[f"D_kl_{est_}"]
        r = num / wide.eps2_target
        wide[f"ratio_{est_}"] = r
        wide[f"ratio_{est_}_se"] = r.abs() * np.sqrt((num_se / num) ** 2
                                                     + (se.eps2_target / wide.eps2_target) ** 2)
    cols = ["arm", "alpha", "generation", "D_kl_knn", "D_kl_flow", "D_chi2_flow", "eps_star2",
            "eps_hat2", "eps2_target", "ratio_knn", "ratio_knn_se", "ratio_flow",
            "ratio_flow_se"]
    return wide[cols].sort_values(["alpha", "generation", "arm"]).reset_index(drop=True)


def plot_sampler_comparison(table: pd.DataFrame, path) -> bool:
    """One column per α: KL(p̂_{i+1} ‖ p) per arm (kNN solid, flow_likelihood dashed) and the
    ratio KL / ε_p² per arm, against generation i."""
    if table.empty:
        return False
    alphas = sorted(table.alpha.unique())
    fig, axes = plt.subplots(2, len(alphas), figsize=(4.2 * len(alphas), 7), squeeze=False)
    for c, a in enumerate(alphas):
        t = table[table.alpha == a]
        for k, (arm, g) in enumerate(t.groupby("arm")):
            g = g.sort_values("generation")
            col = f"C{k}"
            axes[0][c].plot(g.generation + 1, g.D_kl_knn, "o-", color=col, ms=3,
                            label=f"{arm} (kNN)")
            if g.D_kl_flow.notna().any():
                axes[0][c].plot(g.generation + 1, g.D_kl_flow, "s--", color=col, ms=3,
                                label=f"{arm} (flow)")
            axes[1][c].errorbar(g.generation, g.ratio_knn, yerr=g.ratio_knn_se, fmt="o-",
                                color=col, ms=3, capsize=2, label=f"{arm} (kNN)")
            if g.ratio_flow.notna().any():
                axes[1][c].errorbar(g.generation, g.ratio_flow, yerr=g.ratio_flow_se, fmt="s--",
                                    color=col, ms=3, capsize=2, label=f"{arm} (flow)")
        axes[0][c].set_title(f"KL(p̂_i ‖ p), α = {a:g}", fontsize=9)
        axes[0][c].set_xlabel("generation i")
        axes[1][c].set_title(f"KL(p̂_(i+1) ‖ p) / ε_p,i², α = {a:g}", fontsize=9)
        axes[1][c].set_xlabel("generation i")
        for ax in (axes[0][c], axes[1][c]):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.tight_layout()
    _save(fig, path)
    return True


# ---- the report ----------------------------------------------------------------------------
def build_report(root, progress=None) -> list:
    """Write DIR/figures/*.png, DIR/summary.{parquet,csv} and DIR/report.html; returns the
    figure paths. ``progress(step)``, when given, is called with a short description before
    each step (the CLI shows it while the report builds)."""
    say = progress or (lambda step: None)
    store = RunStore(root)
    cfg = yaml.safe_load(store.config_path.read_text())
    if isinstance(cfg, dict) and cfg.get("experiment") == "observability":
        from .observability import build_observability_report

        return build_observability_report(root)
    say("summary over seeds")
    df = pd.read_parquet(store.results_path) if store.results_path.exists() else store.collect()
    write_summary(store, df)
    store.figures.mkdir(parents=True, exist_ok=True)
    F = store.figures
    figs: dict[str, list[Path]] = {k: [] for k in ("answer", "drift", "intra", "bounds",
                                                   "pathwise", "other", "samples", "grids",
                                                   "timing")}
    table = final_table(df)
    steps = [
        ("answer", "final_drift", lambda p: plot_final(table, p)),
        ("drift", "accumulated", lambda p: _metric_figure(
            df, [(m, metric_label(m)) for m in ("accumulated_chi2", "accumulated_kl")], p)),
        ("intra", "intra", lambda p: _metric_figure(
            df, [(m, metric_label(m)) for m in ("intra_chi2", "intra_kl")], p)),
        # The sampler's own drift, beside D_i measured on its actual samples (accumulated.png
        # shows the ideal law's D_i wherever its exact density is known).
        ("drift", "sampler_gap", lambda p: (df.metric == "sampler_gap_kl").any()
         and _metric_figure(df[(df.metric == "sampler_gap_kl")
                               | ((df.metric == "accumulated_kl")
                                  & df.estimator.isin(["exact", "knn"]))],
                            [("sampler_gap_kl", "KL(sampler's p̂_i ‖ ideal p̂_i)"),
                             ("accumulated_kl", "KL(sampler's p̂_i ‖ p)")], p)),
        ("pathwise", "pathwise", lambda p: plot_pathwise(df, p)),
        ("other", "other_metrics", lambda p: _metric_figure(
            df, [(m, metric_label(m)) for m in other_metrics(df)], p, ncols=3)),
        ("bounds", "bounds", lambda p: plot_bounds(df, p)),
    ]
    for key, name, draw in steps:
        say(f"figure {name}")
        if draw(F / f"{name}.png"):
            figs[key].append(F / f"{name}.png")
    for k, params in enumerate(combos(df)):
        suffix = "" if not params else f"_{k}"
        say(f"samples{suffix}")
        if plot_scatter(store, cfg, F / f"samples{suffix}.png", params):
            figs["samples"].append(F / f"samples{suffix}.png")
        if plot_image_grids(store, cfg, F / f"grid{suffix}.png", params):
            figs["grids"].append(F / f"grid{suffix}.png")
    cmp_table = sampler_comparison(df, cfg)
    if plot_sampler_comparison(cmp_table, F / "ode_vs_sde.png"):
        figs["ode"] = [F / "ode_vs_sde.png"]
    say("bound checks")
    bt = evaluate_bounds(df, cfg)
    theory_figs = bound_figures(bt, df, cfg, F) if _has_chain_rows(df) else {}
    figs.update({k: [v] for k, v in theory_figs.items()})
    say("timings")
    times = timing_table(store)
    if plot_timings(times, F / "timings.png"):
        figs["timing"].append(F / "timings.png")
    env_path = store.root / "environment.json"
    env = json.loads(env_path.read_text()) if env_path.exists() else {
        **environment(), "recorded": "at report time (the run left no environment.json)"}
    say("report.html")
    atomic_write_text(store.root / "report.html",
                      _html(cfg, df, table, figs, times, env, failures(store), bt))
    return [p for paths in figs.values() for p in paths]


def _details(summary: str, body: str) -> str:
    """A collapsed block (the long tables live here, out of the page's height)."""
    return f"<details><summary>{html.escape(summary)}</summary>{body}</details>"


def _has_chain_rows(df: pd.DataFrame) -> bool:
    return not df.empty and df.metric.isin(["accumulated_chi2", "score_energy_ideal"]).any()


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def note_kind(note: str) -> str:
    """A note with its numbers replaced by '#': notes that differ only in their numbers (a
    Pareto k̂, a stderr) are one kind."""
    return _NUMBER.sub("#", " ".join(str(note).split()))


def notes_by_kind(df: pd.DataFrame, col: str = "note", keys=("metric", "estimator"),
                  example_len: int = 240, by_kind: bool = True) -> pd.DataFrame:
    """Rows with a non-empty ``col`` grouped by ``keys`` and (``by_kind``) the note's kind
    (note_kind): the count and one example per group, most frequent first."""
    sub = df[df[col].fillna("").astype(str) != ""] if len(df) else df
    keys = [k for k in keys if k in sub.columns]
    if sub.empty:
        return pd.DataFrame(columns=[*keys, "rows", "example"])
    sub = sub.assign(_kind=sub[col].astype(str).map(note_kind) if by_kind else "")
    g = (sub.groupby([*keys, "_kind"], dropna=False, sort=False)
         .agg(rows=(col, "size"), example=(col, "first")).reset_index())
    g["example"] = g.example.map(lambda t: t if len(t) <= example_len
                                 else t[: example_len - 1] + "…")
    return g.drop(columns="_kind").sort_values([*keys[:1], "rows"],
                                               ascending=[True] * len(keys[:1]) + [False])


def _join(values) -> str:
    vals = [f"{v:g}" if isinstance(v, float) else str(v) for v in values]
    return "{" + ", ".join(vals) + "}"


def run_description(cfg: dict) -> list[tuple[str, str]]:
    """What was run, in words, from the resolved configuration (not the preset's description,
    which overrides make stale): (what, how) pairs."""
    def get(section, key, default="?"):
        return (cfg.get(section) or {}).get(key, default)

    t = cfg.get("target") or {}
    kind = t.get("kind", "?")
    if kind == "ring":
        target = (f"ring of {t.get('n_components')} Gaussians in 2-D (radius "
                  f"{t.get('radius')}, std {t.get('std')})")
    elif kind == "paper_gmm":
        target = f"the paper's Gaussian mixture in d = {t.get('dim')} (std {t.get('std')})"
    elif kind == "gmm":
        target = f"Gaussian mixture of {len(t.get('means') or [])} components in d = {t.get('dim')}"
    elif kind == "dataset":
        target = f"images of the {t.get('dataset')} dataset"
        if t.get("classes"):
            target += f" (classes {_join(t['classes'])})"
    else:
        target = str(kind)
    sc = cfg.get("score") or {}
    skind = sc.get("kind", "?")
    if skind in ("kde", "population_kde"):
        score = (f"{'finite' if skind == 'kde' else 'population (N → ∞)'} KDE, bandwidth "
                 f"{sc.get('bandwidth')}")
    elif skind == "mlp":
        score = (f"MLP ({sc.get('layers')} × {sc.get('hidden')}), "
                 f"{sc.get('train_steps')} training steps")
    elif skind == "unet":
        score = f"U-Net (base {sc.get('base_channels')} channels)"
    elif skind == "analytic":
        score = "the exact score of q_i (oracle)"
    else:
        score = str(skind)
    sw = cfg.get("sweep") or {}
    grid = sw.get("grid") or {}
    sweep = f"α ∈ {_join(sw.get('alphas', []))} × seeds {_join(sw.get('seeds', []))}"
    for k, v in grid.items():
        sweep += f" × {k} ∈ {_join(v)}"
    est = cfg.get("estimators") or {}
    measured = ", ".join((["exact densities"] if est.get("exact") else [])
                         + list(est.get("sample_based") or [])
                         + list(est.get("extra") or []))
    return [
        ("target p", target),
        ("score model", score),
        ("forward process", f"{get('process', 'kind')}, T = {get('process', 'T')}"),
        ("sampler", f"{get('sampler', 'kind')}, {get('sampler', 'steps')} steps"
                    + (f" ({get('sampler', 'schedule')} grid)"
                       if get('sampler', 'schedule', None) else "")
                    + f" down to t0 = {get('sampler', 't0')}"),
        ("loop", f"{get('loop', 'policy')}, {get('loop', 'generations')} generations, "
                 f"{get('loop', 'n_train')} training points"),
        ("chains", sweep),
        ("measured", measured or "—"),
        ("device", str(cfg.get("device", "cpu"))),
    ]


def _dl(pairs) -> str:
    return ("<dl class='run'>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>"
                                         for k, v in pairs) + "</dl>")


def _theory_sections(cfg, df, bt, imgs) -> list[tuple[str, str, str]]:
    """Report sections of the bounds layer (docs/paper.md §4), each only when its rows exist:
    (id, title, body)."""
    if not _has_chain_rows(df):
        return []
    out = []
    chk = bound_checks(bt)
    sentence = f'<p class="answer">{html.escape(bounds_sentence(bt))}</p>'
    if len(chk):
        sg = chk[chk.kind == "single_generation"]
        body = sentence
        if len(sg):
            body += ("<p>Each check compares a measured divergence with its bound, allowing "
                     "two standard errors of both. The single-generation bounds are checked "
                     "against the divergence from q_i pushed to t0 (intra_*_t0): the paper's "
                     "Girsanov argument controls the ideal reverse process's output and "
                     "ignores the t0 shrink. <b>held</b>: on the right side (within noise); "
                     "<b>FAILED</b>: on the wrong side beyond noise; <b>no claim</b>: a "
                     "premise fails (transient i &lt; i0, ε⋆² &gt; 1, outside the clean "
                     "regime; the KL bound of Prop 3.1 has none of these) or the measurement "
                     "is unreliable (NaN); <b>identity</b>: for a score exact for its own "
                     "law KL(p̂_t0 ‖ q_t0) = KL(p̂_T ‖ q_T) + ½ ε̂² holds with equality, so "
                     "nothing is tested — calibration_eps_hat then says whether the ε̂² "
                     "estimate is <b>consistent</b> with it.</p>")
        body += (imgs.get("bound_checks", "") + "<h3>Held / FAILED / no claim per α</h3>"
                 "<p>Each cell: checks that held / FAILED / made no claim (over seeds and "
                 "generations).</p>")
        body += _table(_overview_wide(bounds_overview(bt)))
        bad = chk[status_codes(chk) != Status.HELD]
        if len(bad):
            agg = notes_by_kind(bad, "reason", ("check", "status", "cause"), by_kind=False)
            body += ("<h3>Checks that failed or made no claim, by cause</h3>"
                     "<p>Grouped by check, status and cause, with the count and one "
                     "example; every row is in the appendix.</p>" + _table(agg))
        out.append(("bound-checks", "Bound checks per generation (Fig. 3/4)", body))
    rec = imgs.get("recursion", "") + imgs.get("prediction", "")
    if rec:
        pr = bt[bt.kind == "prediction"]
        body = ("<p>The recursion D_(i+1) + (1−α)² D_i ≥ (α/2) I_i per generation "
                "(exact-density χ² rows where available), and measured D_N against the "
                "discounted sum Σ_i (1−α)^(2(N−i)) ε⋆,i² of the measured score energies — "
                "a ≲ relation, so the ratio is reported, not a pass/fail.</p>"
                f"<div class='row'>{rec}</div>")
        if len(pr):
            keep = swept_columns(pr) + ["alpha", "generation"]
            last = pr[pr.generation == pr.groupby(keep[:-1], dropna=False).generation
                      .transform("max")] if keep[:-1] else pr
            g = last.groupby(keep, dropna=False).agg(
                measured=("measured", lambda v: seed_mean(list(v))),
                predicted=("bound", lambda v: seed_mean(list(v)))).reset_index()
            g["ratio"] = g.measured / g.predicted
            body += "<h3>Last generation: measured D_N and the prediction (seed means)</h3>"
            body += _table(g)
        out.append(("prediction", "Recursion and the discounted-sum prediction", body))
    if imgs.get("discount_heatmap"):
        out.append((
            "discount", "Discount heat-map (Fig. 5)",
            "<p>Weight (1−α)^(2(N−i)) of generation i's score error in D_(N+1): a memory of "
            "about 1/(2α) generations — broad at small α, near-diagonal at large α.</p>"
            + imgs["discount_heatmap"]))
    if imgs.get("observability_generations"):
        out.append(("observability-generations", "Observability η across generations "
                    "(Fig. 9)", imgs["observability_generations"]))
    reg = bt[bt.kind == "regime"] if len(bt) else bt
    if len(reg):
        keep = swept_columns(reg) + ["alpha", "status", "reason"]
        out.append(("regimes", "Regime per α and its evidence",
                    _table(reg[keep].rename(columns={"status": "regime",
                                                     "reason": "evidence"}))))
    return out


def _overview_wide(over: pd.DataFrame) -> pd.DataFrame:
    """bounds_overview (one row per α and check) as one row per α, one column per check, each
    cell 'held / FAILED / no claim' and any identity / calibration counts (a flat header)."""
    if over.empty:
        return over
    extra = [s for s in ("identity", "consistent", "inconsistent") if s in over.columns]
    keys = [c for c in over.columns
            if c not in ("check", "held", "FAILED", "no claim", *extra)]
    # identity / calibration statuses are counted after the three verdicts, where present
    cell = over.assign(_c=[
        f"{r['held']} / {r['FAILED']} / {r['no claim']}"
        + "".join(f", {r[s]} {s}" for s in extra if r[s])
        for _, r in over.iterrows()])
    wide = cell.pivot_table(index=keys, columns="check", values="_c", aggfunc="first")
    wide.columns.name = None
    return wide.reset_index().fillna("—")


def _bounds_section(df: pd.DataFrame, img: str) -> tuple[str, str]:
    """The bound_* rows the run stored: the figure, held/FAILED/no-claim counts per bound
    (flat header), and the aggregated notes; every row goes to the appendix."""
    b = bound_rows(df)
    if b.empty:
        return "<p>No bound_* rows in results.parquet (the bounds were not evaluated).</p>", ""
    keep = [c for c in swept_columns(b) + ["alpha", "seed", "generation", "metric", "value",
                                           "measured", "direction", "held", "note"]
            if c in b.columns]
    t = b[keep].rename(columns={"value": "bound"}).copy()
    body = img
    if "held" in t.columns:
        t["held"] = t["held"].map(lambda h: status_text(
            Status.HELD if h is True or h == 1 else
            Status.FAILED if h is False or h == 0 else Status.NO_CLAIM))
        counts = t.groupby(["metric", "held"]).size().unstack(fill_value=0)
        counts = counts.reindex(columns=[c for c in ("held", "FAILED", "no claim")
                                         if c in counts.columns])
        counts.columns.name = None
        body += "<h3>Held / FAILED / no claim per bound</h3>" + _table(counts.reset_index())
    if "note" in t.columns:
        agg = notes_by_kind(t.rename(columns={"held": "verdict"}), "note",
                            ("metric", "verdict"))
        if len(agg):
            body += "<h3>Why, by kind</h3>" + _table(agg)
    appendix = _details(f"every stored bound row ({len(t)})", _table(t, 2000))
    return body, appendix


def _sampler_section(df, cfg, imgs) -> tuple[str, str, str] | None:
    """ODE vs SDE vs flow matching side by side, when the run has score_energy_target rows."""
    table = sampler_comparison(df, cfg)
    if table.empty:
        return None
    body = ("<p>Per arm (training objective + sampler): KL(p̂_(i+1) ‖ p) by kNN for every arm "
            "and by flow_likelihood (the ODE models' own change-of-variables densities, exact "
            "up to the integrator's error) for ODE arms; ε⋆² and ε̂² (generation 0, against "
            "q_0 = p; ε̂² along the arm's own sampler paths), the score error against p at "
            "every generation (eps2_target) and ratio = KL(p̂_(i+1) ‖ p) / ε_p,i², the share "
            "of the score error that the sampler's output shows (with kNN's KL for every arm, "
            "flow_likelihood's for ODE arms). Seed means; stderr by the delta method.</p>"
            + imgs.get("ode", "") + _table(table, 400))
    return ("ode-vs-sde", "Samplers and models side by side (ODE, SDE, flow matching)", body)


def _html(cfg, df, table, figs, times, env, fails, bt=None) -> str:
    imgs = {k: "".join(_img(p) for p in v) for k, v in figs.items()}
    bt = bt if bt is not None else evaluate_bounds(df, cfg)
    theory = _theory_sections(cfg, df, bt, imgs)
    vals = df.value.to_numpy(float) if len(df) else np.array([])
    nonfinite = df[~np.isfinite(vals)] if len(df) else df
    cols = swept_columns(df) + ["alpha", "seed", "generation", "metric", "estimator", "value",
                                "note"]

    # -- the one-screen summary: what was run, the answer, the key figure, the status ----------
    ans_table = table.drop(columns=["half"], errors="ignore").rename(
        columns={"ci_low": "95% low", "ci_high": "95% high", "n": "finite seeds",
                 "nonfinite": "inf/NaN seeds"})
    status = []
    if fails:
        status.append(f"<b class='bad'>{len(fails)} chain(s) failed</b> — re-run the command "
                      "to resume (<a href='#failures'>details</a>)")
    if len(nonfinite):
        status.append(f"{len(nonfinite)} of {len(df)} values are inf/NaN, each with its reason "
                      "(<a href='#notes'>notes</a>)")
    chk = bound_checks(bt)
    if len(chk):
        status.append(html.escape(bounds_sentence(bt, reasons=False))
                      + " (<a href='#bound-checks'>bound checks</a>)")
    summary = (
        f"<h1>collapselab report: {html.escape(str(cfg.get('name', '')))}</h1>"
        "<section id='answer' class='summary'><div class='left'>"
        f'<p class="answer">{html.escape(answer_sentence(table))}</p>'
        + _dl(run_description(cfg))
        + ("<ul class='status'>" + "".join(f"<li>{x}</li>" for x in status) + "</ul>"
           if status else "")
        + "</div><div class='right'>" + imgs["answer"] + _table(ans_table) + "</div></section>"
    )

    sections: list[tuple[str, str, str]] = []
    if fails:
        ft = pd.DataFrame([{k: f[k] for k in ("chain", "generation", "error", "log")}
                           for f in fails])
        sections.append(("failures", "Failed chains (re-run the command to resume)",
                         _table(ft)))
    sections += [
        ("drift", "Accumulated drift D_i (χ² and KL) per α",
         (f"<p class='method'>{SEEDS_NOTE} {LAW_NOTE}</p>" + imgs["drift"]) if imgs["drift"]
         else "<p>no accumulated_* rows with a finite value</p>"),
        ("intra", "One-generation error I_i (χ² and KL) per α",
         imgs["intra"] or "<p>no intra_* rows with a finite value</p>"),
    ]
    if imgs["pathwise"]:
        sections.append(("pathwise", "Score energies and observability", imgs["pathwise"]))
    if imgs["other"]:
        sections.append(("other", "Other measurements per generation", imgs["other"]))
    bounds_body, bounds_appendix = _bounds_section(df, imgs["bounds"])
    if len(bound_rows(df)):
        if any(sid == "bound-checks" for sid, _, _ in theory):
            # The checks below re-evaluate these bounds: the run's own verdicts stay one click
            # away rather than repeating a page of the same curves.
            bounds_body = ("<p>The verdicts the run stored while it ran (the checks below "
                           "re-evaluate them from results.parquet).</p>"
                           + _details("the stored bound rows: figure and counts", bounds_body))
        sections.append(("bounds", "Bound rows stored by the run (bound_* metrics)",
                         bounds_body))
    sections += theory
    ode = _sampler_section(df, cfg, imgs)
    if ode is not None:
        sections.append(ode)
    sections.append(("samples", "Samples per generation",
                     f"<div class='row'>{imgs['samples']}</div>" if imgs["samples"]
                     else "<p>no samples</p>"))
    if imgs["grids"]:
        sections.append(("grids", "Sample grids (real data first)", imgs["grids"]))
    # -- notes: aggregated by kind; every row in the appendix ---------------------------------
    count = (nonfinite.assign(kind=np.where(np.isposinf(nonfinite.value.to_numpy(float)), "inf",
                                            np.where(np.isneginf(nonfinite.value.to_numpy(
                                                float)), "−inf", "NaN")))
             .groupby(["metric", "estimator", "kind"]).size().rename("rows").reset_index()
             if len(nonfinite) else pd.DataFrame())
    notes = notes_by_kind(df) if len(df) else pd.DataFrame()
    notes_body = (
        (f'<p class="bad">{len(nonfinite)} of {len(df)} value(s) are infinite or NaN: never '
         "averaged, marked with a red × in the figures.</p>" + _table(count)
         if len(nonfinite) else "<p>Every value is finite.</p>")
        + "<h3>Notes by kind</h3><p>Rows of results.parquet with a note, grouped by metric, "
          "estimator and the note's wording (numbers aside), with one example each.</p>"
        + _table(notes)
        + f"<p class='method'>{INTERVAL_NOTE}</p>")
    sections.append(("notes", "Infinite / unreliable values, notes and error bars", notes_body))
    sections.append(("timing", "Time per generation", imgs["timing"] + _details(
        "the table", _table(times))))
    sections.append(("config", "Configuration and environment", _details(
        "resolved configuration (config.yaml)",
        f"<pre>{html.escape(yaml.safe_dump(cfg, sort_keys=False))}</pre>")
        + _details("versions and device (environment.json)", _table(pd.DataFrame(
            [{"key": k, "value": str(v)} for k, v in env.items()])))))
    appendix = ""
    if len(nonfinite):
        appendix += _details(f"every infinite or NaN value ({len(nonfinite)})",
                             _table(nonfinite[cols], 5000))
    noted = df[df.note.fillna("").astype(str) != ""] if len(df) else df
    if len(noted):
        appendix += _details(f"every row with a note ({len(noted)})", _table(noted[cols], 5000))
    appendix += bounds_appendix
    if len(chk):
        bad = chk[status_codes(chk) != Status.HELD]
        if len(bad):
            keep = swept_columns(bad) + ["alpha", "seed", "generation", "check", "status",
                                         "cause", "reason"]
            appendix += _details(f"every bound check that failed or made no claim ({len(bad)})",
                                 _table(bad[keep], 5000))
    if appendix:
        sections.append(("appendix", "Appendix: every row (collapsed)", appendix))
    toc = ("<nav><b>Contents</b>: " + " · ".join(
        f"<a href='#{sid}'>{html.escape(title.split(' (')[0])}</a>" for sid, title, _ in sections)
        + "</nav>")
    body = summary + toc + "".join(_section(*sec) for sec in sections)
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>collapselab report: {html.escape(str(cfg.get('name', '')))}</title><style>"
        "body{font-family:sans-serif;max-width:1200px;margin:auto;padding:0 1em;"
        "line-height:1.35}h1{font-size:1.5em;margin:.4em 0}h2{border-bottom:1px solid #ccc;"
        "margin-top:1.2em}"
        "td,th{padding:2px 8px;text-align:left;vertical-align:top}"
        "table.t{border-collapse:collapse;font-size:12px;font-variant-numeric:tabular-nums}"
        "table.t th{background:#e8e8e8}table.t tr:nth-child(even){background:#f4f4f4}"
        "table.t td{max-width:48em}img{max-width:100%}"
        ".answer{font-size:1.1em;background:#eef5ff;padding:.6em;border-left:4px solid #36c}"
        ".summary{display:flex;gap:1.5em;align-items:flex-start}.summary .left{flex:1 1 50%}"
        ".summary .right{flex:1 1 50%}dl.run{display:grid;grid-template-columns:max-content 1fr;"
        "gap:2px 1em;margin:.5em 0}dl.run dt{font-weight:bold}dl.run dd{margin:0}"
        "nav{background:#f6f6f6;padding:.5em;margin:1em 0}"
        ".row{display:flex;gap:1em;flex-wrap:wrap}.row figure{flex:1 1 45%}"
        ".method{font-size:.9em;color:#444}details{margin:.4em 0}summary{cursor:pointer}"
        ".bad{color:#b00}figure{margin:.6em 0}figcaption{font-size:11px;color:#777}"
        "</style></head><body>" + body + "</body></html>"
    )


# ---- the bound figures and `collapselab bounds` (the table: report/bounds.py) --------------
def _mean_by_gen(frame: pd.DataFrame, col: str) -> pd.Series:
    """Mean over seeds per generation; +∞ if any seed is +∞, NaN if none is finite."""
    return frame.groupby("generation")[col].agg(lambda v: seed_mean(list(v)))


def plot_bound_checks(bt: pd.DataFrame, path) -> bool:
    """The paper's Fig. 3/4: per α, the measured divergences against KL ≤ ½ ε̂², χ² ≥ ηε⋆²/8
    and the two-sided ¼ηε⋆² ≤ χ² ≤ 4ε⋆² (seed means; red × where a seed FAILED, grey ring
    where a check made no claim)."""
    sg = bt[bt.kind == "single_generation"] if len(bt) else bt
    if sg.empty:
        return False
    alphas = sorted(sg.alpha.unique())
    panels = [("KL ≤ ½ ε̂²", ["bound_kl_upper"]), ("χ² ≥ η ε⋆²/8", ["bound_chi2_lower_clean"]),
              ("¼ η ε⋆² ≤ χ² ≤ 4 ε⋆²", ["bound_chi2_lower", "bound_intra_upper"])]
    # Only the panels some α has data for (no empty column when, e.g., η was not measured).
    panels = [(t, n) for t, n in panels if sg.check.isin(n).any()]
    if not panels:
        return False
    fig, axes = plt.subplots(len(alphas), len(panels), figsize=(4.2 * len(panels) + 0.6,
                                                                2.8 * len(alphas)),
                             squeeze=False)
    for r, a in enumerate(alphas):
        for col, (title, names) in enumerate(panels):
            ax = axes[r][col]
            rows = sg[(sg.alpha == a) & sg.check.isin(names)]
            if rows.empty:
                ax.set_axis_off()
                continue
            present = [n for n in names if (rows.check == n).any()]
            names = present  # e.g. no η rows: only the upper half of the two-sided panel
            meas = rows[rows.check == present[0]]
            if (status_codes(meas) == Status.IDENTITY).all():
                # Score exact for its own law: the panel compares two sides of an identity.
                title = "KL_t0 vs ½ ε̂² (identity: calibrates ε̂²)"
            m = _mean_by_gen(meas, "measured")
            errorbar_over_seeds(ax, meas, "measured", "measured_stderr", "C0",
                                f"measured {meas.measured_metric.iloc[0]}")
            for k, name in enumerate(names):
                b = rows[rows.check == name]
                if not errorbar_over_seeds(ax, b, "bound", "bound_stderr", f"C{k + 1}",
                                           f"bound {BOUND_LABELS[name]}", "--"):
                    continue
                bad = b[b.status == "FAILED"]
                if len(bad):
                    ax.plot(bad.generation.astype(int), bad.measured, "x", color="red", ms=8,
                            mew=2, label="FAILED (a seed)")
                nc = b[b.status == "no claim"]
                if len(nc) and k == 0:
                    ax.plot(nc.generation.astype(int), nc.measured.fillna(m.mean()), "o",
                            mfc="none", color="0.5", ms=7, label="no claim")
            if np.nanmin(np.r_[m.to_numpy(float), 1.0]) > 0:
                ax.set_yscale("log")
            ax.set_title(f"α = {a:g}: {title}", fontsize=9)
            _int_ticks(ax)
            ax.set_xlabel("generation i")
            ax.set_ylabel("divergence")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
    fig.suptitle("seed means ± 2 standard errors (thin lines: each seed)", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return True


def _measured_against_bound(rows: pd.DataFrame, path, *, measured: str, bound: str,
                            xlabel: str, title: str, yscale: str, mark,
                            yscale_kw: dict | None = None) -> bool:
    """Per α, the seed mean of ``measured`` (solid) against that of ``bound`` (dashed);
    ``mark(ax, colour, group, measured_means)`` adds the figure's own markers."""
    if rows.empty or not (np.isfinite(rows.measured.to_numpy(float)).any()
                          or np.isfinite(rows.bound.to_numpy(float)).any()):
        return False  # nothing to draw: no empty panel
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for k, (a, grp) in enumerate(rows.groupby("alpha")):
        m = _mean_by_gen(grp, "measured")
        errorbar_over_seeds(ax, grp, "measured", "measured_stderr", f"C{k}",
                            f"{measured}, α = {a:g}")
        errorbar_over_seeds(ax, grp, "bound", "bound_stderr", f"C{k}", f"{bound}, α = {a:g}",
                            "--")
        mark(ax, f"C{k}", grp, m)
    ax.set_yscale(yscale, **(yscale_kw or {}))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("χ² divergence")
    _int_ticks(ax)
    ax.set_title(title + "\n(seed means ± 2 s.e.)", fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_recursion(bt: pd.DataFrame, path) -> bool:
    """D_{i+1} + (1−α)² D_i (solid) against (α/2) I_i (dashed) per α, seed means."""

    def failed(ax, colour, grp, _):
        bad = grp[grp.status == "FAILED"]
        if len(bad):
            ax.plot(bad.generation.astype(int), bad.measured, "x", color="red", ms=8, mew=2)

    return _measured_against_bound(
        bt[bt.kind == "recursion"] if len(bt) else bt, path,
        measured="D_(i+1) + (1−α)² D_i", bound="(α/2) I_i", xlabel="generation i",
        title="recursion D_(i+1) + (1−α)² D_i ≥ (α/2) I_i (seed means; × = FAILED)",
        yscale="symlog", yscale_kw={"linthresh": 1e-3}, mark=failed)


def plot_prediction(bt: pd.DataFrame, path) -> bool:
    """Measured D_N (solid) against the discounted sum of the measured ε⋆,i² (dashed)."""

    def infinite(ax, colour, _, m):
        inf = m[np.isposinf(m.to_numpy(float))]
        if len(inf):
            ax.plot(inf.index.astype(int), np.full(len(inf), 0.96), "^", color=colour,
                    transform=ax.get_xaxis_transform(), label="D = ∞")

    return _measured_against_bound(
        bt[bt.kind == "prediction"] if len(bt) else bt, path,
        measured="measured D", bound="Σ (1−α)^(2(N−i)) ε⋆,i²", xlabel="generation N",
        title="D_N against the discounted-sum prediction (seed means)", yscale="log",
        mark=infinite)


def plot_discount(alphas, generations: int, path) -> bool:
    """The paper's Fig. 5: weight (1−α)^{2(N−i)} of generation i's error in D_{N+1}, per α."""
    from ..theory import discount_matrix

    alphas = sorted(float(a) for a in alphas)
    if not alphas or generations < 1:
        return False
    fig, axes = plt.subplots(1, len(alphas), figsize=(3.3 * len(alphas), 3.0), squeeze=False)
    for ax, a in zip(axes[0], alphas, strict=True):
        W = discount_matrix(a, generations)
        im = ax.imshow(np.where(W > 0, W, np.nan), cmap="viridis", vmin=0, vmax=1,
                       origin="upper")
        ax.set_title(f"α = {a:g}", fontsize=9)
        _int_ticks(ax)
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("past generation i (its ε⋆,i²)")
        ax.set_ylabel("D_(N+1): row N")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="(1−α)^(2(N−i))")
    fig.suptitle("discounted decomposition: weight of each past error", fontsize=9)
    _save(fig, path)
    return True


def plot_eta_generations(df: pd.DataFrame, path) -> bool:
    """The paper's Fig. 9: observability η_i across generations per α."""
    if df.empty or not (df.metric == "observability").any():
        return False
    fig, ax = plt.subplots(figsize=(5.5, 3.0))
    plot_metric(df, "observability", "η_i across generations", ax)
    ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
    fig.tight_layout()
    _save(fig, path)
    return True


def bound_figures(bt: pd.DataFrame, df: pd.DataFrame, cfg: dict, F: Path) -> dict[str, Path]:
    """Draw every figure of the bounds layer into F; returns {name: path} of those drawn."""
    out = {}
    alphas = (cfg.get("sweep", {}) or {}).get("alphas") or sorted(df.alpha.dropna().unique())
    G = int((cfg.get("loop", {}) or {}).get("generations", 0) or 0)
    for name, draw in (("bound_checks", lambda p: plot_bound_checks(bt, p)),
                       ("recursion", lambda p: plot_recursion(bt, p)),
                       ("prediction", lambda p: plot_prediction(bt, p)),
                       ("discount_heatmap", lambda p: plot_discount(alphas, G, p)),
                       ("observability_generations", lambda p: plot_eta_generations(df, p))):
        if draw(F / f"{name}.png"):
            out[name] = F / f"{name}.png"
    return out


def write_bounds(root, *, i0: int | None = None, C: float | None = None,
                 c: float | None = None, n_sigma: float = 2.0, figures: bool = True):
    """``collapselab bounds DIR``: DIR/bounds.parquet, DIR/bounds.csv and the bound figures.
    Returns (bounds table, {figure name: path})."""
    store = RunStore(root)
    cfg = yaml.safe_load(store.config_path.read_text()) or {}
    df = pd.read_parquet(store.results_path)
    bt = evaluate_bounds(df, cfg, i0=i0, C=C, c=c, n_sigma=n_sigma)
    buf = io.BytesIO()
    bt.to_parquet(buf, index=False)
    atomic_write_bytes(store.root / "bounds.parquet", buf.getvalue())
    atomic_write_text(store.root / "bounds.csv", bt.to_csv(index=False))
    if not figures:
        return bt, {}
    store.figures.mkdir(parents=True, exist_ok=True)
    return bt, bound_figures(bt, df, cfg, store.figures)
