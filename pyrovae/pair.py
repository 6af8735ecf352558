"""The model/guide pair: the one place in pyrovae that knows what a pair is.

A pair is two Pyro programs with the same signature. Training, importance
sampling and diagnostics all take one, and all of them need the same facts
about it, found here once:

* how a batch becomes the programs' arguments (:func:`batch_arguments`): a
  tensor ``x`` calls ``model(x)``, a tuple ``model(*batch)``, a dict
  ``model(**batch)``;
* the ``nn.Module`` objects that own the programs (``vae.model`` is a bound
  method of the module ``vae``) and the modules the programs call;
* the trainable tensors under stable names (:meth:`ModelGuidePair.parameters`),
  which do not depend on Pyro's internal naming of ``pyro.module`` parameters,
  and the modules' buffers (BatchNorm statistics) under stable names too;
* running every network in ``eval()`` mode for evaluation, restoring each
  module's mode afterwards (:meth:`ModelGuidePair.evaluating`);
* the data checks a module offers (``check_data``), and what ``config.json``
  records about the pair (:meth:`ModelGuidePair.describe`).

Parameter names: ``model.<path>`` / ``guide.<path>`` for parameters of the
owner module of ``model`` / ``guide``; ``param.<module name>.<path>`` for a
network registered with ``pyro.module("<module name>", net)``; ``param.<name>``
for a ``pyro.param``. Buffers follow the same scheme with ``buffer.`` in front.
"""

import contextlib
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from pyro import poutine

from ._checks import CheckpointError, check_tensors
from ._compat import split_module_param_name

__all__ = ["ModelGuidePair", "batch_arguments", "as_pair"]


def batch_arguments(batch) -> Tuple[tuple, dict]:
    """The programs' ``(args, kwargs)`` for one batch.

    >>> batch_arguments(torch.zeros(2, 3))[0][0].shape
    torch.Size([2, 3])
    >>> args, kwargs = batch_arguments({"xs": torch.zeros(2), "ys": torch.ones(2)})
    >>> args, sorted(kwargs)
    ((), ['xs', 'ys'])
    """
    if isinstance(batch, dict):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def _owner(fn) -> Optional[torch.nn.Module]:
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, torch.nn.Module) else None


class _CalledModules:
    """Collect the modules a program calls, keeping each in eval mode while it runs.

    Discovery runs the programs once; eval mode keeps that run from updating
    BatchNorm statistics. Each module's own mode is restored on exit.
    """

    def __init__(self):
        self.modules: List[torch.nn.Module] = []
        self._modes: Dict[int, Tuple[torch.nn.Module, bool]] = {}

    def _pre_hook(self, module, args):
        if all(module is not m for m in self.modules):
            self.modules.append(module)
        for m in module.modules():
            self._modes.setdefault(id(m), (m, m.training))
            m.training = False

    def __enter__(self):
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._pre_hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        for m, mode in self._modes.values():
            m.training = mode


#: how torch says that tensors of one operation live on different devices
_MIXED_DEVICES = ("on the same device", "not on the expected device", "device type for generator")


def _refuse_mixed_devices(error: RuntimeError, args: tuple, kwargs: dict) -> None:
    """A network on one device met data on another: say which, and what to move."""
    if not any(phrase in str(error) for phrase in _MIXED_DEVICES):
        return
    devices = sorted({str(v.device) for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)})
    raise ValueError(
        f"the programs mix devices: the data are on {', '.join(devices) or 'no device'}, and a network or tensor "
        f"they use is not ({error}). Create every network and pyro.param on the device the programs run on "
        "(module.to(device); pyro.param values from the data, e.g. x.new_zeros), or move the data there"
    ) from error


