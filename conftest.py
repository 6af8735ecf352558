"""Doctests in pyrovae/ start like the tests do: a clear param store and a fixed seed."""

import pyro
import pytest


@pytest.fixture(autouse=True)
def _isolate_doctests(request):
    if isinstance(request.node, pytest.DoctestItem):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
    yield
