"""Check a run's exact-density χ² rows against an independent computation.

Usage:
    python benchmarks/check_chi2.py RUN_DIR [--ref-factor 20] [--seeds 0 1] [--max-gen G]
                                            [--grid-step H] [--metrics ...]

For every finite-KDE chain of RUN_DIR (score kind ``kde``, policy ``fresh_mixture``) the laws
are rebuilt from the cells' training sets: p̂_{g+1} = the KDE of generation g's training set
pushed to t0, q_g = α p + (1 − α) p̂_g (q_0 = p). Each stored row

    accumulated_chi2 (row g+1) = χ²(p̂_{g+1} ‖ p)
    intra_chi2       (row g)   = χ²(p̂_{g+1} ‖ q_g)
    intra_chi2_t0    (row g)   = χ²(p̂_{g+1} ‖ q_g pushed to t0)

is compared with

* d = 2: ∫ a²/b − 1 by the trapezoid rule on a grid of step H (default: the smallest component
  standard deviation / 4) over a box that holds every component and its tilted partner with a
  margin; error estimate |I_H − I_2H| (the trapezoid rule on Gaussian integrands converges
  faster than any power of H, so this over-states the error of I_H), plus the integrand's
  largest value on the box's edge times the box's perimeter times its decay length as a
  truncation check;
* d > 2: the stratified estimator itself with ``--ref-factor`` times the run's draws and an
  independent random stream.

Prints one line per row (z = (row − reference)/√(se_row² + se_ref²)) and a summary: the
fraction of exact-density χ² rows at generation ≥ 1 that are finite with a finite stderr, and
the fraction within 3 combined standard errors of the reference.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from collapselab.config import load_config
from collapselab.engine.loop import build_process, build_target
from collapselab.engine.store import RunStore, load_npy
from collapselab.measure.estimators import mixture_components, stratified_divergences
from collapselab.scores.kde import KDEScore
from collapselab.targets import GaussianMixture, LawMixture

EXACT_DENSITY = ("exact", "monte_carlo")
METRICS = ("accumulated_chi2", "intra_chi2", "intra_chi2_t0")


def grid_chi2(a, b, step: float | None = None, chunk: int = 20_000) -> tuple[float, float, float]:
    """(χ², error estimate, edge check) of χ²(a‖b) = ∫ a²/b − 1 in 2-D by the trapezoid rule."""
    _, mu_a, va = mixture_components(a)
    _, mu_b, vb = mixture_components(b)
    sd_min = math.sqrt(float(va.min()))
    step = step or sd_min / 4
    # Box: a's components, and how far N_j²/N_l can sit outside them (the mean shifts by
    # σ²/(2τ² − σ²)·‖μ_j − ν_l‖ at most, for the widest τ), with 12 tilted sds of margin.
    t2 = float(vb.max())
    s2 = float(va.max())
    reach = s2 / (2 * t2 - s2) * float(torch.cdist(mu_a, mu_b).min(1).values.max())
    sd_tilt = math.sqrt(s2 * t2 / (2 * t2 - s2))
    margin = reach + 12 * max(sd_tilt, math.sqrt(s2))
    lo = (mu_a.min(0).values - margin).numpy()
    hi = (mu_a.max(0).values + margin).numpy()
    nx = int(math.ceil((hi[0] - lo[0]) / step)) // 2 * 2 + 1  # odd: the 2H grid nests in it
    ny = int(math.ceil((hi[1] - lo[1]) / step)) // 2 * 2 + 1
    xs, ys = np.linspace(lo[0], hi[0], nx), np.linspace(lo[1], hi[1], ny)
    hx, hy = xs[1] - xs[0], ys[1] - ys[0]
    gx, gy = np.meshgrid(xs, ys, indexing="ij")
    pts = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], 1))
    f = torch.empty(len(pts), dtype=torch.float64)
    for i in range(0, len(pts), chunk):
        x = pts[i:i + chunk]
        f[i:i + chunk] = torch.exp(2 * a.log_prob(x).double() - b.log_prob(x).double())
    f = f.reshape(nx, ny).numpy()

    def trap(g, dx, dy):
        wx = np.full(g.shape[0], dx)
        wx[[0, -1]] *= 0.5
        wy = np.full(g.shape[1], dy)
        wy[[0, -1]] *= 0.5
        return float(wx @ g @ wy)

    fine = trap(f, hx, hy)
    coarse = trap(f[::2, ::2], 2 * hx, 2 * hy)
    edge = max(f[0].max(), f[-1].max(), f[:, 0].max(), f[:, -1].max())
    edge_mass = edge * 2 * ((hi[0] - lo[0]) + (hi[1] - lo[1])) * sd_tilt
    return fine - 1.0, abs(fine - coarse), float(edge_mass)


def chain_laws(cfg, store, alpha, seed, generations, dense: bool = False):
    """{g: (p̂_{g+1}, q_g, q_g pushed to t0, p)} rebuilt from the cells (finite KDE,
    fresh_mixture). ``dense``: the KDE laws as plain GaussianMixtures, whose log density is
    an (n, K) logsumexp, independent of the attention kernel (fast in 2-D)."""
    target, process, t0 = build_target(cfg), build_process(cfg), cfg.sampler.t0
    prev = None
    out = {}
    for g in range(generations):
        cell = store.cell(alpha, seed, g)
        if not (cell / "metrics.json").exists():
            break
        q = target if g == 0 else LawMixture([(alpha, target), (1 - alpha, prev)])
        centres = torch.from_numpy(load_npy(cell / "train.npy")).double()
        law = KDEScore(centres, cfg.score.bandwidth, process).output_law(t0)
        if dense:
            law = GaussianMixture.isotropic(law.scale * law.centres, math.sqrt(law.var))
        out[g] = (law, q, q.marginal(process, t0), target)
        prev = law
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--ref-factor", type=float, default=20.0,
                    help="d > 2: the reference uses this many times the run's draws")
    ap.add_argument("--seeds", type=int, nargs="*", default=None)
    ap.add_argument("--alphas", type=float, nargs="*", default=None)
    ap.add_argument("--max-gen", type=int, default=None)
    ap.add_argument("--grid-step", type=float, default=None)
    ap.add_argument("--metrics", nargs="*", default=list(METRICS))
    args = ap.parse_args(argv)

    store = RunStore(args.run_dir)
    cfg = load_config(store.config_path)
    if cfg.score.kind != "kde" or cfg.loop.policy != "fresh_mixture":
        print("check_chi2 handles finite-KDE chains with the fresh_mixture policy only")
        return 2
    df = pd.read_parquet(store.results_path)
    rows = df[df.metric.isin(METRICS) & df.estimator.isin(EXACT_DENSITY)]
    # Coverage: every exact-density χ² row at generation ≥ 1.
    cov = rows[(rows.generation >= 1) & rows.metric.isin(("accumulated_chi2", "intra_chi2"))]
    ok = np.isfinite(cov.value) & np.isfinite(cov.stderr)
    print(f"run {args.run_dir}: d={build_target(cfg).dim}, n_mc={cfg.estimators.n_mc}")
    for m, grp in cov.groupby("metric"):
        good = np.isfinite(grp.value) & np.isfinite(grp.stderr)
        print(f"  {m}: {int(good.sum())}/{len(grp)} finite with finite stderr (generation >= 1)")
    print(f"  together: {int(ok.sum())}/{len(cov)} = {ok.mean():.1%}")

    dim = build_target(cfg).dim
    alphas = args.alphas if args.alphas is not None else cfg.sweep.alphas
    seeds = args.seeds if args.seeds is not None else cfg.sweep.seeds
    G = cfg.loop.generations if args.max_gen is None else min(args.max_gen, cfg.loop.generations)
    zs = []
    print("alpha seed row metric                value          stderr        reference      "
          "ref_err        z")
    for alpha in alphas:
        for seed in seeds:
            laws = chain_laws(cfg, store, alpha, seed, G, dense=dim == 2)
            for g, (a, q, q_t0, p) in laws.items():
                for metric, b, row_g in (("accumulated_chi2", p, g + 1), ("intra_chi2", q, g),
                                         ("intra_chi2_t0", q_t0, g)):
                    if metric not in args.metrics:
                        continue
                    sel = rows[(rows.alpha == alpha) & (rows.seed == seed)
                               & (rows.generation == row_g) & (rows.metric == metric)]
                    if sel.empty:
                        continue
                    val, se = float(sel.value.iloc[0]), float(sel.stderr.iloc[0])
                    t = time.perf_counter()
                    if dim == 2:
                        ref, ref_err, edge = grid_chi2(a, b, args.grid_step)
                        ref_err = max(ref_err, edge)
                    else:
                        n_ref = int(args.ref_factor * cfg.estimators.n_mc)
                        gen = torch.Generator().manual_seed(10_007 * (seed + 1) + 31 * g + 7)
                        r = stratified_divergences(a, b, n_ref, gen)["chi2"]
                        ref, ref_err = r.value, r.stderr
                    secs = time.perf_counter() - t
                    z = (val - ref) / math.hypot(se, ref_err) if math.isfinite(val) else math.nan
                    zs.append(z)
                    print(f"{alpha:5.2f} {seed:4d} {row_g:3d} {metric:17s} {val:14.6g} "
                          f"{se:12.3g} {ref:14.6g} {ref_err:12.3g} {z:8.2f}  ({secs:.1f}s)",
                          flush=True)
    zs = np.array(zs)
    fin = np.isfinite(zs)
    print(f"compared {len(zs)} rows ({int(fin.sum())} finite): "
          f"{int((np.abs(zs[fin]) < 3).sum())}/{int(fin.sum())} within 3 standard errors; "
          f"mean z {zs[fin].mean():+.2f}, sd z {zs[fin].std():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
