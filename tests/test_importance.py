"""Three tiers: exact math on known answers, convergence within stated Monte Carlo
tolerances, and range checks. Tolerance: 4 standard errors per datapoint, i.e. a
false-failure chance of about 6e-5 each (Gaussian tails), about 0.2% for 32 datapoints."""

import math

import pytest
import torch
import pyro
import pyro.distributions as dist
from pyro import poutine

from pyrovae import VAE, LogMarginal, log_marginal
from pyrovae.importance import iwae_bounds

from .common import PPCA, beta_bernoulli


def test_exact_posterior_gives_exact_answer():
    m = PPCA()
    x = m.sample(20)
    est = log_marginal(m.model, m.exact_guide, x, num_particles=50, chunk_size=7)
    torch.testing.assert_close(est.log_marginal, m.exact_log_marginal(x), atol=1e-6, rtol=0)
    assert torch.allclose(est.ess, torch.full_like(est.ess, 50.0), atol=1e-6)
    assert est.stderr.max() < 1e-6


def test_imperfect_guide_within_four_standard_errors():
    m = PPCA()
    x = m.sample(32)
    est = log_marginal(m.model, m.diag_guide, x, num_particles=4000, chunk_size=1000)
    z = (est.log_marginal - m.exact_log_marginal(x)) / est.stderr
    assert z.abs().max() < 4, z
    assert (est.stderr > 0).all() and (est.ess < 4000).all()


def test_non_gaussian_beta_bernoulli():
    model, guide, exact = beta_bernoulli()
    x = torch.bernoulli(torch.full((16, 10), 0.3, dtype=torch.float64))
    exact_est = log_marginal(model, guide, x, num_particles=20)
    torch.testing.assert_close(exact_est.log_marginal, exact(x), atol=1e-6, rtol=0)
    prior_guide = lambda x: guide(x, exact=False)
    est = log_marginal(model, prior_guide, x, num_particles=4000)
    z = (est.log_marginal - exact(x)) / est.stderr
    assert z.abs().max() < 4, z


def test_chunking_and_particle_count_are_exact():
    m = PPCA()
    x = m.sample(5)
    est = log_marginal(m.model, m.diag_guide, x, num_particles=103, chunk_size=10, return_log_weights=True)
    assert est.log_weights.shape == (103, 5)
    # the streaming float64 accumulation equals a one-shot log-sum-exp of the kept weights
    direct = torch.logsumexp(est.log_weights, 0) - math.log(103)
    torch.testing.assert_close(est.log_marginal, direct, atol=1e-12, rtol=0)


