"""Static-graph steps (pyrovae.static): bitwise equal to eager Pyro, or eager Pyro."""

import dataclasses
import itertools

import pytest
import torch
import pyro
import pyro.distributions as dist
from pyro.infer import Trace_ELBO
from torch import nn

from pyrovae import VAE, fit, load_dataset
from pyrovae import static as static_module
from pyrovae import train as train_module
from pyrovae.pair import ModelGuidePair
from pyrovae.static import StaticStep, loss_and_surrogate

from .common import DEVICE, load_example, seeded_data

FAST = dict(progress=False, device=DEVICE, seed=0, cuda_graph=False)  # the static graph alone is bitwise
_names = itertools.count()  # distinct pyro.module names within one param store


def _fit_both(make, x, **kwargs):
    """Train fresh copies of a pair eagerly and from static graphs; return both results."""
    out = {}
    for mode in (False, True):
        pyro.clear_param_store()
        torch.manual_seed(0)
        model, guide = make()
        out[mode] = fit(model, guide, x, static_graph=mode, **FAST, **kwargs)
    return out[False], out[True]


def _assert_bitwise(eager, static):
    assert static.static_graph, static.static_graph_off
    assert not eager.static_graph and eager.static_graph_off == "static_graph=False"
    assert set(eager.params) == set(static.params)
    for name in eager.params:
        assert torch.equal(eager.params[name], static.params[name]), (
            name, (eager.params[name] - static.params[name]).abs().max().item())
    # Reported losses: the same terms summed as float32 tensors instead of Python floats.
    for a, b in zip(eager.train_elbo, static.train_elbo):
        assert a == pytest.approx(b, rel=1e-6), (a, b)


def _vae_maker(**config):
    torch.manual_seed(0)
    template = VAE((12,), latent_dim=3, hidden=(16,), **config)

    def make():
        vae = VAE(config=dataclasses.replace(template.config, name=f"vae{next(_names)}"))
        vae.load_state_dict(template.state_dict())
        return vae.model, vae.guide

    return make


@seeded_data
def _binary(n=80, d=12, seed=0):
    return torch.bernoulli(torch.full((n, d), 0.3), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("config, kwargs", [
    ({}, {}),
    ({"likelihood": "gaussian"}, {}),
    ({"beta": 0.5}, {}),
    ({}, {"num_particles": 3}),
    ({}, {"kl_warmup_epochs": 1.5, "clip_norm": 5.0}),
])
def test_vae_bitwise_equal_to_eager(config, kwargs):
    # 80 datapoints in batches of 32: two batch shapes (32 and 16), each recorded and checked.
    x = _binary() if config.get("likelihood") != "gaussian" else torch.randn(80, 12)
    eager, static = _fit_both(_vae_maker(**config), x, epochs=4, batch_size=32, **kwargs)
    _assert_bitwise(eager, static)


def test_user_pair_with_pyro_params_and_constraints():
    example = load_example("custom_model_guide")
    x = torch.randn(64, 6)
    eager, static = _fit_both(lambda: example.make_pair(6, 2), x, epochs=5, batch_size=16, lr=0.02)
    _assert_bitwise(eager, static)
    assert {"param.W", "param.sigma"} <= set(static.params)


def _discrete_pair():
    """A non-reparameterisable latent: Trace_ELBO's score-function term is recorded too."""
    logits = nn.Linear(5, 1)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(x.new_tensor(0.5)))
            loc = pyro.param("loc", lambda: x.new_zeros(2, 5))
            pyro.sample("x", dist.Normal(loc[c.long()], 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.module("logits", logits)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(logits=logits(x).squeeze(-1)))

    return model, guide


def test_score_function_terms():
    x = torch.randn(48, 5) + torch.tensor([2.0, 0, 0, 0, 0])
    eager, static = _fit_both(_discrete_pair, x, epochs=3, batch_size=16, lr=0.01)
    _assert_bitwise(eager, static)


def test_resume_of_a_static_run_equals_uninterrupted_eager_run(tmp_path):
    make = _vae_maker()
    x = _binary()
    pyro.clear_param_store()
    eager = fit(*make(), x, epochs=4, batch_size=32, static_graph=False, **FAST)
    pyro.clear_param_store()
    model, guide = make()
    fit(model, guide, x, epochs=2, batch_size=32, static_graph=True, run_dir=tmp_path / "r", **FAST)
    resumed = fit(model, guide, x, epochs=4, batch_size=32, static_graph=True, resume=tmp_path / "r", **FAST)
    assert resumed.static_graph
    for name in eager.params:
        assert torch.equal(eager.params[name], resumed.params[name]), name


def _branchy_pair():
    """Structure that depends on the data's values: cannot be recorded."""
    loc = nn.Linear(4, 2)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            scale = 1.0 if x.sum() > 0 else 2.0  # reads a value: no static structure
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True).expand(-1, 4), scale).to_event(1), obs=x)

    def guide(x):
        pyro.module("loc", loc)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc(x), 1.0).to_event(1))

    return model, guide


