"""A plug-in model's ``state_dict()`` as a safetensors file (never pickle), written atomically.

The tensors are stored under their state-dict names; ``meta`` (JSON) goes into the header.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from ..files import atomic_write_bytes

FORMAT = "collapselab.plugin_state"


def save_state(path: Path, state: dict, meta: dict | None = None) -> None:
    """Write ``state`` (name → tensor) to ``path`` (temporary name, then rename)."""
    tensors = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"state_dict() entry '{k}' is a {type(v).__name__}, not a tensor "
                            "(checkpoints hold tensors only)")
        # Clone: safetensors refuses tensors that share storage.
        tensors[str(k)] = v.detach().to("cpu").contiguous().clone()
    header = {"format": FORMAT, "meta": json.dumps(meta or {})}
    atomic_write_bytes(Path(path), save(tensors, metadata=header))


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict written by :func:`save_state` (on the CPU)."""
    return load_file(str(path))


def state_meta(path: Path) -> dict:
    """The ``meta`` saved with the state."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("meta", "{}"))