def test_scale_and_subsampling_do_not_leak():
    m = PPCA()
    x = m.sample(8)
    base = log_marginal(m.model, m.exact_guide, x, num_particles=10).log_marginal
    scaled = log_marginal(poutine.scale(m.model, scale=0.1), poutine.scale(m.exact_guide, scale=0.1), x,
                          num_particles=10).log_marginal
    torch.testing.assert_close(scaled, base, atol=1e-6, rtol=0)

    def sub_model(x):
        with pyro.plate("data", 1000, subsample=torch.arange(len(x))):
            z = pyro.sample("z", dist.Normal(torch.zeros(m.k, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ m.W.T + m.b, m.sigma).to_event(1), obs=x)

    def sub_guide(x):
        mean, cov = m.posterior(x)
        with pyro.plate("data", 1000, subsample=torch.arange(len(x))):
            pyro.sample("z", dist.MultivariateNormal(mean, covariance_matrix=cov))

    sub = log_marginal(sub_model, sub_guide, x, num_particles=10).log_marginal
    torch.testing.assert_close(sub, base, atol=1e-6, rtol=0)


def _trained_vae():
    torch.manual_seed(0)
    vae = VAE((1, 4, 4), latent_dim=2, hidden=(16,))
    x = torch.bernoulli(torch.full((20, 1, 4, 4), 0.3))
    return vae, x


def test_vae_ladder_and_no_parameter_changes():
    vae, x = _trained_vae()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    est = log_marginal(vae.model, vae.guide, x, num_particles=500)
    for k, v in vae.state_dict().items():
        assert torch.equal(before[k], v), k
    b = est.summary().bounds
    # IWAE-k bounds increase with k; the estimate sits at or above the largest, up to MC noise
    assert b[1] < b[5] < b[50] <= est.summary().log_marginal + 0.05, b
    assert (est.log_marginal >= est.bounds[1] - 4 * est.stderr).all()


def test_agrees_with_hand_vectorised_pytorch_on_same_seed():
    """A hand-written estimator drawing the same eps gives the same numbers."""
    vae, x = _trained_vae()
    K = 64
    torch.manual_seed(7)
    est = log_marginal(vae.model, vae.guide, x, num_particles=K, chunk_size=K)
    torch.manual_seed(7)
    with torch.no_grad():
        loc, scale = vae.encoder(x)
        torch.randn(loc.shape)  # log_marginal's structural pass draws once
        eps = torch.randn(K, *loc.shape)
        z = loc + scale * eps
        logits = vae.decoder(z)[0]
        log_px = -torch.nn.functional.binary_cross_entropy_with_logits(
            logits, x.expand(K, *x.shape), reduction="none").flatten(2).sum(-1)
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_qz = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
        lw = (log_px + log_pz - log_qz).double()
        hand = torch.logsumexp(lw, 0) - math.log(K)
    torch.testing.assert_close(est.log_marginal, hand, atol=1e-4, rtol=0)


def test_cat_and_summary():
    m = PPCA()
    x = m.sample(10)
    parts = [log_marginal(m.model, m.diag_guide, x[i:i + 5], num_particles=100) for i in (0, 5)]
    whole = LogMarginal.cat(parts)
    assert len(whole) == 10
    s = whole.summary()
    assert s.num_datapoints == 10 and s.num_particles == 100 and s.mc_stderr > 0
    assert "log p(x)" in str(s) and set(s.to_dict()["bounds"]) == {"1", "5", "50"}


def test_iwae_bounds_exact():
    lw = torch.log(torch.tensor([[1.0], [3.0], [1.0], [3.0]], dtype=torch.float64))
    b = iwae_bounds(lw, [1, 2, 4])
    torch.testing.assert_close(b[1], torch.tensor([(math.log(1) + math.log(3)) / 2], dtype=torch.float64))
    torch.testing.assert_close(b[2], torch.tensor([math.log(2.0)], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"k must be an int in \[1, num_particles=4\], got 5"):
        iwae_bounds(lw, [5])


def test_bad_input():
    m = PPCA()
    x = m.sample(4)
    with pytest.raises(ValueError, match="num_particles must be >= 2, got 1"):
        log_marginal(m.model, m.exact_guide, x, num_particles=1)
    with pytest.raises(TypeError, match="num_particles must be an int"):
        log_marginal(m.model, m.exact_guide, x, num_particles=10.0)
    with pytest.raises(ValueError, match="no sample site is inside a plate named 'batch'"):
        log_marginal(m.model, m.exact_guide, x, num_particles=10, plate="batch")
    with pytest.raises(ValueError, match=r"args\[0\] contains NaN"):
        log_marginal(m.model, m.exact_guide, x * float("nan"), num_particles=10)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        log_marginal(m.model, m.exact_guide, x, num_particles=10, chunk_size=0)

    def no_obs(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="no observed sample sites"):
        log_marginal(no_obs, no_obs, x, num_particles=10)
    vae = VAE((1, 4, 4), latent_dim=2, hidden=(8,))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, \*\(1, 4, 4\)\)"):
        log_marginal(vae.model, vae.guide, torch.zeros(3, 5), num_particles=10)


def test_global_latents_are_refused_with_their_names():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"latent sites \['mu'\] lie outside plate 'data' \(global latents\)"):
        log_marginal(model, guide, torch.zeros(3), num_particles=10)
    # fixing and hiding the global gives log p(x_i | mu), which is exact here
    cond_model = poutine.block(poutine.condition(model, data={"mu": torch.tensor(0.5)}), hide=["mu"])
    est = log_marginal(cond_model, lambda x: None, torch.zeros(3), num_particles=2, khat=False)
    torch.testing.assert_close(est.log_marginal, dist.Normal(0.5, 1.0).log_prob(torch.zeros(3)).double())