def test_unrecordable_program_falls_back_to_identical_eager_training():
    x = torch.randn(48, 4)
    pyro.clear_param_store()
    torch.manual_seed(0)
    eager = fit(*_branchy_pair(), x, epochs=3, batch_size=16, static_graph=False, **FAST)
    pyro.clear_param_store()
    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning, match="could not be recorded"):
        fallback = fit(*_branchy_pair(), x, epochs=3, batch_size=16, static_graph=True, **FAST)
    assert not fallback.static_graph and "could not be recorded" in fallback.static_graph_off
    for name in eager.params:
        assert torch.equal(eager.params[name], fallback.params[name]), name
    # "auto" falls back quietly, with the reason in the result.
    pyro.clear_param_store()
    torch.manual_seed(0)
    quiet = fit(*_branchy_pair(), x, epochs=120, batch_size=16, static_graph="auto", **FAST)
    assert not quiet.static_graph and "could not be recorded" in quiet.static_graph_off


def test_hidden_python_state_is_caught_when_it_shows_on_the_checked_batch():
    """A step whose structure changes between recording and checking falls back to eager Pyro."""
    calls = {"n": 0}
    net = nn.Linear(3, 1)

    def model(x):
        calls["n"] += 1
        w = 2.0 if calls["n"] % 2 else 3.0  # a counter: invisible to the recording
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(w * net(x).squeeze(-1), 1.0), obs=x[:, 0])

    def guide(x):
        pyro.module("net", net)

    x = torch.randn(32, 3)
    elbo = Trace_ELBO()
    elbo.differentiable_loss(model, guide, x)
    step = StaticStep(elbo, model, guide, list(net.parameters()), pair=ModelGuidePair(model, guide))
    loss, grads = step(x)
    assert step.failure is not None and "differs from eager" in step.failure, step.failure
    assert step(x) is None  # eager from then on


