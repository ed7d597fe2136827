"""The machine a run executes on: versions and device, recorded in environment.json and shown
by the reports."""

from __future__ import annotations

import numpy as np


def environment() -> dict:
    """Versions and device of this machine (the run records its own in environment.json)."""
    import os
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        own = version("collapselab")
    except PackageNotFoundError:
        own = "unknown"
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "collapselab": own,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cuda_available": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
    }
