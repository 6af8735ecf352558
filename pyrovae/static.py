"""Static-graph training steps: Pyro's loss and gradients, recorded once and replayed.

Every SVI step runs the model and the guide as Python: effect handlers,
messages, trace dictionaries, distribution objects and the ELBO's bookkeeping.
On a CPU that costs about 2 ms a step, which is 25-40% of a step of the
784-400-50 MNIST VAE (measured; see ``benchmarks/README.md``). None of it
changes the arithmetic, which is a fixed sequence of tensor operations for
any program whose structure does not depend on the values of its data.

:class:`StaticStep` records that sequence once per input shape: the forward
pass through Pyro's :class:`~pyro.infer.Trace_ELBO` and the backward pass, as
an FX graph of ATen operations (``make_fx``). Later steps replay the graph.
The replay runs the same operations in the same order on the same tensors,
including the random draws from the global generator, so its loss and
gradients are bitwise equal to Pyro's eager ones. That is not taken on trust:
the first time a shape is used in a run, the step is computed both ways from
the same random state and compared bit for bit, and any difference, or a
program that cannot be recorded, switches the run back to eager Pyro.

Reading any tensor's value into Python while recording (``.item()``,
``.tolist()``, ``if t > 0``) refuses the recording, since the value would be
frozen into every replay. What cannot be detected is structure that depends
on Python state outside the tensors, such as a model that branches on
``random.random()`` or on a counter it keeps. Such programs must be trained with
``static_graph=False``; see :func:`pyrovae.fit`. This is the same contract as
Pyro's ``JitTrace_ELBO`` ("models must have static structure").
"""

import logging
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import pyro
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.util import is_identically_zero

from . import _compat
from .rng import same_torch_state, set_torch_state, torch_state
from .tape import NoValueReads

__all__ = ["StaticStep", "loss_and_surrogate"]

log = logging.getLogger("pyrovae")

# Recorded graphs, reused across fit() calls on the same program and tensors.
# Keyed weakly by the model's owner (the module whose method it is, or the
# function itself): a graph holds the parameter tensors, never the owner.
_GRAPHS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_MAX_GRAPHS = 8  # per program: batch shapes times parameter sets


