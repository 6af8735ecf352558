"""Every use of Pyro's and torch's private API, in one place.

Each helper here names what it relies on. ``tests/test_compat.py`` exercises
every one of them against the installed versions and fails with those versions
named when one breaks; :data:`TESTED` records the versions they were checked on.
``pyproject.toml`` bounds the dependencies to the tested major versions.
"""

from typing import Optional, Tuple

import pyro
import torch

__all__ = ["TESTED", "split_module_param_name", "trace_elbo_log_r", "get_elbo_traces", "make_fx", "is_deterministic",
           "plate_full_size", "pack_trace", "packed_dims", "tensor_version", "DispatchMode"]

#: versions on which every helper below was checked
TESTED = {"pyro-ppl": ("1.9.1", "1.9.2"), "torch": ("2.11", "2.13")}

# pyro.module registers a module's parameters as "<module name>$$$<parameter path>".
from pyro.params.param_store import module_from_param_with_module_name as _module_of  # noqa: E402
from pyro.params.param_store import user_param_name as _user_name  # noqa: E402

from torch.utils._python_dispatch import TorchDispatchMode as _TorchDispatchMode  # noqa: E402


class DispatchMode(_TorchDispatchMode):
    """The base class of a mode that sees every ATen operation with its arguments, for
    :mod:`pyrovae.tape` (``torch.utils._python_dispatch.TorchDispatchMode``).

    torch wraps a mode's ``__torch_dispatch__`` in ``torch._dynamo.disable`` unless the class
    method ``_should_skip_dynamo`` says no; the wrapper imports ``torch._dynamo`` on its first
    call, which took 2.1 s on a CPU. Nothing in a recorded chunk is compiled by Dynamo through
    this mode, so it says no."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False


def split_module_param_name(store_name: str) -> Tuple[Optional[str], str]:
    """``("encoder", "net.0.weight")`` for a parameter that ``pyro.module("encoder", ...)``
    registered, ``(None, store_name)`` for a plain ``pyro.param``."""
    module = _module_of(store_name)
    if module is None or module == store_name:
        return None, store_name
    return module, _user_name(store_name)


def get_elbo_traces(elbo, model, guide, args, kwargs):
    """The (model trace, guide trace) pairs an ELBO draws, one per particle (``ELBO._get_traces``)."""
    return elbo._get_traces(model, guide, args, kwargs)


def trace_elbo_log_r(model_trace, guide_trace):
    """The score-function baseline term of Trace_ELBO (``pyro.infer.trace_elbo._compute_log_r``)."""
    from pyro.infer.trace_elbo import _compute_log_r

    return _compute_log_r(model_trace, guide_trace)


def make_fx(fn, tracing_mode: str = "real"):
    """Record ``fn`` as an FX graph of ATen operations (``torch.fx.experimental.proxy_tensor.make_fx``).

    Imported on first use: the module is slow to import.
    """
    from torch.fx.experimental.proxy_tensor import make_fx as _make_fx

    return _make_fx(fn, tracing_mode=tracing_mode)


def is_deterministic(site) -> bool:
    """True for a ``pyro.deterministic`` site, which Pyro records as an observed sample site
    flagged ``infer["_deterministic"]``: it holds no density."""
    return bool(site["infer"].get("_deterministic"))


def plate_full_size(frame):
    """The size of the whole plate of a subsampled ``CondIndepStackFrame`` (None if not recorded)."""
    return getattr(frame, "full_size", None)


def pack_trace(trace) -> dict:
    """Compute and pack a trace's log-densities for contraction; returns plate name -> dim symbol
    (``Trace.pack_tensors``, ``Trace.plate_to_symbol``)."""
    trace.compute_log_prob()
    trace.pack_tensors()
    return trace.plate_to_symbol


def packed_dims(tensor) -> str:
    """The dim symbols of a packed tensor (``tensor._pyro_dims``)."""
    return tensor._pyro_dims


def tensor_version(tensor: torch.Tensor) -> int:
    """How many times a tensor (or a view sharing its memory) was changed in place
    (``Tensor._version``, the counter autograd checks saved tensors with)."""
    return tensor._version


def versions() -> str:
    """The installed versions, for messages that say which versions broke."""
    return f"pyro-ppl {pyro.__version__}, torch {torch.__version__}"
