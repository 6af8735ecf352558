"""Every argument and data check of pyrovae: fail early, naming the argument and the value.

Kept free of pyrovae imports so that any module may use it.
"""

import math
import os
from pathlib import Path
from typing import Iterable, Optional

import torch

__all__ = ["CheckpointError", "check_int", "check_float", "check_bool", "check_choice", "check_tensors", "check_finite",
           "check_seed", "check_path"]


class CheckpointError(ValueError):
    """A run folder or checkpoint that cannot be loaded safely or correctly."""


def check_int(name: str, value, minimum: int = 1, *, allow_none: bool = False):
    """Return ``value`` if it is an int (not a bool) >= ``minimum``; else raise naming it.

    >>> check_int("epochs", 3)
    3
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be a positive int, got {value!r}" if minimum == 1 else
                         f"{name} must be >= {minimum}, got {value!r}")
    return value


def check_float(name: str, value, *, positive: bool = False, allow_none: bool = False,
                maximum: Optional[float] = None) -> Optional[float]:
    """Return ``value`` as a float if it is a finite non-negative number (positive if asked)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a {'positive' if positive else 'non-negative'} finite float, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum:.3g}, got {value!r}")
    return float(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_choice(name: str, value, choices: Iterable, *, allow_none: bool = False):
    """Return ``value`` if it is one of ``choices`` (or None when allowed)."""
    if value is None and allow_none:
        return None
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not one of {sorted(map(str, choices))}"
                         + (" or None" if allow_none else ""))
    return value


def check_seed(name: str, value) -> Optional[int]:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"{name} must be an int or None, got {value!r}")
    return value


def check_finite(name: str, x: torch.Tensor) -> torch.Tensor:
    """Refuse an empty tensor or one with NaN or infinite entries, naming the first bad datapoint."""
    if x.dim() > 0 and x.shape[0] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    if x.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        if x.dim() == 0:
            raise ValueError(f"{name} is NaN or infinite")
        bad = (~torch.isfinite(x)).reshape(len(x), -1).any(1).nonzero()[0].item()
        raise ValueError(f"{name} contains NaN or infinite values (first at index {bad})")
    return x


def check_tensors(args: tuple, kwargs: dict, name: str = "data") -> None:
    """:func:`check_finite` on every tensor among the programs' arguments."""
    named = [(f"{name}[{i}]" if len(args) + len(kwargs) > 1 else name, a) for i, a in enumerate(args)]
    named += [(f"{name}[{k!r}]", v) for k, v in kwargs.items()]
    for label, value in named:
        if isinstance(value, torch.Tensor):
            check_finite(label, value)


def check_path(name: str, value) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path, got {value!r}")
    return Path(value)
