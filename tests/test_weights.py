"""The particle pass behind log_marginal and to_inference_data: vectorised versus sequential,
the first-chunk check, enumeration inside plates, refusals, and layouts.

Exact cases (exact guides, enumeration with no continuous latent) hold to 1e-6; Monte Carlo
comparisons hold within 4 combined standard errors per datapoint (false-failure chance about
6e-5 each)."""

import math

import pytest
import torch
import pyro
import pyro.distributions as dist
from pyro import poutine

from pyrovae import log_marginal
from pyrovae.weights import (ROUNDOFF_ULPS, PairStructure, _Broadcasting, _finite_abs, datapoint_major, inspect_pair,
                             log_weights, particle_pass, sequential_pass)

from .common import DEVICE, PPCA
from .test_importance import _GaussianMixture


def _estimate(lw):
    """log p estimate and its delta-method standard error from (K, N) log weights."""
    K = lw.shape[0]
    lse = torch.logsumexp(lw, 0)
    ess = torch.exp(2 * lse - torch.logsumexp(2 * lw, 0))
    return lse - math.log(K), ((K / ess - 1).clamp(min=0) / (K - 1)).sqrt()


@pytest.mark.parametrize("guide_name", ["exact_guide", "diag_guide"])
def test_sequential_pass_agrees_with_the_vectorised_pass(guide_name):
    m = PPCA()
    x = m.sample(12)
    guide = getattr(m, guide_name)
    structure = inspect_pair(m.model, guide, (x,), {}, plate="data")
    K = 30 if guide_name == "exact_guide" else 3000
    vec, vec_se = _estimate(particle_pass(m.model, guide, (x,), {}, structure, K).log_weights)
    seq, seq_se = _estimate(sequential_pass(m.model, guide, (x,), {}, structure, K).log_weights)
    if guide_name == "exact_guide":
        torch.testing.assert_close(vec, m.exact_log_marginal(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(seq, vec, atol=1e-6, rtol=0)
    else:
        z = (seq - vec) / (vec_se**2 + seq_se**2).sqrt()
        assert z.abs().max() < 4, z


def test_sequential_pass_sums_enumerated_latents_too():
    g = _GaussianMixture()
    x = torch.tensor([-2.5, 0.0, 1.0], dtype=torch.float64)
    structure = inspect_pair(g.model, g.exact_guide, (x,), {}, plate="data")
    assert structure.enumerated == ("c",) and structure.latents == ("z",)
    seq, _ = _estimate(sequential_pass(g.model, g.exact_guide, (x,), {}, structure, 5).log_weights)
    torch.testing.assert_close(seq, g.exact_log_marginal(x), atol=1e-6, rtol=0)


def test_silent_broadcasting_bug_is_caught_by_the_first_chunk_check():
    """This model raises nothing under vectorised particles but mixes particles into datapoints."""
    m = PPCA()
    x = m.sample(5)

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(m.k, dtype=x.dtype), 1.0).to_event(1))
            loc = z.reshape(len(x), -1)[:, : m.k] @ m.W.T + m.b  # written for z of shape (N, k)
            pyro.sample("x", dist.Normal(loc, m.sigma).to_event(1), obs=x)

    est = log_marginal(model, m.exact_guide, x, num_particles=20, chunk_size=8)
    assert est.sequential and "broadcasts over the particle dimension" in est.fallback_reason, est.fallback_reason
    torch.testing.assert_close(est.log_marginal, m.exact_log_marginal(x), atol=1e-6, rtol=0)


def test_enumeration_inside_a_nested_plate_is_exact():
    """Per-feature discrete latents in a plate inside the data plate: log-sum-exp inside, sum outside."""
    pi = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    mu = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)

    def model(x):  # x: (N, D)
        with pyro.plate("data", x.shape[0], dim=-2), pyro.plate("feature", x.shape[1], dim=-1):
            c = pyro.sample("c", dist.Categorical(pi), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(mu[c], 1.0), obs=x)

    def guide(x):
        pass

    x = torch.randn(5, 4, dtype=torch.float64)
    exact = (dist.Normal(mu, 1.0).log_prob(x.unsqueeze(-1)) + pi.log()).logsumexp(-1).sum(-1)
    est = log_marginal(model, guide, x, num_particles=3)
    assert not est.sequential, est.fallback_reason
    torch.testing.assert_close(est.log_marginal, exact, atol=1e-6, rtol=0)


