"""The importance-weighted bound as a training objective, per datapoint, for any pair.

For each datapoint x_i of the data plate and K particles z_k ~ q(z | x_i)::

    L_K(x_i) = log (1/K) sum_k w_ik,    log w_ik = log p(x_i, z_k) - log q(z_k | x_i)

is a lower bound on log p(x_i) that tightens as K grows (Burda et al., 2016);
``K = 1`` is the ELBO. Pyro's ``RenyiELBO`` with ``alpha=0`` forms one weight
per particle for the *whole batch*, a bound on log p(x_1, ..., x_B) whose
variance grows with the batch (pyro issues 2220 and 3104). :class:`IWAE`
forms one log-sum-exp per datapoint, which is the objective of the IWAE paper.

The log weights come from :func:`pyrovae.weights.training_log_weights`, the
same plate-aware code that :func:`pyrovae.log_marginal` uses, but with
gradients and with ``poutine.scale`` applied (β, KL warm-up).

:class:`IWAEDReG` keeps the objective and changes the guide's gradient to
the doubly-reparameterised estimator of Tucker et al. (2019), whose signal
to noise ratio does not decay as K grows (the plain IWAE gradient of the
guide does, Rainforth et al. 2018). See ``docs/iwae.md``.

References:

* Burda, Grosse, Salakhutdinov (2016). Importance Weighted Autoencoders. ICLR.
* Rainforth et al. (2018). Tighter variational bounds are not necessarily better. ICML.
* Tucker, Lawson, Gu, Maddison (2019). Doubly reparameterized gradient estimators
  for Monte Carlo objectives. ICLR.
"""

import math
from typing import List, Sequence

import torch
from pyro.infer import ELBO

from ._checks import check_int
from .weights import inspect_pair, training_log_weights

__all__ = ["IWAE", "IWAEDReG"]


