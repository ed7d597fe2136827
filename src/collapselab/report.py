"""Figures and a self-contained report.html from a run directory (results.parquet + cells)."""

from __future__ import annotations

import base64
import html
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from .store import RunStore, atomic_write_bytes, atomic_write_text, load_npy  # noqa: E402

# Preference order when several estimators measured the same metric.
ESTIMATOR_ORDER = ["exact", "monte_carlo", "classifier", "knn", "gaussian_features"]


def pick_estimator(df: pd.DataFrame, metric: str) -> str | None:
    have = df.loc[df.metric == metric, "estimator"].unique().tolist()
    for e in ESTIMATOR_ORDER:
        if e in have and (e != "exact" or len(have) == 1):
            return e
    return have[0] if have else None


def seed_summary(df: pd.DataFrame, metric: str, estimator: str) -> pd.DataFrame:
    """Per (α, generation): mean over seeds, 95% t-interval half-width, count, #non-finite."""
    sub = df[(df.metric == metric) & (df.estimator == estimator)]
    out = []
    for (a, g), grp in sub.groupby(["alpha", "generation"]):
        v = grp.value.to_numpy(float)
        fin = v[np.isfinite(v)]
        n = len(fin)
        mean = float(fin.mean()) if n else math.nan
        if n > 1:
            from scipy import stats

            half = float(stats.t.ppf(0.975, n - 1) * fin.std(ddof=1) / math.sqrt(n))
        else:
            half = math.nan
        out.append(dict(alpha=a, generation=g, mean=mean, half=half, n=n,
                        nonfinite=int((~np.isfinite(v)).sum())))
    return pd.DataFrame(out)