def test_refusals_name_the_site_and_the_fix():
    m = PPCA()
    x = m.sample(3)

    def no_guide(x):
        pass

    with pytest.raises(ValueError, match=r"model latent sites \['z'\] are not sampled by the guide.*"
                                         r'infer=\{"enumerate": "parallel"\}'):
        inspect_pair(m.model, no_guide, (x,), {}, plate="data")

    def sequential_enum(x):
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Bernoulli(0.5), infer={"enumerate": "sequential"})
            pyro.sample("x", dist.Normal(c, 1.0).to_event(1), obs=x[:, 0:1].expand(-1, 1))

    with pytest.raises(ValueError, match=r"model sites \['c'\] are enumerated sequentially.*parallel"):
        inspect_pair(sequential_enum, no_guide, (x,), {}, plate="data")

    def outside(x):
        m.model(x)
        pyro.sample("total", dist.Normal(0.0, 1.0), obs=x.sum())

    with pytest.raises(ValueError, match=r"observed sites \['total'\] are outside plate 'data'.*move them inside"):
        inspect_pair(outside, m.exact_guide, (x,), {}, plate="data")


def test_scale_is_ignored_but_mask_is_applied():
    """poutine.scale is a training weight; poutine.mask removes a term from the density."""
    m = PPCA()
    x = m.sample(4)
    keep = torch.tensor([True, False, True, False])

    def obs_masked(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(m.k, dtype=x.dtype), 1.0).to_event(1))
            with poutine.mask(mask=keep):
                pyro.sample("x", dist.Normal(z @ m.W.T + m.b, m.sigma).to_event(1), obs=x)

    structure = inspect_pair(m.model, m.exact_guide, (x,), {}, plate="data")
    torch.manual_seed(0)
    base = particle_pass(m.model, m.exact_guide, (x,), {}, structure, 3).log_weights
    torch.manual_seed(0)
    scaled = particle_pass(poutine.scale(m.model, scale=0.3), m.exact_guide, (x,), {}, structure, 3).log_weights
    torch.testing.assert_close(scaled, base, atol=1e-12, rtol=0)
    torch.manual_seed(0)
    masked = particle_pass(obs_masked, m.exact_guide, (x,), {}, structure, 3)
    z = masked.guide_traces[0].nodes["z"]["value"]  # (3, 4, k)
    mean, cov = m.posterior(x)
    prior_over_q = dist.Normal(0.0, 1.0).log_prob(z).sum(-1) - dist.MultivariateNormal(mean, cov).log_prob(z)
    torch.testing.assert_close(masked.log_weights[:, ~keep], prior_over_q[:, ~keep], atol=1e-10, rtol=0)
    torch.testing.assert_close(masked.log_weights[:, keep], base[:, keep], atol=1e-10, rtol=0)


def test_log_weights_keep_k_exact_over_uneven_chunks():
    m = PPCA()
    x = m.sample(3)
    structure = inspect_pair(m.model, m.diag_guide, (x,), {}, plate="data")
    out = log_weights(m.model, m.diag_guide, (x,), {}, structure, num_particles=23, chunk_size=10)
    assert out.log_weights.shape == (23, 3) and not out.sequential and out.passes == ()
    assert out.roundoff.shape == (3,) and (out.roundoff > 0).all() and (out.roundoff < 1e-10).all()


def test_datapoint_major_handles_any_plate_layout():
    structure = PairStructure(plate="data", plate_dim=-1, size=4, nesting=2, observed=(), latents=(),
                              enumerated=(), shapes={}, model_trace=None)
    data = pyro.poutine.indep_messenger.CondIndepStackFrame("data", -1, 4, 0, 4)
    feature = pyro.poutine.indep_messenger.CondIndepStackFrame("feature", 3, 3, 0, 3)._replace(dim=-2)
    particles = pyro.poutine.indep_messenger.CondIndepStackFrame("_pyrovae_particles", -3, 5, 0, 5)
    value = torch.arange(5 * 3 * 4 * 2).reshape(5, 3, 4, 2).double()
    site = {"value": value, "fn": dist.Normal(value, 1.0).to_event(1), "cond_indep_stack": (particles, feature, data)}
    out, names = datapoint_major(site, structure, vectorized=True)
    assert out.shape == (5, 4, 3, 2) and names == ["feature", None]
    assert torch.equal(out, value.permute(0, 2, 1, 3))
    # a site in the data plate only, broadcast along the feature dim, unvectorised
    value = torch.arange(4 * 2).reshape(1, 4, 2).double()
    site = {"value": value, "fn": dist.Normal(value, 1.0).to_event(1), "cond_indep_stack": (data,)}
    out, names = datapoint_major(site, structure, vectorized=False)
    assert out.shape == (4, 2) and names == [None]


