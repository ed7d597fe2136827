"""Neural score models in the loop: build the network, train it by DSM, checkpoint it.

Glue between the configuration (``score.*``) and :mod:`.training`: the MLP (any data, images
flattened) and the U-Net (images). The EMA weights sample; a warm start resumes from the
previous generation's raw weights (PAPER.md §5 recipe: AdamW, cosine, EMA, early stopping).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..batched import train_dsm_batched
from .gpu_fast import parse_gpu_fast
from .mlp import MLPNet, NeuralScore
from .training import TrainConfig, TrainResult, load_checkpoint, save_checkpoint, train_dsm
from .unet import UNet


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
    """Train generation i's network on its training set; the score samples with EMA weights.

    An MLP trains through the batched trainer with one chain (:func:`fit_neural_batched`):
    the same draws, schedule and result as :func:`~.training.train_dsm` up to float rounding,
    with its hand-written backward, flat optimizer state and (on CPU) fused SiLU kernels,
    1.1-1.7x faster per step at the presets' sizes (docs/performance.md). A U-Net trains with
    ``train_dsm``."""
    if score_cfg.kind == "mlp":
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
    """:func:`fit_neural` for K MLP chains at once (one :func:`~collapselab.batched.
    train_dsm_batched` call); chain k gets what ``fit_neural(score_cfg, process, datas[k],
    generation=generation, seed=seeds[k], t_min=t_min, init_state=init_states[k])`` gives, up
    to float rounding (~1e-6 relative; see collapselab.batched): the same initial weights, warm
    start, schedule and random draws.

    datas: K training sets of one shape. threads: CPU shards of the batched trainer (default:
    torch's thread count). A diverged chain raises TrainingDivergedError with ``.chain = k``.
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
    results = train_dsm_batched(nets, datas, process, cfg, seeds=[int(s) for s in seeds],
                                device=device, threads=threads)
    return [(NeuralScore(r.ema_net, process), r) for r in results]


def save_model(path: Path, result: TrainResult, meta: dict | None = None) -> None:
    """model.safetensors: raw and EMA weights (+ the net's config in the header)."""
    save_checkpoint(path, result.net, result.ema_net, meta=meta)


def raw_state(path: Path) -> dict:
    """Raw weights of a saved generation (the warm start of the next one)."""
    return load_checkpoint(path).net.state_dict()
