
import pytest
import torch

from pyrovae import VAE
from pyrovae.diagnostics import khat_threshold, ppc_pvalues, psis_khat, to_inference_data, unreliable_fraction

from .common import PPCA


def test_khat_threshold_follows_vehtari_2024():
    assert khat_threshold(100) == pytest.approx(0.5)
    assert khat_threshold(1000) == pytest.approx(1 - 1 / 3)
    assert khat_threshold(10**6) == 0.7
    with pytest.raises(ValueError, match="num_samples must be an int >= 2"):
        khat_threshold(1)


def test_khat_separates_light_and_heavy_tails():
    g = torch.Generator().manual_seed(0)
    light = torch.randn(2000, 20, generator=g, dtype=torch.float64, device="cpu") * 0.1  # lognormal, small variance
    # log of Pareto(alpha=1/k) draws with k = 0.9 has a tail shape of 0.9
    u = torch.rand(2000, 20, generator=g, dtype=torch.float64, device="cpu")
    heavy = -0.9 * torch.log(u)
    kl, kh = psis_khat(light), psis_khat(heavy)
    # range checks: each datapoint's estimate has sd ~0.05 at S=2000; bounds are > 5 sd away
    assert (kl < 0.5).all(), kl
    assert (kh > 0.6).all(), kh
    assert unreliable_fraction(kh, 2000) > 0.5 and unreliable_fraction(kl, 2000) == 0.0


def test_inference_data_is_ready_for_arviz():
    import arviz as az

    vae = VAE((1, 4, 4), latent_dim=2, hidden=(8,))
    x = torch.bernoulli(torch.full((5, 1, 4, 4), 0.3))
    idata = to_inference_data(vae.model, vae.guide, x, num_samples=40, num_chains=4)
    assert idata.posterior["z"].shape == (4, 10, 5, 2)
    assert idata.posterior_predictive["x"].shape == (4, 10, 5, 1, 4, 4)
    assert idata.observed_data["x"].shape == (5, 1, 4, 4)
    assert idata.sample_stats["khat"].shape == (5,) and idata.sample_stats["log_weight"].shape == (4, 10, 5)
    summary = az.summary(idata, var_names=["z"])
    assert len(summary) == 10 and summary["r_hat"].between(0.9, 1.2).all(), summary
    x_rep = torch.as_tensor(idata.posterior_predictive["x"].values).reshape(40, 5, 1, 4, 4)
    p = ppc_pvalues(x, x_rep, lambda t: t.flatten(-3).mean(-1))
    assert p.shape == (5,) and ((p >= 0) & (p <= 1)).all()


def test_inference_data_log_marginal_is_exact_for_exact_guide():
    m = PPCA()
    x = m.sample(6)
    idata = to_inference_data(m.model, m.exact_guide, x, num_samples=8, num_chains=2)
    lm = torch.as_tensor(idata.sample_stats["log_marginal"].values)
    torch.testing.assert_close(lm, m.exact_log_marginal(x), atol=1e-6, rtol=0)