def test_batchnorm_updates_refuse_recording_and_leave_statistics_untouched():
    encoder = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(encoder(x), 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)

    x = torch.randn(16, 4)
    elbo = Trace_ELBO()
    elbo.differentiable_loss(model, guide, x)
    before = [b.clone() for b in encoder.buffers()]
    step = StaticStep(elbo, model, guide, list(encoder.parameters()), pair=ModelGuidePair(model, guide),
                      buffers=list(encoder.buffers()))
    assert step(x) is None and "in place" in step.failure, step.failure
    for a, b in zip(before, encoder.buffers()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("pair", ["vae", "discrete"])
def test_loss_and_surrogate_match_pyro(pair):
    model, guide = _vae_maker()() if pair == "vae" else _discrete_pair()
    x = _binary(16) if pair == "vae" else torch.randn(16, 5)
    elbo = Trace_ELBO()
    torch.manual_seed(3)
    loss, surrogate = loss_and_surrogate(elbo, model, guide, x)
    torch.manual_seed(3)
    pyros = elbo.differentiable_loss(model, guide, x)
    assert loss.item() == pytest.approx(pyros.item(), rel=1e-6)
    assert not loss.requires_grad and surrogate.requires_grad
    params = [p for p in pyro.get_param_store().values()]
    ours = torch.autograd.grad(surrogate, params, allow_unused=True)
    theirs = torch.autograd.grad(pyros, params, allow_unused=True)
    for a, b in zip(ours, theirs):
        assert (a is None and b is None) or torch.equal(a, b)


def test_graphs_are_reused_across_calls():
    make = _vae_maker()
    model, guide = make()
    x = _binary(64)
    first = fit(model, guide, x, epochs=2, batch_size=32, static_graph=True, **FAST)
    owner = model.__self__
    graphs = dict(static_module._GRAPHS[owner])
    second = fit(model, guide, x, epochs=2, batch_size=32, static_graph=True, **FAST)
    assert first.static_graph and second.static_graph
    again = static_module._GRAPHS[owner]
    assert len(graphs) == 1 and all(again[k] is g for k, g in graphs.items())


def test_auto_uses_the_graph_for_long_runs_only(monkeypatch):
    x = _binary(64)
    short = fit(*_vae_maker()(), x, epochs=2, batch_size=32, **FAST)
    assert not short.static_graph and "STATIC_GRAPH_MIN_STEPS" in short.static_graph_off
    monkeypatch.setattr(train_module, "STATIC_GRAPH_MIN_STEPS", {"cpu": 4, "cuda": 4})
    long = fit(*_vae_maker()(), x, epochs=2, batch_size=32, **FAST)
    assert long.static_graph, long.static_graph_off
    meanfield = fit(*_vae_maker()(), x, epochs=2, batch_size=32, elbo="meanfield", **FAST)
    assert not meanfield.static_graph and "TraceMeanField_ELBO" in meanfield.static_graph_off


@pytest.mark.parametrize("kwargs, match", [
    ({"static_graph": "yes"}, "static_graph must be"),
    ({"static_graph": 1}, "static_graph must be"),
    ({"static_graph": True, "elbo": "meanfield"}, "needs elbo='trace'"),
    ({"static_graph": True, "validate": "always"}, "validate='first'"),
])
def test_bad_static_graph_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit(*_vae_maker()(), _binary(8), epochs=1, **FAST, **kwargs)


def test_digits_vae_static_equals_eager_on_real_data():
    """The main job's model on the embedded digits, dynamic binarisation (the transform runs outside the graph)."""
    s = load_dataset("digits", binarize="dynamic", subset=200)
    torch.manual_seed(0)
    template = VAE(s.event_shape, latent_dim=4, hidden=(32,))

    def make():
        vae = VAE(config=dataclasses.replace(template.config, name=f"digits{next(_names)}"))
        vae.load_state_dict(template.state_dict())
        return vae.model, vae.guide

    eager, static = _fit_both(make, s, epochs=3, batch_size=64)
    _assert_bitwise(eager, static)
    assert eager.val_elbo == static.val_elbo


def test_a_parameter_read_as_a_copy_is_refused():
    """A program that reads a parameter's value into a fresh tensor would replay a stale copy."""
    w = torch.zeros(3, requires_grad=True)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(w.clone() * 0 + w, 1.0).to_event(1), obs=x)

    def copying_model(x):
        snapshot = torch.tensor(w.tolist(), requires_grad=False)  # the value, not the tensor
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(w + snapshot, 1.0).to_event(1), obs=x)

    def guide(x):
        pass

    x = torch.randn(8, 3)
    for fn, ok in ((model, True), (copying_model, False)):
        elbo = Trace_ELBO()
        elbo.differentiable_loss(fn, guide, x)
        step = StaticStep(elbo, fn, guide, [w], pair=ModelGuidePair(fn, guide))
        result = step(x)
        assert (result is not None) == ok, step.failure
    assert "reads a tensor's value into Python (Tensor.tolist)" in step.failure, step.failure
