"""Throughput of the KDE score (PAPER.md §5) in query–centre pairs per second.

    python benchmarks/bench_kde.py [--n 4096] [--N 20000] [--d 10] [--repeats 5]
                                   [--paper-N 100000] [--no-paper] [--json OUT]

One process, identical inputs for every method (centres from the paper's GMM layout, queries
drawn from it noised to time t by the OU process), timings interleaved across methods and
repeated; the table reports the median (and the best) of the repeats. Methods:

  (a)  numpy-direct   straightforward NumPy float64: ‖y − a c‖² by broadcasting, stable softmax,
                      weights @ centres; query blocks sized so a block holds ≤ 8 Mi numbers.
  (a') numpy-blas     NumPy float64 with the BLAS expansion y·c − ‖c‖²/2 (a stronger baseline).
  (b)  kde_score      collapselab.scores.kde_attention.kde_score(y, centres, a, v) with
  backend="auto" on
                      float32 inputs (centre preparation included in the time).
  (b") ... + KDEKeys  kde_score with centres prepared once (how a sampler calls it per step).
  (b') kde_score f64  kde_score on float64 inputs (the exact, chunked backend).
  (c)  bare sdpa      torch.nn.functional.scaled_dot_product_attention alone, on the very folded
                      q / k tensors kde_score builds (the machine's reference limit).

After each NumPy call the benchmark waits 0.5 s before timing the next method: OpenBLAS's worker
threads spin after a call and would otherwise take a core from the torch method timed next.
Peak memory is the largest growth of the peak resident set (VmHWM, reset through
/proc/self/clear_refs before every timed call) over the resident set at the call's start.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from collapselab.scores.kde_attention import KDEKeys, _queries, kde_score, ou_scale_var

_BLAS_SETTLE_S = 0.5
PAPER_PAIRS = 3e15  # 10 runs × 3 α × 20 generations × 500 steps × 1e5 samples × 1e5 centres


def make_inputs(n: int, n_centres: int, d: int, t: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    means = np.zeros((5, d))
    means[1:, :2] = [[4, 4], [4, -4], [-4, 4], [-4, -4]]
    centres = means[rng.integers(0, 5, n_centres)] + 0.6 * rng.standard_normal((n_centres, d))
    x0 = means[rng.integers(0, 5, n)] + 0.6 * rng.standard_normal((n, d))
    y = math.exp(-t / 2) * x0 + math.sqrt(-math.expm1(-t)) * rng.standard_normal((n, d))
    return y, centres


def numpy_direct(y, c, a, v):
    """(a): the formula as written, float64, in query blocks of ≤ 8 Mi numbers."""
    out = np.empty_like(y)
    ac = a * c
    block = max(1, (1 << 23) // (len(c) * y.shape[1]))
    for i in range(0, len(y), block):
        yi = y[i : i + block]
        sq = ((yi[:, None, :] - ac[None, :, :]) ** 2).sum(-1)
        logits = -sq / (2 * v)
        logits -= logits.max(1, keepdims=True)
        w = np.exp(logits)
        w /= w.sum(1, keepdims=True)
        out[i : i + block] = (w @ ac - yi) / v
    return out


def numpy_blas(y, c, a, v):
    """(a'): the BLAS expansion, float64, in query blocks of ≤ 8 Mi numbers."""
    out = np.empty_like(y)
    ac = a * c
    half_norm = 0.5 * (ac * ac).sum(1)
    block = max(1, (1 << 23) // len(c))
    for i in range(0, len(y), block):
        yi = y[i : i + block]
        logits = yi @ ac.T
        logits -= half_norm
        logits /= v
        logits -= logits.max(1, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(1, keepdims=True)
        out[i : i + block] = (logits @ ac - yi) / v
    return out


def _status_mb(name: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(name):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the peak resident set (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def run_scale(n, n_centres, d, t, bandwidth, repeats, numpy_repeats, label):
    a, v = ou_scale_var(t, bandwidth)
    y64, c64 = make_inputs(n, n_centres, d, t)
    y_t64, c_t64 = torch.from_numpy(y64), torch.from_numpy(c64)
    y32, c32 = y_t64.float(), c_t64.float()
    keys = KDEKeys.prepare(c32)
    _, q = _queries(y32, keys, a)
    q4, k4 = q[None, None].contiguous(), keys.keys[None, None]

    methods = {
        "(a) numpy-direct f64": (lambda: numpy_direct(y64, c64, a, v), numpy_repeats),
        "(a') numpy-blas f64": (lambda: numpy_blas(y64, c64, a, v), numpy_repeats),
        "(b) kde_score auto f32": (lambda: kde_score(y32, c32, a, v), repeats),
        '(b") kde_score f32 + KDEKeys': (lambda: kde_score(y32, keys, a, v), repeats),
        "(b') kde_score f64": (lambda: kde_score(y_t64, c_t64, a, v), repeats),
        "(c) bare sdpa f32": (
            lambda: F.scaled_dot_product_attention(q4, k4, k4, scale=1.0 / v),
            repeats,
        ),
    }
    rows = {name: {"times": [], "peak_rss_mb": None} for name in methods}
    outputs = {}
    with torch.no_grad():
        for name, (fn, _) in methods.items():  # warm-up (threads, allocator) for torch only
            if "numpy" not in name:
                fn()
        # Timing, interleaved across methods; every timed call also records its peak RSS growth.
        for r in range(repeats):
            for name, (fn, reps) in methods.items():
                if r >= reps:
                    continue
                reset = reset_peak_rss()
                start = _status_mb("VmRSS:")
                t0 = time.perf_counter()
                outputs[name] = fn()
                rows[name]["times"].append(time.perf_counter() - t0)
                if "numpy" in name:
                    # NumPy's OpenBLAS threads busy-wait for a while after a call; timing
                    # torch while they spin charges it for NumPy's idle threads.
                    time.sleep(_BLAS_SETTLE_S)
                peak = _status_mb("VmHWM:")
                if reset and start is not None and peak is not None:
                    prev = rows[name]["peak_rss_mb"] or 0.0
                    rows[name]["peak_rss_mb"] = max(prev, peak - start)
        ref = outputs["(a') numpy-blas f64"]
        err = {
            name: np.asarray(outputs[name], dtype=np.float64)
            for name in ("(a) numpy-direct f64", "(b) kde_score auto f32", "(b') kde_score f64")
        }
    scale_ref = np.abs(ref).max()
    pairs = n * n_centres
    for name, row in rows.items():
        row["median_s"] = statistics.median(row["times"])
        row["best_s"] = min(row["times"])
        row["pairs_per_s"] = pairs / row["median_s"]
        if name in err:
            row["max_err_rel"] = float(np.abs(err[name] - ref).max() / scale_ref)
    ratios = {}
    for stat in ("median_s", "best_s"):
        b = rows["(b) kde_score auto f32"][stat]
        tag = "median" if stat == "median_s" else "best"
        ratios[f"(b)/(a) {tag}"] = rows["(a) numpy-direct f64"][stat] / b
        ratios[f"(b)/(a') {tag}"] = rows["(a') numpy-blas f64"][stat] / b
        ratios[f"(b)/(c) {tag}"] = rows["(c) bare sdpa f32"][stat] / b
    return {
        "label": label,
        "n": n,
        "N": n_centres,
        "d": d,
        "t": t,
        "bandwidth": bandwidth,
        "scale": a,
        "var": v,
        "rows": rows,
        "ratios": ratios,
    }


def print_scale(res):
    print(
        f"\n{res['label']}: n={res['n']} queries, N={res['N']} centres, d={res['d']}, "
        f"t={res['t']}, h={res['bandwidth']} (a={res['scale']:.4f}, v={res['var']:.4f})"
    )
    head = f"{'method':26s} {'median s':>9s} {'best s':>8s} {'pairs/s':>10s} {'reps':>4s}"
    head += f" {'peak RSS MB':>11s} {'max rel err':>11s}"
    print(head)
    print("-" * len(head))
    for name, row in res["rows"].items():
        rss = row["peak_rss_mb"]
        rss_s = "n/a" if rss is None else f"{rss:.0f}"
        err = f"{row['max_err_rel']:.1e}" if "max_err_rel" in row else "-"
        print(
            f"{name:26s} {row['median_s']:9.3f} {row['best_s']:8.3f} "
            f"{row['pairs_per_s']:10.3e} {len(row['times']):4d} {rss_s:>11s} {err:>11s}"
        )
    print("ratios: " + ", ".join(f"{k} = {v:.1f}×" for k, v in res["ratios"].items()))


def machine():
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096, help="queries")
    p.add_argument("--N", type=int, default=20_000, help="centres")
    p.add_argument("--d", type=int, default=10, help="dimension")
    p.add_argument("--t", type=float, default=0.5, help="OU time of the queries")
    p.add_argument("--bandwidth", type=float, default=0.6)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--paper-N", type=int, default=100_000, help="centres at paper scale")
    p.add_argument("--no-paper", action="store_true", help="skip the paper-scale row")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    args = p.parse_args(argv)

    info = machine()
    print(
        f"machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, torch {info['torch']} "
        f"({info['torch_threads']} threads), numpy {info['numpy']}"
    )
    results = [
        run_scale(
            args.n, args.N, args.d, args.t, args.bandwidth, args.repeats, args.repeats, "main"
        )
    ]
    print_scale(results[0])
    if not args.no_paper:
        # NumPy at paper scale takes tens of seconds per call: one timed call each.
        results.append(
            run_scale(
                args.n, args.paper_N, args.d, args.t, args.bandwidth, args.repeats, 1, "paper"
            )
        )
        print_scale(results[-1])
    rate = results[-1]["rows"]["(b) kde_score auto f32"]["pairs_per_s"]
    hours = PAPER_PAIRS / rate / 3600
    print(
        f"\nprojection: {PAPER_PAIRS:.0e} pairs (paper GMM experiment) at {rate:.3e} pairs/s "
        f"= {hours:.0f} h = {hours / 24:.1f} days on this machine"
    )
    if args.json:
        with open(args.json, "w") as fh:
            payload = {"machine": info, "results": results, "projection_hours": hours}
            json.dump(payload, fh, indent=2)


if __name__ == "__main__":
    main()
