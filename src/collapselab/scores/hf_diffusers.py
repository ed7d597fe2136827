"""A diffusers model in the loop: ``score.kind: diffusers`` (``collapselab[diffusers]``).

A ``UNet2DModel`` built from its configuration (no weights are downloaded) and a
``DDPMScheduler``: trained with the usual ε-prediction loss of Ho et al. (2020),

    L(θ) = E_{x0, k, ε} ‖ε_θ(√ᾱ_k x0 + √(1 − ᾱ_k) ε, k) − ε‖²,   k ~ U{0, …, K − 1},

with ᾱ_k the scheduler's cumulative product of its β schedule, and sampled with the scheduler's
own ancestral steps (``DDPMScheduler.step``). The noising process is the scheduler's discrete
one, not the configured ``process`` (which the loop passes and this model ignores); the model
draws its own samples, so the chain's ``sampler`` settings do not apply either. It follows the
plug-in contract of :mod:`collapselab.scores.registry` (``fit``/``sample``/``state_dict``).
"""

from __future__ import annotations

import copy

import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import Tensor


class DiffusersModel:
    """UNet2DModel + DDPMScheduler for images of ``channels`` channels in [-1, 1].

    block_out_channels, layers_per_block, norm_num_groups, down_block_types, up_block_types:
        UNet2DModel's arguments (one down block per level; sizes must halve cleanly).
    num_train_timesteps, beta_start, beta_end, beta_schedule, clip_sample: DDPMScheduler's.
    inference_steps: scheduler steps when sampling (default: num_train_timesteps).
    train_steps, batch_size, lr, weight_decay: AdamW on the ε-prediction loss.
    ema_decay: EMA of the weights (0: none); the EMA weights sample and are checkpointed.
    """

    def __init__(self, channels: int = 1, block_out_channels=(32, 64), layers_per_block: int = 1,
                 norm_num_groups: int = 8, down_block_types=None, up_block_types=None,
                 num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02, beta_schedule: str = "linear",
                 clip_sample: bool = True, inference_steps: int | None = None,
                 train_steps: int = 2000, batch_size: int = 128, lr: float = 1e-3,
                 weight_decay: float = 0.0, ema_decay: float = 0.0):
        levels = len(block_out_channels)
        self.unet_config = dict(
            in_channels=int(channels), out_channels=int(channels),
            block_out_channels=tuple(int(c) for c in block_out_channels),
            layers_per_block=int(layers_per_block), norm_num_groups=int(norm_num_groups),
            down_block_types=tuple(down_block_types or ("DownBlock2D",) * levels),
            up_block_types=tuple(up_block_types or ("UpBlock2D",) * levels),
        )
        self.scheduler = DDPMScheduler(num_train_timesteps=int(num_train_timesteps),
                                       beta_start=beta_start, beta_end=beta_end,
                                       beta_schedule=beta_schedule, clip_sample=clip_sample)
        self.inference_steps = int(inference_steps or num_train_timesteps)
        self.train_steps, self.batch_size = int(train_steps), int(batch_size)
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.ema_decay = float(ema_decay)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("ema_decay must be in [0, 1)")
        self.unet = self._build(0)  # fails here, at validation, on a bad UNet configuration
        self.event_shape: tuple[int, ...] | None = None
        self.device = torch.device("cpu")

    def _build(self, seed: int) -> UNet2DModel:
        with torch.random.fork_rng(devices=[]):  # seeded init, global RNG untouched
            torch.manual_seed(seed)
            return UNet2DModel(**self.unet_config)

    def fit(self, x: Tensor, *, seed: int, process, device="cpu") -> None:
        """AdamW on the ε-prediction loss from a fresh seeded initialisation; every draw
        (batches, steps k, noise) from one generator seeded by ``seed``."""
        if x.dim() != 4 or x.shape[1] != self.unet_config["in_channels"]:
            raise ValueError(f"diffusers model: expected images (n, "
                             f"{self.unet_config['in_channels']}, H, W), got {tuple(x.shape)}")
        self.device = torch.device(device)
        self.event_shape = tuple(x.shape[1:])
        net = self._build(seed).to(self.device).train()
        ema = copy.deepcopy(net).eval() if self.ema_decay > 0 else None
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        gen = torch.Generator().manual_seed(int(seed))
        data = x.to(torch.float32)
        abar = self.scheduler.alphas_cumprod.to(torch.float32)
        K = len(abar)
        bs = min(self.batch_size, len(data))
        for _ in range(self.train_steps):
            idx = torch.randint(len(data), (bs,), generator=gen)
            k = torch.randint(K, (bs,), generator=gen)
            eps = torch.randn((bs, *self.event_shape), generator=gen)
            a = abar[k].reshape(-1, 1, 1, 1)
            noisy = (a.sqrt() * data[idx] + (1 - a).sqrt() * eps).to(self.device)
            loss = torch.nn.functional.mse_loss(net(noisy, k.to(self.device)).sample,
                                                eps.to(self.device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"diffusers model: training loss became {loss.item()}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                with torch.no_grad():
                    for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
                        pe.lerp_(p, 1.0 - self.ema_decay)
        self.unet = (ema if ema is not None else net).eval()

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator) -> Tensor:
        """n images by the scheduler's ancestral steps from N(0, I) (``inference_steps``)."""
        if self.event_shape is None:
            raise RuntimeError("diffusers model: sample() before fit()")
        sched = copy.deepcopy(self.scheduler)  # set_timesteps mutates the scheduler
        sched.set_timesteps(self.inference_steps)
        x = torch.randn((n, *self.event_shape), generator=generator).to(self.device)
        for k in sched.timesteps:
            eps = self.unet(x, k.to(self.device)).sample
            # The step's noise from the chain's (CPU) generator: reproducible on any device.
            x = sched.step(eps.cpu(), k, x.cpu(), generator=generator).prev_sample.to(self.device)
        return x.cpu()

    def state_dict(self) -> dict[str, Tensor]:
        """The sampling network's weights (EMA when ``ema_decay`` > 0)."""
        return dict(self.unet.state_dict())

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.unet.load_state_dict(state)
        self.unet.eval()


def make(**options) -> DiffusersModel:
    """The ``diffusers`` kind's factory: ``DiffusersModel(**score.options)``."""
    return DiffusersModel(**options)
