"""Optional CUDA speed-ups of the denoising-score-matching step (``score.gpu_fast``).

The DSM loss ``E‖ε_θ(X_t, t) − ε‖²`` (Ho et al. 2020; :mod:`.training`) is unchanged; these
options change how the network's forward/backward runs on a CUDA device:

- ``bf16``: the forward (and so the backward) under ``torch.autocast(dtype=bfloat16)``: the
  convolutions and matmuls in bf16 on tensor cores, reductions (GroupNorm, softmax) and the
  loss in float32 as autocast keeps them; the weights, gradients, optimizer and EMA stay
  float32. It changes the trained network's rounding, not the objective;
- ``channels_last``: weights and inputs in NHWC memory order (cuDNN's native layout for
  convolutions on tensor cores); values identical;
- ``compile``: the network's forward/backward through ``torch.compile`` (fused elementwise
  kernels);
- ``cuda_graphs``: ``torch.compile(mode="reduce-overhead")``, which records the compiled
  forward/backward as CUDA graphs and replays them (one launch per step instead of hundreds).
  Valid because train_dsm's batch shape is static (the incomplete last batch is dropped).

``score.gpu_fast: true`` switches on all four; a list switches on those named. The optimizer
is already the fused Adam(W) kernel (:func:`.training._make_optimizer` asks for it on every
device). On a CPU device every option is ignored: the step, and so every number, is exactly
the default one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["GPU_FAST_OPTIONS", "GpuFast", "fast_forward", "parse_gpu_fast"]

GPU_FAST_OPTIONS = ("bf16", "channels_last", "compile", "cuda_graphs")


@dataclass(frozen=True)
class GpuFast:
    """Which CUDA speed-ups the DSM step uses (module docstring); all off by default."""

    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    cuda_graphs: bool = False

    @property
    def any(self) -> bool:
        return self.bf16 or self.channels_last or self.compile or self.cuda_graphs


def parse_gpu_fast(value: bool | Iterable[str] | None) -> GpuFast:
    """``score.gpu_fast``: false / null (none), true (all four) or a list of option names."""
    if value is None or value is False:
        return GpuFast()
    if value is True:
        return GpuFast(*(True,) * len(GPU_FAST_OPTIONS))
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ConfigError("score.gpu_fast", f"must be true, false or a list of "
                          f"{list(GPU_FAST_OPTIONS)} (got {value!r})")
    names = list(value)
    bad = [n for n in names if n not in GPU_FAST_OPTIONS]
    if bad:
        raise ConfigError("score.gpu_fast", f"unknown option(s) {bad}; allowed: "
                          f"{list(GPU_FAST_OPTIONS)} (or true / false)")
    return GpuFast(**{n: True for n in names})


def fast_forward(
    net: nn.Module, fast: GpuFast | None, device: torch.device, *, force: bool = False
) -> Callable[[Tensor, Tensor], Tensor]:
    """The function train_dsm calls as ``ε_θ(x_t, t)``, with ``fast``'s options applied.

    On a non-CUDA device (unless ``force``, for tests on CPU) it is ``net`` itself. Otherwise
    ``net`` is converted to channels-last in place (parameters keep their identity, so an
    optimizer built afterwards or before sees the same tensors) and the returned function
    casts the input, runs the (compiled) network under bf16 autocast and returns float32.
    """
    if fast is None or not fast.any or (device.type != "cuda" and not force):
        return net
    if fast.channels_last:
        net.to(memory_format=torch.channels_last)
    run = net
    if fast.compile or fast.cuda_graphs:
        run = torch.compile(net, mode="reduce-overhead" if fast.cuda_graphs else None)

    def forward(x: Tensor, t: Tensor) -> Tensor:
        if fast.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if fast.cuda_graphs:
            # A new training step: the previous step's graph outputs (loss, activations) are
            # consumed by then, so the replay may overwrite them.
            torch.compiler.cudagraph_mark_step_begin()
        amp = (torch.autocast(device.type, dtype=torch.bfloat16) if fast.bf16
               else contextlib.nullcontext())
        with amp:
            out = run(x, t)
        return out.float()

    return forward
