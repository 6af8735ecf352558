"""to_inference_data: the ArviZ export of draws, predictive replicates and per-datapoint log p(x).

Exact cases use guides that are the exact posterior (tolerance 1e-6); shapes and names are checked
exactly; nothing here is a Monte Carlo range check."""

import json
import warnings

import pytest
import torch
import pyro
import pyro.distributions as dist
from torch.utils.data import TensorDataset

from pyrovae import VAE
from pyrovae.diagnostics import to_inference_data

from .common import PPCA
from .test_importance import _GaussianMixture, _masked_cvae


def _az():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ArviZ announces its 1.0 refactor on import
        import arviz

    return arviz


def _named_pair(obs_name: str, latent_name: str = "z"):
    """z ~ N(0, 1), x ~ N(z, 1) per datapoint, with the sites named as asked; the guide is exact."""

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample(latent_name, dist.Normal(0.0, 1.0))
            pyro.sample(obs_name, dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample(latent_name, dist.Normal(x / 2, 0.5**0.5))

    return model, guide


def _loo(idata):
    az = _az()
    with warnings.catch_warnings():
        # The log-likelihood is the same for every draw (see to_inference_data): ArviZ can fit no
        # Pareto tail to constant ratios and says so; the LOO value is still exact.
        warnings.simplefilter("ignore", UserWarning)
        return az.loo(idata, pointwise=True)


def test_args_and_kwargs_reach_the_programs():
    """The old export called model(x) only."""
    m = PPCA()
    x = m.sample(5)
    shift = torch.full((5, m.d), 0.5, dtype=torch.float64)

    def model(x, y, *, scale=1.0):
        m.model((x - y) / scale)

    def guide(x, y, *, scale=1.0):
        m.exact_guide((x - y) / scale)

    exact = m.exact_log_marginal(x - shift)
    for idata in (to_inference_data(model, guide, x, shift, num_samples=8, scale=1.0),
                  to_inference_data(model, guide, (x, shift), num_samples=8),
                  to_inference_data(model, guide, {"x": x, "y": shift}, num_samples=8)):
        lm = torch.as_tensor(idata.sample_stats["log_marginal"].values)
        torch.testing.assert_close(lm, exact, atol=1e-6, rtol=0)
        assert idata.posterior["z"].shape == (4, 2, 5, 2)
        assert idata.observed_data["x"].shape == (5, m.d)
    # a keyword that is also an option goes through model_kwargs
    idata = to_inference_data(model, guide, x, shift, num_samples=8, model_kwargs={"scale": 1.0})
    torch.testing.assert_close(torch.as_tensor(idata.sample_stats["log_marginal"].values), exact, atol=1e-6, rtol=0)


@pytest.mark.parametrize("obs_name", ["obs", "draw", "chain", "log_weight"])
def test_any_observed_site_name_keeps_every_group(obs_name):
    """A site named "obs", "draw" or "chain" made posterior_predictive and observed_data vanish."""
    model, guide = _named_pair(obs_name)
    x = torch.tensor([0.0, 1.0, -2.0])
    idata = to_inference_data(model, guide, x, num_samples=8, num_chains=2)
    var = obs_name + "_" if obs_name in ("draw", "chain") else obs_name
    assert set(idata.groups()) >= {"posterior", "posterior_predictive", "observed_data", "log_likelihood",
                                   "sample_stats"}, idata.groups()
    assert idata.posterior_predictive[var].shape == (2, 4, 3)
    assert idata.observed_data[var].values.tolist() == x.tolist()
    assert idata.posterior["z"].shape == (2, 4, 3)
    if var != obs_name:
        assert json.loads(idata.posterior.attrs["pyrovae_site_names"]) == {var: obs_name}
    for group in ("posterior", "posterior_predictive", "observed_data", "sample_stats", "log_likelihood"):
        ds = getattr(idata, group)
        assert not (set(ds.data_vars) & set(ds.dims)), (group, ds)


def test_latent_named_like_a_dimension_is_kept():
    model, guide = _named_pair("x", latent_name="chain")
    idata = to_inference_data(model, guide, torch.zeros(3), num_samples=4, num_chains=2)
    assert idata.posterior["chain_"].shape == (2, 2, 3)
    _az().summary(idata, var_names=["chain_"])


def test_plate_left_of_the_data_plate():
    """An inner plate at dim -2 crashed the export with a reshape error."""
    N, D = 4, 3

    def model(x):  # x: (N, D), laid out (D, N) inside the plates
        with pyro.plate("data", N, dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with pyro.plate("feature", D, dim=-2):
                pyro.sample("x", dist.Normal(z, 1.0), obs=x.T)

    def guide(x):  # exact: precision 1 + D, mean sum_d x_d / (1 + D)
        with pyro.plate("data", N, dim=-1):
            pyro.sample("z", dist.Normal(x.sum(-1) / (1 + D), (1 + D) ** -0.5))

    x = torch.randn(N, D, dtype=torch.float64)
    idata = to_inference_data(model, guide, x, num_samples=6, num_chains=3)
    assert idata.posterior["z"].dims == ("chain", "draw", "data")
    assert idata.posterior_predictive["x"].dims == ("chain", "draw", "data", "feature")
    assert idata.posterior_predictive["x"].shape == (3, 2, N, D)
    assert idata.observed_data["x"].dims == ("data", "feature")
    torch.testing.assert_close(torch.as_tensor(idata.observed_data["x"].values), x)
    cov = torch.eye(D, dtype=torch.float64) + torch.ones(D, D, dtype=torch.float64)
    exact = dist.MultivariateNormal(torch.zeros(D, dtype=torch.float64), cov).log_prob(x)
    torch.testing.assert_close(torch.as_tensor(idata.sample_stats["log_marginal"].values), exact, atol=1e-6, rtol=0)


def test_loo_runs_on_the_vae_and_on_a_pair_with_site_obs():
    az = _az()
    vae = VAE((1, 4, 4), latent_dim=2, hidden=(8,))
    x = torch.bernoulli(torch.full((6, 1, 4, 4), 0.3))
    idata = to_inference_data(vae.model, vae.guide, x, num_samples=40)
    loo = _loo(idata)
    total = float(idata.sample_stats["log_marginal"].sum())
    assert loo.elpd_loo == pytest.approx(total, abs=1e-6) and abs(loo.p_loo) < 1e-6, loo
    assert idata.log_likelihood["x"].shape == (4, 10, 6)

    model, guide = _named_pair("obs")
    x = torch.tensor([0.0, 1.0, -2.0, 0.5])
    idata = to_inference_data(model, guide, x, num_samples=40)
    loo = _loo(idata)
    exact = dist.Normal(0.0, 2**0.5).log_prob(x).double().sum()
    assert loo.elpd_loo == pytest.approx(float(exact), abs=1e-5), loo
    # two models compare on sum_i log p(x_i)
    worse = to_inference_data(*_named_pair("obs", "w"), x + 3, num_samples=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        table = az.compare({"good": idata, "shifted_data": worse})
    assert table.index[0] == "good"


def test_enumerated_model_exports_posterior_of_the_discrete_latent():
    g = _GaussianMixture()
    x = torch.tensor([-3.0, 0.0, 3.0], dtype=torch.float64)
    idata = to_inference_data(g.model, g.exact_guide, x, num_samples=400, num_chains=4)
    torch.testing.assert_close(torch.as_tensor(idata.sample_stats["log_marginal"].values),
                               g.exact_log_marginal(x), atol=1e-6, rtol=0)
    c = torch.as_tensor(idata.posterior["c"].values)
    assert c.shape == (4, 100, 3) and set(c.unique().tolist()) <= {0, 1}
    # p(c = 1 | x) is ~0 at x = -3 and ~1 at x = 3: a range check with a huge margin
    freq = c.double().mean((0, 1))
    assert freq[0] < 0.2 and freq[2] > 0.8, freq
    assert idata.posterior_predictive["x"].shape == (4, 100, 3)


def test_export_falls_back_for_a_program_that_cannot_be_vectorised():
    m = PPCA()
    x = m.sample(4)
    model = _masked_cvae(m, torch.ones(4, m.d, dtype=torch.bool))
    idata = to_inference_data(model, m.exact_guide, x, num_samples=6, num_chains=2)
    assert "IndexError" in idata.sample_stats.attrs["pyrovae_fallback_reason"]
    assert idata.posterior["z"].shape == (2, 3, 4, 2)
    assert idata.posterior_predictive["x"].shape == (2, 3, 4, m.d)
    torch.testing.assert_close(torch.as_tensor(idata.sample_stats["log_marginal"].values),
                               m.exact_log_marginal(x), atol=1e-6, rtol=0)
    assert (torch.as_tensor(idata.sample_stats["khat"].values) == -float("inf")).all()


def test_bad_input_is_refused_by_name():
    model, guide = _named_pair("x")
    x = torch.zeros(3)
    with pytest.raises(TypeError, match="to_inference_data needs the data in memory, got a TensorDataset"):
        to_inference_data(model, guide, TensorDataset(x), num_samples=4)
    with pytest.raises(ValueError, match=r"num_chains must be an int in \[1, num_samples=4\], got 5"):
        to_inference_data(model, guide, x, num_samples=4, num_chains=5)
    with pytest.raises(ValueError, match="num_samples must be >= 2"):
        to_inference_data(model, guide, x, num_samples=1)
    with pytest.raises(ValueError, match="x contains NaN"):
        to_inference_data(model, guide, x * float("nan"), num_samples=4)