def plot_metric(df: pd.DataFrame, metric: str, title: str, ax) -> bool:
    est = pick_estimator(df, metric)
    if est is None:
        return False
    summ = seed_summary(df, metric, est)
    for a, grp in summ.groupby("alpha"):
        grp = grp.sort_values("generation")
        line, = ax.plot(grp.generation, grp["mean"], marker="o", ms=3, label=f"α = {a:g}")
        lo, hi = grp["mean"] - grp.half.fillna(0), grp["mean"] + grp.half.fillna(0)
        ax.fill_between(grp.generation, lo, hi, color=line.get_color(), alpha=0.2)
        bad = grp[grp.nonfinite > 0]
        if len(bad):
            ax.plot(bad.generation, np.full(len(bad), ax.get_ylim()[1]), "^",
                    color=line.get_color(), label=f"α = {a:g}: inf/unreliable")
    ax.set_xlabel("generation i")
    ax.set_title(f"{title}\n[{est}; mean over seeds, 95% band]", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return True


def _project(x: np.ndarray, basis) -> np.ndarray:
    if x.shape[1] <= 2:
        return x
    mean, comps = basis
    return (x - mean) @ comps.T


def plot_scatter(store: RunStore, cfg: dict, path) -> bool:
    """Samples per generation (columns) and α (rows), first seed; PCA to 2-D when d > 2."""
    alphas, seed = cfg["sweep"]["alphas"], cfg["sweep"]["seeds"][0]
    G = cfg["loop"]["generations"]
    cols = sorted(set(np.linspace(0, G, min(G + 1, 6)).round().astype(int).tolist()))
    first = store.cell(alphas[0], seed, 0)
    if not (first / "train.npy").exists():
        return False
    real = load_npy(first / "train.npy").astype(np.float64)
    basis = None
    if real.shape[1] > 2:
        from sklearn.decomposition import PCA

        pca = PCA(2).fit(real)
        basis = (pca.mean_, pca.components_)
    ref = _project(real[:1000], basis)
    fig, axes = plt.subplots(len(alphas), len(cols), figsize=(2.2 * len(cols), 2.2 * len(alphas)),
                             squeeze=False, sharex=True, sharey=True)
    for r, a in enumerate(alphas):
        for c, g in enumerate(cols):
            ax = axes[r][c]
            ax.scatter(ref[:, 0], ref[:, 1], s=1, c="0.8")
            cell = store.cell(a, seed, g - 1) / "samples.npy"
            if g > 0 and cell.exists():
                x = _project(load_npy(cell)[:1000].astype(np.float64), basis)
                ax.scatter(x[:, 0], x[:, 1], s=1, c="C0")
            elif g > 0:
                ax.text(0.5, 0.5, "not run", transform=ax.transAxes, ha="center")
            if r == 0:
                ax.set_title("p (data)" if g == 0 else f"p̂_{g}", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"α = {a:g}")
    fig.suptitle("samples per generation (grey: p)" + (" — PCA of p" if basis else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _save(fig, path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def final_table(df: pd.DataFrame) -> pd.DataFrame:
    """D at the last generation per α: the answer to 'how does drift depend on α?'."""
    est = pick_estimator(df, "accumulated_chi2") or pick_estimator(df, "accumulated_kl")
    if est is None:
        return pd.DataFrame()
    metric = "accumulated_chi2" if pick_estimator(df, "accumulated_chi2") else "accumulated_kl"
    summ = seed_summary(df, metric, est)
    last = summ[summ.generation == summ.generation.max()]
    return last.assign(metric=metric, estimator=est)[
        ["alpha", "generation", "metric", "estimator", "mean", "half", "n", "nonfinite"]
    ]


def build_report(root) -> list:
    """Write DIR/figures/*.png and DIR/report.html; returns the figure paths."""
    store = RunStore(root)
    cfg = yaml.safe_load(store.config_path.read_text())
    df = pd.read_parquet(store.results_path) if store.results_path.exists() else store.collect()
    store.figures.mkdir(parents=True, exist_ok=True)
    figs = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ok = plot_metric(df, "accumulated_chi2", "D_i = χ²(p̂_i ‖ p)", axes[0])
    ok |= plot_metric(df, "accumulated_kl", "KL(p̂_i ‖ p)", axes[1])
    if ok:
        _save(fig, store.figures / "accumulated.png")
        figs.append(store.figures / "accumulated.png")
    else:
        plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ok = plot_metric(df, "intra_chi2", "I_i = χ²(p̂_{i+1} ‖ q_i)", axes[0])
    ok |= plot_metric(df, "intra_kl", "KL(p̂_{i+1} ‖ q_i)", axes[1])
    if ok:
        _save(fig, store.figures / "intra.png")
        figs.append(store.figures / "intra.png")
    else:
        plt.close(fig)
    if plot_scatter(store, cfg, store.figures / "samples.png"):
        figs.append(store.figures / "samples.png")
    atomic_write_text(store.root / "report.html", _html(cfg, df, figs))
    return figs


def _html(cfg: dict, df: pd.DataFrame, figs) -> str:
    table = final_table(df)
    rows = "".join(
        f"<tr><td>{r.alpha:g}</td><td>{r['mean']:.4g} ± {r.half:.2g}</td><td>{r.n}</td>"
        f"<td>{r.nonfinite}</td></tr>"
        for _, r in table.iterrows()
    )
    answer = ""
    if len(table):
        answer = (
            f"<p>Drift after {int(table.generation.max())} generations "
            f"({html.escape(table.metric.iloc[0])}, estimator {html.escape(table.estimator.iloc[0])}"
            f"; mean ± 95% half-width over seeds):</p><table><tr><th>α</th><th>D</th>"
            f"<th>seeds</th><th>inf/unreliable</th></tr>{rows}</table>"
        )
    imgs = "".join(
        f'<h3>{html.escape(p.stem)}</h3><img src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}" style="max-width:100%">'
        for p in figs
    )
    notes = df[df.note.fillna("") != ""][["alpha", "seed", "generation", "metric", "estimator", "note"]]
    notes_html = notes.head(50).to_html(index=False) if len(notes) else "<p>none</p>"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>collapselab report</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}td,th{padding:2px 8px}"
        "</style></head><body>"
        f"<h1>collapselab: {html.escape(str(cfg.get('name', '')))}</h1>{answer}{imgs}"
        f"<h2>Notes on inf / unreliable values</h2>{notes_html}"
        f"<h2>Configuration</h2><pre>{html.escape(yaml.safe_dump(cfg, sort_keys=False))}</pre>"
        "</body></html>"
    )
