"""The sampler's own drift at generation 1: sampler_gap_kl against D_1 (KL) per reverse grid.

For a preset, runs generation 0 (trained on p alone, so the same for every α) of one chain per
seed for each ``schedule:steps`` given, and prints the gap KL(sampler's p̂_1 ‖ ideal p̂_1), the
exact-density D_1 = KL(ideal p̂_1 ‖ p), their ratio, and the generation's seconds (sampling and
whole generation). ``--n`` raises loop.n_samples and estimators.n_eval for a gap resolved
beyond the per-generation metric's default error bar (the sampler's law does not depend on n;
the KDE's centres are n_train). Pathwise quantities are skipped unless ``--pathwise``.

    python benchmarks/bench_sampler_gap.py quickstart --seeds 0,1 --n 40000 \\
        uniform:100 geometric:100 edm:100
    python benchmarks/bench_sampler_gap.py quickstart --seeds 0,1 --pathwise \\
        uniform:100 geometric:100     # seconds per generation at the preset's defaults
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
from pathlib import Path

from collapselab.config import load_config
from collapselab.engine.loop import run_chain
from collapselab.engine.store import RunStore, read_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset")
    ap.add_argument("grids", nargs="+", metavar="SCHEDULE:STEPS")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--n", type=int, default=None, help="loop.n_samples = estimators.n_eval")
    ap.add_argument("--pathwise", action="store_true", help="keep the preset's pathwise rows")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print("| schedule | steps | seed | sampler_gap_kl | D_1 (KL, ideal law) | gap / D_1 | "
          "sample s | generation s |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in args.grids:
        schedule, steps = spec.split(":")
        ov = [f"sampler.schedule={schedule}", f"sampler.steps={steps}", "loop.generations=1"]
        if args.n:
            ov += [f"loop.n_samples={args.n}", f"estimators.n_eval={args.n}"]
        if not args.pathwise:
            ov += ["pathwise.score_energy=false", "pathwise.learned=false",
                   "pathwise.observability=false"]
        cfg = load_config(args.preset, ov)
        for seed in seeds:
            root = Path(tempfile.mkdtemp(prefix="bench-sampler-gap-"))
            try:
                store = RunStore(root)
                run_chain(cfg, 0.5, seed, store)
                m = read_json(store.cell(0.5, seed, 0) / "metrics.json")
            finally:
                shutil.rmtree(root, ignore_errors=True)
            rows = {(r["metric"], r["estimator"]): r for r in m["rows"] if r["generation"] == 1}
            gap = rows[("sampler_gap_kl", "knn_paired")]
            d1 = rows[("accumulated_kl", "monte_carlo")]
            t = m["timings"]
            ratio = gap["value"] / d1["value"]
            ratio_se = abs(ratio) * math.hypot(gap["stderr"] / gap["value"],
                                               d1["stderr"] / d1["value"])
            print(f"| {schedule} | {steps} | {seed} | {gap['value']:.4f} ± {gap['stderr']:.4f} "
                  f"| {d1['value']:.4f} ± {d1['stderr']:.4f} | {ratio:.3f} ± {ratio_se:.3f} | "
                  f"{t['sample']:.2f} | {sum(t.values()):.2f} |", flush=True)


if __name__ == "__main__":
    main()
