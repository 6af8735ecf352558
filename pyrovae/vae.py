"""The variational autoencoder as a Pyro model/guide pair.

``VAE.model`` is the generative model p(z) p(x|z) with a standard Normal prior
and a decoder likelihood; ``VAE.guide`` is the encoder q(z|x), a diagonal
Normal. Both keep one datapoint per element of the ``"data"`` plate, so any
Pyro inference code (``SVI``, ``Predictive``, :func:`pyrovae.fit`,
:func:`pyrovae.log_marginal`) can use them as they are.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.nn import PyroModule

from .likelihoods import LIKELIHOODS, get_likelihood
from ._checks import check_int
from .nn import NETWORKS, _check_shape

__all__ = ["VAE", "VAEConfig"]

# Refuse networks that could not be allocated on any ordinary machine.
_MAX_PARAMETERS = 2**31


@dataclass(frozen=True)
class VAEConfig:
    """Everything needed to rebuild a :class:`VAE` (stored as JSON in run folders).

    :param tuple event_shape: shape of one datapoint, e.g. ``(1, 28, 28)``; None
        in a job's configuration, where the data decides it (:meth:`for_data`).
    :param int latent_dim: size of z.
    :param str network: ``"mlp"`` or ``"conv"`` (keys of :data:`pyrovae.nn.NETWORKS`).
    :param tuple hidden: hidden widths of the MLP networks.
    :param int channels: first-layer channels of the convolutional networks.
    :param str likelihood: key of :data:`pyrovae.likelihoods.LIKELIHOODS`.
    :param dict likelihood_options: keyword options of that likelihood.
    :param float beta: weight of the latent site (β-VAE); 1 gives the ELBO.
    :param str name: prefix under which the networks are registered with
        ``pyro.module``; give two VAEs living in one param store different names.
    """

    event_shape: Optional[Tuple[int, ...]]
    latent_dim: int = 10
    network: str = "mlp"
    hidden: Tuple[int, ...] = (400,)
    channels: int = 32
    likelihood: str = "bernoulli"
    likelihood_options: dict = field(default_factory=dict)
    beta: float = 1.0
    name: str = "vae"

    def __post_init__(self):
        # Normalise lists from JSON back to tuples, then validate eagerly.
        if self.event_shape is not None:
            object.__setattr__(self, "event_shape", _check_shape("event_shape", self.event_shape))
        object.__setattr__(self, "hidden", tuple(self.hidden))
        check_int("latent_dim", self.latent_dim)
        check_int("channels", self.channels)
        for h in self.hidden:
            check_int("hidden", h)
        if self.network not in NETWORKS:
            raise ValueError(f"network {self.network!r} is not one of {sorted(NETWORKS)}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood {self.likelihood!r} is not one of {sorted(LIKELIHOODS)}")
        if not isinstance(self.likelihood_options, dict):
            raise TypeError(f"likelihood_options must be a dict, got {self.likelihood_options!r}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)):
            raise TypeError(f"beta must be a float, got {self.beta!r}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a positive finite float, got {self.beta!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty str, got {self.name!r}")
        size = 0 if self.event_shape is None else self.approx_num_parameters()
        if size > _MAX_PARAMETERS:
            raise ValueError(
                f"this VAE would have about {size:.3g} parameters (event_shape={self.event_shape}, "
                f"latent_dim={self.latent_dim}, hidden={self.hidden}); the limit is {_MAX_PARAMETERS:.3g}"
            )

    def approx_num_parameters(self) -> int:
        """Parameter count of encoder and decoder: exact for MLPs, an upper bound for conv nets."""
        d, k = math.prod(self.event_shape), self.latent_dim
        out = get_likelihood(self.likelihood, **self.likelihood_options).num_params * d
        if self.network == "mlp":
            dense = lambda widths: sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
            return dense((d, *self.hidden, 2 * k)) + dense((k, *self.hidden, out))
        c = self.channels
        return (d + out) * 2 * c * (16 + 2 * k) + 32 * c * c

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def for_data(self, event_shape) -> "VAEConfig":
        """This configuration for datapoints of shape ``event_shape``."""
        return dataclasses.replace(self, event_shape=tuple(event_shape))


class VAE(PyroModule):
    """A VAE whose ``model`` and ``guide`` are Pyro programs.

    Generative model, for each datapoint in the ``"data"`` plate:
    ``z ~ Normal(0, I)``, ``x ~ likelihood(decoder(z))``. Guide:
    ``z ~ Normal(encoder(x))``, diagonal. With ``beta != 1`` the latent site
    is scaled by ``beta`` in both programs through ``poutine.scale``, so the
    objective becomes E[log p(x|z)] - beta KL(q(z|x) || p(z)).

    :param event_shape: shape of one datapoint, e.g. ``(1, 28, 28)``.
    :param kwargs: the other fields of :class:`VAEConfig`.

    >>> vae = VAE((1, 8, 8), latent_dim=2, hidden=(16,))
    >>> x = torch.bernoulli(torch.full((4, 1, 8, 8), 0.3))
    >>> loss = pyro.infer.Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    >>> vae.model(num_samples=3).shape  # generation: no data
    torch.Size([3, 1, 8, 8])
    """

    def __init__(self, event_shape=None, *, config: Optional[VAEConfig] = None, **kwargs):
        super().__init__()
        if config is None:
            config = VAEConfig(event_shape, **kwargs)
        elif event_shape is not None or kwargs:
            raise TypeError("pass either config= or event_shape and options, not both")
        if config.event_shape is None:
            raise ValueError("the VAE needs an event_shape: pass it, or use config.for_data(shape)")
        self.config = config
        self.likelihood = get_likelihood(config.likelihood, **config.likelihood_options)
        encoder_cls, decoder_cls = NETWORKS[config.network]
        width = {"hidden": config.hidden} if config.network == "mlp" else {"channels": config.channels}
        self.encoder = encoder_cls(config.event_shape, config.latent_dim, **width)
        self.decoder = decoder_cls(
            config.latent_dim, config.event_shape, num_params=self.likelihood.num_params, **width
        )
        # Buffers, so that .to(device) moves the prior with the networks.
        self.register_buffer("prior_loc", torch.zeros(config.latent_dim))
        self.register_buffer("prior_scale", torch.ones(config.latent_dim))

    @property
    def event_shape(self) -> Tuple[int, ...]:
        return self.config.event_shape

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def describe(self) -> dict:
        """What a run folder's ``config.json`` records to rebuild this VAE."""
        return {"type": "VAE", "config": self.config.to_dict()}

    def _check_x(self, x, name="x"):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        n = len(self.event_shape)
        if x.dim() <= n or tuple(x.shape[-n:]) != self.event_shape:
            raise ValueError(
                f"{name} must have shape (batch, *{self.event_shape}), got {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")

    def check_data(self, x, name="x"):
        """Check shape and likelihood support of a data tensor; raise ``ValueError``."""
        self._check_x(x, name)
        self.likelihood.check_data(x, name)

    def model(self, x: Optional[torch.Tensor] = None, *, num_samples: int = 1):
        """p(z) p(x|z). With ``x=None``, draws ``num_samples`` datapoints.

        :param torch.Tensor x: data of shape ``(batch, *event_shape)``, or None.
        :returns: x, observed or sampled, shape ``(batch, *event_shape)``.
        """
        pyro.module(f"{self.config.name}.decoder", self.decoder)
        if x is None:
            batch = check_int("num_samples", num_samples)
        else:
            self._check_x(x)
            batch = x.shape[0]
        with pyro.plate("data", batch):
            with poutine.scale(scale=self.config.beta):
                z = pyro.sample("z", dist.Normal(self.prior_loc, self.prior_scale).to_event(1))
            fn = self.likelihood.distribution(self.decoder(z), len(self.event_shape))
            return pyro.sample("x", fn, obs=x)

    def guide(self, x: Optional[torch.Tensor] = None, *, num_samples: int = 1):
        """q(z|x), a diagonal Normal from the encoder.

        :param torch.Tensor x: data of shape ``(batch, *event_shape)``.
        :returns: z of shape ``(batch, latent_dim)``.
        """
        if x is None:
            raise ValueError("guide needs data x; call model() without x to generate")
        self._check_x(x)
        pyro.module(f"{self.config.name}.encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encoder(x)
            with poutine.scale(scale=self.config.beta):
                return pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # Convenience for pictures and users; the Pyro programs above are the source of truth.
    def encode(self, x: torch.Tensor):
        """Posterior parameters ``(loc, scale)``, each of shape ``(batch, latent_dim)``."""
        self._check_x(x)
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> dist.TorchDistribution:
        """The likelihood p(x|z) for latents ``z`` of shape ``(*batch, latent_dim)``."""
        return self.likelihood.distribution(self.decoder(z), len(self.event_shape))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | z = posterior mean), shape of ``x``."""
        return self.decode(self.encode(x)[0]).mean

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """Means of p(x|z) for ``z`` drawn from the prior, shape ``(num_samples, *event_shape)``."""
        num_samples = check_int("num_samples", num_samples)
        z = dist.Normal(self.prior_loc, self.prior_scale).sample((num_samples,))
        return self.decode(z).mean
