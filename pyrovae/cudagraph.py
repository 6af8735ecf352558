"""Whole training steps replayed as CUDA graphs.

On a GPU, a step of a small network is bound by kernel launches, not arithmetic:
an eager PyTorch step of the 784-400-50 MNIST VAE launches a few hundred kernels,
each costing the CPU several microseconds, while the GPU idles between them.
:mod:`pyrovae.static` already records the arithmetic of a Pyro step (the ELBO and
its gradients) as one FX graph of ATen operations. :class:`GraphedStep` captures
that graph, the hand-over of the gradients and the optimiser's update into one
CUDA graph, launched with a single call per step.

What the capture changes, and how each guarantee of an eager step is kept:

* **Inputs.** Each batch is copied into a static buffer that the graph reads.
  A graph is captured per batch shape (the last batch of an epoch is often smaller).
* **Optimiser.** Adam and AdamW run with ``capturable=True``, which keeps their
  step counters on the GPU, so the update is part of the graph. Once a run has
  used a graph its optimiser stays capturable, also in its checkpoints, so a
  resumed run does the same arithmetic as an uninterrupted one.
* **Loss.** Summed on the device, read once per epoch: no ``.item()`` per step.
* **Non-finite losses.** The graph notes on the device the first step whose loss
  is not finite. The trainer reads it at the end of the epoch, before anything
  is saved, puts the parameters and optimiser back to where they were at the
  start of that epoch, and raises :class:`~pyrovae.train.NonFiniteLossError`
  naming the step; no checkpoint ever holds a NaN.
* **Random draws.** The graph draws from the device's default generator, as the
  eager step does, with the same offsets (PyTorch's graph-safe Philox).
* **Checked, not trusted.** The first step of each shape is computed twice from
  the same parameters, optimiser state and random state: once by running the
  recorded operations and the optimiser eagerly, once by replaying the captured
  graph. The parameters after the update, the loss and the generator's state must
  be bitwise equal; any difference, or a failure to capture, turns the graphs off
  for the run, and the plain static graph carries on.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .rng import set_torch_state, torch_state

__all__ = ["GraphedStep", "GraphedSteps", "unsupported"]

#: optimisers whose update can run inside a CUDA graph (``capturable=True``)
CAPTURABLE = (torch.optim.Adam, torch.optim.AdamW)


def unsupported(optimizer, device: torch.device, *, clip_norm, lr_schedule, several_sources: bool,
                distributed: bool) -> Optional[str]:
    """Why steps of this run cannot be CUDA graphs, or None if they can."""
    if device.type != "cuda":
        return "not on CUDA"
    if type(optimizer) not in CAPTURABLE:
        return f"{type(optimizer).__name__} has no capturable update (Adam and AdamW have)"
    if clip_norm is not None:
        return "clip_norm reads the gradient norm every step"
    if lr_schedule is not None:
        return "an lr schedule changes the learning rate that a graph holds fixed"
    if several_sources:
        return "several data sources"
    if distributed:
        return "gradients are averaged across processes between backward and update"
    return None


def make_capturable(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """Switch Adam/AdamW to (or from) keeping its step counters on the parameters' device."""
    for group in optimizer.param_groups:
        group["capturable"] = capturable
    for p, state in optimizer.state.items():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            state["step"] = step.to(p.device if capturable else "cpu")


