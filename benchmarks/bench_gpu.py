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
5. Triton KDE kernel (``collapselab.scores.kde_triton``; needs Triton): pairs/s of the Triton kernel
   through ``kde_score(backend="triton")`` and of a bare SDPA call, interleaved in one run at
   the paper's size, their ratio, the float64-reference error of both on 2,000 of the queries
   against all centres, and the projected KDE sampling time of one paper-gmm chain at the
   faster rate.
6. U-Net step, default vs ``score.gpu_fast`` (bf16 autocast + channels-last + torch.compile +
   CUDA graphs, and bf16 + channels-last alone): ms per step at the fashion-mnist preset's
   sizes (batch 128), their ratio, the loss curves of ``--unet-steps`` steps from the same
   initial weights and draws (means of 50-step windows ± stderr), and the projected
   wall-clock of one fashion-mnist generation (training steps of the preset × ms/step +
   DDPM sampling of its samples at the measured forward time).

Parts 5 and 6 only run on CUDA (``--device cpu`` prints that they are skipped); ``--only
5,6`` runs just them (the GPU measurement of the Triton kernel and the fast U-Net step).

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
from collapselab.engine.executors import prepare_run_dir, run_experiment
from collapselab.processes import OU, VPProcess
from collapselab.scores import kde_attention as kernels
from collapselab.scores.ensemble import train_dsm_ensemble
from collapselab.scores.gpu_fast import GpuFast
from collapselab.scores.kde_attention import KDEKeys, _queries, kde_score, ou_scale_var
from collapselab.scores.mlp import MLPNet
from collapselab.scores.neural import build_network
from collapselab.scores.training import TrainConfig, run_plan, train_dsm

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


