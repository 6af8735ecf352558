"""The per-datapoint IWAE objective and its doubly-reparameterised gradient, checked by hand."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyrovae import fit, log_marginal
from pyrovae.iwae import IWAE, IWAEDReG

from .common import DEVICE, seeded_data

K, N, D, L = 7, 5, 4, 3  # particles, datapoints, data dim, latent dim


class GaussianVAE(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc, self.dec = nn.Linear(D, 2 * L), nn.Linear(L, D)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(L), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.dec(z), 0.7).to_event(1), obs=x)

    def guide(self, x):
        loc, raw = self.enc(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw)).to_event(1))

    def hand_log_weights(self, x, eps, detach_q_params=False):
        """log w of shape (K, N), written out with the same draws z = loc + scale * eps."""
        loc, raw = self.enc(x).chunk(2, -1)
        scale = nn.functional.softplus(raw)
        z = loc + scale * eps
        qloc, qscale = (loc.detach(), scale.detach()) if detach_q_params else (loc, scale)
        log_q = (-0.5 * ((z - qloc) / qscale) ** 2 - qscale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_pz = (-0.5 * z ** 2 - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_px = (-0.5 * ((x - self.dec(z)) / 0.7) ** 2 - math.log(0.7) - 0.5 * math.log(2 * math.pi)).sum(-1)
        return log_px + log_pz - log_q


@seeded_data
def _x():
    return torch.randn(N, D, generator=torch.Generator().manual_seed(1))


same_draws_only_on_cpu = pytest.mark.skipif(
    DEVICE != "cpu", reason="the same draws: on CUDA, Pyro's torch.normal and a hand-written torch.randn draw "
    "different streams; the CPU run checks the arithmetic")


@same_draws_only_on_cpu
def test_iwae_matches_a_hand_vectorised_bound_on_the_same_draws():
    vae, x = GaussianVAE(), _x()
    pyro.set_rng_seed(3)
    loss = IWAE(num_particles=K).differentiable_loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(3)
    lw = vae.hand_log_weights(x, torch.randn(K, N, L))
    hand = -(torch.logsumexp(lw, 0) - math.log(K)).sum()
    assert abs(loss.item() - hand.item()) < 1e-5 * abs(hand.item()), (loss.item(), hand.item())
    # and its gradients are the bound's
    grads = torch.autograd.grad(loss, list(vae.parameters()))
    hand_grads = torch.autograd.grad(hand, list(vae.parameters()))
    for a, b in zip(grads, hand_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()


@same_draws_only_on_cpu
def test_iwae_dreg_gradients_match_a_hand_written_estimator():
    vae, x = GaussianVAE(), _x()
    params = list(vae.parameters())
    pyro.set_rng_seed(4)
    loss, grads = IWAEDReG(num_particles=K).loss_and_param_grads(vae.model, vae.guide, params, x)
    pyro.set_rng_seed(4)
    eps = torch.randn(K, N, L)
    lw = vae.hand_log_weights(x, eps)
    w = torch.softmax(lw.detach(), 0)
    # model (decoder) parameters: the IWAE gradient; guide (encoder): Tucker et al.'s DReG,
    # sum_k w_k^2 d log w_k / d z_k . d z_k / d phi, from log w with q's parameters held fixed.
    dec = torch.autograd.grad(-(torch.logsumexp(lw, 0) - math.log(K)).sum(), list(vae.dec.parameters()))
    lw_stop = vae.hand_log_weights(x, eps, detach_q_params=True)
    enc = torch.autograd.grad(-(w.pow(2) * lw_stop).sum(), list(vae.enc.parameters()))
    expected = dict(zip([id(p) for p in [*vae.dec.parameters(), *vae.enc.parameters()]], [*dec, *enc]))
    for p, g in zip(params, grads):
        assert torch.allclose(g, expected[id(p)], atol=1e-5, rtol=1e-5), (g - expected[id(p)]).abs().max()
    assert abs(loss.item() + (torch.logsumexp(lw, 0) - math.log(K)).sum().item()) < 1e-4


@same_draws_only_on_cpu
def test_iwae_with_k_equal_1_is_the_elbo():
    vae, x = GaussianVAE(), _x()
    pyro.set_rng_seed(5)
    iwae = IWAE(num_particles=1).loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(5)
    elbo = pyro.infer.Trace_ELBO().loss(vae.model, vae.guide, x)
    assert abs(iwae - elbo) < 1e-4, (iwae, elbo)


@pytest.mark.parametrize("elbo", ["iwae", "iwae-dreg"])
def test_fit_trains_with_the_iwae_objectives(elbo):
    vae = GaussianVAE()
    x = torch.randn(64, L) @ torch.randn(L, D) + 0.1 * torch.randn(64, D)
    r = fit(vae.model, vae.guide, x, val_data=x[:16], elbo=elbo, num_particles=5, epochs=15, batch_size=16,
            lr=0.02, progress=False, device=DEVICE)
    assert r.val_elbo[-1] > r.val_elbo[0] + 1.0, r.val_elbo
    # the reported training objective is the IWAE-5 bound: at least the K = 1 ELBO on average
    est = log_marginal(vae.model, vae.guide, x, num_particles=500, bounds=[1, 5])
    assert est.bounds[5].mean() >= est.bounds[1].mean()


def test_dreg_refuses_parameters_shared_by_model_and_guide():
    net = nn.Linear(D, D)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(net(z), 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.module("net", net)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(net(x), 1.0).to_event(1))

    with pytest.raises(ValueError, match="belong to the model or to the guide"):
        IWAEDReG(num_particles=3).loss_and_param_grads(model, guide, list(net.parameters()), _x())


def test_iwae_refuses_global_latents_with_the_sites_named():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0).expand([x.shape[0], D]).to_event(1), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    with pytest.raises(ValueError, match=r"\['mu'\]"):
        IWAE(num_particles=3).loss(model, guide, _x())
