"""Recorded chunks of particles: the tensor operations of one chunk, recorded once and replayed.

:func:`pyrovae.log_marginal` runs the guide and the model once per chunk of
particles. The arithmetic of a chunk is a fixed sequence of ATen operations,
but running it as a Pyro program adds Python around every one of them
(effect handlers, messages, trace dictionaries, distribution objects): about
2 ms per chunk, 4-5% of a chunk of a 784-400-50 VAE on two CPU cores
(``benchmarks/importance_chunk.py``). Some operations also give the same
result in every chunk, such as the prior's ``zeros`` and ``ones`` or the
guide's ``log(scale)``.

:meth:`Tape.record` runs one chunk under a dispatch mode that notes each ATen
operation, its arguments and which earlier operation made each tensor
argument. A tensor that the chunk did not make (a parameter, the data, a
network output that :class:`pyrovae.reuse.ReusedCalls` hands out again) is
held by reference. Replaying the tape calls the same operations in the same
order, the random draws included, so the global generator gives fresh
particles. Before the tape is built, operations whose inputs do not depend on
a random draw are **folded**: their result from the recorded chunk is kept
and not computed again.

A tape is valid while its constants keep their values and nothing tracks
gradients: :mod:`pyrovae.weights` keeps one for one batch of one call, under
``torch.no_grad()``, with the networks unchanged. The recorder costs about
20 ms per tape on top of the chunk it records. ``make_fx``, which records
training steps (:mod:`pyrovae.static`), took 0.26 s for the same chunk, and
2.2 s in a fresh process, more than 84 chunks of 300 MNIST images save.

What the tape refuses (:class:`Refused`; the caller then runs the chunk as the
program is written):

* reading a tensor's value into Python (``.item()``, ``if t > 0``,
  ``.tolist()``, ``.numpy()``): the value would be frozen into every replay;
* operations whose output shape depends on values (``nonzero``,
  ``masked_select``, boolean indexing), since shapes are frozen too;
* changing in place a tensor the chunk did not make (a parameter, the data);
* a Python object other than plain values among an operation's arguments or
  results.

What it cannot see is a program whose operations depend on Python state
outside the tensors (``random.random()``, a counter it keeps, NumPy's
generator). The caller therefore checks the tape once, against a fresh run of
the program from the same random state, bit for bit, before trusting it
(:mod:`pyrovae.weights`), the contract of :mod:`pyrovae.static`.
"""

import operator
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

import torch
import torch.fx
from torch.overrides import TorchFunctionMode

from . import _compat

__all__ = ["Tape", "Refused", "NoValueReads", "ValueRead"]

# .item(), float(t), bool(t) and allclose reach the dispatcher as _local_scalar_dense or is_nonzero.
_READS = frozenset({"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal"})
_LITERALS = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, torch.layout,
             torch.memory_format)


class ValueRead(RuntimeError):
    """A tensor's value was read into Python while recording."""