# ---- 5. the Triton KDE kernel against bare SDPA ------------------------------------------
def triton_kernel(device: torch.device, n: int, n_centres: int, repeats: int) -> dict:
    """Triton kernel vs bare SDPA, interleaved (same inputs, same warm device), plus the
    float64-reference error of both on the first 2,000 queries at t = 0.02 and t = 0.5."""
    try:
        from collapselab.scores.kde_triton import kde_attention
    except ImportError as exc:
        return dict(ok=False, note=f"triton unavailable: {exc}")
    gen = torch.Generator().manual_seed(1)
    centres64 = 3 * torch.randn(n_centres, 10, generator=gen, dtype=torch.float64)
    y64 = 3 * torch.randn(n, 10, generator=gen, dtype=torch.float64)
    centres, y = centres64.float().to(device), y64.float().to(device)
    a, v = ou_scale_var(0.5, 0.6)
    keys = KDEKeys.prepare(centres)
    _, q = _queries(y, keys, a)
    q4, k4 = q[None, None].contiguous(), keys.keys[None, None]
    calls = {
        "triton": lambda: kde_score(y, keys, a, v, backend="triton"),
        "triton_raw": lambda: kde_attention(q, keys.keys, 1 / v),
        "triton_tf32x3": lambda: kde_attention(q, keys.keys, 1 / v, precision="tf32x3"),
        "sdpa_bare": lambda: F.scaled_dot_product_attention(q4, k4, k4, scale=1 / v),
        "sdpa_kde_score": lambda: kde_score(y, keys, a, v, backend="sdpa"),
    }
    times = {k: [] for k in calls}
    t_first = time.perf_counter()
    with torch.no_grad():
        for fn in calls.values():  # warm-up, Triton's autotuning included
            fn()
        sync(device)
        autotune_s = time.perf_counter() - t_first
        for _ in range(repeats):  # interleaved: drift of the card hits every method alike
            for name, fn in calls.items():
                times[name].append(_once(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    pairs = n * n_centres
    errors = []
    m = min(n, 2000)
    for t in (0.02, 0.5):
        a_t, v_t = ou_scale_var(t, 0.1)
        ref = kde_score(y64[:m].to(device), centres64.to(device), a_t, v_t)  # float64
        keys_t = keys  # keys do not depend on (a, v)
        row = dict(t=t)
        for name, backend in (("triton", "triton"), ("sdpa", "sdpa")):
            with torch.no_grad():
                got = kde_score(y[:m], keys_t, a_t, v_t, backend=backend)
            row[name] = float((got.double() - ref).abs().max() / ref.abs().max())
        r = float(max((y64[:m] - a_t * centres64.mean(0)).norm(dim=1).max(),
                      a_t * (centres64 - centres64.mean(0)).norm(dim=1).max()))
        row["bound"] = 10 * torch.finfo(torch.float32).eps * r * r / v_t
        row["ok"] = row["triton"] <= row["bound"]
        errors.append(row)
    return dict(ok=all(e["ok"] for e in errors), n=n, N=n_centres, median_s=med,
                pairs_s={k: pairs / s for k, s in med.items()},
                ratio_vs_bare_sdpa=med["sdpa_bare"] / med["triton"],
                ratio_raw_vs_bare_sdpa=med["sdpa_bare"] / med["triton_raw"],
                ratio_tf32x3_vs_bare_sdpa=med["sdpa_bare"] / med["triton_tf32x3"],
                autotune_and_warmup_s=autotune_s, errors=errors, note="")


def _once(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


# ---- 6. the U-Net step: default vs score.gpu_fast ----------------------------------------
def _image_data(n: int) -> torch.Tensor:
    """The embedded 8×8 digits upsampled to 28×28 (a real image law; nothing downloads)."""
    from collapselab.datasets import load_dataset

    x = torch.from_numpy(load_dataset("digits").images[:n])
    return F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(-1, 1)


def unet_fast(device: torch.device, steps: int, repeats: int) -> dict:
    score_cfg = load_config("fashion-mnist").score
    images = _image_data(1500)
    proc = VPProcess(beta_min=0.1, beta_max=20.0, T=1.0)
    variants = {
        "default": None,
        "bf16+channels_last": GpuFast(bf16=True, channels_last=True),
        "all (bf16, channels_last, compile, cuda_graphs)": GpuFast(True, True, True, True),
    }
    def cfg_for(steps: int, **kw) -> TrainConfig:
        return TrainConfig(steps=steps, batch_size=128, val_fraction=0.0, optimizer="adamw",
                           lr=2e-4, weight_decay=1e-4, grad_clip=None, **kw)

    short, long = (4, 12) if device.type == "cpu" else (20, 60)
    rows = {}
    for name, fast in variants.items():
        # One module per variant, reset to the same initial weights for every run, so that
        # torch.compile's cache (keyed on the module) compiles it once.
        net = build_network(score_cfg, (1, 28, 28), seed=0)
        init = {k: v.clone() for k, v in net.state_dict().items()}

        def run(cfg, net=net, init=init, fast=fast):
            return train_dsm(net, images, proc, cfg, init_state=init, device=device, fast=fast)

        t0 = time.perf_counter()
        run(cfg_for(short))  # compile, CUDA-graph recording, cuDNN heuristics
        sync(device)
        warm_s = time.perf_counter() - t0
        # ms/step = (T(long) − T(short)) / (long − short): the per-call set-up (EMA copy, data
        # split, graph re-recording) cancels. Best of repeats.
        ts = [(_once(lambda: run(cfg_for(long)), device)
               - _once(lambda: run(cfg_for(short)), device)) / (long - short)
              for _ in range(repeats)]
        res = run(cfg_for(steps, schedule="cosine", ema_decay=0.99, seed=0))
        hist = np.asarray(res.loss_history)
        windows = [(float(w.mean()), float(w.std(ddof=1) / math.sqrt(len(w))))
                   for w in np.array_split(hist, max(1, len(hist) // 50))]
        rows[name] = dict(ms_per_step=1e3 * min(ts), warmup_s=warm_s,
                          loss_windows=windows, final_loss=float(hist[-50:].mean()))
    base = rows["default"]["ms_per_step"]
    for r in rows.values():
        r["speedup"] = base / r["ms_per_step"]
    # Sampling: DDPM steps × forward passes over the preset's samples, batches of 1,000.
    net = build_network(score_cfg, (1, 28, 28), seed=0).to(device).eval()
    xb = images[:1000].to(device)
    tb = torch.full((1000,), 0.5, device=device)
    with torch.no_grad():
        fwd_s = min(timed(lambda: net(xb, tb), device, max(2, repeats)))
    full = load_config("fashion-mnist")
    n_train = full.loop.n_train
    plan0 = run_plan(TrainConfig(epochs=full.score.epochs_first, batch_size=128,
                                 val_fraction=full.score.val_fraction), n_train, proc)
    plan1 = run_plan(TrainConfig(epochs=full.score.epochs, batch_size=128,
                                 val_fraction=full.score.val_fraction), n_train, proc)
    sample_s = full.sampler.steps * math.ceil(full.loop.n_samples / 1000) * fwd_s
    proj = {}
    for name, r in rows.items():
        proj[name] = dict(train_steps_gen0=plan0.total, train_steps_gen_i=plan1.total,
                          train_h_gen0=plan0.total * r["ms_per_step"] / 3.6e6,
                          train_h_gen_i=plan1.total * r["ms_per_step"] / 3.6e6,
                          sample_h=sample_s / 3600)
    return dict(rows=rows, forward_ms_batch1000=1e3 * fwd_s, projection=proj)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default="1,2,3,4,5,6",
                    help="comma-separated parts to run (default all: 1,2,3,4,5,6)")
    ap.add_argument("--unet-steps", type=int, default=300,
                    help="steps of the part-6 loss curves (default 300)")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    args = ap.parse_args(argv)
    try:
        parts = {int(p) for p in args.only.split(",")}
    except ValueError:
        parts = set()
    if not parts or not parts <= {1, 2, 3, 4, 5, 6}:
        print(f"bench_gpu: --only {args.only!r}: give parts among 1,2,3,4,5,6, comma-separated",
              file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"bench_gpu: --device {args.device}: no CUDA device is available to torch "
              f"{torch.__version__} (install a CUDA build of torch on a GPU machine, or pass "
              "--device cpu)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# device {device} ({name}), torch {torch.__version__}", flush=True)
    out: dict = dict(device=str(device), name=name)
    checks: list[dict] = []

    if 1 in parts:
        runs = run_cases(args.device)
        print("\n## 1. recursive runs on the device")
        for r in runs:
            print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['case']:32s} {r['seconds']:7.1f} s "
                  f"{r['rows']:5d} rows  {r['note']}")
        rep = reproducibility(args.device)
        print(f"{'ok  ' if rep['ok'] else 'FAIL'} unet chain run twice: results.parquet values "
              f"{'identical' if rep.get('values_identical') else 'DIFFER'}, samples "
              f"{'identical' if rep.get('samples_identical') else 'DIFFER'}"
              + (f" (max diff {rep['max_sample_diff']:.2e})" if rep.get("max_sample_diff")
                 else "")
              + (f" {rep['note']}" if rep["note"] else ""), flush=True)
        out.update(runs=runs, reproducibility=rep)
        checks += runs + [rep]
    if 2 in parts:
        acc = kernel_accuracy(device)
        print("\n## 2. kde_score float32 (backend auto) on the device vs float64 reference "
              "(h = 0.1)")
        for r in acc:
            print(f"{'ok  ' if r['ok'] else 'FAIL'} t = {r['t']:<5} max rel err "
                  f"{r['max_rel_err']:.1e} (bound {r['bound']:.1e})", flush=True)
        out.update(accuracy=acc)
        checks += acc
    n, n_centres = (4096, 20_000) if args.quick else (100_000, 100_000)
    if 3 in parts:
        tp = throughput(device, n, n_centres, args.repeats)
        proj = projection(tp["b_pairs_s"])
        auto = kernels._resolve_backend("auto", torch.zeros(1, 10, device=device))
        print(f"\n## 3. KDE kernel, n = {n:,} queries, N = {n_centres:,} centres, d = 10")
        print(f"(b) kde_score + KDEKeys ({auto:7s}) {tp['b_s'] * 1e3:9.2f} ms  "
              f"{tp['b_pairs_s']:.3e} pairs/s")
        print(f"(c) bare sdpa                     {tp['c_s'] * 1e3:9.2f} ms  "
              f"{tp['c_pairs_s']:.3e} pairs/s")
        print(f"(b)/(c) = {tp['ratio']:.2f}x")
        print(f"paper-gmm: {proj['pairs_per_chain']:.1e} pairs per alpha x seed chain -> "
              f"{proj['sampling_s_per_chain'] / 60:.1f} min of KDE sampling per chain, "
              f"{proj['sampling_h_total']:.1f} h for its {proj['chains']} chains "
              "(sampling only; exact metrics add to it)", flush=True)
        out.update(throughput=dict(tp, auto_backend=auto), projection=proj)
    if 4 in parts:
        nets = network_steps(device, args.quick, max(1, min(args.repeats, 3)))
        print("\n## 4. DSM training steps")
        for r in nets:
            print(f"{r['net']:48s} {r['ms_per_step']:8.2f} ms/step", flush=True)
        out.update(networks=nets)
    if (5 in parts or 6 in parts) and device.type != "cuda":
        print("\n## 5-6. skipped: the Triton kernel and the fast U-Net step are measured on "
              "CUDA only (the CPU tests run the kernel in Triton's interpreter)")
        parts -= {5, 6}
    if 5 in parts:
        tk = triton_kernel(device, n, n_centres, args.repeats)
        print(f"\n## 5. Triton KDE kernel vs bare SDPA, n = {n:,}, N = {n_centres:,}, d = 10")
        if "median_s" not in tk:
            print(f"FAIL {tk['note']}")
        else:
            for k, sec in tk["median_s"].items():
                print(f"{k:16s} {sec * 1e3:9.2f} ms  {tk['pairs_s'][k]:.3e} pairs/s")
            print(f"triton (kde_score) / bare sdpa = {tk['ratio_vs_bare_sdpa']:.2f}x   "
                  f"raw kernel: {tk['ratio_raw_vs_bare_sdpa']:.2f}x   tf32x3: "
                  f"{tk['ratio_tf32x3_vs_bare_sdpa']:.2f}x   (autotune + warm-up "
                  f"{tk['autotune_and_warmup_s']:.1f} s)")
            for e in tk["errors"]:
                print(f"{'ok  ' if e['ok'] else 'FAIL'} t = {e['t']:<5} max rel err vs float64: "
                      f"triton {e['triton']:.1e}, sdpa {e['sdpa']:.1e} (bound {e['bound']:.1e})")
            pj = projection(tk["pairs_s"]["triton"])
            print(f"paper-gmm at the triton rate: {pj['sampling_s_per_chain'] / 60:.1f} min of "
                  f"KDE sampling per chain, {pj['sampling_h_total']:.1f} h for "
                  f"{pj['chains']} chains", flush=True)
            tk["projection"] = pj
        out.update(triton=tk)
        checks.append(tk)
    if 6 in parts:
        uf = unet_fast(device, args.unet_steps, max(1, min(args.repeats, 3)))
        print("\n## 6. fashion-mnist U-Net step (batch 128): default vs score.gpu_fast")
        for k, r in uf["rows"].items():
            print(f"{k:48s} {r['ms_per_step']:8.2f} ms/step  x{r['speedup']:.2f}  "
                  f"(first run incl. compile {r['warmup_s']:.1f} s)")
        print(f"loss, means of 50-step windows over {args.unet_steps} steps (± stderr):")
        for k, r in uf["rows"].items():
            print(f"  {k:46s} " + " ".join(f"{m:.4f}±{e:.4f}" for m, e in r["loss_windows"]))
        print(f"forward of 1,000 images (eval): {uf['forward_ms_batch1000']:.1f} ms")
        for k, pj in uf["projection"].items():
            print(f"fashion-mnist generation ({k}): training {pj['train_h_gen0']:.2f} h "
                  f"(gen 0, {pj['train_steps_gen0']} steps) / {pj['train_h_gen_i']:.2f} h "
                  f"(later, {pj['train_steps_gen_i']} steps; early stopping may cut it) + "
                  f"sampling {pj['sample_h']:.2f} h", flush=True)
        out.update(unet_fast=uf)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0 if all(r["ok"] for r in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