# --------------------------------------------------------------------------- chunks sized by memory
@pytest.mark.skipif(DEVICE != "cpu", reason="on CUDA the allocator measures the footprint, not the CPU's proxy")
def test_chunks_are_sized_by_the_memory_a_particle_takes(monkeypatch):
    """The first chunk (PROBE_PAIRS pairs) measures a particle's footprint; the next chunks fill the
    budget; K stays exact; no chunk after the first reads a value back to the host."""
    from pyrovae import weights
    from pyrovae.tape import NoValueReads

    sizes = []
    real = weights.particle_pass

    def recording(model, guide, args, kwargs, structure, num, *rest):
        sizes.append(num)
        if len(sizes) == 1:
            return real(model, guide, args, kwargs, structure, num, *rest)
        with NoValueReads():  # a host read here would be a device synchronisation per chunk on a GPU
            return real(model, guide, args, kwargs, structure, num, *rest)

    monkeypatch.setattr(weights, "particle_pass", recording)
    monkeypatch.setattr(weights, "PROBE_PAIRS", 40)
    m = PPCA()
    x = m.sample(10)
    first_pass = real(m.model, m.diag_guide, (x,), {}, inspect_pair(m.model, m.diag_guide, (x,), {}, plate="data"), 4)
    per_particle = weights._trace_bytes(first_pass) // 4
    monkeypatch.setitem(weights.CHUNK_MEMORY, "cpu", 7 * per_particle)
    est = log_marginal(m.model, m.diag_guide, x, num_particles=50)
    assert sizes[0] == 4 and sizes[1:] == [7] * 6 + [4], sizes  # 4 + 6 * 7 + 4 = 50
    assert est.log_marginal.shape == (10,) and torch.isfinite(est.log_marginal).all()


def test_cuda_chunks_take_at_most_half_the_free_memory(monkeypatch):
    from pyrovae import weights

    gib = 2**30
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 1 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 * gib)
    # 10 particles took 100 MiB: 10 MiB each; budget min(4 GiB, 6 GiB / 2) = 3 GiB -> 307 particles
    assert weights.auto_chunk_size(100 * 2**20, 10, cuda, 5000) == 307
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * gib, 80 * gib))
    assert weights.auto_chunk_size(100 * 2**20, 10, cuda, 5000) == 409  # the 4 GiB cap
    assert weights.auto_chunk_size(100 * 2**20, 10, cuda, 50) == 50  # never more than what remains
    assert weights.auto_chunk_size(100 * gib, 1, cuda, 50) == 1  # one particle at a time, at least


# --------------------------------------------------------------------------- scoring shortcuts
def _amortised_pair(event=3):
    """A guide whose parameters come from x only, so the particle plate expands them."""

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(0.8 * x, 0.45 + 0.1 * x.abs()).to_event(1))

    x = torch.linspace(-2.0, 2.0, 4 * event, device=DEVICE).reshape(4, event)
    return model, guide, x


def test_guide_densities_from_the_unexpanded_distribution_are_bitwise_those_of_the_expanded_one():
    model, guide, x = _amortised_pair()
    structure = inspect_pair(model, guide, (x,), {}, plate="data")
    first = particle_pass(model, guide, (x,), {}, structure, 7)
    model_fns, guide_fns = first.unexpanded["model"], first.unexpanded["guide"]
    assert guide_fns["z"].batch_shape == (4,)  # the guide's distribution before the particle dim
    assert first.guide_traces[0].nodes["z"]["fn"].batch_shape == (7, 4)
    assert "z" not in model_fns  # replayed sites are not broadcast by the plate
    broadcasting = _Broadcasting()
    broadcasting.approve(first)
    assert [a[:2] for a in broadcasting.approved] == [("guide", "z")]
    with pyro.validation_enabled(False):  # as log_weights runs its chunks
        pyro.set_rng_seed(3)
        plain = particle_pass(model, guide, (x,), {}, structure, 7)
        pyro.set_rng_seed(3)
        shortcut = particle_pass(model, guide, (x,), {}, structure, 7, broadcasting)
    assert torch.equal(plain.log_weights, shortcut.log_weights)
    assert torch.equal(plain.roundoff, shortcut.roundoff)


class _NoBroadcastNormal(dist.Normal):
    """A user's distribution whose log_prob accepts only values of its own batch shape."""

    def log_prob(self, value):
        if value.shape != self.batch_shape:
            raise ValueError("value must have this distribution's batch shape")
        return super().log_prob(value)

    def expand(self, batch_shape, _instance=None):
        return super().expand(batch_shape, _instance or _NoBroadcastNormal.__new__(_NoBroadcastNormal))


