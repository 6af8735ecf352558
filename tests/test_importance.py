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

from .common import DEVICE, PPCA, beta_bernoulli


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
    """A hand-written estimator drawing the same eps gives the same numbers: the
    structural runs before the particles leave the caller's random stream alone."""
    if DEVICE != "cpu":
        pytest.skip("on CUDA, Pyro's torch.normal and the hand-written torch.randn draw different streams")
    vae, x = _trained_vae()
    K = 64
    torch.manual_seed(7)
    est = log_marginal(vae.model, vae.guide, x, num_particles=K, chunk_size=K)
    torch.manual_seed(7)
    with torch.no_grad():
        loc, scale = vae.encoder(x)
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
    with pytest.raises(ValueError, match=r"x contains NaN or infinite values \(first at index 0\)"):
        log_marginal(m.model, m.exact_guide, x * float("nan"), num_particles=10)
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
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


# ---------------------------------------------------------------- issue 10: every pair a user can train
def test_poutine_mask_scores_a_masked_datapoint_exactly_zero():
    """A masked-out observation contributes nothing: log p = 0 there (the old code read -3.5)."""
    m = PPCA()
    x = m.sample(6)
    keep = torch.tensor([True, False, True, True, False, True])

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(m.k, dtype=x.dtype), 1.0).to_event(1))
            with poutine.mask(mask=keep):
                pyro.sample("x", dist.Normal(z @ m.W.T + m.b, m.sigma).to_event(1), obs=x)

    def guide(x):  # exact: the posterior where observed, the prior where masked out
        mean, cov = m.posterior(x)
        mean = torch.where(keep.unsqueeze(-1), mean, torch.zeros_like(mean))
        cov = torch.where(keep.reshape(-1, 1, 1), cov, torch.eye(m.k, dtype=x.dtype))
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.MultivariateNormal(mean, covariance_matrix=cov))

    est = log_marginal(model, guide, x, num_particles=20)
    expected = torch.where(keep, m.exact_log_marginal(x), torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(est.log_marginal, expected, atol=1e-6, rtol=0)


def test_random_subsample_is_refused_naming_the_plate():
    """subsample_size draws a new subset per chunk, mixing datapoints in one output slot."""
    m = PPCA()
    x = m.sample(8)

    def model(x):
        with pyro.plate("data", len(x), subsample_size=4) as idx:
            z = pyro.sample("z", dist.Normal(torch.zeros(m.k, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ m.W.T + m.b, m.sigma).to_event(1), obs=x[idx])

    def guide(x):
        with pyro.plate("data", len(x), subsample_size=4):
            pyro.sample("z", dist.Normal(torch.zeros(m.k, dtype=x.dtype), 1.0).to_event(1))

    with pytest.raises(ValueError, match=r"plate 'data' draws a random subset \(subsample_size=...\).*"
                                         r"no subsample_size \(or fix them with subsample=indices\)"):
        log_marginal(model, guide, x, num_particles=10)


def test_latent_sampled_only_by_the_guide_is_refused():
    """Its log q entered the weights with no log p: the old "bound" lay above log p(x)."""
    m = PPCA()
    x = m.sample(4)

    def guide(x):
        mean, cov = m.posterior(x)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.MultivariateNormal(mean, covariance_matrix=cov))
            pyro.sample("extra", dist.Normal(torch.zeros(len(x), dtype=x.dtype), 0.1))

    with pytest.raises(ValueError, match=r"the guide samples sites \['extra'\] that the model does not sample "
                                         r"as latents.*Remove them from the guide, or give them a prior"):
        log_marginal(m.model, guide, x, num_particles=10)


def _masked_cvae(m, mask):
    """A conditional-VAE observation as Pyro's CVAE example writes it: boolean-mask indexing."""

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(m.k, dtype=x.dtype), 1.0).to_event(1))
            loc = z @ m.W.T + m.b
            # Only the unmasked entries are scored; loc[mask] assumes loc has x's shape.
            chosen = loc[mask].view(len(x), -1)
            pyro.sample("x", dist.Normal(chosen, m.sigma).to_event(1), obs=x[mask].view(len(x), -1))

    return model


def test_boolean_mask_program_falls_back_to_sequential_and_stays_exact():
    """Under vectorised particles loc[mask] raises IndexError; the fallback keeps K exact and says so."""
    m = PPCA()
    x = m.sample(5)
    model = _masked_cvae(m, torch.ones(5, m.d, dtype=torch.bool))
    est = log_marginal(model, m.exact_guide, x, num_particles=30, chunk_size=7, return_log_weights=True)
    assert est.sequential and "IndexError" in est.fallback_reason, est.fallback_reason
    assert est.log_weights.shape == (30, 5)
    torch.testing.assert_close(est.log_marginal, m.exact_log_marginal(x), atol=1e-6, rtol=0)
    vectorised = log_marginal(m.model, m.exact_guide, x, num_particles=30)
    assert not vectorised.sequential and vectorised.fallback_reason is None


