import os

import pytest
import torch

from collapselab.engine.hooks import Hooks

# Two cores are shared by the test workers; one thread each avoids oversubscription.
torch.set_num_threads(1)
os.environ.setdefault(
    "COLLAPSELAB_CACHE", os.path.join(os.getcwd(), ".pytest_cache", "collapselab")
)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


# ---- test hooks, passed explicitly: run_experiment(..., hooks=...) ---------------------------
@pytest.fixture
def fit_log(tmp_path):
    """Hooks logging every score fit to ``tmp_path / "fits.txt"`` (``Path(fit_log.fit_log)``)
    as "alpha seed generation params", in whatever process trains; add faults with
    ``fit_log.with_faults(...)``."""
    return Hooks(fit_log=str(tmp_path / "fits.txt"))


@pytest.fixture
def fault_hooks():
    """Build Hooks that inject faults: ``fault_hooks({"alpha", "seed", "generation",
    "kind": exit|raise|nan}, ...)`` fails those chains' score fits."""
    return lambda *faults: Hooks(faults=faults)
