import pytest
import torch
import pyro
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from pyrovae import VAE, VAEConfig


def _x(n=6, shape=(1, 4, 4)):
    return torch.bernoulli(torch.full((n, *shape), 0.3))


@pytest.mark.parametrize("network", ["mlp", "conv"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "continuous-bernoulli", "laplace"])
def test_model_guide_trace(network, likelihood):
    vae = VAE((1, 4, 4), latent_dim=2, network=network, hidden=(8,), channels=4, likelihood=likelihood)
    x = _x()
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    assert guide_tr.nodes["z"]["value"].shape == (6, 2)
    assert model_tr.nodes["x"]["is_observed"]
    assert model_tr.nodes["x"]["fn"].event_shape == (1, 4, 4)
    assert vae.model(num_samples=3).shape == (3, 1, 4, 4)


def test_beta_scales_the_latent_site_in_both_programs():
    vae = VAE((1, 4, 4), latent_dim=2, hidden=(8,), beta=0.25)
    x = _x()
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    assert guide_tr.nodes["z"]["scale"] == 0.25 and model_tr.nodes["z"]["scale"] == 0.25
    assert model_tr.nodes["x"]["scale"] == 1.0


def test_works_with_pyro_svi():
    """The pair is a plain Pyro program: Pyro's own SVI finds and trains its networks."""
    vae = VAE((1, 4, 4), latent_dim=2, hidden=(8,))
    before = [p.detach().clone() for p in vae.parameters()]
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    svi.step(_x())
    changed = [not torch.equal(b, p) for b, p in zip(before, vae.parameters())]
    assert all(changed), changed


def test_bad_inputs():
    vae = VAE((1, 4, 4), latent_dim=2, hidden=(8,))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, \*\(1, 4, 4\)\), got \(6, 16\)"):
        vae.model(torch.zeros(6, 16))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        vae.guide([1, 2])
    with pytest.raises(ValueError, match="guide needs data"):
        vae.guide()
    with pytest.raises(ValueError, match="beta must be a positive"):
        VAEConfig((4,), beta=-1.0)
    with pytest.raises(ValueError, match="network 'rnn' is not one of"):
        VAE((4,), network="rnn")
    with pytest.raises(TypeError, match="either config"):
        VAE((4,), config=VAEConfig((4,)))


def test_prior_buffers_follow_the_module():
    vae = VAE((4,), latent_dim=3)
    assert {n for n, _ in vae.named_buffers()} == {"prior_loc", "prior_scale"}
