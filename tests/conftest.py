import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    """A generator with a fresh seed each run; the seed is printed so a failure can be replayed."""
    seed = int(os.environ.get("MLMAMBA_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"seed={seed} (MLMAMBA_TEST_SEED={seed} replays it)")
    return torch.Generator().manual_seed(seed)
