"""Neural score models in the loop: build the network, train it by DSM, checkpoint it.

Glue between the configuration (``score.*``) and :mod:`.training`: the MLP (any data, images
flattened) and the U-Net (images). The EMA weights sample; a warm start resumes from the
previous generation's raw weights (the paper's image recipe: AdamW, cosine, EMA, early
stopping; docs/paper.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from .ensemble import train_dsm_ensemble
from .flow import FlowField, train_flow_matching
from .gpu_fast import parse_gpu_fast
from .mlp import MLPNet, NeuralScore
from .training import (
    TrainConfig,
    TrainingDivergedError,
    TrainResult,
    load_checkpoint,
    save_checkpoint,
    train_dsm,
)
from .unet import UNet

# Optional trainers of K MLP chains, by ``score.train_backend`` name, registered by the packages
# that provide them (collapselab.fast registers "native" when it is imported; config imports it
# when a config asks for it). "torch", the default, is this module's own path and never
# consults this table, so a default run does not depend on what is installed.
TRAIN_BACKENDS: dict[str, Callable] = {}

# K MLP chains of the default backend train as one vmapped ensemble
# (:func:`~.ensemble.train_dsm_ensemble`) up to this width, as K sequential ``train_dsm`` fits
# above it: both give the same numbers up to float rounding, and the ensemble is kept only
# where benchmarks/bench_ensemble.py measured it faster than sequential fits on CPU (narrow
# nets, where per-op overhead dominates; wider ones spend their time in products that one
# large matmul per chain computes faster than a batched one). Never decided by the machine.
ENSEMBLE_MAX_HIDDEN = 128


def use_ensemble(score_cfg, K: int) -> bool:
    """Whether :func:`fit_neural_batched` trains K chains as one vmapped ensemble."""
    return K > 1 and score_cfg.hidden <= ENSEMBLE_MAX_HIDDEN


def register_train_backend(name: str, trainer: Callable) -> None:
    """Make ``score.train_backend: <name>`` train K MLP chains with ``trainer(nets, datas,
    process, cfg, seeds=..., device=..., threads=...)`` → one TrainResult per chain."""
    TRAIN_BACKENDS[name] = trainer


def train_backend(score_cfg) -> str:
    return getattr(score_cfg, "train_backend", "torch") or "torch"


def build_network(score_cfg, event_shape: tuple[int, ...], seed: int) -> nn.Module:
    """The configured network with weights initialised from ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if score_cfg.kind == "mlp":
            return MLPNet(math.prod(event_shape), hidden=score_cfg.hidden, layers=score_cfg.layers)
        if score_cfg.kind == "unet":
            return UNet(
                in_channels=event_shape[0],
                base_channels=score_cfg.base_channels,
                channel_mults=tuple(score_cfg.channel_mults),
                num_res_blocks=score_cfg.num_res_blocks,
                attention_levels=tuple(score_cfg.attention_levels),
                dropout=score_cfg.dropout,
            )
    raise ValueError(f"not a network score: {score_cfg.kind}")


def train_config(score_cfg, generation: int, seed: int, t_min: float) -> TrainConfig:
    """Generation 0 may train longer (``epochs_first``; the paper: 200 epochs, then 100)."""
    epochs = (
        score_cfg.epochs_first if generation == 0 and score_cfg.epochs_first else score_cfg.epochs
    )
    return TrainConfig(
        steps=score_cfg.train_steps,
        epochs=epochs,
        batch_size=score_cfg.batch_size,
        lr=score_cfg.lr,
        weight_decay=score_cfg.weight_decay,
        optimizer=score_cfg.optimizer,
        schedule=score_cfg.schedule,
        ema_decay=score_cfg.ema_decay,
        patience=score_cfg.patience,
        val_fraction=score_cfg.val_fraction,
        t_min=t_min,
        seed=seed,
    )


def fit_neural(
    score_cfg,
    process,
    data: Tensor,
    *,
    generation: int,
    seed: int,
    t_min: float,
    device="cpu",
    init_state: dict | None = None,
) -> tuple[NeuralScore, TrainResult]:
    """Train generation i's network on its training set with :func:`~.training.train_dsm`;
    the score samples with EMA weights. With ``score.train_backend`` other than "torch" an MLP
    trains through that backend with one chain (:func:`fit_neural_batched`); with
    ``score.objective: flow_matching`` the network is a velocity field (:func:`fit_flow`)."""
    if getattr(score_cfg, "objective", "dsm") == "flow_matching":
        return fit_flow(score_cfg, process, data, generation=generation, seed=seed, t_min=t_min,
                        device=device, init_state=init_state)
    if score_cfg.kind == "mlp" and train_backend(score_cfg) != "torch":
        return fit_neural_batched(score_cfg, process, [data], generation=generation,
                                  seeds=[seed], t_min=t_min, device=device,
                                  init_states=[init_state])[0]
    net = build_network(score_cfg, tuple(data.shape[1:]), seed)
    cfg = train_config(score_cfg, generation, seed, t_min)
    result = train_dsm(net, data, process, cfg, init_state=init_state, device=device,
                       fast=parse_gpu_fast(getattr(score_cfg, "gpu_fast", False)))
    return NeuralScore(result.ema_net, process), result