class IWAE(ELBO):
    """The IWAE-K bound, one log-sum-exp per datapoint of the data plate.

    ``differentiable_loss`` returns minus the bound summed over the batch, so
    ``fit`` reports it in nats per datapoint like any ELBO. Particles are
    vectorised in a plate left of the programs' plates. Every latent must be
    proposed by the guide and live in the data plate (no global latents).

    :param int num_particles: K >= 1.
    :param str plate: the name of the data plate.

    >>> import pyro, pyro.distributions as dist
    >>> def model(x):
    ...     with pyro.plate("data", len(x)):
    ...         z = pyro.sample("z", dist.Normal(0., 1.))
    ...         pyro.sample("x", dist.Normal(z, 1.), obs=x)
    >>> def guide(x):  # the exact posterior: every weight equals p(x), the bound is exact
    ...     with pyro.plate("data", len(x)):
    ...         pyro.sample("z", dist.Normal(x / 2, 0.5 ** 0.5))
    >>> x = torch.tensor([0.0, 1.0])
    >>> loss = IWAE(num_particles=5).loss(model, guide, x)
    >>> round(loss, 4) == round(-float(dist.Normal(0., 2 ** 0.5).log_prob(x).sum()), 4)
    True
    """

    def __init__(self, num_particles: int = 5, *, plate: str = "data", vectorize_particles: bool = True,
                 max_plate_nesting: float = float("inf")):
        check_int("num_particles", num_particles)
        if not vectorize_particles:
            raise ValueError("IWAE vectorises its particles; vectorize_particles must be True")
        if not isinstance(plate, str) or not plate:
            raise TypeError(f"plate must be a non-empty str, got {plate!r}")
        super().__init__(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=max_plate_nesting)
        self.plate = plate
        self._structures = {}

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("IWAE draws its particles through pyrovae.weights, not ELBO._get_traces")

    def _structure(self, model, guide, args, kwargs):
        """The pair's plate layout, found once per program and batch shape (an unvectorised run)."""
        key = (id(model), id(guide), tuple(getattr(a, "shape", None) for a in args),
               tuple((k, getattr(v, "shape", None)) for k, v in sorted(kwargs.items())))
        if key not in self._structures:
            with torch.no_grad():
                self._structures[key] = inspect_pair(model, guide, args, kwargs, plate=self.plate)
        return self._structures[key]

    def log_weights(self, model, guide, *args, _detach_draws: bool = False, **kwargs):
        """``(log_weights, log_q_detached, log_p)``, each ``(K, N)``, with gradients (see
        :func:`pyrovae.weights.training_log_weights`)."""
        structure = self._structure(model, guide, args, kwargs)
        return training_log_weights(model, guide, args, kwargs, structure, self.num_particles,
                                    detach_draws=_detach_draws)

    def _bound(self, lw: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(lw, 0) - math.log(self.num_particles)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """Minus the IWAE-K bound summed over the datapoints of the batch (a 0-d tensor)."""
        lw, _, _ = self.log_weights(model, guide, *args, **kwargs)
        return -self._bound(lw).sum()

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()


class IWAEDReG(IWAE):
    """The IWAE-K bound with the doubly-reparameterised gradient for the guide (Tucker et al., 2019).

    With normalised weights ``w~_ik = w_ik / sum_j w_ij``, the guide's parameters
    φ get ``sum_ik w~_ik^2 (d log w_ik / d z_ik)(d z_ik / d φ)``, and the model's
    parameters θ the ordinary IWAE gradient ``sum_ik w~_ik d log w_ik / d θ``.
    The two need different surrogates, so this estimator returns its
    gradients itself (:meth:`loss_and_param_grads`) rather than a loss to
    differentiate. Needs reparameterised guide sites and parameters that
    belong to one program only.
    """

    def __init__(self, num_particles: int = 5, **kwargs):
        super().__init__(num_particles, **kwargs)
        self._roles = {}

    def _guide_params(self, model, guide, params, args, kwargs, log_q_detached) -> List[bool]:
        """Which parameters are the guide's: those log q of the detached draws depends on (found once)."""
        key = (id(model), id(guide), tuple(id(p) for p in params))
        if key not in self._roles:
            found = torch.autograd.grad(log_q_detached.sum(), params, retain_graph=True, allow_unused=True)
            self._roles[key] = [g is not None for g in found]
            self._refuse_shared(model, guide, params, args, kwargs, self._roles[key])
        return self._roles[key]

    def _refuse_shared(self, model, guide, params, args, kwargs, in_guide) -> None:
        """One extra run with the guide's draws detached: a guide parameter the model also reads is refused."""
        guide_params = [p for p, g in zip(params, in_guide) if g]
        with torch.enable_grad():
            _, _, log_p = self.log_weights(model, guide, *args, _detach_draws=True, **kwargs)
            grads = torch.autograd.grad(log_p.sum(), guide_params, allow_unused=True) if guide_params else ()
        shared = [i for i, g in enumerate(grads) if g is not None]
        if shared:
            raise ValueError("IWAEDReG needs parameters that belong to the model or to the guide, not both: "
                             f"{len(shared)} guide parameter(s) are also read by the model; use elbo='iwae'")

    def loss_and_param_grads(self, model, guide, params: Sequence[torch.Tensor], *args, **kwargs):
        """``(loss, grads)``: minus the bound summed over the batch, and one gradient (or None) per parameter."""
        params = list(params)
        lw, log_q_detached, _ = self.log_weights(model, guide, *args, **kwargs)
        bound = self._bound(lw)
        in_guide = self._guide_params(model, guide, params, args, kwargs, log_q_detached)
        weights = torch.softmax(lw.detach(), 0)
        # The path derivative of log w only: adding log q of the detached draws cancels
        # log w's direct dependence on φ, leaving the dependence through z.
        surrogate = (weights.pow(2) * (lw + log_q_detached)).sum()
        model_grads = torch.autograd.grad(-bound.sum(), params, retain_graph=True, allow_unused=True)
        guide_grads = torch.autograd.grad(-surrogate, params, allow_unused=True)
        grads = [g if is_guide else m for m, g, is_guide in zip(model_grads, guide_grads, in_guide)]
        return -bound.sum().detach(), grads