def test_a_density_that_cannot_broadcast_keeps_its_expanded_distribution():
    model, _, x = _amortised_pair()

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", _NoBroadcastNormal(0.8 * x, 0.5).to_event(1))

    structure = inspect_pair(model, guide, (x,), {}, plate="data")
    first = particle_pass(model, guide, (x,), {}, structure, 5)
    broadcasting = _Broadcasting()
    broadcasting.approve(first)
    assert broadcasting.approved == set()
    out = log_weights(model, guide, (x,), {}, structure, num_particles=12, chunk_size=5)
    assert not out.sequential and out.log_weights.shape == (12, 4) and torch.isfinite(out.log_weights).all()


def test_roundoff_counts_every_summand_of_a_site_inside_an_inner_plate():
    """Terms of opposite sign inside an inner plate cancel in the sum but not in the round-off."""

    def model(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x[:, :1]), 1.0))
            with pyro.plate("pixels", x.shape[1], dim=-1):
                pyro.sample("x", dist.Normal(z, 0.01), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("z", dist.Normal(x[:, :1], 1e-4))

    # pixels at z have log-density +3.7, the others about -5000: the magnitude is not |sum|
    x = torch.tensor([[0.0, 0.0, 1.0], [2.0, 2.0, 1.5]], device=DEVICE)
    structure = inspect_pair(model, guide, (x,), {}, plate="data")
    p = particle_pass(model, guide, (x,), {}, structure, 6)
    magnitude = cancelled = 0
    for trace in (p.model_traces[0], p.guide_traces[0]):
        for name in ("z", "x"):
            if name in trace.nodes and trace.nodes[name]["type"] == "sample":
                site = trace.nodes[name]
                lp = site["fn"].log_prob(site["value"]).double().reshape(6, 2, -1)
                magnitude = magnitude + lp.abs().sum(-1)
                cancelled = cancelled + lp.sum(-1).abs()
    assert (magnitude - cancelled).min() > 7  # the two readings differ far beyond float32 round-off
    eps = torch.finfo(torch.float32).eps
    # the library sums the summands in float32: agreement to float32 round-off
    torch.testing.assert_close(p.roundoff, ROUNDOFF_ULPS * eps * (1 + magnitude.max(0).values), rtol=1e-6, atol=0)


def test_finite_abs_zeroes_what_is_not_finite():
    lp = torch.tensor([-2.0, 3.0, -math.inf, math.inf, math.nan])
    assert _finite_abs(lp).tolist() == [2.0, 3.0, 0.0, 0.0, 0.0]


def test_parameters_inside_the_data_plate_are_not_touched_by_the_particle_plate():
    """pyro.param with event_dim inside the data plate: indexed by the data plate, not the particles."""
    pyro.clear_param_store()
    x = torch.tensor([[0.5, -1.0], [2.0, 0.0], [-0.3, 0.7]], device=DEVICE)

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)

    def guide(x):
        loc = pyro.param("loc", lambda: 0.8 * x, event_dim=1)  # registered outside, as is common
        with pyro.plate("data", len(x)):
            shift = pyro.param("shift", lambda: torch.full_like(x, 0.1), event_dim=1)
            pyro.sample("z", dist.Normal(loc + shift, 0.45).to_event(1))

    structure = inspect_pair(model, guide, (x,), {}, plate="data")
    out = log_weights(model, guide, (x,), {}, structure, num_particles=9, chunk_size=4, keep_traces=True)
    assert not out.sequential
    shift = out.passes[1].guide_traces[0].nodes["shift"]
    assert shift["value"].shape == (3, 2)
    assert [f.name for f in shift["cond_indep_stack"]] == ["data"]
    # exact: the guide is N(0.8 x + 0.1, 0.45^2), so each weight is a closed-form density ratio
    z = out.passes[1].guide_traces[0].nodes["z"]["value"]
    expected = (dist.Normal(0.0, 1.0).log_prob(z) + dist.Normal(z, 0.5).log_prob(x)
                - dist.Normal(0.8 * x + 0.1, 0.45).log_prob(z)).sum(-1).double()
    torch.testing.assert_close(out.log_weights[4:8], expected, rtol=1e-6, atol=1e-5)
    pyro.clear_param_store()


def test_chunks_after_the_first_are_exact_with_enumerated_and_proposed_latents():
    """Later chunks score the guide as it samples and sum the model's discrete latent out."""
    g = _GaussianMixture()
    x = torch.tensor([-2.5, 0.0, 1.0, 3.0], dtype=torch.float64, device=DEVICE)
    structure = inspect_pair(g.model, g.exact_guide, (x,), {}, plate="data")
    out = log_weights(g.model, g.exact_guide, (x,), {}, structure, num_particles=11, chunk_size=4)
    assert not out.sequential, out.fallback_reason
    exact = g.exact_log_marginal(x).to(out.log_weights)
    # an exact guide: every weight is p(x_i), in every chunk
    torch.testing.assert_close(out.log_weights, exact.expand(11, -1), atol=1e-6, rtol=0)