def fit_neural_batched(
    score_cfg,
    process,
    datas: Sequence[Tensor],
    *,
    generation: int,
    seeds: Sequence[int],
    t_min: float,
    device="cpu",
    init_states: Sequence[dict | None] | None = None,
    threads: int | None = None,
) -> list[tuple[NeuralScore, TrainResult]]:
    """:func:`fit_neural` for K MLP chains at once; chain k gets what ``fit_neural(score_cfg,
    process, datas[k], generation=generation, seed=seeds[k], t_min=t_min,
    init_state=init_states[k])`` gives: the same initial weights, warm start, schedule and
    random draws. The default backend trains them as one vmapped ensemble
    (:func:`~.ensemble.train_dsm_ensemble`, equal to K ``train_dsm`` fits up to float
    rounding) or one after another (:func:`use_ensemble`); ``score.train_backend`` names another
    registered trainer (:data:`TRAIN_BACKENDS`).

    datas: K training sets of one shape. threads: CPU threads of an optional backend. A
    diverged chain raises TrainingDivergedError with ``.chain = k``.
    """
    if score_cfg.kind != "mlp":
        raise ValueError(f"batched training is for MLP scores, not {score_cfg.kind}")
    K = len(datas)
    if len(seeds) != K or (init_states is not None and len(init_states) != K):
        raise ValueError(f"need one seed and one init state per data set ({K})")
    nets = [build_network(score_cfg, tuple(d.shape[1:]), int(s))
            for d, s in zip(datas, seeds, strict=True)]
    for net, state in zip(nets, init_states or [None] * K, strict=True):
        if state is not None:  # what train_dsm does with init_state (the EMA starts from it)
            net.load_state_dict(state)
    # The seed in the config is replaced per chain by ``seeds`` (as train_dsm's config seed).
    cfg = train_config(score_cfg, generation, int(seeds[0]), t_min)
    seeds = [int(s) for s in seeds]
    backend = train_backend(score_cfg)
    if backend != "torch":
        trainer = TRAIN_BACKENDS.get(backend)
        if trainer is None:
            raise RuntimeError(f"score.train_backend: {backend!r} is not available (its package "
                               "registers it when imported; see docs/performance.md)")
        results = trainer(nets, datas, process, cfg, seeds=seeds, device=device,
                          threads=threads)
    elif use_ensemble(score_cfg, K):
        results = train_dsm_ensemble(nets, datas, process, cfg, seeds=seeds, device=device)
    else:
        results = []
        for k, (net, data) in enumerate(zip(nets, datas, strict=True)):
            try:
                results.append(train_dsm(net, data, process, replace(cfg, seed=seeds[k]),
                                         device=device))
            except TrainingDivergedError as exc:
                exc.chain = k
                raise
    return [(NeuralScore(r.ema_net, process), r) for r in results]


def fit_flow(score_cfg, process, data: Tensor, *, generation: int, seed: int, t_min: float,
             device="cpu", init_state: dict | None = None) -> tuple[FlowField, TrainResult]:
    """:func:`fit_neural` for ``objective: flow_matching``: the same network, initial weights,
    warm start and optimiser settings, trained by conditional flow matching
    (:func:`~.flow.train_flow_matching`); the EMA velocity field is the model."""
    net = build_network(score_cfg, tuple(data.shape[1:]), seed)
    cfg = train_config(score_cfg, generation, seed, t_min)
    result = train_flow_matching(net, data, cfg, coupling=score_cfg.coupling,
                                 init_state=init_state, device=device)
    return FlowField(result.ema_net, process), result


def load_model(path: Path, score_cfg, process, device="cpu"):
    """A saved generation's model (EMA weights) as the loop uses it: a NeuralScore, or a
    FlowField for ``objective: flow_matching``."""
    net = load_checkpoint(path, device=device).ema_net
    if getattr(score_cfg, "objective", "dsm") == "flow_matching":
        return FlowField(net, process)
    return NeuralScore(net, process)


def save_model(path: Path, result: TrainResult, meta: dict | None = None) -> None:
    """model.safetensors: raw and EMA weights (+ the net's config in the header)."""
    save_checkpoint(path, result.net, result.ema_net, meta=meta)


def raw_state(path: Path) -> dict:
    """Raw weights of a saved generation (the warm start of the next one)."""
    return load_checkpoint(path).net.state_dict()
