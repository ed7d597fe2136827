"""Figures and a self-contained report.html from a run directory (results.parquet + cells).

The report opens with the answer to the question a sweep asks — how does the drift at the last
generation depend on α — then shows D_i and I_i per α with seed bands, bound/regime rows when
present, samples per generation, sample grids for image runs, timings, configuration and the
environment. Every figure is also written to DIR/figures as PNG and embedded in the HTML as
base64, so report.html is one file that opens anywhere.
"""

from __future__ import annotations

import base64
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

from .store import (  # noqa: E402
    RESULT_COLUMNS,
    RunStore,
    atomic_write_bytes,
    atomic_write_text,
    failures,
    load_npy,
    read_json,
    summarize,
    write_summary,
)

# Preference order when several estimators measured the same metric.
ESTIMATOR_ORDER = ["exact", "monte_carlo", "classifier", "knn", "gaussian_features"]
# A bound row's measured counterpart when the row carries no ``measured`` column.
BOUND_TARGETS = {"bound_kl_upper": "intra_kl", "bound_chi2_lower": "intra_chi2",
                 "bound_chi2_lower_clean": "intra_chi2", "bound_intra_upper": "intra_chi2"}
PATHWISE_PREFIXES = ("score_energy_", "observability")


def swept_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in RESULT_COLUMNS and "." in c]


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


def seed_summary(df: pd.DataFrame, metric: str, estimator: str) -> pd.DataFrame:
    """Per (swept keys, α, generation): mean over seeds, 95% t half-width ``half``, count ``n``
    of finite values and ``nonfinite`` (see :func:`store.summarize`)."""
    sub = df[(df.metric == metric) & (df.estimator == estimator)]
    s = summarize(sub)
    return s.rename(columns={"half_width": "half", "n_nonfinite": "nonfinite"})


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