@dataclass
class _Snapshot:
    """Device copies of the tensors a step changes: parameters, optimiser state, accumulators."""

    tensors: List[torch.Tensor]
    copies: List[torch.Tensor]

    @classmethod
    def of(cls, optimizer, params: Sequence[torch.Tensor], extra: Sequence[torch.Tensor] = ()) -> "_Snapshot":
        tensors = [*params, *extra]
        for p in params:
            tensors += [v for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
        return cls(tensors, [t.detach().clone() for t in tensors])

    def restore(self) -> None:
        """In place: a captured graph holds these tensors' addresses."""
        with torch.no_grad():
            for t, c in zip(self.tensors, self.copies):
                t.copy_(c)


class GraphedStep:
    """One batch shape's step (recorded loss and gradients, then the optimiser) as a CUDA graph.

    :param graph: the checked FX graph of :class:`~pyrovae.static.StaticStep`,
        mapping a batch to ``[loss, *grads]``.
    :param optimizer: a capturable Adam or AdamW over ``params``.
    :param params: the trainable tensors, in the order of the graph's gradients.
    :param accumulators: the device tensors ``(loss_sum, first_bad, count)`` shared
        by every shape's graph.
    :param pool: the memory pool the graphs of one run share.
    """

    def __init__(self, graph, optimizer, params: Sequence[torch.Tensor], accumulators, pool):
        self.graph, self.optimizer, self.params = graph, optimizer, list(params)
        self.accumulators = accumulators
        self.pool = pool
        self.cuda_graph: Optional[torch.cuda.CUDAGraph] = None
        self.static_x: Optional[torch.Tensor] = None

    def _body(self, x: torch.Tensor) -> None:
        loss_sum, first_bad, count = self.accumulators
        out = self.graph(x)
        loss = out[0]
        for p, g in zip(self.params, out[1:]):
            p.grad = g
        finite = torch.isfinite(loss)
        first_bad.copy_(torch.where(finite | (first_bad >= 0), first_bad, count))
        loss_sum.add_(loss.detach().double())
        count.add_(1)
        self.optimizer.step()

    def first_step(self, x: torch.Tensor) -> Optional[str]:
        """Capture the graph and check it: the step replayed from the graph, then the same step run
        eagerly from the same state, compared bit for bit. The eager step is the one that stands
        (equal to the graph's when the check passes). Returns None, or why the graph is unusable."""
        dev = x.device
        before, snap = torch_state(dev), _Snapshot.of(self.optimizer, self.params, self.accumulators)
        try:
            self._capture(x)
        except Exception as e:  # any failure to capture: the plain static graph carries on
            set_torch_state(before, dev)
            snap.restore()
            self._eager(x)
            return f"the step could not be captured as a CUDA graph ({type(e).__name__}: {str(e).splitlines()[0]})"
        set_torch_state(before, dev)
        self.replay(x)
        graphed = [t.detach().clone() for t in snap.tensors]
        graphed_rng = torch_state(dev)
        set_torch_state(before, dev)
        snap.restore()
        self._eager(x)
        if not all(torch.equal(a, b) for a, b in zip(graphed, snap.tensors)):
            diff = max((a.double() - b.double()).abs().max().item() for a, b in zip(graphed, snap.tensors))
            self.cuda_graph = None
            return f"the CUDA graph's step differs from the same step run eagerly (max difference {diff:.3g})"
        if not all((a is None and b is None) or torch.equal(a, b) for a, b in zip(graphed_rng, torch_state(dev))):
            self.cuda_graph = None
            return "the CUDA graph draws a different number of random numbers than the eager step"
        return None

    def _eager(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            self._body(x)

    def _capture(self, x: torch.Tensor) -> None:
        self.static_x = x.detach().clone()
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self.pool):
            self._body(self.static_x)
        self.cuda_graph = graph

    def replay(self, x: torch.Tensor) -> None:
        """One step on batch ``x``; the loss is added to the shared device sum."""
        self.static_x.copy_(x)
        self.cuda_graph.replay()


class GraphedSteps:
    """The CUDA graphs of one run, one per batch shape, with their shared device accumulators.

    :meth:`__call__` takes a step if it can; :meth:`take_epoch` reads the epoch's
    loss sum and first non-finite step once, at the epoch's end.
    """

    def __init__(self, optimizer, params: Sequence[torch.Tensor], device: torch.device):
        self.optimizer, self.params = optimizer, list(params)
        self.accumulators = (torch.zeros((), dtype=torch.float64, device=device),  # loss sum
                             torch.full((), -1, dtype=torch.int64, device=device),  # first non-finite step
                             torch.zeros((), dtype=torch.int64, device=device))  # step of the epoch
        self.pool = torch.cuda.graph_pool_handle()
        self.steps: Dict[tuple, GraphedStep] = {}
        self.failure: Optional[str] = None
        self._epoch_start: Optional[_Snapshot] = None
        make_capturable(optimizer, True)

    def __call__(self, x: torch.Tensor, graph) -> bool:
        """Step on batch ``x`` with the checked FX ``graph`` of its shape. True: the step was taken
        (its loss is in the device sum); False: graphs are off, run the step otherwise."""
        if self.failure is not None:
            return False
        shape = (tuple(x.shape), x.dtype)
        step = self.steps.get(shape)
        if step is None:
            step = GraphedStep(graph, self.optimizer, self.params, self.accumulators, self.pool)
            self.failure = step.first_step(x)  # the step is taken either way
            if self.failure is None:
                self.steps[shape] = step
            return True
        step.replay(x)
        return True

    def skip(self) -> None:
        """A step of this epoch taken otherwise (its loss read on the host): count it."""
        self.accumulators[2].add_(1)

    def start_epoch(self, step: int) -> None:
        """Keep the epoch's starting parameters and optimiser state (device copies); zero the sums."""
        loss_sum, first_bad, count = self.accumulators
        with torch.no_grad():
            loss_sum.zero_()
            first_bad.fill_(-1)
            count.fill_(step)
        self._epoch_start = _Snapshot.of(self.optimizer, self.params)

    def take_epoch(self):
        """``(loss sum, first non-finite step of the epoch or None)`` of the graphed steps since
        :meth:`start_epoch`: one device synchronisation. After a non-finite loss the parameters
        and the optimiser are put back to the epoch's start."""
        loss_sum, first_bad, _ = self.accumulators
        total, bad = float(loss_sum), int(first_bad)
        if bad >= 0 and self._epoch_start is not None:
            self._epoch_start.restore()
        return total, (bad if bad >= 0 else None)
