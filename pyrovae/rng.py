"""The random state of a training run, as plain values that a checkpoint can hold.

A resumed run continues bitwise only if every generator it draws from is
restored: torch's global generator (Pyro's draws), the CUDA generators, NumPy's
and Python's global state, and the generator that orders the batches. Pyro's
own ``pyro.util.get_rng_state`` misses the last two of those and returns
NumPy's state as a tuple of arrays, which ``torch.load(weights_only=True)``
refuses; here everything is a tensor, an int, a float or a tuple of them.
"""

import random
from typing import Optional

import numpy as np
import torch

__all__ = ["capture", "restore", "torch_state", "set_torch_state", "same_torch_state"]


def torch_state(device: torch.device):
    """torch's global generator and, on CUDA, the generator of ``device``: what a Pyro step draws from."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_torch_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def same_torch_state(a, b) -> bool:
    """Whether two :func:`torch_state` values are the same state."""
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in zip(a, b))


def capture(generator: Optional[torch.Generator] = None) -> dict:
    """Every generator's state: torch (CPU and, once initialised, CUDA), NumPy, Python, and ``generator``."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy_key": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_rest": (int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "data": None if generator is None else generator.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict, generator: Optional[torch.Generator] = None) -> None:
    """Undo :func:`capture`: set every generator it recorded."""
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    pos, has_gauss, cached = state["numpy_rest"]
    np.random.set_state(("MT19937", state["numpy_key"].numpy().astype(np.uint32), pos, has_gauss, cached))
    if generator is not None and state.get("data") is not None:
        generator.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(obj):
    return tuple(_tuplify(o) for o in obj) if isinstance(obj, (list, tuple)) else obj
