import os

import pytest
import torch
import pyro

from .common import restore_default_device

# PYROVAE_DEVICE=cuda runs the suite on a GPU (as Pyro's PYRO_DEVICE does).
DEVICE = os.environ.get("PYROVAE_DEVICE", "cpu")
if DEVICE != "cpu":
    torch.set_default_device(DEVICE)


@pytest.fixture(autouse=True)
def _isolate():
    """Seed, clear Pyro's param store and enable validation for every test; fail a test that
    leaves torch's default device changed (the tests after it would run elsewhere)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    before = torch.get_default_device()
    with pyro.validation_enabled(True):
        yield
    pyro.clear_param_store()
    after = torch.get_default_device()
    if after != before:
        restore_default_device(before)
        pytest.fail(f"the test left torch's default device at {after}, not {before}: restore it as it was "
                    "(tests/common.default_device)")
