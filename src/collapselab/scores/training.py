"""Denoising score matching for ε-predicting networks, with EMA, early stopping, checkpoints.

Loss (Ho et al. 2020; Vincent 2011). With X_t = scale(t)·x0 + √var(t)·ε and t ~ U[t_min, T],

    L(θ) = E_{x0, t, ε} ‖ε_θ(X_t, t) − ε‖²
         = E_{x0, t, ε} var(t)·‖s_θ(X_t, t) − ∇ log p(X_t | x0)‖²,      s_θ = −ε_θ/√var(t),

i.e. denoising score matching with weight λ(t) = var(t). With unit weight instead (see
:func:`dsm_loss`, ``weighting="score"``), (T − t_min)·E_t[·] is the paper's ideal-path score
energy plus a constant: DSM loss = ε⋆² + C with C depending only on the training law q_i
(docs/paper.md). Both weightings have the same minimiser, the true score of q_i.

The paper's image recipe (docs/paper.md): AdamW, lr 2e-4, weight decay 1e-4, cosine schedule,
EMA 0.99, early stopping with patience 50. Everything here is generic over the network and the
VP process (:mod:`collapselab.processes`).

Checkpoints are safetensors files (never pickle): raw weights under ``raw.``, EMA weights
under ``ema.``, optimizer tensors under ``opt.``, and JSON metadata in the safetensors header.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import Tensor, nn

from ..errors import ConfigError
from ..files import atomic_write_bytes
from .gpu_fast import GpuFast, fast_forward
from .mlp import MLPNet, NeuralScore
from .unet import UNet

CHECKPOINT_FORMAT = "collapselab.checkpoint"
NET_CLASSES: dict[str, type[nn.Module]] = {"MLPNet": MLPNet, "UNet": UNet}


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite; ``step`` is the 1-based step where it did."""

    def __init__(self, step: int, loss: float):
        self.step, self.loss = step, loss
        super().__init__(
            f"DSM training diverged at step {step}: loss = {loss}. Check the data for NaN/Inf, "
            "lower the learning rate (score.lr)."
        )


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train_dsm`.

    steps / epochs: length of the run; ``epochs`` (if set) overrides ``steps`` with
        ⌈epochs · ⌊n_train / batch_size⌋⌉ steps. Batches are drawn without replacement within an
        epoch (the incomplete last batch is dropped); batch_size is capped at n_train.
    optimizer: 'adam' (L2 weight decay) or 'adamw' (decoupled weight decay).
    schedule: 'constant' or 'cosine' (decays to lr·min_lr_ratio at the last step), after
        ``warmup_steps`` of linear warm-up.
    ema_decay: EMA of the weights; with ``ema_warmup`` the decay used at step k is
        min(ema_decay, (1 + k)/(10 + k)) so that short runs are not dominated by the init.
    t_min, t_max: t ~ U[t_min, t_max]; t_max defaults to the process's T.
    grad_clip: max global gradient norm (None: no clipping).
    eval_every: steps between validations (None: once per epoch). Validation is the DSM loss of
        the EMA network, in eval mode, on a fixed held-out split (``val_fraction`` of the data)
        with fixed times and noises (``val_repeats`` draws per point): deterministic, so that
        early stopping compares like with like.
    patience: stop after this many validations without an improvement larger than
        ``min_delta`` (None: never stop early). Requires val_fraction > 0.
    restore_best: at the end, the EMA network gets the EMA weights of the best validation; the
        raw network keeps its last weights (training resumes from those).
    seed: seeds every random draw of the run (split, batches, t, ε, dropout).
    """

    steps: int = 2000
    epochs: float | None = None
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    t_min: float = 1e-3
    t_max: float | None = None
    grad_clip: float | None = 1.0
    eval_every: int | None = None
    patience: int | None = None
    min_delta: float = 0.0
    val_fraction: float = 0.0
    val_repeats: int = 1
    restore_best: bool = True
    seed: int = 0

    def __post_init__(self):
        checks = [
            ("steps", self.steps >= 1, "must be >= 1"),
            ("epochs", self.epochs is None or self.epochs > 0, "must be > 0"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("lr", self.lr >= 0, "must be >= 0"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("optimizer", self.optimizer in ("adam", "adamw"), "must be 'adam' or 'adamw'"),
            ("schedule", self.schedule in ("constant", "cosine"),
             "must be 'constant' or 'cosine'"),
            ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
            ("ema_decay", 0 <= self.ema_decay < 1, "must be in [0, 1)"),
            ("t_min", self.t_min > 0, "must be > 0 (the score is singular at t = 0)"),
            ("t_max", self.t_max is None or self.t_max > self.t_min, "must be > t_min"),
            ("grad_clip", self.grad_clip is None or self.grad_clip > 0, "must be > 0 or null"),
            ("eval_every", self.eval_every is None or self.eval_every >= 0, "must be >= 0"),
            ("patience", self.patience is None or self.patience >= 1, "must be >= 1 or null"),
            ("val_fraction", 0 <= self.val_fraction < 1, "must be in [0, 1)"),
            ("val_repeats", self.val_repeats >= 1, "must be >= 1"),
            ("patience", self.patience is None or self.val_fraction > 0,
             "early stopping needs a validation split (val_fraction > 0)"),
        ]
        for name, ok, msg in checks:
            if not ok:
                raise ConfigError(name, f"{msg} (got {getattr(self, name)!r})")


@dataclass
class TrainResult:
    """Outcome of :func:`train_dsm`.

    net: the raw network (last weights; resume training from these). ema_net: the EMA network
    (sample from this one; the best validated EMA weights when ``restore_best``).
    loss_history: training loss per step; val_history: (step, validation loss) pairs.
    """

    net: nn.Module
    ema_net: nn.Module
    loss_history: list[float]
    val_history: list[tuple[int, float]]
    best_val_loss: float
    best_step: int | None
    steps: int
    stopped_early: bool
    optimizer_state: dict
    config: TrainConfig = field(default_factory=TrainConfig)

    def score(self, process) -> NeuralScore:
        """The EMA network as a score (score protocol of :mod:`collapselab.scores.base`)."""
        return NeuralScore(self.ema_net, process)


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape((-1,) + (1,) * (x.dim() - 1))


def dsm_loss(net: nn.Module, x0: Tensor, process, t: Tensor, eps: Tensor,
             weighting: str = "eps", batch_size: int = 4096) -> Tensor:
    """Per-sample denoising score-matching losses for given (x0, t, ε), without gradients.

    weighting='eps': ‖ε_θ(X_t, t) − ε‖² (the training loss, DSM weight var(t)).
    weighting='score': ‖s_θ(X_t, t) − ∇ log p(X_t | x0)‖² = ‖ε_θ − ε‖²/var(t); its mean over
    t ~ U[t0, T] times (T − t0) estimates ε⋆² + C (docs/paper.md).
    The network is evaluated in its current mode (call ``net.eval()`` for dropout off).
    """
    if weighting not in ("eps", "score"):
        raise ValueError("weighting must be 'eps' or 'score'")
    out = []
    with torch.no_grad():
        for i in range(0, x0.shape[0], batch_size):
            xb, tb, eb = x0[i:i + batch_size], t[i:i + batch_size], eps[i:i + batch_size]
            xt = _bcast(process.scale(tb), xb) * xb + _bcast(process.var(tb).sqrt(), xb) * eb
            err = (net(xt, tb) - eb).square().flatten(1).sum(1)
            out.append(err / process.var(tb) if weighting == "score" else err)
    return torch.cat(out)


def make_optimizer(params, cfg: TrainConfig, device: torch.device):
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    try:  # The fused kernel (CPU since torch 2.4) removes most per-step Python overhead.
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


def step_and_average(opt, ema_params, raw_params, step: int, total: int,
                     cfg: TrainConfig) -> None:
    """One optimizer step at the schedule's learning rate for 1-based ``step``, then the EMA
    update ema ← ema + (1 − d)(raw − ema), d = min(decay, (1+step)/(10+step)) with warm-up."""
    lr = lr_at(step, total, cfg)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    with torch.no_grad():
        d = min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema_decay
        torch._foreach_lerp_(ema_params, raw_params, 1.0 - d)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate at 1-based ``step``: linear warm-up, then constant or cosine decay."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(total - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.min_lr_ratio
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def _clip_(params: list[Tensor], max_norm: float) -> None:
    """Global-norm gradient clipping (as clip_grad_norm_, with less per-call overhead)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp_(max=1.0))


def seed_from(gen: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=gen))


@dataclass(frozen=True)
class RunPlan:
    """Sizes of one DSM run derived from its config and data size (shared by train_dsm and the
    batched trainer, which must split and schedule exactly alike)."""

    n_val: int
    batch_size: int
    total: int
    t_max: float
    eval_every: int
    do_val: bool


def run_plan(cfg: TrainConfig, n: int, process) -> RunPlan:
    """Validation split size, batch size, total steps (epochs count whole batches), t_max and the
    validation cadence of a run on n points (see :class:`TrainConfig`)."""
    n_val = 0
    if cfg.val_fraction > 0:
        if n < 2:
            raise ValueError(f"need at least 2 data points for a validation split, got {n}")
        n_val = min(max(int(round(cfg.val_fraction * n)), 1), n - 1)
    bsz = min(cfg.batch_size, n - n_val)
    per_epoch = (n - n_val) // bsz
    total = cfg.steps if cfg.epochs is None else max(1, math.ceil(cfg.epochs * per_epoch))
    eval_every = per_epoch if cfg.eval_every is None else cfg.eval_every
    return RunPlan(n_val, bsz, total,
                   float(process.T if cfg.t_max is None else cfg.t_max),
                   eval_every, n_val > 0 and eval_every > 0)


def train_dsm(net: nn.Module, data: Tensor, process, cfg: TrainConfig | None = None, *,
              generator: torch.Generator | None = None, init_state: dict | None = None,
              optimizer_state: dict | None = None, device="cpu",
              nan_check: bool = True, fast: GpuFast | None = None) -> TrainResult:
    """Fit an ε-predicting ``net`` to ``data`` (shape (n, *event)) by denoising score matching.

    Minimises E‖ε_θ(X_t, t) − ε‖² over t ~ U[t_min, t_max] (module docstring; DSM with weight
    var(t); DSM loss = ε⋆² + C, docs/paper.md). ``net`` is trained in place (moved to
    ``device``) and returned as ``TrainResult.net``; an EMA copy is ``TrainResult.ema_net``.

    generator: CPU torch.Generator for all randomness (default: seeded with ``cfg.seed``);
        same generator state + same initial weights = same result on the same machine.
    init_state: state dict loaded into ``net`` first (warm start, e.g. the previous
        generation's raw weights); the EMA starts from it. A warm start runs a fresh schedule.
    optimizer_state: optional optimizer state dict to resume Adam's moments.
    nan_check: raise :class:`TrainingDivergedError` (with the step) on a non-finite loss. On
        CPU every step is checked before the update; on accelerators the check runs every 25
        steps (no per-step synchronisation) and still names the first bad step.
    fast: CUDA speed-ups of the step (:mod:`.gpu_fast`: bf16 autocast, channels-last,
        torch.compile, CUDA graphs); ignored on other devices.
    """
    cfg = cfg or TrainConfig()
    device = torch.device(device)
    gen = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)
    split_seed, loop_seed, drop_seed, val_seed = (seed_from(gen) for _ in range(4))
    if init_state is not None:
        net.load_state_dict(init_state)
    net.to(device).train()
    forward = fast_forward(net, fast, device)  # ``net`` itself unless CUDA speed-ups are on

    data = torch.as_tensor(data)
    data = data.to(device=device, dtype=next(net.parameters()).dtype)
    n = data.shape[0]
    if n < 1:
        raise ValueError("no training data")
    plan = run_plan(cfg, n, process)
    n_val, bsz, total = plan.n_val, plan.batch_size, plan.total
    t_min, t_max, eval_every, do_val = cfg.t_min, plan.t_max, plan.eval_every, plan.do_val
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed)).to(device)
    train_x, val_x = data[perm[n_val:]], data[perm[:n_val]]
    n_train = n - n_val

    # Fixed validation draws: the early-stopping criterion is a deterministic function of θ.
    if do_val:
        vg = torch.Generator().manual_seed(val_seed)
        val_x = val_x.repeat((cfg.val_repeats,) + (1,) * (data.dim() - 1))
        val_t = (torch.rand(val_x.shape[0], generator=vg, dtype=torch.float64)
                 * (t_max - t_min) + t_min).to(device=device, dtype=val_x.dtype)
        val_eps = torch.randn(val_x.shape, generator=vg, dtype=val_x.dtype).to(device)

    opt = make_optimizer(net.parameters(), cfg, device)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    raw_p, ema_p = list(net.parameters()), list(ema.parameters())
    raw_b, ema_b = list(net.buffers()), list(ema.buffers())

    g = torch.Generator(device=device).manual_seed(loop_seed)
    hist = torch.empty(total, device=device)
    check_every = 1 if device.type == "cpu" else 25
    val_history: list[tuple[int, float]] = []
    best, best_step, bad, stopped = math.inf, None, 0, False
    best_state: list[Tensor] | None = None
    order, pos, step = None, n_train, 0

    def check(upto: int):
        if check_every == 1:
            if not math.isfinite(float(hist[upto - 1])):
                raise TrainingDivergedError(upto, float(hist[upto - 1]))
            return
        bad_idx = (~torch.isfinite(hist[:upto])).nonzero()
        if bad_idx.numel():
            i = int(bad_idx[0])
            raise TrainingDivergedError(i + 1, float(hist[i]))

    def sync_buffers():
        for eb, rb in zip(ema_b, raw_b, strict=True):
            eb.copy_(rb)

    # Dropout draws from the global RNG: fork it so the run is seeded yet leaves no trace.
    cuda_idx = None
    if device.type == "cuda":
        cuda_idx = device.index if device.index is not None else torch.cuda.current_device()
    with torch.random.fork_rng(devices=[] if cuda_idx is None else [cuda_idx]):
        torch.random.default_generator.manual_seed(drop_seed)
        if cuda_idx is not None:
            with torch.cuda.device(cuda_idx):
                torch.cuda.manual_seed(drop_seed)
        for step in range(1, total + 1):
            if pos + bsz > n_train:
                order, pos = torch.randperm(n_train, generator=g, device=device), 0
            x0 = train_x[order[pos:pos + bsz]]
            pos += bsz
            t = torch.rand(bsz, generator=g, device=device, dtype=x0.dtype) * (t_max - t_min)
            t += t_min
            eps = torch.randn(x0.shape, generator=g, device=device, dtype=x0.dtype)
            xt = _bcast(process.scale(t), x0) * x0 + _bcast(process.var(t).sqrt(), x0) * eps
            loss = (forward(xt, t) - eps).square().flatten(1).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            hist[step - 1] = loss.detach()
            if nan_check and step % check_every == 0:
                check(step)  # before the update on CPU: the raw weights stay finite
            if cfg.grad_clip is not None:
                _clip_(raw_p, cfg.grad_clip)
            step_and_average(opt, ema_p, raw_p, step, total, cfg)

            if do_val and (step % eval_every == 0 or step == total):
                sync_buffers()
                val = float(dsm_loss(ema, val_x, process, val_t, val_eps).mean())
                val_history.append((step, val))
                if val < best - cfg.min_delta:
                    best, best_step, bad = val, step, 0
                    if cfg.restore_best:
                        best_state = [p.detach().clone() for p in ema.state_dict().values()]
                else:
                    bad += 1
                    if cfg.patience is not None and bad >= cfg.patience:
                        stopped = True
                        break
    if nan_check and check_every > 1:
        check(step)
    sync_buffers()
    if best_state is not None:
        with torch.no_grad():
            for p, b in zip(ema.state_dict().values(), best_state, strict=True):
                p.copy_(b)
    net.eval()
    return TrainResult(net=net, ema_net=ema, loss_history=hist[:step].tolist(),
                       val_history=val_history, best_val_loss=best if do_val else math.nan,
                       best_step=best_step, steps=step, stopped_early=stopped,
                       optimizer_state=opt.state_dict(), config=cfg)


# ---- checkpoints ------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns."""

    net: nn.Module
    ema_net: nn.Module | None
    optimizer_state: dict | None
    meta: dict


def _state(obj) -> dict[str, Tensor]:
    return obj.state_dict() if isinstance(obj, nn.Module) else dict(obj)


def build_net(spec: dict) -> nn.Module:
    """Rebuild a network from ``{"class": "MLPNet" | "UNet", "config": {...}}`` (no imports of
    arbitrary names: only the classes of :data:`NET_CLASSES`)."""
    cls = NET_CLASSES.get(spec.get("class", ""))
    if cls is None:
        raise ValueError(f"unknown network class {spec.get('class')!r}; "
                         f"known: {sorted(NET_CLASSES)}")
    return cls(**spec["config"])


def save_checkpoint(path, raw_net, ema_net=None, optimizer_state: dict | None = None,
                    meta: dict | None = None) -> Path:
    """Write raw (``raw.``) and EMA (``ema.``) weights, optionally the optimizer state
    (``opt.<param>.<key>``), to a safetensors file, atomically
    (:func:`~collapselab.files.atomic_write_bytes`).

    ``raw_net``/``ema_net`` are modules or state dicts. ``meta`` (JSON-serialisable) and the
    network's constructor config (when it has ``.config``) go into the safetensors header, so
    :func:`load_checkpoint` can rebuild MLPNet/UNet without a factory.
    """
    path = Path(path)
    tensors: dict[str, Tensor] = {}
    for prefix, src in (("raw.", raw_net), ("ema.", ema_net)):
        if src is not None:
            for k, v in _state(src).items():
                # Clone: safetensors refuses tensors that share storage.
                tensors[prefix + k] = v.detach().to("cpu").contiguous().clone()
    opt_meta = None
    if optimizer_state is not None:
        scalars: dict[str, dict] = {}
        for idx, st in optimizer_state["state"].items():
            for k, v in st.items():
                if isinstance(v, Tensor):
                    tensors[f"opt.{idx}.{k}"] = v.detach().to("cpu").contiguous().clone()
                else:
                    scalars.setdefault(str(idx), {})[k] = v
        opt_meta = {"param_groups": optimizer_state["param_groups"], "scalars": scalars}
    header = {"format": CHECKPOINT_FORMAT, "version": 1, "meta": meta or {},
              "optimizer": opt_meta}
    if isinstance(raw_net, nn.Module) and hasattr(raw_net, "config"):
        header["net"] = {"class": type(raw_net).__name__, "config": raw_net.config}
    text = json.dumps(header)  # fails here, before any file is touched, if meta is not JSON
    atomic_write_bytes(path, save(tensors, metadata={"collapselab": text}))
    return path


def read_checkpoint_meta(path) -> dict:
    """The JSON header of a checkpoint written by :func:`save_checkpoint`."""
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("collapselab")
    if raw is None:
        raise ValueError(f"{path} is not a collapselab checkpoint (no 'collapselab' metadata)")
    header = json.loads(raw)
    if header.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {header.get('format')!r}")
    return header


def load_checkpoint(path, net_factory: Callable[[], nn.Module] | None = None,
                    device="cpu") -> Checkpoint:
    """Load a checkpoint of :func:`save_checkpoint` with safetensors only (no pickle).

    ``net_factory()`` builds an empty network of the right architecture; when None the
    MLPNet/UNet config stored in the header is used. Weights load strictly.
    """
    header = read_checkpoint_meta(path)
    tensors = load_file(str(path), device=str(device))

    def make() -> nn.Module:
        if net_factory is not None:
            return net_factory()
        if "net" not in header:
            raise ValueError(f"{path}: no network config stored; pass net_factory")
        return build_net(header["net"])

    def part(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    net = make().to(device)
    net.load_state_dict(part("raw."))
    ema_sd = part("ema.")
    ema = None
    if ema_sd:
        ema = make().to(device)
        ema.load_state_dict(ema_sd)
        ema.eval().requires_grad_(False)
    opt_state = None
    if header.get("optimizer") is not None:
        state: dict[int, dict] = {}
        for k, v in part("opt.").items():
            idx, key = k.split(".", 1)
            state.setdefault(int(idx), {})[key] = v
        for idx, sc in header["optimizer"]["scalars"].items():
            state.setdefault(int(idx), {}).update(sc)
        opt_state = {"state": state, "param_groups": header["optimizer"]["param_groups"]}
    return Checkpoint(net=net, ema_net=ema, optimizer_state=opt_state, meta=header["meta"])


__all__ = [
    "Checkpoint", "TrainConfig", "TrainResult", "TrainingDivergedError", "build_net",
    "dsm_loss", "load_checkpoint", "read_checkpoint_meta", "save_checkpoint", "train_dsm",
]
