"""collapselab.fast: the optional CPU accelerator for MLP score training.

A hand-written DSM step for K SiLU MLPs (:mod:`.batched`: explicit backward, flat optimizer
state, thread shards), fused C kernels (:mod:`.native`, compiled from ``kernels.c`` on first
use) and a register-tiled float32 GEMM (:mod:`.gemm`). It is used only when asked for, with
``score.train_backend: native`` or ``COLLAPSELAB_TRAIN_BACKEND=native``; importing this package
registers that trainer with :mod:`collapselab.scores.neural`. Nothing else in collapselab
imports it, and a default run computes the same numbers whether it is installed or not.
Results agree with the default trainer up to float32 rounding.
"""

from __future__ import annotations

from ..scores.neural import register_train_backend
from .batched import train_dsm_batched

register_train_backend("native", train_dsm_batched)

__all__ = ["train_dsm_batched"]
