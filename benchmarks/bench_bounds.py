"""CPU cost per generation of the pathwise measurements, before/after a change, on one chain.

Runs ``collapselab run PRESET`` (one α, one seed, one worker, one torch thread) once per source
tree given with ``--src`` (alternating, ``--repeats`` times) and reports, per tree, the CPU
seconds of the whole child process divided by the number of generations, and the wall-clock
per-generation timings the loop records (fit / sample / measure). CPU time is the number to
compare on a shared machine: wall time moves with the other processes' load.

    python benchmarks/bench_bounds.py --src /path/to/old/src --src src --preset quickstart
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def run_once(src: str, preset: str, out: Path, overrides: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "collapselab.cli", "run", preset, "--out", str(out),
           "--workers", "1", "--quiet", "--no-report", "--set", "sweep.alphas=[0.5]",
           "--set", "sweep.seeds=[0]"]
    for o in overrides:
        cmd += ["--set", o]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    cells = glob.glob(str(out / "cells" / "*" / "*" / "*" / "metrics.json"))
    tim = [json.loads(Path(c).read_text())["timings"] for c in cells]
    mean = {k: sum(t[k] for t in tim) / len(tim) for k in tim[0]}
    return {"cpu_per_generation": cpu / len(tim), "generations": len(tim), **mean}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", action="append", required=True, help="a source tree (repeatable)")
    ap.add_argument("--preset", default="quickstart")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-bounds-"))
    try:
        for rep in range(a.repeats):
            for k, src in enumerate(a.src):
                out = tmp / f"{k}-{rep}"
                r = run_once(src, a.preset, out, a.overrides)
                print(f"{src} repeat {rep}: CPU {r['cpu_per_generation']:.2f} s/generation "
                      f"(wall: fit {r['fit']:.2f}, sample {r['sample']:.2f}, "
                      f"measure {r['measure']:.2f} s; {r['generations']} generations)",
                      flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
