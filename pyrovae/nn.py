"""Encoder and decoder networks that return distribution parameters.

Every network accepts any number of leading batch dimensions, because Pyro's
vectorised particles add one on the left of the data plate: an encoder maps
``x`` of shape ``(*batch, *event_shape)`` to ``(loc, scale)`` of shape
``(*batch, latent_dim)``, and a decoder maps ``z`` of shape
``(*batch, latent_dim)`` to a tuple of ``num_params`` tensors of shape
``(*batch, *event_shape)``, which a :class:`~pyrovae.likelihoods.Likelihood`
turns into a distribution.
"""

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_int

__all__ = ["MLPEncoder", "MLPDecoder", "ConvEncoder", "ConvDecoder", "NETWORKS"]

# Smallest posterior scale an encoder can return; keeps log q(z|x) finite.
_MIN_SCALE = 1e-5


def _check_shape(name, shape) -> Tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    try:
        shape = tuple(shape)
    except TypeError:
        raise TypeError(f"{name} must be a tuple of positive ints, got {shape!r}") from None
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"{name} must be a non-empty tuple of positive ints, got {shape!r}")
    return shape


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _split_scale(h: torch.Tensor, latent_dim: int):
    loc, raw = h.split(latent_dim, dim=-1)
    return loc, F.softplus(raw) + _MIN_SCALE


class MLPEncoder(nn.Module):
    """Fully connected encoder ``x -> (loc, scale)`` of a diagonal Normal q(z|x).

    :param tuple event_shape: shape of one datapoint, e.g. ``(1, 28, 28)``.
    :param int latent_dim: size of z.
    :param tuple hidden: hidden layer widths, e.g. ``(400,)``.

    >>> enc = MLPEncoder((1, 8, 8), latent_dim=2, hidden=(16,))
    >>> loc, scale = enc(torch.zeros(5, 3, 1, 8, 8))
    >>> loc.shape, bool((scale > 0).all())
    (torch.Size([5, 3, 2]), True)
    """

    def __init__(self, event_shape, latent_dim: int, hidden: Sequence[int] = (400,)):
        super().__init__()
        self.event_shape = _check_shape("event_shape", event_shape)
        self.latent_dim = check_int("latent_dim", latent_dim)
        hidden = tuple(check_int("hidden", h) for h in hidden)
        # The last layer outputs loc and the raw scale side by side.
        self.net = _mlp((math.prod(self.event_shape), *hidden, 2 * latent_dim))

    def forward(self, x: torch.Tensor):
        flat = x.reshape(*x.shape[: x.dim() - len(self.event_shape)], -1)
        return _split_scale(self.net(flat), self.latent_dim)


class MLPDecoder(nn.Module):
    """Fully connected decoder ``z -> num_params`` maps of shape ``event_shape``.

    :param int latent_dim: size of z.
    :param tuple event_shape: shape of one datapoint.
    :param tuple hidden: hidden layer widths.
    :param int num_params: how many output maps (1 for Bernoulli logits, 2 for a
        mean and a raw scale).

    >>> dec = MLPDecoder(2, (1, 8, 8), hidden=(16,), num_params=2)
    >>> [p.shape for p in dec(torch.zeros(5, 3, 2))]
    [torch.Size([5, 3, 1, 8, 8]), torch.Size([5, 3, 1, 8, 8])]
    """

    def __init__(self, latent_dim: int, event_shape, hidden: Sequence[int] = (400,), num_params: int = 1):
        super().__init__()
        self.event_shape = _check_shape("event_shape", event_shape)
        self.latent_dim = check_int("latent_dim", latent_dim)
        self.num_params = check_int("num_params", num_params)
        hidden = tuple(check_int("hidden", h) for h in hidden)
        self.net = _mlp((latent_dim, *hidden, num_params * math.prod(self.event_shape)))

    def forward(self, z: torch.Tensor):
        out = self.net(z)
        batch = z.shape[:-1]
        if self.num_params == 1:
            return (out.reshape(*batch, *self.event_shape),)
        return tuple(o.reshape(*batch, *self.event_shape) for o in out.chunk(self.num_params, dim=-1))


def _image_shape(event_shape):
    if len(event_shape) == 2:
        return (1, *event_shape)
    if len(event_shape) == 3:
        return tuple(event_shape)
    raise ValueError(f"convolutional networks need event_shape (H, W) or (C, H, W), got {event_shape!r}")


class ConvEncoder(nn.Module):
    """Convolutional encoder for images: two stride-2 convolutions, then a linear layer.

    :param tuple event_shape: ``(C, H, W)`` or ``(H, W)``.
    :param int latent_dim: size of z.
    :param int channels: channels of the first convolution (the second has twice as many).

    >>> enc = ConvEncoder((1, 28, 28), latent_dim=4, channels=8)
    >>> enc(torch.zeros(2, 3, 1, 28, 28))[0].shape
    torch.Size([2, 3, 4])
    """

    def __init__(self, event_shape, latent_dim: int, channels: int = 32):
        super().__init__()
        self.event_shape = _check_shape("event_shape", event_shape)
        c, h, w = _image_shape(self.event_shape)
        self.latent_dim = check_int("latent_dim", latent_dim)
        channels = check_int("channels", channels)
        self.conv = nn.Sequential(
            nn.Conv2d(c, channels, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1),
            nn.ReLU(),
        )
        flat = 2 * channels * (h // 4) * (w // 4)
        self.head = nn.Linear(flat, 2 * latent_dim)

    def forward(self, x):
        batch = x.shape[: x.dim() - len(self.event_shape)]
        img = x.reshape(-1, *_image_shape(self.event_shape))
        h = self.conv(img).flatten(1)
        return _split_scale(self.head(h).reshape(*batch, -1), self.latent_dim)


class ConvDecoder(nn.Module):
    """Convolutional decoder: a linear layer, then two stride-2 transposed convolutions.

    Output maps are cropped to ``(H, W)``, so sizes that are not multiples of 4 work.

    >>> dec = ConvDecoder(4, (1, 28, 28), channels=8)
    >>> dec(torch.zeros(2, 3, 4))[0].shape
    torch.Size([2, 3, 1, 28, 28])
    """

    def __init__(self, latent_dim: int, event_shape, channels: int = 32, num_params: int = 1):
        super().__init__()
        self.event_shape = _check_shape("event_shape", event_shape)
        c, h, w = _image_shape(self.event_shape)
        self.latent_dim = check_int("latent_dim", latent_dim)
        self.num_params = check_int("num_params", num_params)
        channels = check_int("channels", channels)
        self._grid = (2 * channels, -(-h // 4), -(-w // 4))
        self.head = nn.Linear(latent_dim, math.prod(self._grid))
        self.deconv = nn.Sequential(
            nn.ReLU(),
            nn.ConvTranspose2d(2 * channels, channels, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(channels, c * num_params, 4, stride=2, padding=1),
        )

    def forward(self, z):
        batch = z.shape[:-1]
        c, h, w = _image_shape(self.event_shape)
        out = self.deconv(self.head(z.reshape(-1, self.latent_dim)).reshape(-1, *self._grid))
        out = out[..., :h, :w]
        maps = out.chunk(self.num_params, dim=1)
        return tuple(m.reshape(*batch, *self.event_shape) for m in maps)


#: registry of (encoder, decoder) classes by network key
NETWORKS = {"mlp": (MLPEncoder, MLPDecoder), "conv": (ConvEncoder, ConvDecoder)}
