"""GPU check: does ``device: cuda`` work everywhere, and how fast is it?

    python benchmarks/bench_gpu.py                 # on a machine with a CUDA GPU (~2-5 min)
    python benchmarks/bench_gpu.py --device cpu --quick    # the same checks, tiny, on CPU

Four parts, one table each:

1. Runs: a two-generation recursive run on ``--device`` for every score model and sampler
   (analytic, population_kde, kde, mlp on a 2-D Gaussian mixture with Euler–Maruyama and DDPM;
   unet on the embedded 8×8 digits with DDPM), through ``run_experiment`` exactly as
   ``collapselab run --set device=cuda`` runs them. A run passes when it completes, every
   sample is finite and every metric row is present. Then the U-Net chain runs twice more
   from scratch: its results.parquet values and samples must agree to the last bit (what a
   resumed chain relies on; cuDNN's convolutions are not deterministic by default).
2. Kernel accuracy: ``kde_score`` on the device (float32) against the float64 CPU reference
   at t = 0.02 (the sharpest point of the paper's sampler), 0.5 and 2.
3. Kernel throughput: query–centre pairs per second of (b) ``kde_score`` with prepared keys
   and (c) a bare ``scaled_dot_product_attention`` of the same shapes, at the paper's size
   (100,000 queries × 100,000 centres, d = 10; ``--quick``: 4,096 × 20,000), median of
   repeats with the device synchronised; then the projection of the ``paper-gmm`` preset
   (generations × sampler steps × samples × centres pairs per α × seed chain) at rate (b).
4. Network steps: ms per DSM training step of the MLP (batch 512, width 128) and of the
   ``fashion-mnist`` preset's U-Net (batch 128, 28×28), the time that dominates the image
   presets.

Nothing is downloaded. Exit status 0 when every check of parts 1 and 2 passes (the
reproducibility check included), 1 otherwise;
2 when the device is not available.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from collapselab.config import load_config
from collapselab.executors import prepare_run_dir, run_experiment
from collapselab.kernels import KDEKeys, _queries, kde_score, ou_scale_var
from collapselab.processes import OU, VPProcess
from collapselab.scores.ensemble import train_dsm_ensemble
from collapselab.scores.mlp import MLPNet
from collapselab.scores.neural import build_network
from collapselab.scores.training import TrainConfig, train_dsm

GMM_RUN = [
    "loop.generations=2", "loop.n_train=400", "sampler.steps=40", "estimators.n_mc=2000",
    "estimators.n_eval=300", "sweep.alphas=[0.5]", "sweep.seeds=[0]",
    "score.train_steps=150", "score.hidden=64",
]
DIGITS_RUN = [
    "loop.generations=2", "loop.n_train=300", "loop.n_samples=300", "sampler.steps=30",
    "score.kind=unet", "score.base_channels=16", "score.channel_mults=[1, 2]",
    "score.train_steps=60", "score.batch_size=64", "estimators.n_eval=300",
    "estimators.feature_epochs=3", "sweep.alphas=[0.5]", "sweep.seeds=[0]",
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> list[float]:
    fn()  # warm-up: kernels, allocator, cuDNN/SDPA heuristics
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


# ---- 1. runs on the device ----------------------------------------------------------------
def run_cases(device: str) -> list[dict]:
    cases = []
    for kind in ("analytic", "population_kde", "kde", "mlp"):
        for sampler in ("euler_maruyama", "ddpm"):
            cases.append((f"{kind} + {sampler}", "quickstart",
                          GMM_RUN + [f"score.kind={kind}", f"sampler.kind={sampler}"]))
    cases.append(("unet + ddpm (digits)", "digits", DIGITS_RUN))
    rows = []
    for label, preset, overrides in cases:
        t0 = time.perf_counter()
        try:
            cfg = load_config(preset, overrides + [f"device={device}"])
            with tempfile.TemporaryDirectory() as tmp:
                store = prepare_run_dir(cfg, Path(tmp) / "run")
                df = run_experiment(cfg, store)
                done = store.completed(0.5, 0, {})
                samples_ok = all(np.isfinite(np.load(p)).all()
                                 for p in Path(tmp).rglob("samples.npy"))
            ok = samples_ok and done == cfg.loop.generations and len(df) > 0
            rows.append(dict(case=label, ok=ok, seconds=time.perf_counter() - t0,
                             rows=len(df), note="" if ok else "missing rows or non-finite"))
        except Exception as exc:  # report and continue: one table of every case
            rows.append(dict(case=label, ok=False, seconds=time.perf_counter() - t0, rows=0,
                             note=f"{type(exc).__name__}: {exc}".splitlines()[0][:120]))
            traceback.print_exc(file=sys.stderr)
    return rows


def reproducibility(device: str) -> dict:
    """The U-Net chain of part 1 (the case whose kernels can be non-deterministic on a GPU:
    cuDNN convolutions) run twice from scratch: a resumed chain recomputes what an
    uninterrupted one did only if these agree to the last bit."""
    out = []
    try:
        cfg = load_config("digits", DIGITS_RUN + [f"device={device}"])
        for _ in range(2):
            with tempfile.TemporaryDirectory() as tmp:
                store = prepare_run_dir(cfg, Path(tmp) / "run")
                df = run_experiment(cfg, store)
                samples = [np.load(p) for p in sorted(Path(tmp).rglob("samples.npy"))]
                out.append((df.value.to_numpy(float), samples))
    except Exception as exc:  # reported as a failed check, like part 1
        traceback.print_exc(file=sys.stderr)
        return dict(ok=False, note=f"{type(exc).__name__}: {exc}".splitlines()[0][:120])
    (va, sa), (vb, sb) = out
    same_values = np.array_equal(va, vb, equal_nan=True)
    pairs = list(zip(sa, sb, strict=False))  # the same cells in both runs, or it differs
    same_samples = len(sa) == len(sb) and all(np.array_equal(x, y) for x, y in pairs)
    diff = 0.0 if same_samples or not pairs else max(
        float(np.abs(x - y).max()) if x.shape == y.shape else math.inf for x, y in pairs)
    return dict(ok=same_values and same_samples, values_identical=same_values,
                samples_identical=same_samples, max_sample_diff=diff, note="")


# ---- 2. kernel accuracy -------------------------------------------------------------------
def kernel_accuracy(device: torch.device) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(5000, 10, generator=gen, dtype=torch.float64)
    y = 3 * torch.randn(2000, 10, generator=gen, dtype=torch.float64)
    rows = []
    for t in (0.02, 0.5, 2.0):
        a, v = ou_scale_var(t, 0.1)
        yt = a * y + math.sqrt(1 - a * a) * torch.randn(y.shape, generator=gen,
                                                       dtype=torch.float64)
        ref = kde_score(yt, centres, a, v)  # float64, chunked, ~1e-13
        got = kde_score(yt.float().to(device), centres.float().to(device), a, v)
        err = float((got.double().cpu() - ref).abs().max() / ref.abs().max())
        # float32 bound of kernels.py: eps·R²/v² relative to the score's scale (R bounds the
        # centred query and centre norms); the check allows 10× that.
        r = float(max(yt.norm(dim=1).max(), a * centres.norm(dim=1).max()))
        bound = 10 * torch.finfo(torch.float32).eps * r * r / v
        rows.append(dict(t=t, max_rel_err=err, bound=bound, ok=err <= bound))
    return rows


# ---- 3. kernel throughput and the paper-gmm projection -----------------------------------
def throughput(device: torch.device, n: int, n_centres: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    centres = (3 * torch.randn(n_centres, 10, generator=gen)).to(device)
    y = (3 * torch.randn(n, 10, generator=gen)).to(device)
    a, v = ou_scale_var(0.5, 0.6)
    keys = KDEKeys.prepare(centres)
    _, q = _queries(y, keys, a)
    q4, k4 = q[None, None].contiguous(), keys.keys[None, None]
    with torch.no_grad():
        tb = timed(lambda: kde_score(y, keys, a, v), device, repeats)
        tc = timed(lambda: F.scaled_dot_product_attention(q4, k4, k4, scale=1 / v), device,
                   repeats)
    pairs = n * n_centres
    b, c = statistics.median(tb), statistics.median(tc)
    return dict(n=n, N=n_centres, b_s=b, c_s=c, b_pairs_s=pairs / b, c_pairs_s=pairs / c,
                ratio=c / b)


def projection(rate: float) -> dict:
    cfg = load_config("paper-gmm")
    per_chain = (cfg.loop.generations * cfg.sampler.steps * cfg.loop.samples
                 * cfg.loop.n_train)
    chains = len(cfg.sweep.alphas) * len(cfg.sweep.seeds)
    return dict(pairs_per_chain=per_chain, chains=chains,
                sampling_s_per_chain=per_chain / rate,
                sampling_h_total=per_chain * chains / rate / 3600)


# ---- 4. network training steps ------------------------------------------------------------
def network_steps(device: torch.device, quick: bool, repeats: int) -> list[dict]:
    steps = 5 if quick else 30
    rows = []
    mlp = MLPNet(10, hidden=128, layers=3)
    data = torch.randn(8192, 10)
    cfg = TrainConfig(steps=steps, batch_size=512, val_fraction=0.0)
    ts = timed(lambda: train_dsm(mlp, data, OU(), cfg, device=device), device, repeats)
    rows.append(dict(net="MLP d=10 width 128, batch 512", ms_per_step=1e3 * min(ts) / steps))
    # 6 chains as one vmapped ensemble (the batched executor's default trainer) and, where the
    # optional accelerator imports, its hand-written step: ms per step of all chains together.
    nets = [MLPNet(10, hidden=128, layers=3) for _ in range(6)]
    datas = list(torch.randn(6, 8192, 10))
    ts = timed(lambda: train_dsm_ensemble(nets, datas, OU(), cfg, seeds=list(range(6)),
                                          device=device), device, repeats)
    rows.append(dict(net="MLP d=10 width 128, batch 512, train_dsm_ensemble K=6 (all chains)",
                     ms_per_step=1e3 * min(ts) / steps))
    try:
        from collapselab.fast import train_dsm_batched
    except ImportError:
        train_dsm_batched = None
    for k in (1, 6) if train_dsm_batched is not None else ():
        nets = [MLPNet(10, hidden=128, layers=3) for _ in range(k)]
        datas = torch.randn(k, 8192, 10)
        ts = timed(lambda nets=nets, datas=datas, k=k: train_dsm_batched(
            nets, datas, OU(), cfg, list(range(k)), device=device), device, repeats)
        rows.append(dict(net=f"MLP d=10 width 128, batch 512, collapselab.fast K={k} "
                             "(all chains)", ms_per_step=1e3 * min(ts) / steps))
    score_cfg = load_config("fashion-mnist").score
    if quick:
        score_cfg = score_cfg.model_copy(update=dict(base_channels=16, num_res_blocks=1))
    unet = build_network(score_cfg, (1, 28, 28), seed=0)
    images = torch.randn(1024, 1, 28, 28)
    ucfg = TrainConfig(steps=steps, batch_size=128 if not quick else 16, val_fraction=0.0)
    proc = VPProcess(beta_min=0.1, beta_max=20.0, T=1.0)
    ts = timed(lambda: train_dsm(unet, images, proc, ucfg, device=device), device, repeats)
    rows.append(dict(net=f"U-Net fashion-mnist preset{' (shrunk)' if quick else ''}, "
                     f"batch {ucfg.batch_size}", ms_per_step=1e3 * min(ts) / steps))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"bench_gpu: --device {args.device}: no CUDA device is available to torch "
              f"{torch.__version__} (install a CUDA build of torch on a GPU machine, or pass "
              "--device cpu)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# device {device} ({name}), torch {torch.__version__}")

    runs = run_cases(args.device)
    print("\n## 1. recursive runs on the device")
    for r in runs:
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['case']:32s} {r['seconds']:7.1f} s "
              f"{r['rows']:5d} rows  {r['note']}")
    rep = reproducibility(args.device)
    print(f"{'ok  ' if rep['ok'] else 'FAIL'} unet chain run twice: results.parquet values "
          f"{'identical' if rep.get('values_identical') else 'DIFFER'}, samples "
          f"{'identical' if rep.get('samples_identical') else 'DIFFER'}"
          + (f" (max diff {rep['max_sample_diff']:.2e})" if rep.get("max_sample_diff") else "")
          + (f" {rep['note']}" if rep["note"] else ""))
    acc = kernel_accuracy(device)
    print("\n## 2. kde_score float32 on the device vs float64 reference (h = 0.1)")
    for r in acc:
        print(f"{'ok  ' if r['ok'] else 'FAIL'} t = {r['t']:<5} max rel err {r['max_rel_err']:.1e}"
              f" (bound {r['bound']:.1e})")
    n, n_centres = (4096, 20_000) if args.quick else (100_000, 100_000)
    tp = throughput(device, n, n_centres, args.repeats)
    proj = projection(tp["b_pairs_s"])
    print(f"\n## 3. KDE kernel, n = {n:,} queries, N = {n_centres:,} centres, d = 10")
    print(f"(b) kde_score + KDEKeys  {tp['b_s'] * 1e3:9.2f} ms  {tp['b_pairs_s']:.3e} pairs/s")
    print(f"(c) bare sdpa            {tp['c_s'] * 1e3:9.2f} ms  {tp['c_pairs_s']:.3e} pairs/s")
    print(f"(b)/(c) = {tp['ratio']:.2f}x")
    print(f"paper-gmm: {proj['pairs_per_chain']:.1e} pairs per alpha x seed chain -> "
          f"{proj['sampling_s_per_chain'] / 60:.1f} min of KDE sampling per chain, "
          f"{proj['sampling_h_total']:.1f} h for its {proj['chains']} chains "
          "(sampling only; exact metrics add to it)")
    nets = network_steps(device, args.quick, max(1, min(args.repeats, 3)))
    print("\n## 4. DSM training steps")
    for r in nets:
        print(f"{r['net']:48s} {r['ms_per_step']:8.2f} ms/step")
    if args.json:
        Path(args.json).write_text(json.dumps(
            dict(device=str(device), name=name, runs=runs, reproducibility=rep, accuracy=acc,
                 throughput=tp, projection=proj, networks=nets), indent=1))
    return 0 if all(r["ok"] for r in runs + acc + [rep]) else 1


if __name__ == "__main__":
    sys.exit(main())
