"""Wall time of a sweep with --workers 1 against --workers N (default 2), in one invocation.

    python benchmarks/bench_workers.py [--preset paper-gmm-cpu] [--workers 2]
        [--set loop.generations=2 --set sweep.seeds=[0,1] ...] [--keep DIR]

Runs `collapselab run PRESET --quiet --no-report` twice in fresh directories (one worker, then
N), checks that the two results.parquet are byte-identical, and prints the times and the ratio.
Not a test: timings depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(preset: str, out: Path, workers: int, overrides: list[str]) -> float:
    cmd = [sys.executable, "-m", "collapselab.cli", "run", preset, "--out", str(out), "--quiet",
           "--no-report", "--workers", str(workers)]
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


if __name__ == "__main__":
    main()
