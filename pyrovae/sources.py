"""Several sources of data in one run: semi-supervised learning, and terms a user adds.

Kingma et al.'s M2 trains one pair on labelled batches, ``model(xs, ys)``, and
on unlabelled ones, ``model(xs)`` with the label enumerated, and adds a
classification term on the labelled data. In :func:`pyrovae.fit` that is a
dict of named :class:`Source` objects::

    fit(model, guide, {
        "unlabelled": Source((x_u,)),                                  # the first source sets the epoch
        "labelled": Source((x_l, y_l), batch_size=20),                 # cycles, reshuffled each pass
        "classify": Source((x_l, y_l), batch_size=20, weight=0.1 * n,  # a term the user adds
                           model=model_classify, guide=guide_classify),
    }, elbo=TraceEnum_ELBO(max_plate_nesting=1), ...)

Every optimiser step takes one batch from each source and sums their
objectives, each scaled by its ``weight`` (``poutine.scale`` on both
programs). An epoch is one pass over the first source; the others cycle,
reshuffled with the run's generator at the start of each of their passes.
A checkpoint records where every source stands.
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from pyro import poutine
from pyro.infer import ELBO

from ._checks import check_float, check_int
from .data import LoaderBatches
from .objectives import Objective
from .pair import ModelGuidePair, batch_arguments

__all__ = ["Source", "SourceRun"]


@dataclass(frozen=True)
class Source:
    """One named source of batches (see the module docs).

    :param data: the source's data, in any form :func:`pyrovae.fit` accepts for one source.
    :param int batch_size: datapoints per step; None: ``fit``'s ``batch_size``
        (a ``DataLoader`` keeps its own).
    :param float weight: multiplies this source's objective (``poutine.scale``).
    :param model: the model for this source's batches; None: ``fit``'s model.
    :param guide: the guide for this source's batches; None: ``fit``'s guide.
    :param elbo: the estimator for this source; None: ``fit``'s.
    """

    data: object
    batch_size: Optional[int] = None
    weight: float = 1.0
    model: Optional[Callable] = None
    guide: Optional[Callable] = None
    elbo: Optional[ELBO] = None

    def __post_init__(self):
        check_int("batch_size", self.batch_size, allow_none=True)
        check_float("weight", self.weight, positive=True)
        if (self.model is None) != (self.guide is None):
            raise TypeError("a Source takes both model= and guide=, or neither")
        for name in ("model", "guide"):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {fn!r}")
        if self.elbo is not None and not isinstance(self.elbo, ELBO):
            raise TypeError(f"elbo must be a pyro.infer.ELBO or None, got {self.elbo!r}")


class SourceRun:
    """A secondary source during training: its programs, objective, and where it stands.

    :param str name: the source's name.
    :param batches: its data (:class:`~pyrovae.data.TensorBatches` or :class:`~pyrovae.data.LoaderBatches`).
    :param int batch_size: datapoints per step (tensor data).
    :param ModelGuidePair pair: its programs, discovered.
    :param objective: its :class:`~pyrovae.objectives.Objective`.
    :param float weight: its scale.
    """

    def __init__(self, name: str, batches, batch_size: int, pair: ModelGuidePair, objective: Objective,
                 weight: float):
        self.name, self.batches, self.batch_size = name, batches, batch_size
        self.pair, self.objective = pair, objective
        self.model = poutine.scale(pair.model, scale=weight) if weight != 1.0 else pair.model
        self.guide = objective.wrap(poutine.scale(pair.guide, scale=weight) if weight != 1.0 else pair.guide)
        self._iterator = None

    def _position(self, data_state: dict) -> dict:
        return data_state.setdefault(self.name, {"pass": 0, "pos": 0, "perm": None, "epoch_start": None,
                                                 "loss_sum": 0.0, "count": 0})

    def next_batch(self, data_state: dict, generator: torch.Generator):
        """The next batch, starting a new (reshuffled) pass when the last one is used up."""
        pos = self._position(data_state)
        if isinstance(self.batches, LoaderBatches):
            return self._next_streamed(pos)
        steps = math.ceil(len(self.batches) / self.batch_size)
        if pos["perm"] is None or pos["pos"] >= steps:
            if pos["perm"] is not None:
                pos["pass"] += 1
            pos["perm"], pos["pos"] = torch.randperm(len(self.batches), generator=generator, device="cpu"), 0
        idx = pos["perm"][pos["pos"] * self.batch_size: (pos["pos"] + 1) * self.batch_size]
        pos["pos"] += 1
        return self.batches.take(idx.to(self.batches.device)), len(idx)

    def _next_streamed(self, pos: dict):
        if pos["epoch_start"] is None or pos["pos"] >= self.batches.steps:
            if pos["epoch_start"] is not None:
                pos["pass"] += 1
            pos["epoch_start"], pos["pos"], self._iterator = self.batches.epoch_state(), 0, None
        if self._iterator is None:  # a new pass, or the first batch after a resume
            self._iterator = self.batches.batches(pos["pass"], pos["epoch_start"], pos["pos"])
        pos["pos"] += 1
        return next(self._iterator)

    def loss_and_grads(self, params, batch):
        args, kwargs = batch_arguments(batch)
        return self.objective.loss_and_grads(self.model, self.guide, params, args, kwargs)

    def record(self, data_state: dict, value: float, size: int) -> None:
        pos = self._position(data_state)
        pos["loss_sum"], pos["count"] = pos["loss_sum"] + value, pos["count"] + size

    def take_epoch_elbo(self, data_state: dict) -> Optional[float]:
        """This source's objective per datapoint over the epoch (None without a loss value); resets it."""
        pos = self._position(data_state)
        value = -pos["loss_sum"] / pos["count"] if pos["count"] and self.objective.reports_loss else None
        pos["loss_sum"], pos["count"] = 0.0, 0
        return value
