import os

import pytest
import torch
import pyro

# PYROVAE_DEVICE=cuda runs the suite on a GPU (as Pyro's PYRO_DEVICE does).
DEVICE = os.environ.get("PYROVAE_DEVICE", "cpu")
if DEVICE != "cpu":
    torch.set_default_device(DEVICE)


@pytest.fixture(autouse=True)
def _isolate():
    """Seed, clear Pyro's param store and enable validation for every test."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with pyro.validation_enabled(True):
        yield
    pyro.clear_param_store()
