import math

import pytest
import torch
import torch.distributions as td

from pyrovae.likelihoods import LIKELIHOODS, Bernoulli, ContinuousBernoulli, Gaussian, Laplace, get_likelihood

from .common import seeded_data


@seeded_data
def _params(n, shape=(1, 3, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *shape, generator=g) for _ in range(2)]


@pytest.mark.parametrize(
    "lik, reference, data",
    [
        (Bernoulli(), lambda p: td.Bernoulli(logits=p[0]), lambda s: torch.bernoulli(torch.full(s, 0.4))),
        (Gaussian(), lambda p: td.Normal(p[0], torch.nn.functional.softplus(p[1]) + 1e-3), lambda s: torch.randn(s)),
        (Gaussian(scale=0.3), lambda p: td.Normal(p[0], 0.3), lambda s: torch.randn(s)),
        (Laplace(), lambda p: td.Laplace(p[0], torch.nn.functional.softplus(p[1]) + 1e-3), lambda s: torch.randn(s)),
        (Laplace(scale=2.0), lambda p: td.Laplace(p[0], 2.0), lambda s: torch.randn(s)),
        (ContinuousBernoulli(), lambda p: td.ContinuousBernoulli(logits=p[0]), lambda s: torch.rand(s)),
    ],
)
def test_log_density_matches_torch(lik, reference, data):
    params = _params(4)
    x = data((4, 1, 3, 3))
    ours = lik.distribution(tuple(params[: lik.num_params]), event_dim=3).log_prob(x)
    expected = reference(params).log_prob(x).sum((-1, -2, -3))
    assert ours.shape == (4,)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-5)


def test_bernoulli_logits_are_stable():
    logits = torch.tensor([[-200.0, 200.0]])
    lp = Bernoulli().distribution((logits,), 1).log_prob(torch.tensor([[1.0, 0.0]]))
    assert torch.isfinite(lp).all() and lp.item() == pytest.approx(-400.0), lp


def test_bernoulli_refuses_fractional_data_unless_asked():
    x = torch.tensor([[0.0, 0.25, 1.0]])
    with pytest.raises(ValueError, match=r"binary .* found 0.25"):
        Bernoulli().check_data(x)
    Bernoulli(allow_fractional=True).check_data(x)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Bernoulli(allow_fractional=True).check_data(torch.tensor([[1.5]]))


def test_learned_scale_has_a_floor():
    # A decoder pushing the raw scale to -inf must not produce +inf densities.
    lik = Gaussian(min_scale=1e-3)
    loc = torch.zeros(1, 4)
    lp = lik.distribution((loc, torch.full((1, 4), -1e4)), 1).log_prob(loc)
    bound = -4 * math.log(1e-3 * math.sqrt(2 * math.pi))
    assert torch.isfinite(lp).all() and lp.item() == pytest.approx(bound, rel=1e-4), lp


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scale_is_refused(bad):
    with pytest.raises(ValueError, match="scale"):
        Gaussian(scale=bad)


def test_registry_and_errors():
    assert set(LIKELIHOODS) == {"bernoulli", "gaussian", "continuous-bernoulli", "laplace"}
    with pytest.raises(ValueError, match="'poisson' is not one of"):
        get_likelihood("poisson")
    with pytest.raises(TypeError, match="likelihood must be"):
        get_likelihood(3)
    with pytest.raises(ValueError, match="continuous Bernoulli"):
        ContinuousBernoulli().check_data(torch.tensor([[1.2]]))
    with pytest.raises(ValueError, match="NaN"):
        Gaussian().check_data(torch.tensor([[float("nan")]]))