def loss_and_surrogate(elbo: Trace_ELBO, model, guide, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Trace_ELBO's loss and its surrogate as tensor operations only.

    :meth:`Trace_ELBO.differentiable_loss` returns the negative ELBO as a value
    and the surrogate's gradient, assembling the value from Python floats read
    with ``.item()``; those cannot be recorded. This is the formulation of
    Pyro's ``JitTrace_ELBO``: the same terms added in the same order, so the
    surrogate's gradients are the same operations, and the value differs from
    Pyro's only in the rounding of a float32 rather than a float64 sum.

    :param torch.Tensor x: a batch of shape ``(batch, *event_shape)``.
    :returns: ``(loss, surrogate)``: the negative ELBO (detached) and the
        surrogate loss whose gradient estimates the ELBO's, both 0-d tensors.
    """
    loss, surrogate_loss = 0.0, 0.0
    for model_trace, guide_trace in _compat.get_elbo_traces(elbo, model, guide, (x,), {}):
        elbo_particle, surrogate = 0, 0
        log_r = None
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                elbo_particle = elbo_particle + site["log_prob_sum"].detach()
                surrogate = surrogate + site["log_prob_sum"]
        for site in guide_trace.nodes.values():
            if site["type"] == "sample":
                _, score_function_term, entropy_term = site["score_parts"]
                elbo_particle = elbo_particle - site["log_prob_sum"].detach()
                if not is_identically_zero(entropy_term):
                    surrogate = surrogate - entropy_term.sum()
                if not is_identically_zero(score_function_term):
                    if log_r is None:
                        log_r = _compat.trace_elbo_log_r(model_trace, guide_trace)
                    surrogate = surrogate + (log_r.sum_to(site["cond_indep_stack"]) * score_function_term).sum()
        loss = loss + (-elbo_particle) / elbo.num_particles
        surrogate_loss = surrogate_loss + (-surrogate) / elbo.num_particles
    return loss, surrogate_loss


def _mutated_constants(graph: torch.fx.GraphModule) -> List[str]:
    """Names of recorded constants (parameters, buffers) that the graph writes in place."""
    out = []
    for node in graph.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or not schema.is_mutable:
            continue
        for arg, value in zip(schema.arguments, node.args):
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.fx.Node):
                if value.op == "get_attr":
                    out.append(value.target)
    return out


class StaticStep:
    """Loss and gradients of a model/guide pair from recorded graphs, one per input shape.

    Call it with a batch; it returns ``(loss, grads)``, a 0-d tensor and one
    gradient (or None) per parameter, or ``None`` once it has fallen back to
    eager Pyro, with the reason in :attr:`failure`; the caller then runs the
    step itself, from the same random state. The caller applies the
    gradients (``p.grad = g``) and steps its optimiser.

    :param pyro.infer.Trace_ELBO elbo: the estimator; exactly ``Trace_ELBO``
        (with any ``num_particles`` and ``vectorize_particles``).
    :param callable model: the model to run, taking the batch.
    :param callable guide: the guide to run, taking the batch.
    :param params: the trainable tensors, in the order of the returned gradients.
    :param pair: the unwrapped programs (:class:`~pyrovae.pair.ModelGuidePair`),
        whose identity names recorded graphs for reuse across calls.
    :param variant: anything else that changes the program (e.g. a KL-scaling
        handler's presence), part of that name.
    :param buffers: tensors the program may update in place (module buffers),
        restored after recording, which runs the step once.

    >>> import pyrovae
    >>> vae = pyrovae.VAE((6,), latent_dim=2, hidden=(8,), name="static_doc")
    >>> x = (torch.rand(5, 6) < 0.5).float()
    >>> elbo = Trace_ELBO()
    >>> params = list(vae.parameters())
    >>> from pyrovae.pair import ModelGuidePair
    >>> step = StaticStep(elbo, vae.model, vae.guide, params, pair=ModelGuidePair(vae.model, vae.guide))
    >>> loss, grads = step(x)
    >>> step.failure is None and len(grads) == len(params)
    True
    """

    def __init__(self, elbo, model, guide, params: Sequence[torch.Tensor], *, pair, variant: tuple = (), buffers=()):
        if type(elbo) is not Trace_ELBO:
            raise ValueError(f"static graphs replay Trace_ELBO only, got {type(elbo).__name__}")
        self.elbo, self.model, self.guide = elbo, model, guide
        self.params = list(params)
        self.buffers = list(buffers)
        self.failure: Optional[str] = None
        self._ready: Dict[tuple, torch.fx.GraphModule] = {}  # checked in this run, by batch shape
        try:
            self._graphs: Dict[tuple, torch.fx.GraphModule] = _GRAPHS.setdefault(pair.cache_owner(), {})
        except TypeError:  # not weak-referenceable: keep this run's graphs only
            self._graphs = {}
        self._key = (
            pair.identity(),
            tuple(repr(i) for i in variant),
            elbo.num_particles, elbo.vectorize_particles, elbo.max_plate_nesting,
            tuple(id(p) for p in self.params),
        )

    def _loss_and_grads(self, x):
        with NoValueReads():
            loss, surrogate = loss_and_surrogate(self.elbo, self.model, self.guide, x)
        grads = torch.autograd.grad(surrogate, self.params, allow_unused=True)
        # In the parameter's memory layout, as autograd leaves a .grad: a transposed
        # view would slow down every elementwise optimiser update.
        return [loss, *(g if g is None or g.stride() == p.stride() else torch.empty_like(p).copy_(g)
                        for p, g in zip(self.params, grads))]

    def _record(self, x) -> Optional[torch.fx.GraphModule]:
        saved = [b.detach().clone() for b in self.buffers]
        state = torch_state(x.device)
        try:
            graph = _compat.make_fx(lambda batch: self._loss_and_grads(batch))(x)
        except Exception as e:  # any failure to record means: run this program eagerly
            self.failure = f"the step could not be recorded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            return None
        finally:
            set_torch_state(state, x.device)
            with torch.no_grad():
                for b, s in zip(self.buffers, saved):
                    b.copy_(s)
        graph.graph.eliminate_dead_code()  # unused plate indices and constant copies; impure ops stay
        graph.recompile()
        mutated = _mutated_constants(graph)
        if mutated:
            self.failure = f"the step updates tensors in place (e.g. BatchNorm running statistics): {mutated[:3]}"
            return None
        # A parameter with a gradient must be read by reference: a copy would go stale
        # after the first optimiser step, and no single-step check could tell.
        held = {id(t) for t in [*graph.parameters(), *graph.buffers()]}
        outputs = next(n for n in graph.graph.nodes if n.op == "output").args[0]
        stale = [i for i, p in enumerate(self.params) if outputs[1 + i] is not None and id(p) not in held]
        if stale:
            self.failure = f"the recorded graph reads copies of parameters {stale[:3]}, not the live tensors"
            return None
        return graph

    def _checked(self, x, graph):
        """The step computed eagerly by Pyro and by the graph from one random state, compared bit for bit.

        Returns the step's ``[loss, *grads]``: the graph's when they agree, else
        Pyro's (with :attr:`failure` set), leaving the random state as Pyro's step does.
        """
        before = torch_state(x.device)
        loss = self.elbo.differentiable_loss(self.model, self.guide, x)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        eager = [loss.detach(), *grads]
        after = torch_state(x.device)
        set_torch_state(before, x.device)
        with torch.no_grad():
            out = graph(x)
        for i, (a, b) in enumerate(zip(grads, out[1:])):
            if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                diff = "one is missing" if a is None or b is None else f"max difference {(a - b).abs().max().item():.3g}"
                self.failure = f"the recorded gradient of parameter {i} differs from eager Pyro's ({diff})"
        if self.failure is None and not torch.allclose(out[0], eager[0], rtol=1e-6, atol=1e-6):
            self.failure = f"the recorded loss {out[0].item()} differs from eager Pyro's {eager[0].item()}"
        if self.failure is None and not same_torch_state(after, torch_state(x.device)):
            self.failure = "the recorded step draws a different number of random numbers than eager Pyro"
        if self.failure is not None:
            set_torch_state(after, x.device)
            return eager
        return out

    def checked_graph(self, x: torch.Tensor) -> Optional[torch.fx.GraphModule]:
        """The graph for ``x``'s shape if it passed its check in this run, else None."""
        if self.failure is not None:
            return None
        return self._ready.get((tuple(x.shape), x.dtype, str(x.device)))

    def __call__(self, x: torch.Tensor) -> Optional[Tuple[torch.Tensor, List[Optional[torch.Tensor]]]]:
        if self.failure is not None:
            return None
        shape = (tuple(x.shape), x.dtype, str(x.device))
        graph = self._ready.get(shape)
        if graph is not None:  # the hot path: a graph already checked in this run
            # The graph holds its own backward pass: replaying it under autograd would
            # record a second, unused graph of the same operations (measured: 1.13x vs 1.03x).
            with torch.no_grad():
                out = graph(x)
            return out[0], list(out[1:])
        key = self._key + shape
        with pyro.validation_enabled(False):
            graph = self._graphs.get(key)
            if graph is None:
                graph = self._record(x)
                if graph is None:
                    log.info("pyrovae: static graph off, %s; training eagerly", self.failure)
                    return None
                if len(self._graphs) >= _MAX_GRAPHS:  # e.g. a param store cleared again and again
                    self._graphs.pop(next(iter(self._graphs)))
                self._graphs[key] = graph
            out = self._checked(x, graph)
        if self.failure is None:
            self._ready[shape] = graph
        else:
            self._graphs.pop(key, None)
            log.info("pyrovae: static graph off, %s; training eagerly", self.failure)
        return out[0], list(out[1:])
