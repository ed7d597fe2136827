"""Seconds per generation of the presets, split into training / sampling / measuring.

    python benchmarks/bench_presets.py [--presets digits fashion-mnist-cpu quickstart
        paper-gmm-cpu] [--generations 2] [--keep DIR] [--json OUT]

Each preset runs as one chain (its first α and first seed) for ``--generations`` generations,
through the real CLI (`collapselab run PRESET --workers 1 --quiet --no-report`), in a fresh
directory, with one torch thread (the executor's worker setting). The per-generation split is
read from every cell's metrics.json ("timings": fit / sample / measure); wall is the whole
command (start-up, data loading and the feature classifier included; the classifier is cached by
content hash, so a second run skips its training); CPU is the command's user + system time,
which on a loaded machine is the better guide to the time on an idle one (one thread: wall ≈ CPU
when idle). Prints a table, the machine and the load.
Not a test: timings depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

DEFAULT = ["digits", "fashion-mnist-cpu", "quickstart", "paper-gmm-cpu"]


def _first(preset: str, key: str):
    from collapselab.config import load_config

    cfg = load_config(preset)
    return getattr(cfg.sweep, key)[0]


def run(preset: str, out: Path, generations: int, extra: list[str] = ()) -> dict:
    alpha, seed = _first(preset, "alphas"), _first(preset, "seeds")
    sets = [f"loop.generations={generations}", f"sweep.alphas=[{alpha}]", f"sweep.seeds=[{seed}]",
            *extra]
    cmd = [
        sys.executable,
        "-m",
        "collapselab.cli",
        "run",
        preset,
        "--out",
        str(out),
        "--quiet",
        "--no-report",
        "--workers",
        "1",
    ]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    load0 = os.getloadavg()[0]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    wall = time.perf_counter() - t
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    gens = []
    for metrics in sorted(out.glob("cells/*/*/generation=*/metrics.json")):
        g = int(metrics.parent.name.split("=")[1])
        gens.append((g, json.loads(metrics.read_text())["timings"]))
    gens.sort()
    return {
        "preset": preset,
        "wall": wall,
        "cpu": cpu,
        "load_before": load0,
        "load_after": os.getloadavg()[0],
        "score": cfg["score"]["kind"],
        "sampler": f"{cfg['sampler']['kind']} {cfg['sampler']['steps']}",
        "n": cfg["loop"]["n_train"],
        "generations": [{"generation": g, **tm} for g, tm in gens],
    }


def table(results: list[dict]) -> str:
    lines = [
        "| preset | score | sampler | n_train | generation | fit s | sample s | measure s "
        "| total s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for g in r["generations"]:
            tot = g["fit"] + g["sample"] + g["measure"]
            lines.append(
                f"| {r['preset']} | {r['score']} | {r['sampler']} | {r['n']} | "
                f"{g['generation']} | {g['fit']:.1f} | {g['sample']:.1f} | "
                f"{g['measure']:.1f} | {tot:.1f} |"
            )
    lines.append("")
    lines.append(
        "| preset | wall s (whole command) | CPU s (user + sys) | load 1-min before → after |"
    )
    lines.append("|---|---:|---:|---|")
    for r in results:
        lines.append(
            f"| {r['preset']} | {r['wall']:.1f} | {r['cpu']:.1f} | "
            f"{r['load_before']:.2f} → {r['load_after']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=DEFAULT)
    ap.add_argument("--generations", type=int, default=2)
    ap.add_argument("--keep", type=Path, help="keep the run directories under this folder")
    ap.add_argument("--json", type=Path, help="also write the raw numbers here")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="extra --set for every preset (e.g. score.train_backend=native)")
    args = ap.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="bench_presets_"))
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}, one torch thread per chain",
        flush=True,
    )
    results = []
    for preset in args.presets:
        out = base / preset
        if out.exists():
            raise SystemExit(f"{out} exists; give an empty --keep folder")
        results.append(run(preset, out, args.generations, args.overrides))
        print(f"{preset}: {results[-1]['wall']:.1f} s", flush=True)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
