import os

import pytest
import torch

# Two cores are shared by the test workers; one thread each avoids oversubscription.
torch.set_num_threads(1)
os.environ.setdefault(
    "COLLAPSELAB_CACHE", os.path.join(os.getcwd(), ".pytest_cache", "collapselab")
)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