class NoValueReads(TorchFunctionMode):
    """Refuse, while recording, any read of a tensor's value into Python.

    A value read while recording would be frozen into every replay. Recording
    training steps (:mod:`pyrovae.static`), ``make_fx`` already refuses to read
    the batch, but a parameter is recorded by reference and can be read
    silently: ``w.tolist()`` or ``if w.sum() > 0`` would freeze today's value,
    and the one-batch check could not see it until the optimiser has moved
    ``w``. Recording chunks (:class:`Tape`), ``.numpy()`` and ``.tolist()``
    read memory without an ATen operation that the dispatch mode would see.
    """

    _READS = frozenset({"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__complex__",
                        "__format__"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in self._READS:
            raise ValueRead(f"the program reads a tensor's value into Python (Tensor.{func.__name__})")
        return func(*args, **(kwargs or {}))


class Refused(RuntimeError):
    """The chunk cannot be replayed from a tape; the message says why."""


@dataclass
class _Op:
    """One recorded operation: arguments with tensors replaced by value numbers (:class:`_Value`)."""

    func: object
    args: tuple
    kwargs: dict
    outputs: Tuple[Optional[int], ...]  # value number of each tensor output, None for a None output
    random: bool
    mutates: bool
    single: bool  # one tensor returned, not a list or tuple of them


@dataclass(frozen=True)
class _Value:
    number: int


@dataclass
class _Recording:
    """What a recorder learnt about the values of one chunk."""

    ops: List[_Op] = field(default_factory=list)
    constants: Dict[int, torch.Tensor] = field(default_factory=dict)  # values the chunk did not make
    results: Dict[int, torch.Tensor] = field(default_factory=dict)  # values that may be folded
    dynamic: Set[int] = field(default_factory=set)  # values that depend on a random draw
    mutated: Set[int] = field(default_factory=set)  # storages written in place (data pointers)
    held: Set[int] = field(default_factory=set)  # storages of the constants
    drawn: Set[int] = field(default_factory=set)  # storages written with values that depend on a draw
    count: int = 0


class _Recorder(_compat.DispatchMode):
    """Notes every ATen operation run inside it (see the module docs)."""

    def __init__(self):
        super().__init__()
        self.rec = _Recording()
        # id(tensor) -> (ref, value number); the constants are held by the recording, so their ids stay theirs
        self._numbers: Dict[int, Tuple[weakref.ref, int]] = {}

    def number_of(self, tensor: torch.Tensor) -> Optional[int]:
        entry = self._numbers.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def _new_number(self, tensor: torch.Tensor) -> int:
        number = self.rec.count
        self.rec.count += 1
        self._numbers[id(tensor)] = (weakref.ref(tensor), number)
        return number

    def _argument(self, value):
        if isinstance(value, torch.Tensor):
            if value.layout != torch.strided:
                raise Refused(f"an operation takes a tensor of layout {value.layout}, which a tape does not follow")
            number = self.number_of(value)
            if number is None:
                number = self._new_number(value)
                self.rec.constants[number] = value
                self.rec.held.add(_storage(value))
            return _Value(number)
        if isinstance(value, (list, tuple)):
            return type(value)(self._argument(v) for v in value)
        if isinstance(value, _LITERALS):
            return value
        raise Refused(f"an operation takes a {type(value).__name__} argument, which a tape cannot hold")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        if schema.name in _READS:
            raise Refused(f"the program reads a tensor's value into Python ({func})")
        if torch.Tag.dynamic_output_shape in func.tags and not _integer_indexing(func, args):
            raise Refused(f"the output shape of {func} depends on values")
        rec_args = self._argument(tuple(args))
        rec_kwargs = {k: self._argument(v) for k, v in kwargs.items()}
        written = _written(schema, args, kwargs)
        if any(_storage(t) in self.rec.held for t in written):  # refused before the write happens
            raise Refused(f"{func} changes in place a tensor that the chunk did not make")
        random = torch.Tag.nondeterministic_seeded in func.tags
        dynamic = random or any(v.number in self.rec.dynamic for v in _values((rec_args, rec_kwargs))) \
            or any(_storage(t) in self.rec.drawn for t in _leaves((args, kwargs), torch.Tensor))
        out = func(*args, **kwargs)
        for tensor in written:
            self.rec.mutated.add(_storage(tensor))
            if dynamic:  # every view of this memory now reads values that depend on a draw
                self.rec.drawn.add(_storage(tensor))
        outputs = tuple(None if t is None else self._output(t, dynamic) for t in _tensors_of(out, func))
        self.rec.ops.append(_Op(func, rec_args, rec_kwargs, outputs, random, bool(written),
                                single=not isinstance(out, (list, tuple))))
        return out

    def _output(self, tensor: torch.Tensor, dynamic: bool) -> int:
        number = self._new_number(tensor)  # an in-place result is a new value of the same tensor
        if dynamic:
            self.rec.dynamic.add(number)
        else:
            self.rec.results[number] = tensor
        return number


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _integer_indexing(func, args) -> bool:
    """``aten.index`` with integer index tensors only: its output shape follows from the shapes."""
    if func is not torch.ops.aten.index.Tensor:
        return False
    indices = args[1] if len(args) > 1 else ()
    return all(i is None or not (i.dtype == torch.bool or i.dtype == torch.uint8) for i in indices)


def _written(schema, args, kwargs) -> List[torch.Tensor]:
    """The tensors an operation writes in place (its schema's mutable arguments)."""
    if not schema.is_mutable:
        return []
    out = []
    for i, argument in enumerate(schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(argument.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        out.extend(v for v in values if isinstance(v, torch.Tensor))
    return out


def _tensors_of(out, func) -> list:
    if isinstance(out, torch.Tensor) or out is None:
        return [out]
    if isinstance(out, (list, tuple)) and all(t is None or isinstance(t, torch.Tensor) for t in out):
        return list(out)
    raise Refused(f"{func} returns a {type(out).__name__}, which a tape cannot hold")


def _leaves(arg, kind):
    """The objects of type ``kind`` in nested lists, tuples and dicts."""
    if isinstance(arg, kind):
        yield arg
    elif isinstance(arg, (list, tuple)):
        for a in arg:
            yield from _leaves(a, kind)
    elif isinstance(arg, dict):
        for a in arg.values():
            yield from _leaves(a, kind)


def _values(arg):
    return _leaves(arg, _Value)


class Tape:
    """A chunk's operations, replayed by calling the tape: returns the recorded outputs, computed afresh.

    >>> w = torch.ones(3)
    >>> def chunk():
    ...     return [w.log() + torch.randn(3)]  # log(w) does not depend on a draw: folded
    >>> _ = torch.manual_seed(0); recorded, tape = Tape.record(chunk)
    >>> _ = torch.manual_seed(0); torch.equal(tape()[0], recorded[0])
    True
    >>> tape.folded
    1
    """

    def __init__(self, module: torch.fx.GraphModule, folded: int):
        self.module, self.folded = module, folded

    @classmethod
    def record(cls, fn: Callable[[], List[torch.Tensor]]) -> Tuple[List[torch.Tensor], "Tape"]:
        """Run ``fn`` once, recording it; returns its outputs (a list of tensors) and the tape.

        :raises Refused: the chunk cannot be replayed (see the module docs); the random state has then
            advanced by part of a chunk.
        """
        recorder = _Recorder()
        try:
            with NoValueReads(), recorder:
                outputs = fn()
        except ValueRead as read:
            raise Refused(str(read)) from None
        if not isinstance(outputs, list) or not all(isinstance(t, torch.Tensor) for t in outputs):
            raise TypeError("a recorded chunk returns a list of tensors")
        numbers = [recorder.number_of(t) for t in outputs]
        if any(n is None for n in numbers):
            raise Refused("an output of the chunk was not made by a tensor operation")
        return outputs, cls(*_build(recorder.rec, numbers))

    def __call__(self) -> List[torch.Tensor]:
        return self.module()


def _foldable(rec: _Recording, number: int) -> bool:
    tensor = rec.results.get(number)
    return tensor is not None and _storage(tensor) not in rec.mutated


def _needed(rec: _Recording, outputs: List[int]) -> List[bool]:
    """Which operations the replay runs: those that make an output, draw random numbers or write in
    place, and those they depend on; folded values are not computed again."""
    maker = {n: i for i, op in enumerate(rec.ops) for n in op.outputs if n is not None}
    keep = [op.random or op.mutates for op in rec.ops]
    stack = [maker[n] for n in outputs if not _foldable(rec, n)] + [i for i, k in enumerate(keep) if k]
    while stack:
        i = stack.pop()
        keep[i] = True
        for v in (*_values(rec.ops[i].args), *_values(rec.ops[i].kwargs)):
            j = maker.get(v.number)
            if j is not None and not keep[j] and not _foldable(rec, v.number):
                stack.append(j)
    return keep


def _build(rec: _Recording, outputs: List[int]) -> Tuple[torch.fx.GraphModule, int]:
    """The FX graph of the operations the replay runs, its constants held by reference."""
    graph, root, nodes = torch.fx.Graph(), torch.nn.Module(), {}
    folded = 0

    def node_of(number: int):
        if number not in nodes:  # a constant, or a value computed once when the chunk was recorded
            name = f"c{len(root._buffers) + len(root._parameters)}"
            tensor = rec.constants.get(number, rec.results.get(number))
            if isinstance(tensor, torch.nn.Parameter):
                root.register_parameter(name, tensor)
            else:
                root.register_buffer(name, tensor)
            nodes[number] = graph.get_attr(name)
        return nodes[number]

    def arg(a):
        if isinstance(a, _Value):
            return node_of(a.number)
        if isinstance(a, (list, tuple)):
            return type(a)(arg(x) for x in a)
        return a

    for op, keep in zip(rec.ops, _needed(rec, outputs)):
        if not keep:
            folded += any(n is not None and _foldable(rec, n) for n in op.outputs)
            continue
        node = graph.call_function(op.func, arg(op.args), {k: arg(v) for k, v in op.kwargs.items()})
        for i, number in enumerate(op.outputs):
            if number is not None:
                nodes[number] = node if op.single else graph.call_function(operator.getitem, (node, i))
    graph.output([node_of(n) for n in outputs])
    return torch.fx.GraphModule(root, graph), folded