class _GaussianMixture:
    """c ~ Cat(pi), z | c ~ N(mu_c, 1), x | z ~ N(z, s^2): log p(x) and p(z | x) in closed form."""

    s = 0.8

    @property
    def pi(self):  # made when used, on the suite's default device (not when the module is imported)
        return torch.tensor([0.3, 0.7], dtype=torch.float64)

    @property
    def mu(self):
        return torch.tensor([-2.0, 1.5], dtype=torch.float64)

    def model(self, x):
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Categorical(self.pi), infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(self.mu[c], 1.0))
            pyro.sample("x", dist.Normal(z, self.s), obs=x)

    def _component_logits(self, x):
        return dist.Normal(self.mu, (1 + self.s**2) ** 0.5).log_prob(x.unsqueeze(-1)) + self.pi.log()

    def exact_log_marginal(self, x):
        return self._component_logits(x).logsumexp(-1)

    def exact_guide(self, x):  # p(z | x): a mixture over c of Gaussians
        v = 1 / (1 + 1 / self.s**2)
        comps = dist.Normal(v * (self.mu + x.unsqueeze(-1) / self.s**2), v**0.5)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.MixtureSameFamily(dist.Categorical(logits=self._component_logits(x)), comps))

    def rough_guide(self, x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(x / 2, 2.0))


def test_enumerated_discrete_latent_is_summed_exactly():
    """Enumerated in the model with a continuous latent from the guide (the old code refused it)."""
    g = _GaussianMixture()
    x = torch.linspace(-4, 4, 9, dtype=torch.float64)
    exact = log_marginal(g.model, g.exact_guide, x, num_particles=40, chunk_size=15)
    assert not exact.sequential, exact.fallback_reason
    torch.testing.assert_close(exact.log_marginal, g.exact_log_marginal(x), atol=1e-6, rtol=0)
    est = log_marginal(g.model, g.rough_guide, x, num_particles=4000)
    z = (est.log_marginal - g.exact_log_marginal(x)) / est.stderr
    assert z.abs().max() < 4, z


def test_config_enumerate_is_honoured():
    from pyro.infer import config_enumerate

    g = _GaussianMixture()

    @config_enumerate
    def model(x):
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Categorical(g.pi))
            z = pyro.sample("z", dist.Normal(g.mu[c], 1.0))
            pyro.sample("x", dist.Normal(z, g.s), obs=x)

    x = torch.tensor([-1.0, 0.5, 3.0], dtype=torch.float64)
    est = log_marginal(model, g.exact_guide, x, num_particles=10)
    torch.testing.assert_close(est.log_marginal, g.exact_log_marginal(x), atol=1e-6, rtol=0)