def plot_metric(df: pd.DataFrame, metric: str, title: str, ax, params: dict | None = None) -> bool:
    """Mean over seeds per α with a 95% band; seeds with inf/NaN marked by a red ×."""
    sub = best_rows(_select(df, params or {}), metric)
    if sub.empty:
        return False
    est = "/".join(dict.fromkeys(e for e in ESTIMATOR_ORDER + sorted(set(sub.estimator))
                                 if e in set(sub.estimator)))
    # One curve per α: cells measured by different estimators are joined along generations.
    summ = summarize(sub.assign(estimator=est)).rename(
        columns={"half_width": "half", "n_nonfinite": "nonfinite"})
    for a, grp in summ.groupby("alpha"):
        grp = grp.sort_values("generation")
        line, = ax.plot(grp.generation, grp["mean"], marker="o", ms=3, label=f"α = {a:g}")
        lo, hi = grp["mean"] - grp.half.fillna(0), grp["mean"] + grp.half.fillna(0)
        ax.fill_between(grp.generation, lo, hi, color=line.get_color(), alpha=0.2)
    _mark_nonfinite(ax, summ.groupby("generation", as_index=False).nonfinite.sum())
    ax.set_xlabel("generation i")
    extra = f" — {_label(params)}" if params else ""
    ax.set_title(f"{title}{extra}\n[{est}; mean over seeds, 95% band]", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return True


def _metric_figure(df, pairs, path) -> bool:
    cs = combos(df)
    fig, axes = plt.subplots(len(cs), 2, figsize=(10, 3.8 * len(cs)), squeeze=False)
    ok = False
    for r, params in enumerate(cs):
        for c, (metric, title) in enumerate(pairs):
            if not plot_metric(df, metric, title, axes[r][c], params):
                axes[r][c].set_axis_off()
            else:
                ok = True
    if ok:
        fig.tight_layout()
        _save(fig, path)
    else:
        plt.close(fig)
    return ok


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
    fig.suptitle(f"samples per generation, seed {seed} (grey: p){extra}"
                 + (" — PCA of p" if basis else ""), fontsize=9)
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
    """8×8 sample grids per generation (columns) × α (rows) for runs whose samples are images."""
    params = params or {}
    alphas, seed = cfg["sweep"]["alphas"], cfg["sweep"]["seeds"][0]
    cols = [g for g in _columns(cfg["loop"]["generations"]) if g > 0]
    cells = {(a, g): store.cell(a, seed, g - 1, params) / "samples.npy" for a in alphas
             for g in cols}
    shapes = [np.load(p, mmap_mode="r").shape for p in cells.values() if p.exists()]
    if not shapes or len(shapes[0]) != 4:
        return False
    fig, axes = plt.subplots(len(alphas), len(cols), figsize=(2.4 * len(cols), 2.4 * len(alphas)),
                             squeeze=False)
    for r, a in enumerate(alphas):
        for c, g in enumerate(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if cells[(a, g)].exists():
                ax.imshow(image_grid(load_npy(cells[(a, g)])), cmap="gray", vmin=0, vmax=1)
            else:
                ax.text(0.5, 0.5, "not run", transform=ax.transAxes, ha="center")
            if r == 0:
                ax.set_title(f"p̂_{g}", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"α = {a:g}")
    extra = f" — {_label(params)}" if params else ""
    fig.suptitle(f"samples per generation, seed {seed}{extra}", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return True


# ---- bounds, regimes, pathwise quantities ---------------------------------------------------
def bound_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df[df.metric.str.startswith("bound_")]


def plot_bounds(df: pd.DataFrame, path) -> bool:
    """Each bound_* metric against what it bounds, per α (mean over seeds): bound dashed,
    measured solid. The measured value is the row's ``measured`` column when present, else the
    metric it bounds (BOUND_TARGETS)."""
    b = bound_rows(df)
    if b.empty:
        return False
    names = sorted(b.metric.unique())
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        rows = b[b.metric == name]
        for k, (a, grp) in enumerate(rows.groupby("alpha")):
            m = grp.groupby("generation").value.mean()
            ax.plot(m.index, m.values, "--", color=f"C{k}", label=f"bound α = {a:g}")
            if "measured" in grp.columns and grp["measured"].notna().any():
                meas = grp.groupby("generation")["measured"].mean()
            elif name in BOUND_TARGETS:
                tgt = df[(df.metric == BOUND_TARGETS[name]) & (df.alpha == a)]
                est = pick_estimator(tgt, BOUND_TARGETS[name])
                meas = tgt[tgt.estimator == est].groupby("generation").value.mean()
            else:
                meas = None
            if meas is not None and len(meas):
                ax.plot(meas.index, meas.values, "-o", ms=3, color=f"C{k}",
                        label=f"measured α = {a:g}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("generation i")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_pathwise(df: pd.DataFrame, path) -> bool:
    """ε⋆², ε̂² and η per generation and α (mean over seeds, 95% band)."""
    names = sorted(m for m in df.metric.unique() if m.startswith(PATHWISE_PREFIXES))
    if not names:
        return False
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        plot_metric(df, name, name, ax)
    fig.tight_layout()
    _save(fig, path)
    return True


def _bounds_table(df: pd.DataFrame) -> str:
    b = bound_rows(df)
    if b.empty:
        return "<p>No bound_* rows in results.parquet (the bounds were not evaluated).</p>"
    keep = [c for c in swept_columns(b) + ["alpha", "seed", "generation", "metric", "value",
                                           "measured", "direction", "held", "note"]
            if c in b.columns]
    t = b[keep].rename(columns={"value": "bound"}).copy()
    if "held" in t.columns:
        t["held"] = t["held"].map(lambda h: "held" if h is True or h == 1 else
                                  ("FAILED" if h is False or h == 0 else "no claim"))
        counts = t.groupby(["metric", "held"]).size().unstack(fill_value=0)
        head = "<h3>Held / failed per bound</h3>" + counts.to_html()
    else:
        head = ""
    return head + "<h3>Every bound row</h3>" + _table(t, 400)


# ---- tables ---------------------------------------------------------------------------------
def final_table(df: pd.DataFrame) -> pd.DataFrame:
    """D at the last generation per (swept keys, α): the answer to 'how does drift depend on
    α?'. Columns: swept keys, alpha, generation, metric, estimator, mean, half, n, nonfinite."""
    out, fallback = pd.DataFrame(), None
    for metric in ("accumulated_chi2", "accumulated_kl"):
        sub = best_rows(df, metric)
        if sub.empty:
            continue
        swept = swept_columns(sub)
        last_g = sub.groupby(swept, dropna=False).generation.transform("max") if swept else \
            sub.generation.max()
        sub = sub[sub.generation == last_g]
        summ = summarize(sub).rename(columns={"half_width": "half", "n_nonfinite": "nonfinite"})
        cols = swept + ["alpha", "generation", "metric", "estimator", "mean", "half", "n",
                        "nonfinite"]
        out = summ[cols].reset_index(drop=True)
        if np.isfinite(out["mean"].to_numpy(float)).any():
            break
        # χ² unreliable for every α at the last generation (e.g. heavy tails): fall back to KL.
        fallback = f"{metric} has no finite mean at the last generation"
    if fallback and len(out) and out.metric.iloc[0] != "accumulated_chi2":
        out.attrs["fallback"] = fallback
    return out


def _fmt(x: float, digits: int = 4) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "NaN"
    if isinstance(x, float) and math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return f"{x:.{digits}g}"


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
        vals = ", ".join(f"{_fmt(m)} ± {_fmt(h, 2)} at α = {a:g}"
                         for a, m, h in zip(grp.alpha, grp["mean"], grp.half, strict=True))
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
            if abs(lo["mean"] - hi["mean"]) <= np.nan_to_num(lo.half) + np.nan_to_num(hi.half):
                overlap = " (the 95% intervals of the extreme α overlap)"
        bad = int(grp.nonfinite.sum())
        flag = f"; {bad} seed value(s) are inf/NaN and are left out of the means" if bad else ""
        out.append(f"{trend}{where}{overlap}: {name} at generation {g} is {vals}{flag}.")
    return " ".join(out)


def _table(df: pd.DataFrame, limit: int = 200) -> str:
    if df.empty:
        return "<p>none</p>"
    shown = df.head(limit).map(lambda v: _fmt(v) if isinstance(v, float) else v)
    more = f"<p>… {len(df) - limit} more rows in the data files.</p>" if len(df) > limit else ""
    return shown.to_html(index=False, escape=True, classes="t") + more


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
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bottom = np.zeros(len(table))
    for col in [c for c in table.columns if c.endswith("(s, mean)") and not c.startswith("total")]:
        ax.bar(table.generation, table[col], bottom=bottom, label=col.split(" ")[0])
        bottom += table[col].to_numpy()
    ax.set_xlabel("generation i")
    ax.set_ylabel("seconds (mean over chains)")
    ax.set_title("time per generation", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_final(table: pd.DataFrame, path) -> bool:
    """Last-generation drift against α with 95% intervals: the answer at a glance."""
    if table.empty:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.4))
    swept = swept_columns(table)
    groups = table.groupby(swept) if swept else [((), table)]
    for k, (key, grp) in enumerate(groups):
        grp = grp.sort_values("alpha")
        lab = ", ".join(f"{c}={v}" for c, v in zip(swept, key if isinstance(key, tuple)
                                                   else (key,), strict=True)) or None
        ax.errorbar(grp.alpha, grp["mean"], yerr=grp.half.fillna(0), marker="o", capsize=3,
                    color=f"C{k}", label=lab)
        _mark_nonfinite(ax, grp, x="alpha")
    ax.set_xlabel("fresh-data fraction α")
    ax.set_ylabel(f"{table.metric.iloc[0]} [{table.estimator.iloc[0]}]")
    ax.set_title(f"drift at generation {int(table.generation.max())} (mean, 95% t-interval)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    if swept or len(ax.get_legend_handles_labels()[0]):
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return True


def _save(fig, path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def environment() -> dict:
    """Versions and device of this machine (the run records its own in environment.json)."""
    import os
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        own = version("collapselab")
    except PackageNotFoundError:
        own = "unknown"
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "collapselab": own,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cuda_available": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
    }


# ---- the report ----------------------------------------------------------------------------
def build_report(root) -> list:
    """Write DIR/figures/*.png, DIR/summary.{parquet,csv} and DIR/report.html; returns the
    figure paths."""
    store = RunStore(root)
    cfg = yaml.safe_load(store.config_path.read_text())
    df = pd.read_parquet(store.results_path) if store.results_path.exists() else store.collect()
    write_summary(store, df)
    store.figures.mkdir(parents=True, exist_ok=True)
    F = store.figures
    figs: dict[str, list[Path]] = {k: [] for k in ("answer", "drift", "intra", "bounds",
                                                   "samples", "grids", "timing")}
    table = final_table(df)
    if plot_final(table, F / "final_drift.png"):
        figs["answer"].append(F / "final_drift.png")
    if _metric_figure(df, [("accumulated_chi2", "D_i = χ²(p̂_i ‖ p)"),
                           ("accumulated_kl", "KL(p̂_i ‖ p)")], F / "accumulated.png"):
        figs["drift"].append(F / "accumulated.png")
    if _metric_figure(df, [("intra_chi2", "I_i = χ²(p̂_{i+1} ‖ q_i)"),
                           ("intra_kl", "KL(p̂_{i+1} ‖ q_i)")], F / "intra.png"):
        figs["intra"].append(F / "intra.png")
    if plot_bounds(df, F / "bounds.png"):
        figs["bounds"].append(F / "bounds.png")
    if plot_pathwise(df, F / "pathwise.png"):
        figs["bounds"].append(F / "pathwise.png")
    for k, params in enumerate(combos(df)):
        suffix = "" if not params else f"_{k}"
        if plot_scatter(store, cfg, F / f"samples{suffix}.png", params):
            figs["samples"].append(F / f"samples{suffix}.png")
        if plot_image_grids(store, cfg, F / f"grid{suffix}.png", params):
            figs["grids"].append(F / f"grid{suffix}.png")
    times = timing_table(store)
    if plot_timings(times, F / "timings.png"):
        figs["timing"].append(F / "timings.png")
    env_path = store.root / "environment.json"
    env = json.loads(env_path.read_text()) if env_path.exists() else {
        **environment(), "recorded": "at report time (the run left no environment.json)"}
    atomic_write_text(store.root / "report.html",
                      _html(cfg, df, table, figs, times, env, failures(store)))
    return [p for paths in figs.values() for p in paths]


def _img(p: Path) -> str:
    data = base64.b64encode(p.read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(p.name)}</figcaption></figure>")


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{html.escape(title)}</h2>{body}</section>'


def _html(cfg, df, table, figs, times, env, fails) -> str:
    imgs = {k: "".join(_img(p) for p in v) for k, v in figs.items()}
    answer = (f'<p class="answer">{html.escape(answer_sentence(table))}</p>'
              + _table(table.rename(columns={"half": "95% half-width", "n": "finite seeds",
                                             "nonfinite": "inf/NaN seeds"}))
              + imgs["answer"])
    nonfinite = df[~np.isfinite(df.value.to_numpy(float))]
    cols = swept_columns(df) + ["alpha", "seed", "generation", "metric", "estimator", "value",
                                "note"]
    notes = (df[df.note.fillna("") != ""].groupby(["metric", "estimator", "note"]).size()
             .rename("rows").reset_index())
    bad_html = (f'<p class="bad">{len(nonfinite)} value(s) are infinite or NaN (marked with a '
                "red × in the figures and never averaged):</p>" + _table(nonfinite[cols])
                if len(nonfinite) else "<p>Every value is finite.</p>")
    fail_html = ""
    if fails:
        ft = pd.DataFrame([{k: f[k] for k in ("chain", "generation", "error", "log")}
                           for f in fails])
        fail_html = _section("failures", "Failed chains (re-run the command to resume)",
                             _table(ft))
    body = [
        f"<h1>collapselab: {html.escape(str(cfg.get('name', '')))}</h1>",
        f"<p>{html.escape(str(cfg.get('description', '')))}</p>",
        _section("answer", "How does drift depend on α?", answer),
        fail_html,
        _section("drift", "Accumulated divergence D_i (χ² and KL) per α",
                 imgs["drift"] or "<p>no accumulated_* rows</p>"),
        _section("intra", "Intra-generation divergence I_i (χ² and KL) per α",
                 imgs["intra"] or "<p>no intra_* rows</p>"),
        _section("nonfinite", "Infinite / unreliable values and their notes",
                 bad_html + "<h3>Notes by metric</h3>" + _table(notes)),
        _section("bounds", "Bounds and regimes",
                 imgs["bounds"] + _bounds_table(df)),
        _section("samples", "Samples per generation (PCA of p)",
                 imgs["samples"] or "<p>no samples</p>"),
        _section("grids", "Sample grids", imgs["grids"]) if imgs["grids"] else "",
        _section("timing", "Time per generation", imgs["timing"] + _table(times)),
        _section("config", "Resolved configuration",
                 f"<pre>{html.escape(yaml.safe_dump(cfg, sort_keys=False))}</pre>"),
        _section("environment", "Versions and device",
                 _table(pd.DataFrame([{"key": k, "value": str(v)} for k, v in env.items()]))),
    ]
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<title>collapselab report</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:0 1em}"
        "td,th{padding:2px 8px;text-align:right}table.t{border-collapse:collapse;font-size:13px}"
        "table.t tr:nth-child(even){background:#f4f4f4}img{max-width:100%}"
        ".answer{font-size:1.15em;background:#eef5ff;padding:.6em;border-left:4px solid #36c}"
        ".bad{color:#b00}figure{margin:1em 0}</style></head><body>"
        + "".join(body) + "</body></html>"
    )
