"""Decoder likelihoods: map decoder outputs to a :mod:`pyro.distributions` object.

A likelihood turns the ``num_params`` tensors a decoder returns, each of shape
``(*batch, *event_shape)``, into a distribution over one datapoint per batch
element (the event dimensions are declared with ``to_event``). It also knows
its support, so that data the distribution cannot score is refused before
training starts instead of turning into a NaN later.

All densities come from :mod:`pyro.distributions`; nothing here writes one by
hand.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
import pyro.distributions as dist

from ._checks import check_float

__all__ = [
    "Likelihood",
    "Bernoulli",
    "Gaussian",
    "ContinuousBernoulli",
    "Laplace",
    "LIKELIHOODS",
    "get_likelihood",
]


def _positive(raw: torch.Tensor, min_scale: float) -> torch.Tensor:
    # softplus keeps gradients alive for very negative raw outputs (exp would
    # underflow), and the floor keeps the density bounded: a scale of 0 would
    # make log p(x|z) = +inf at x = loc.
    return F.softplus(raw) + min_scale


def _check_scale(name: str, value: Optional[float], *, allow_none: bool = True) -> None:
    check_float(name, value, positive=True, allow_none=allow_none)


class Likelihood:
    """Base class: a family p(x | decoder outputs).

    Subclasses set :attr:`num_params` (how many tensors the decoder returns)
    and implement :meth:`distribution` and :meth:`check_data`.
    """

    #: number of decoder output maps this likelihood consumes
    num_params: int = 1
    #: registry key, also used in saved configs
    key: str = ""

    def distribution(self, params, event_dim: int) -> dist.TorchDistribution:
        """Distribution over one datapoint for each batch element.

        :param tuple params: ``num_params`` tensors of shape ``(*batch, *event_shape)``.
        :param int event_dim: ``len(event_shape)``.
        :returns: a distribution with ``batch_shape == batch`` and
            ``event_shape == event_shape``.
        """
        raise NotImplementedError

    def check_data(self, x: torch.Tensor, name: str = "x") -> None:
        """Raise :class:`ValueError` if ``x`` lies outside the support."""
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or infinite values")

    def options(self) -> dict:
        """Keyword arguments that rebuild this likelihood (JSON-able)."""
        return {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


class Bernoulli(Likelihood):
    """Bernoulli on logits, for binary pixels.

    The log-density is computed from logits (``binary_cross_entropy_with_logits``
    inside :class:`pyro.distributions.Bernoulli`), which is stable for large
    logits where ``log(sigmoid(l))`` would underflow.

    :param bool allow_fractional: score values in ``[0, 1]`` that are not 0 or 1
        (the "grayscale Bernoulli" of Pyro's VAE tutorial). The result is then
        not a normalised density of the data; use it knowingly. Default ``False``:
        such data is an error.
    """

    key = "bernoulli"
    num_params = 1

    def __init__(self, *, allow_fractional: bool = False):
        if not isinstance(allow_fractional, bool):
            raise TypeError(f"allow_fractional must be a bool, got {allow_fractional!r}")
        self.allow_fractional = allow_fractional

    def distribution(self, params, event_dim):
        (logits,) = params
        # validate_args=False only where fractional values are allowed on purpose.
        validate = False if self.allow_fractional else None
        return dist.Bernoulli(logits=logits, validate_args=validate).to_event(event_dim)

    def check_data(self, x, name="x"):
        super().check_data(x, name)
        if self.allow_fractional:
            if (x < 0).any() or (x > 1).any():
                bad = x[(x < 0) | (x > 1)][0].item()
                raise ValueError(f"{name} must lie in [0, 1] for a Bernoulli likelihood, found {bad!r}")
            return
        binary = (x == 0) | (x == 1)
        if not binary.all():
            bad = x[~binary][0].item()
            raise ValueError(
                f"{name} must be binary (0 or 1) for a Bernoulli likelihood, found {bad!r}; "
                "binarise the data (binarize='dynamic' or 'static') or use "
                "Bernoulli(allow_fractional=True) deliberately"
            )

    def options(self):
        return {"allow_fractional": self.allow_fractional}


class _LocationScale(Likelihood):
    """Shared code of the diagonal location-scale families below."""

    _family = None

    def __init__(self, *, scale: Optional[float] = None, min_scale: float = 1e-3):
        _check_scale("scale", scale)
        _check_scale("min_scale", min_scale, allow_none=False)
        self.scale = None if scale is None else float(scale)
        self.min_scale = float(min_scale)
        self.num_params = 1 if scale is not None else 2

    def distribution(self, params, event_dim):
        loc = params[0]
        if self.scale is None:
            scale = _positive(params[1], self.min_scale)
        else:
            scale = loc.new_full((), self.scale).expand_as(loc)
        return self._family(loc, scale).to_event(event_dim)

    def options(self):
        return {"scale": self.scale, "min_scale": self.min_scale}


class Gaussian(_LocationScale):
    """Diagonal Normal, with learned per-pixel scale or a fixed one.

    :param float scale: fixed standard deviation. ``None`` (default) learns a
        scale per pixel: the decoder then returns a mean map and a raw scale map,
        mapped through ``softplus(raw) + min_scale``.
    :param float min_scale: floor on a learned scale, default ``1e-3``. Without
        it a decoder can shrink the scale towards 0 on pixels it predicts
        exactly (e.g. constant background) and drive the density to infinity;
        with it, each pixel contributes at most ``-log(min_scale * sqrt(2 pi))``
        (about 5.99 nats) to log p(x|z).
    """

    key = "gaussian"
    _family = dist.Normal


class Laplace(_LocationScale):
    """Diagonal Laplace, with learned or fixed scale (options as :class:`Gaussian`)."""

    key = "laplace"
    _family = dist.Laplace


class ContinuousBernoulli(Likelihood):
    """Continuous Bernoulli on logits, a normalised density on ``[0, 1]``.

    The fix of Loaiza-Ganem & Cunningham (2019) for the grayscale Bernoulli: it
    includes the normalising constant, so its log-density is a true density of
    pixels in ``[0, 1]``.
    """

    key = "continuous-bernoulli"
    num_params = 1

    def distribution(self, params, event_dim):
        (logits,) = params
        return dist.ContinuousBernoulli(logits=logits).to_event(event_dim)

    def check_data(self, x, name="x"):
        super().check_data(x, name)
        if (x < 0).any() or (x > 1).any():
            bad = x[(x < 0) | (x > 1)][0].item()
            raise ValueError(f"{name} must lie in [0, 1] for a continuous Bernoulli likelihood, found {bad!r}")


#: registry of likelihood classes by key
LIKELIHOODS = {cls.key: cls for cls in (Bernoulli, Gaussian, ContinuousBernoulli, Laplace)}


def get_likelihood(spec, **options) -> Likelihood:
    """Resolve a registry key (with options) or pass a :class:`Likelihood` through.

    >>> get_likelihood("gaussian", scale=0.1)
    Gaussian(scale=0.1, min_scale=0.001)
    """
    if isinstance(spec, Likelihood):
        if options:
            raise TypeError(f"options {sorted(options)} given with a Likelihood instance {spec!r}")
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"likelihood must be a str key or a Likelihood, got {spec!r}")
    if spec not in LIKELIHOODS:
        raise ValueError(f"likelihood {spec!r} is not one of {sorted(LIKELIHOODS)}")
    return LIKELIHOODS[spec](**options)