def _shifted_pair(declared):
    """x ~ N(z + shift, 1), z ~ N(0, 1); the shift comes from a keyword named like one of log_marginal's options."""
    import inspect

    def shift_of(kw):
        return float(kw.get(declared) or 0.0)

    def model(x, **kw):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z + shift_of(kw), 1.0), obs=x)

    def guide(x, **kw):  # exact posterior
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal((x - shift_of(kw)) / 2, 0.5**0.5))

    sig = inspect.Signature([inspect.Parameter("x", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                             inspect.Parameter(declared, inspect.Parameter.KEYWORD_ONLY, default=None)])
    model.__signature__ = guide.__signature__ = sig
    return model, guide


@pytest.mark.parametrize("name, value", [("plate", "data"), ("bounds", [1, 2]), ("khat", False), ("chunk_size", 3),
                                         ("num_particles", None), ("return_log_weights", True)])
def test_program_keywords_named_like_options_are_never_swallowed(name, value):
    model, guide = _shifted_pair(name)
    x = torch.tensor([0.0, 1.0, 3.0])
    options = {"num_particles": 10}
    if value is not None:
        options[name] = value
    with pytest.raises(ValueError, match=rf"the model or guide takes a parameter '{name}', which is also an "
                                         rf"option of log_marginal.*model_kwargs=\{{'{name}': ...\}}"):
        log_marginal(model, guide, x, **options)
    # through model_kwargs the programs get their value, and log_marginal keeps its option
    est = log_marginal(model, guide, x, **options, model_kwargs={name: 2.0})
    exact = dist.Normal(2.0, 2**0.5).log_prob(x).double()
    torch.testing.assert_close(est.log_marginal, exact, atol=1e-5, rtol=0)
    # model_kwargs={} leaves the programs their default
    est = log_marginal(model, guide, x, **options, model_kwargs={})
    torch.testing.assert_close(est.log_marginal, dist.Normal(0.0, 2**0.5).log_prob(x).double(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"keyword arguments \['y'\] are given both directly and in model_kwargs"):
        log_marginal(model, guide, x, num_particles=10, y=1, model_kwargs={"y": 2})


class _BatchNormPair(torch.nn.Module):
    """A Gaussian VAE whose encoder normalises with BatchNorm1d."""

    def __init__(self, d=4, k=2):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = torch.nn.Sequential(torch.nn.Linear(d, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                                           torch.nn.Linear(8, 2 * k))
        self.decoder = torch.nn.Linear(k, d)
        self.k = k

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.k), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 0.5).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", len(x)):
            loc, log_scale = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def test_batchnorm_encoder_estimates_do_not_depend_on_the_batch():
    """In training mode each datapoint's proposal depended on its batch-mates; now eval() mode is used."""
    pair = _BatchNormPair().train()
    x = torch.randn(6, 4)
    other = torch.cat([x[:3], 5 * torch.randn(3, 4)])  # same first three datapoints, different batch-mates
    before = {k: v.clone() for k, v in pair.state_dict().items()}
    torch.manual_seed(3)
    a = log_marginal(pair.model, pair.guide, x, num_particles=50, return_log_weights=True)
    torch.manual_seed(3)  # the same draws for the same slots
    b = log_marginal(pair.model, pair.guide, other, num_particles=50, return_log_weights=True)
    torch.testing.assert_close(a.log_weights[:, :3], b.log_weights[:, :3], atol=1e-6, rtol=0)
    assert pair.training and all(m.training for m in pair.modules()), "modes must be restored"
    for key, value in pair.state_dict().items():
        assert torch.equal(before[key], value), f"{key} changed: running statistics must not move"


def test_dataset_and_dataloader_are_streamed_in_order():
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    m = PPCA()
    x = m.sample(23)
    exact = m.exact_log_marginal(x)
    est = log_marginal(m.model, m.exact_guide, TensorDataset(x), num_particles=10, batch_size=7)
    assert len(est) == 23
    torch.testing.assert_close(est.log_marginal, exact, atol=1e-6, rtol=0)
    est = log_marginal(m.model, m.exact_guide, DataLoader(TensorDataset(x), batch_size=5), num_particles=10)
    torch.testing.assert_close(est.log_marginal, exact, atol=1e-6, rtol=0)

    class Dicts(Dataset):  # items are dicts: the programs are called as model(**batch)
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return {"x": x[i]}

    est = log_marginal(m.model, m.exact_guide, Dicts(), num_particles=10)
    torch.testing.assert_close(est.log_marginal, exact, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="the DataLoader shuffles.*shuffle=False"):
        log_marginal(m.model, m.exact_guide, DataLoader(TensorDataset(x), shuffle=True), num_particles=10)
    with pytest.raises(ValueError, match="drop_last=True"):
        log_marginal(m.model, m.exact_guide, DataLoader(TensorDataset(x), batch_size=5, drop_last=True),
                     num_particles=10)
    with pytest.raises(ValueError, match="batch_size applies to a Dataset"):
        log_marginal(m.model, m.exact_guide, x, num_particles=10, batch_size=5)


def test_tuple_and_dict_batches_call_the_programs_like_fit():
    m = PPCA()
    x = m.sample(4)
    shift = torch.full((4, m.d), 0.5, dtype=torch.float64)

    def model(x, y):
        m.model(x - y)

    def guide(x, y):
        m.exact_guide(x - y)

    exact = m.exact_log_marginal(x - shift)
    for data in ((x, shift), [x, shift], {"x": x, "y": shift}):
        est = log_marginal(model, guide, data, num_particles=5)
        torch.testing.assert_close(est.log_marginal, exact, atol=1e-6, rtol=0)
    est = log_marginal(model, guide, x, shift, num_particles=5)
    torch.testing.assert_close(est.log_marginal, exact, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exact_guide_gives_khat_minus_inf(dtype):
    """Weights constant up to round-off are reliable: the old code flagged ~1 in 5 datapoints (k-hat inf)."""
    m = PPCA()
    x = m.sample(200).to(dtype)
    m.W, m.b, m.post_cov = m.W.to(dtype), m.b.to(dtype), m.post_cov.to(dtype)
    est = log_marginal(m.model, m.exact_guide, x, num_particles=1000)
    assert (est.khat == -math.inf).all(), est.khat[est.khat != -math.inf]
    summary = est.summary()
    assert summary.unreliable_fraction == 0.0 and summary.constant_fraction == 1.0, summary
    # an imperfect guide still gets a real tail fit
    est = log_marginal(m.model, m.diag_guide, x[:20].double() if dtype == torch.float64 else x[:20],
                       num_particles=1000)
    assert torch.isfinite(est.khat).all(), est.khat


def test_new_options_are_validated_eagerly():
    m = PPCA()
    x = m.sample(4)
    with pytest.raises(ValueError, match=r"bounds must hold ints in \[1, num_particles=10\], got 20"):
        log_marginal(m.model, m.exact_guide, x, num_particles=10, bounds=[1, 20])
    with pytest.raises(TypeError, match="bounds must be a sequence of ints"):
        log_marginal(m.model, m.exact_guide, x, num_particles=10, bounds=5)
    with pytest.raises(TypeError, match="model_kwargs must be a dict with str keys"):
        log_marginal(m.model, m.exact_guide, x, num_particles=10, model_kwargs=[("a", 1)])
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        log_marginal(m.model, m.exact_guide, x, num_particles=10, batch_size=0)
    with pytest.raises(TypeError, match="khat must be a bool"):
        log_marginal(m.model, m.exact_guide, x, num_particles=10, khat=1)
    with pytest.raises(TypeError, match="model and guide must be callables"):
        log_marginal(m.model, None, x, num_particles=10)
