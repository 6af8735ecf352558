"""Loss and gradients from any Pyro ELBO, and the checks that keep a minibatch objective honest.

:class:`Objective` is how :class:`~pyrovae.train.Trainer` drives an estimator:
Pyro's ELBOs differ in what they offer (``differentiable_loss``, or only
``loss_and_grads``, or no loss value at all), and the trainer should not care.
:func:`check_structure` refuses, before the first step, programs whose
minibatch objective would be silently wrong.
"""

import math
from typing import List

import pyro
import torch
from pyro.infer import ELBO, Trace_ELBO, TraceTailAdaptive_ELBO
from pyro.poutine.util import site_is_subsample

from . import _compat
from .pair import ModelGuidePair

__all__ = ["Objective", "check_structure", "ANCHOR"]

#: a parameter site that makes Pyro's ``loss_and_grads`` run its backward pass for pairs
#: whose networks live only in an ``nn.Module`` (RenyiELBO skips it without param sites)
ANCHOR = "_pyrovae_backward_anchor"


def _anchored(fn):
    def program(*args, **kwargs):
        pyro.param(ANCHOR, lambda: torch.zeros(()))
        return fn(*args, **kwargs)

    return program


class Objective:
    """Loss and gradients from any Pyro ELBO, and the estimator validation reports.

    * ELBOs with ``differentiable_loss`` (``Trace_ELBO``, ``TraceMeanField_ELBO``,
      ``TraceEnum_ELBO``, ``TraceTMC_ELBO``, pyrovae's ``IWAE``): the loss is differentiated.
    * ELBOs with ``loss_and_grads`` only (``TraceGraph_ELBO``, ``RenyiELBO``):
      that method runs the backward pass; a pair without Pyro param sites gets
      an anchor site so that ``RenyiELBO`` does not skip it.
    * ``TraceTailAdaptive_ELBO`` estimates gradients without a loss: the
      training objective is not reported (None) and validation reports
      ``Trace_ELBO`` with the same particles.
    * An ELBO with ``loss_and_param_grads`` (pyrovae's ``IWAE(dreg=True)``)
      returns its own gradients.

    :param elbo: the Pyro ELBO.
    :param ModelGuidePair pair: discovered programs.
    """

    def __init__(self, elbo: ELBO, pair: ModelGuidePair):
        self.elbo = elbo
        if hasattr(elbo, "loss_and_param_grads"):
            self.kind = "grads"
        elif isinstance(elbo, TraceTailAdaptive_ELBO):
            self.kind = "surrogate"
        elif hasattr(type(elbo), "differentiable_loss"):
            self.kind = "differentiable"
        else:
            self.kind = "backward"
        self.anchor = self.kind == "backward" and not pair.has_param_sites
        self.validation_elbo = elbo if self.kind != "surrogate" else Trace_ELBO(
            num_particles=elbo.num_particles, vectorize_particles=elbo.vectorize_particles)

    @property
    def reports_loss(self) -> bool:
        """False where the estimator has no loss value (``TraceTailAdaptive_ELBO``)."""
        return self.kind != "surrogate"

    def wrap(self, guide):
        return _anchored(guide) if self.anchor else guide

    def loss_and_grads(self, model, guide, params: List[torch.Tensor], args, kwargs):
        """``(loss, grads)``: a 0-d tensor, and the gradients (None: differentiate ``loss``)."""
        if self.kind == "grads":
            return self.elbo.loss_and_param_grads(model, guide, params, *args, **kwargs)
        if self.kind == "backward":
            held = [p.grad for p in params]  # gradients of another data source in this step
            for p in params:
                p.grad = None
            loss = self.elbo.loss_and_grads(model, guide, *args, **kwargs)
            grads = [p.grad for p in params]
            for p, g in zip(params, held):
                p.grad = g
            return torch.as_tensor(float(loss)), grads
        return self.elbo.differentiable_loss(model, guide, *args, **kwargs), None

    def validation_loss(self, model, guide, args, kwargs) -> float:
        return float(self.validation_elbo.loss(model, guide, *args, **kwargs))

    def describe(self) -> dict:
        """The ELBO's class and options, as ``config.json`` records them (a resume must match)."""
        # max_plate_nesting is guessed by Pyro on the first call: not an option of the objective
        options = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                   for k, v in vars(self.elbo).items() if not k.startswith("_") and k != "max_plate_nesting"
                   and isinstance(v, (int, float, bool, str, type(None)))}
        return {"class": type(self.elbo).__name__, **options}


def check_structure(pair: ModelGuidePair, batch_size: int, num_data: int) -> None:
    """Refuse, before the first step, programs whose objective would be silently wrong.

    * a model with no observed site (the ELBO would not involve the data);
    * with batches smaller than the data: observations outside every plate, or
      latents outside every plate while the observations' plate is not scaled
      to the whole data (the minibatch objective is then biased).
    """
    observed = [(n, s) for n, s in pair.model_trace.nodes.items() if s["type"] == "sample" and s["is_observed"]]
    if not observed:
        raise ValueError("the model has no observed sample site (pyro.sample(..., obs=...)): the ELBO would not "
                         "involve the data. Observe the data in the model; check that every tensor of the batch "
                         "reaches the programs")
    if batch_size >= num_data:
        return
    fix = ("put the observations in pyro.plate('data', N, subsample=batch_indices) or pyro.plate('data', N, "
           "subsample_size=...), where N is the size of the whole data, or scale them with poutine.scale(scale=N / "
           f"batch_size); or train with batch_size >= {num_data}")
    outside = [n for n, s in observed if not s["cond_indep_stack"]]
    if outside:
        raise ValueError(f"observed sites {outside} lie outside every plate, but batches hold {batch_size} of the "
                         f"{num_data} datapoints: each step would weigh a batch as if it were all the data, a "
                         f"biased objective. To fix it, {fix}")
    global_latents = [n for n, s in pair.model_trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]
                      and not site_is_subsample(s) and not s["cond_indep_stack"] and not _compat.is_deterministic(s)]
    unscaled = [n for n, s in observed if float(s["scale"]) == 1.0]
    if global_latents and unscaled:
        raise ValueError(f"latent sites {global_latents} lie outside every plate and the observations {unscaled} are "
                         f"not scaled to the {num_data} datapoints while batches hold {batch_size}: the prior would "
                         f"count once per batch, a biased objective. To fix it, {fix}")
