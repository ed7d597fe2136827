"""Wall time of a sweep with --workers 1 against --workers N (default 2), in one invocation.

    python benchmarks/bench_workers.py [--preset paper-gmm-cpu] [--workers 2] [--batched]
        [--set loop.generations=2 --set sweep.seeds=[0,1] ...] [--keep DIR]

Runs `collapselab run PRESET --quiet --no-report` twice in fresh directories (one worker, then
N), checks that the two results.parquet are byte-identical, and prints the times and the ratio.
With --batched (MLP presets), a third run with `--executor batched --workers N` (chains of a
generation trained together: the vmapped ensemble, or sequential fits) is timed against the
second, and its values are compared with the local executor's: equal up to float rounding
carried through sampling and the estimators (the largest relative difference is printed).
Not a test: timings depend on the machine and on what else runs on it.

    python benchmarks/bench_workers.py --preset digits --batched \
        --set loop.generations=2 --set score.train_steps=1000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(preset: str, out: Path, workers: int, overrides: list[str],
        executor: str = "local") -> float:
    cmd = [sys.executable, "-m", "collapselab.cli", "run", preset, "--out", str(out), "--quiet",
           "--no-report", "--workers", str(workers), "--executor", executor]
    for o in overrides:
        cmd += ["--set", o]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="paper-gmm-cpu")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--keep", type=Path, help="keep the run directories under this folder")
    ap.add_argument("--batched", action="store_true",
                    help="also time --executor batched --workers N (MLP presets)")
    args = ap.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="bench_workers_"))
    print(f"preset {args.preset} {' '.join(args.overrides)}; {os.cpu_count()} cores", flush=True)
    t1 = run(args.preset, base / "w1", 1, args.overrides)
    print(f"--workers 1: {t1:.1f} s", flush=True)
    tn = run(args.preset, base / f"w{args.workers}", args.workers, args.overrides)
    print(f"--workers {args.workers}: {tn:.1f} s", flush=True)
    same = (base / "w1/results.parquet").read_bytes() == \
        (base / f"w{args.workers}/results.parquet").read_bytes()
    print(f"ratio (workers 1 / workers {args.workers}): {t1 / tn:.2f}x; "
          f"results.parquet identical: {same}")
    if args.batched:
        import numpy as np
        import pandas as pd

        tb = run(args.preset, base / "batched", args.workers, args.overrides, "batched")
        print(f"--executor batched --workers {args.workers}: {tb:.1f} s", flush=True)
        keys = ["alpha", "seed", "generation", "metric", "estimator"]
        a = pd.read_parquet(base / f"w{args.workers}/results.parquet")
        b = pd.read_parquet(base / "batched/results.parquet")
        m = a.merge(b, on=[k for k in keys if k in a.columns], suffixes=("", "_b"))
        fin = np.isfinite(m["value"]) & np.isfinite(m["value_b"])
        rel = (m["value"] - m["value_b"]).abs()[fin] / m["value"].abs()[fin].clip(lower=1e-12)
        print(f"ratio (local workers {args.workers} / batched): {tn / tb:.2f}x; rows "
              f"{len(a)} vs {len(b)}, matched {len(m)}; largest relative difference of finite "
              f"values {rel.max():.1e} (median {rel.median():.1e})")


if __name__ == "__main__":
    main()
