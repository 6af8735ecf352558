import pytest
import torch

from pyrovae.nn import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder


@pytest.mark.parametrize("event_shape", [(1, 8, 8), (1, 28, 28), (3, 10, 6)])
@pytest.mark.parametrize("batch", [(5,), (2, 5)])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_shapes(kind, event_shape, batch):
    enc = MLPEncoder(event_shape, 3, hidden=(7,)) if kind == "mlp" else ConvEncoder(event_shape, 3, channels=4)
    dec = MLPDecoder(3, event_shape, hidden=(7,), num_params=2) if kind == "mlp" else ConvDecoder(3, event_shape, channels=4, num_params=2)
    loc, scale = enc(torch.rand(*batch, *event_shape))
    assert loc.shape == scale.shape == (*batch, 3) and (scale > 0).all()
    outs = dec(torch.randn(*batch, 3))
    assert [o.shape for o in outs] == [(*batch, *event_shape)] * 2


@pytest.mark.parametrize("bad, err", [((0, 4), ValueError), ("abc", ValueError), (None, TypeError)])
def test_bad_event_shape(bad, err):
    with pytest.raises(err, match="event_shape"):
        MLPEncoder(bad, 2)


def test_bad_latent_dim():
    with pytest.raises(ValueError, match="latent_dim must be a positive int, got 0"):
        MLPDecoder(0, (4,))