class ModelGuidePair:
    """A model and a guide, with the facts every pyrovae function needs about them.

    :param callable model: Pyro program ``model(*args, **kwargs)``.
    :param callable guide: Pyro program with the same signature.

    Parameters and modules are found by running the programs once on a batch
    (:meth:`discover`), the way Pyro's ``SVI`` finds parameters: networks
    registered with ``pyro.module``, ``pyro.param`` statements and
    :class:`~pyro.nn.PyroModule` attributes all count, plus the parameters of
    an ``nn.Module`` whose bound methods the programs are.

    >>> import pyrovae
    >>> vae = pyrovae.VAE((4,), latent_dim=2, hidden=(8,))
    >>> pair = ModelGuidePair(vae.model, vae.guide)
    >>> pair.discover(torch.zeros(3, 4))
    >>> sorted(pair.parameters())[:2]
    ['model.decoder.net.0.bias', 'model.decoder.net.0.weight']
    """

    def __init__(self, model, guide):
        if not callable(model) or not callable(guide):
            raise TypeError(f"model and guide must be callables, got {type(model).__name__} and {type(guide).__name__}")
        self.model, self.guide = model, guide
        self.owners: List[Tuple[str, torch.nn.Module]] = []
        for role, fn in (("model", model), ("guide", guide)):
            owner = _owner(fn)
            if owner is not None and all(owner is not o for _, o in self.owners):
                self.owners.append((role, owner))
        self._params: Optional[Dict[str, torch.Tensor]] = None
        self._named_modules: Dict[str, torch.nn.Module] = {}
        self._called: List[torch.nn.Module] = []

    @property
    def owner(self) -> Optional[torch.nn.Module]:
        """The module whose method ``model`` is, or None for a plain function."""
        return _owner(self.model)

    def cache_owner(self):
        """The object that caches about these programs are kept with (weakly): the owner, else the model."""
        return self.owner if self.owner is not None else self.model

    def identity(self) -> tuple:
        """A hashable identity of the programs: their functions and the objects they are bound to."""
        fns = (self.model, self.guide)
        return (tuple(getattr(f, "__func__", f) for f in fns), tuple(id(getattr(f, "__self__", None)) for f in fns))

    # ----------------------------------------------------------------- discovery
    def discover(self, *args, **kwargs) -> None:
        """Run the guide, then the model on the guide's draws, once, to find parameters and modules.

        Runs without gradients and with every network in eval mode, so nothing
        is trained and no BatchNorm statistic moves. Keeps the two traces
        (:attr:`model_trace`, :attr:`guide_trace`) for structural checks.
        Refuses a pair without parameters (there would be nothing to train).
        """
        capture = self.find_modules(*args, **kwargs)
        self.has_param_sites = bool(capture.nodes)
        self._params, self._named_modules = self._name_tensors(capture)

    def find_modules(self, *args, **kwargs):
        """Run the programs once, as :meth:`discover` does, recording the modules they call and
        their traces, but naming no parameters (estimation needs no parameters to train).

        :returns: the trace of the ``param`` sites the run met.
        """
        with torch.no_grad(), _CalledModules() as called, poutine.trace(param_only=True) as capture:
            try:
                guide_trace = poutine.trace(self.guide).get_trace(*args, **kwargs)
                model_trace = poutine.trace(poutine.replay(self.model, trace=guide_trace)).get_trace(*args, **kwargs)
            except RuntimeError as e:
                _refuse_mixed_devices(e, args, kwargs)
                raise
            except TypeError as e:
                if len(args) + len(kwargs) < 2:
                    raise
                shown = ", ".join([f"<{len(args)} positional tensors>"] * bool(args) + [f"{k}=" for k in kwargs])
                raise TypeError(
                    f"calling the guide and model as guide({shown}) failed: {e}. A batch that is a tuple (or a "
                    "Dataset of tuples, such as TensorDataset) passes each tensor as a positional argument, "
                    "a dict passes keyword arguments; give the programs that signature, or pass only the tensors "
                    "they take"
                ) from e
        self._called = called.modules
        self.model_trace, self.guide_trace = model_trace, guide_trace
        return capture.trace

    def _name_tensors(self, param_trace):
        params: Dict[str, torch.Tensor] = {}
        modules: Dict[str, torch.nn.Module] = {role: owner for role, owner in self.owners}
        owned = {}
        for role, owner in self.owners:
            for name, p in owner.named_parameters():
                owned[id(p)] = f"{role}.{name}"
                if p.requires_grad and f"{role}.{name}" not in params and all(p is not q for q in params.values()):
                    params[f"{role}.{name}"] = p
        by_id = {id(p): n for n, p in params.items()}
        for store_name, site in param_trace.nodes.items():
            value = site["value"]
            p = value.unconstrained() if hasattr(value, "unconstrained") else value
            module_name, path = split_module_param_name(store_name)
            if id(p) in owned or id(p) in by_id:
                continue
            self._check_clash(store_name, module_name, path, p)
            name = f"param.{module_name}.{path}" if module_name is not None else f"param.{store_name}"
            if name in params:
                raise ValueError(
                    f"two parameters would be saved as {name!r}: rename the pyro.param or pyro.module involved"
                )
            params[name] = p
            by_id[id(p)] = name
            if module_name is not None and module_name not in modules:
                module = self._module_holding(p)
                if module is not None:
                    modules[f"param.{module_name}"] = module
        if not params:
            raise ValueError(
                "the model and guide have no parameters: register networks with pyro.module, "
                "use pyro.param, or pass bound methods of an nn.Module"
            )
        return params, modules

    def _module_holding(self, tensor) -> Optional[torch.nn.Module]:
        """The outermost called module that holds ``tensor`` as a parameter."""
        for m in self._called_roots():
            if any(q is tensor for q in m.parameters()):
                return m
        return None

    def called_modules(self) -> List[torch.nn.Module]:
        """The networks the programs called in the last :meth:`find_modules` run (outermost only)."""
        return self._called_roots()

    def _called_roots(self) -> List[torch.nn.Module]:
        inner = {id(c) for m in self._called for c in m.modules() if c is not m}
        return [m for m in self._called if id(m) not in inner]

    def _check_clash(self, store_name, module_name, path, tensor) -> None:
        """Refuse a param-store entry that shadows an owner module's parameter (a reused pyro.module name)."""
        if module_name is None:
            return
        for role, owner in self.owners:
            for name, q in owner.named_parameters():
                if name.endswith("." + path) and module_name.endswith(name[: -len(path) - 1]) \
                        and q is not tensor and q.shape == tensor.shape:
                    raise ValueError(
                        f"Pyro's param store holds {store_name!r} for a different tensor than the module's own "
                        f"{role}.{name!r}: another module was registered under the same pyro.module name "
                        "(e.g. two VAEs with the same name=). Give each model a distinct name, or call "
                        "pyro.clear_param_store() before fitting"
                    )

    def _require_discovered(self):
        if self._params is None:
            raise RuntimeError("call discover(batch) first: parameters are found by running the programs once")

    def parameters(self) -> Dict[str, torch.Tensor]:
        """Trainable tensors by stable name (see the module docs)."""
        self._require_discovered()
        return dict(self._params)

    def modules(self) -> List[torch.nn.Module]:
        """Every network the pair owns or calls (outermost modules only)."""
        out = [m for _, m in self.owners] + list(self._named_modules.values()) + self._called_roots()
        unique: List[torch.nn.Module] = []
        for m in out:
            if all(m is not u for u in unique):
                unique.append(m)
        return unique

    def buffers(self) -> Dict[str, torch.Tensor]:
        """Persistent buffers of the named modules (BatchNorm statistics, priors), by stable name."""
        out: Dict[str, torch.Tensor] = {}
        seen = set()
        for prefix, module in self._named_modules.items():
            persistent = set(module.state_dict(keep_vars=True))
            for name, b in module.named_buffers():
                if id(b) not in seen and name in persistent:
                    out[f"buffer.{prefix}.{name}"] = b
                    seen.add(id(b))
        return out

    def load_state(self, params: Dict[str, torch.Tensor], buffers: Optional[Dict[str, torch.Tensor]], *,
                   source: str = "checkpoint") -> None:
        """Copy saved parameters and buffers into the live tensors, in place.

        Names and shapes must match exactly: a missing or extra tensor is an
        error, never skipped. ``buffers=None`` means the writer did not record
        buffers (format 1), which is refused when this pair has any.
        """
        copy_into(self.parameters(), params, "parameter", source)
        live = self.buffers()
        if buffers is None:
            if live:
                raise CheckpointError(
                    f"{source} was written by pyrovae format 1, which did not save module buffers, and this pair "
                    f"has buffers {sorted(live)[:5]}; retrain, or load the parameters yourself"
                )
            return
        copy_into(live, buffers, "buffer", source)

    # ----------------------------------------------------------------- modes
    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Every module of the pair in ``eval()`` mode inside the block; each one's mode restored after."""
        modes = [(m, m.training) for root in self.modules() for m in root.modules()]
        try:
            for m, _ in modes:
                m.training = False
            yield
        finally:
            for m, mode in modes:
                m.training = mode

    def to(self, device) -> None:
        """Move the owner modules (parameters and buffers) to ``device``."""
        for _, owner in self.owners:
            owner.to(device)

    # ----------------------------------------------------------------- data and description
    def check_data(self, args: tuple, kwargs: dict, name: str = "data") -> None:
        """Finite, non-empty tensors, then the owner's own ``check_data`` on the first argument."""
        check_tensors(args, kwargs, name)
        check = getattr(self.owner, "check_data", None)
        if check is not None and args and isinstance(args[0], torch.Tensor):
            check(args[0], name)

    def describe(self) -> dict:
        """What ``config.json`` records: a module's own description (``VAE``), else the programs' names."""
        describe = getattr(self.owner, "describe", None)
        if callable(describe):
            return describe()
        name = lambda f: getattr(f, "__qualname__", None) or type(f).__name__
        return {"type": "custom", "model": name(self.model), "guide": name(self.guide)}


def copy_into(live: Dict[str, torch.Tensor], saved: Dict[str, torch.Tensor], what: str, source: str) -> None:
    missing, extra = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    if missing or extra:
        raise CheckpointError(f"{source} does not match this model/guide: {what}s missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for name, t in live.items():
            if t.shape != saved[name].shape:
                raise CheckpointError(f"{source}: {what} {name!r} has shape {tuple(saved[name].shape)}, "
                            f"the model's has {tuple(t.shape)}")
            t.copy_(saved[name])


def as_pair(model, guide) -> ModelGuidePair:
    """A :class:`ModelGuidePair` for ``model`` and ``guide`` (undiscovered)."""
    return ModelGuidePair(model, guide)
