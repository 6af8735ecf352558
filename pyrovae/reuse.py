"""Network calls that chunks of particles repeat, computed once.

Importance sampling runs the guide and the model once per chunk of particles
(:mod:`pyrovae.weights`). A network whose inputs do not depend on the
particles, such as the encoder of q(z | x), which reads only x, then computes
the same output in every chunk: about 5% of ``log_marginal``'s time for an
MNIST VAE on a CPU. Inside :class:`ReusedCalls` such a call is computed once
and its output handed out again, but only where that is exact:

* **The same inputs.** The same tensors (same memory, shape, strides, dtype,
  device and version counter; the block holds them, so their memory cannot be
  taken by another tensor) and equal plain values (None, bool, int, float,
  str). A module whose inputs change, as the decoder's do, is left alone from
  its second call on.
* **Checked once.** The second call with the same inputs is computed again and
  must give bitwise the same outputs, and neither call may send a Pyro message
  (``pyro.sample``, ``pyro.param``, ``pyro.module``, a plate): a network that
  draws random numbers or holds Pyro statements is never reused.
* **Untouched outputs.** Every reuse checks that the program has not changed a
  returned tensor in place; if it has, the module runs as written from then on.
* **Only where it is safe to intercept:** gradients off; plain ``nn.Module``
  objects (not ``PyroModule``, whose attributes are Pyro statements, nor
  TorchScript) returning a tensor, or a tuple or list of tensors.

The assumption behind it: a network's output is a function of its inputs and
its parameters, which do not change while the block is open (no gradients, no
optimiser). A module that reads other state that changes from chunk to chunk
must not be given to the block.
"""

import functools
import itertools
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from pyro.nn import PyroModule
from pyro.poutine.messenger import Messenger

from . import _compat

__all__ = ["ReusedCalls"]

_PLAIN = (type(None), bool, int, float, str)
_OFF = "off"  # the module runs as written for the rest of the block


@dataclass
class _Entry:
    """The first output of a module, the inputs it was computed from, and whether a second
    call confirmed it."""

    key: tuple
    inputs: tuple  # held so that their memory is not reused while ``key`` names it
    output: object
    versions: tuple
    confirmed: bool = False


class _Listener(Messenger):
    """Notes whether any Pyro statement runs while it is on the stack."""

    def __init__(self):
        super().__init__()
        self.heard = False

    def _pyro_sample(self, msg):
        self.heard = True

    def _pyro_param(self, msg):
        self.heard = True


def _interceptable(module) -> bool:
    return (isinstance(module, torch.nn.Module) and not isinstance(module, (PyroModule, torch.jit.ScriptModule))
            and "forward" not in vars(module))


def _key(args: tuple, kwargs: dict) -> Tuple[Optional[tuple], tuple]:
    """What identifies a call's inputs, and the tensors to hold; ``(None, ())`` when an input
    is neither a strided tensor nor a plain value."""
    key, held = [], []
    for name, value in itertools.chain(enumerate(args), sorted(kwargs.items())):
        if isinstance(value, torch.Tensor) and value.layout == torch.strided:
            key.append((name, value.data_ptr(), tuple(value.shape), value.stride(), value.dtype, value.device,
                        _compat.tensor_version(value)))
            held.append(value)
        elif isinstance(value, _PLAIN):
            key.append((name, type(value), value))
        else:
            return None, ()
    return tuple(key), tuple(held)


def _tensors(output) -> Optional[List[torch.Tensor]]:
    """The tensors of an output that can be reused: a tensor, or a tuple or list of them."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in output):
        return list(output)
    return None


def _versions(output) -> tuple:
    return tuple(_compat.tensor_version(t) for t in _tensors(output))


def _identical(a, b) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return (type(a) is type(b) and len(ta) == len(tb)
            and all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y) for x, y in zip(ta, tb)))


class ReusedCalls:
    """Inside the block, each given module called again with the very same inputs returns its
    first output instead of recomputing it, where that is exact (see the module docs).

    :param modules: the networks the programs call (e.g. ``ModelGuidePair.called_modules()``);
        those that cannot be intercepted safely are left out.

    >>> net = torch.nn.Linear(3, 2)
    >>> x = torch.ones(4, 3)
    >>> with torch.no_grad(), ReusedCalls([net]) as reuse:
    ...     outs = [net(x) for _ in range(3)]
    >>> reuse.computed[0], outs[2] is outs[0]
    (2, True)
    """

    def __init__(self, modules: Iterable[torch.nn.Module]):
        self.modules: List[torch.nn.Module] = []
        for m in modules:
            if _interceptable(m) and all(m is not n for n in self.modules):
                self.modules.append(m)
        #: how many times each module (in the order of :attr:`modules`) really ran in the block
        self.computed = [0] * len(self.modules)
        self._entries: Dict[int, object] = {}

    def __enter__(self) -> "ReusedCalls":
        for i, module in enumerate(self.modules):
            module.forward = functools.partial(self._call, i, module.forward)
        return self

    def __exit__(self, *exc) -> None:
        for module in self.modules:
            del module.forward
        self._entries.clear()

    def _run(self, i: int, forward, args, kwargs):
        self.computed[i] += 1
        return forward(*args, **kwargs)

    def _call(self, i: int, forward, *args, **kwargs):
        entry = self._entries.get(i)
        if entry is _OFF or torch.is_grad_enabled():
            return self._run(i, forward, args, kwargs)
        key, held = _key(args, kwargs)
        if key is None or (entry is not None and entry.key != key):
            self._entries[i] = _OFF
            return self._run(i, forward, args, kwargs)
        if entry is not None and entry.confirmed:
            if _versions(entry.output) == entry.versions:
                return type(entry.output)(entry.output) if isinstance(entry.output, list) else entry.output
            self._entries[i] = _OFF  # the program changed a returned tensor in place
            return self._run(i, forward, args, kwargs)
        with _Listener() as listener:
            output = self._run(i, forward, args, kwargs)
        self._entries[i] = self._judge(entry, key, held, output, listener.heard)
        return output

    @staticmethod
    def _judge(entry: Optional[_Entry], key, held, output, heard: bool):
        """The entry after a watched call: new, confirmed, or off."""
        if heard or _tensors(output) is None:
            return _OFF
        if entry is None:
            return _Entry(key, held, output, _versions(output))
        if _versions(entry.output) != entry.versions or not _identical(entry.output, output):
            return _OFF
        entry.confirmed = True
        return entry
