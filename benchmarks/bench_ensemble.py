"""K MLP chains trained together: the default vmapped ensemble against K sequential fits and
against the opt-in accelerator, as ratios from one run; and one chain's step, default path
with ``torch.compile`` against the accelerator's step.

    python benchmarks/bench_ensemble.py [--K 6] [--steps 60] [--repeats 3] [--threads 1]
        [--shapes quickstart-mlp digits] [--no-compile] [--out benchmarks/results/NAME.md]

Shapes (the presets' MLP sizes): ``quickstart-mlp`` d = 2, width 128, 3 layers, batch 512;
``digits`` d = 64, width 256, 3 layers, batch 256. Per shape and repeat the trainers run in
turn on the same data: ``ensemble`` = :func:`collapselab.scores.ensemble.train_dsm_ensemble`
(K chains, vmap + one fused Adam), ``sequential`` = K :func:`~collapselab.scores.training.
train_dsm` fits (the same fused Adam), ``native`` = :func:`collapselab.fast.train_dsm_batched`
(the hand-written step, where collapselab.fast imports). The minimum over repeats is reported
(the machine may be shared: the minimum is the least disturbed). ``compiled`` times K
sequential fits of the default trainer whose network is ``torch.compile``-d (compilation
excluded: one warm-up fit first). Not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from collapselab.processes import OU, VPProcess
from collapselab.scores.ensemble import train_dsm_ensemble
from collapselab.scores.mlp import MLPNet
from collapselab.scores.training import TrainConfig, train_dsm

SHAPES = {  # name: (dim, hidden, layers, batch, process)
    "quickstart-mlp": (2, 128, 3, 512, OU(T=4.0)),
    "digits": (64, 256, 3, 256, VPProcess(T=1.0, beta_min=0.1, beta_max=20.0)),
}


def _nets(K, dim, hidden, layers):
    out = []
    for k in range(K):
        torch.manual_seed(k)
        out.append(MLPNet(dim, hidden=hidden, layers=layers))
    return out


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _shape(a, name: str, train_dsm_batched, lines: list[str]) -> None:
    """Time every trainer on one shape; append its table row to ``lines``."""
    dim, hidden, layers, bsz, proc = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    datas = [torch.randn(4 * bsz, dim, generator=g) for _ in range(a.K)]
    cfg = TrainConfig(steps=a.steps, batch_size=bsz, lr=2e-3, optimizer="adamw",
                      weight_decay=1e-4, schedule="cosine", ema_decay=0.99)
    seeds = list(range(a.K))
    runs = {"ensemble": lambda: train_dsm_ensemble(_nets(a.K, dim, hidden, layers), datas,
                                                   proc, cfg, seeds=seeds),
            "sequential": lambda: [train_dsm(n, d, proc, replace(cfg, seed=s))
                                   for n, d, s in zip(_nets(a.K, dim, hidden, layers),
                                                      datas, seeds, strict=True)]}
    if train_dsm_batched is not None:
        runs["native"] = lambda: train_dsm_batched(_nets(a.K, dim, hidden, layers), datas,
                                                   proc, cfg, seeds=seeds, threads=a.threads)
    if not a.no_compile:
        compiled = [torch.compile(n) for n in _nets(a.K, dim, hidden, layers)]

        def run_compiled():
            for n, d, s in zip(compiled, datas, seeds, strict=True):
                train_dsm(n, d, proc, replace(cfg, seed=s))
        run_compiled()  # compile (excluded)
        runs["compiled"] = run_compiled
    best = {k: min(_time(fn) for _ in range(a.repeats)) for k, fn in runs.items()}
    best_i = {k: float("nan") for k in ("ensemble", "sequential", "native", "compiled")}
    best_i.update(best)
    e, s, n, c = (best_i[k] for k in ("ensemble", "sequential", "native", "compiled"))
    lines.append(f"| {name} (d={dim}, width {hidden}, batch {bsz}) | {e:.3f} | {s:.3f} | "
                 f"{n:.3f} | {c:.3f} | {s / e:.2f} | {e / n:.2f} | {c / n:.2f} |")
    print(lines[-1], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--K", type=int, default=6)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    try:
        from collapselab.fast import train_dsm_batched
        from collapselab.fast.native import load, status
        load()
        native_status = status()
    except Exception as exc:  # noqa: BLE001 - the accelerator is optional
        train_dsm_batched, native_status = None, f"not importable: {exc}"
    lines = [f"machine: {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} logical CPUs, torch {torch.__version__}, "
             f"{a.threads} torch thread(s), load average {os.getloadavg()}",
             f"collapselab.fast native kernels: {native_status}",
             f"K = {a.K}, {a.steps} steps per fit, minimum of {a.repeats} repeats", ""]
    lines.append("| shape | ensemble s | sequential s | native s | compiled s | "
                 "sequential/ensemble | ensemble/native | compiled/native (per step) |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for name in a.shapes:
        _shape(a, name, train_dsm_batched, lines)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)


if __name__ == "__main__":
    main()
