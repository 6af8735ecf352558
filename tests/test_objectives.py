"""Every Pyro ELBO trains any pair, and programs whose minibatch objective would be wrong are refused."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import (RenyiELBO, Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO,
                        TraceTailAdaptive_ELBO, config_enumerate)
from torch import nn

from pyrovae import Source, fit
from pyrovae.runs import RunFolder

from .common import DEVICE, seeded_data


class ModulePair(nn.Module):
    """A pair whose networks live only in the module: no pyro.module, so no Pyro param sites."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(6, 4), nn.Linear(2, 6)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.dec(z), 0.5).to_event(1), obs=x)

    def guide(self, x):
        loc, raw = self.enc(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1))


@seeded_data
def _data(n=64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 2, generator=g) @ torch.randn(2, 6, generator=g)


ELBOS = {
    "trace": lambda: Trace_ELBO(),
    "meanfield": lambda: TraceMeanField_ELBO(),
    "tracegraph": lambda: TraceGraph_ELBO(),
    "renyi": lambda: RenyiELBO(alpha=0.5, num_particles=3),
    "tail-adaptive": lambda: TraceTailAdaptive_ELBO(num_particles=3, vectorize_particles=True),
}


@pytest.mark.parametrize("name", sorted(ELBOS))
def test_every_elbo_trains_a_module_pair_with_validation(name):
    """TraceGraph_ELBO and RenyiELBO failed with "no attribute 'differentiable_loss'"; RenyiELBO's
    loss_and_grads skips its backward pass for a pair without param sites; TraceTailAdaptive_ELBO
    was reported as a NonFiniteLossError."""
    torch.manual_seed(0)
    pair = ModulePair()
    before = {k: v.clone() for k, v in pair.state_dict().items()}
    x = _data()
    r = fit(pair.model, pair.guide, x, val_data=x[:16], elbo=ELBOS[name](), epochs=3, batch_size=16, lr=0.05,
            progress=False, device=DEVICE)
    for key, value in pair.state_dict().items():
        assert not torch.equal(value, before[key]), f"{name}: {key} did not train"
    assert all(v is not None for v in r.val_elbo) and r.val_elbo[-1] > r.val_elbo[0] - 5.0, r.val_elbo
    if name == "tail-adaptive":
        assert r.train_elbo == [None, None, None]  # an estimator without a loss value reports none
    else:
        assert all(v is not None and v < 0 for v in r.train_elbo), r.train_elbo
    assert "_pyrovae_backward_anchor" not in pyro.get_param_store()


def test_the_objective_is_recorded_and_a_resume_must_use_it(tmp_path):
    pair = ModulePair()
    fit(pair.model, pair.guide, _data(), elbo=RenyiELBO(alpha=0.3, num_particles=2), epochs=1, batch_size=32,
        progress=False, device=DEVICE, run_dir=tmp_path)
    spec = RunFolder(tmp_path).config()["elbo"]
    assert spec["class"] == "RenyiELBO" and spec["alpha"] == 0.3 and spec["num_particles"] == 2
    with pytest.raises(ValueError, match="keeps its objective"):
        fit(pair.model, pair.guide, _data(), elbo=RenyiELBO(alpha=0.7, num_particles=2), epochs=2, batch_size=32,
            progress=False, device=DEVICE, resume=tmp_path)


# ---------------------------------------------------------------------------- M2 with enumeration
def _ss_model(dec, k):
    def model(xs, ys=None):
        pyro.module("dec", dec)
        with pyro.plate("data", xs.shape[0]):
            z = pyro.sample("z", dist.Normal(xs.new_zeros(2), 1.0).to_event(1))
            y = pyro.sample("y", dist.OneHotCategorical(logits=xs.new_zeros(k)), obs=ys)
            batch = torch.broadcast_shapes(z.shape[:-1], y.shape[:-1])  # y may be enumerated
            loc = dec(torch.cat([z.expand(*batch, 2), y.expand(*batch, k)], -1))
            pyro.sample("x", dist.Normal(loc, 0.5).to_event(1), obs=xs)

    return model


def _ss_guide(enc_y, enc_z, k):
    @config_enumerate
    def guide(xs, ys=None):
        pyro.module("enc_y", enc_y)
        pyro.module("enc_z", enc_z)
        with pyro.plate("data", xs.shape[0]):
            if ys is None:
                ys = pyro.sample("y", dist.OneHotCategorical(logits=enc_y(xs)))
            batch = torch.broadcast_shapes(xs.shape[:-1], ys.shape[:-1])
            loc, raw = enc_z(torch.cat([xs.expand(*batch, xs.shape[-1]), ys.expand(*batch, k)], -1)).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1))

    return guide


def test_m2_with_enumeration_validates_after_every_epoch():
    """With val_data, TraceEnum_ELBO failed after epoch 1: validation ran under no_grad and called
    differentiable_loss ("ELBO is cannot be differentiated")."""
    k = 3
    torch.manual_seed(0)
    dec, enc_y, enc_z = nn.Linear(2 + k, 6), nn.Linear(6, k), nn.Linear(6 + k, 4)
    model, guide = _ss_model(dec, k), _ss_guide(enc_y, enc_z, k)
    x = _data()
    r = fit(model, guide, (x,), val_data=(x[:16],), elbo=TraceEnum_ELBO(max_plate_nesting=1), epochs=2,
            batch_size=16, progress=False, device=DEVICE)
    assert all(v is not None for v in r.val_elbo), r.val_elbo


# ---------------------------------------------------------------------------- refused before step 1
def coin_model(data):
    """The SVI tutorial's coin: observations in no plate."""
    f = pyro.sample("fairness", dist.Beta(10.0, 10.0))
    for i in range(len(data)):
        pyro.sample(f"obs_{i}", dist.Bernoulli(f), obs=data[i])


def coin_guide(data):
    a = pyro.param("a", torch.tensor(15.0), constraint=dist.constraints.positive)
    b = pyro.param("b", torch.tensor(15.0), constraint=dist.constraints.positive)
    pyro.sample("fairness", dist.Beta(a, b))


def test_observations_outside_every_plate_with_minibatches_are_refused():
    """Trained with batch_size < data, the coin model silently optimised a biased objective."""
    data = torch.cat([torch.ones(6), torch.zeros(4)])
    with pytest.raises(ValueError, match=r"outside every plate.*subsample"):
        fit(coin_model, coin_guide, data, epochs=1, batch_size=5, progress=False, device=DEVICE)
    fit(coin_model, coin_guide, data, epochs=1, batch_size=10, progress=False, device=DEVICE)  # whole data: fine


def test_a_global_latent_with_an_unscaled_data_plate_is_refused_and_subsample_is_accepted():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("mu", dist.Normal(loc, 1.0))

    x = torch.randn(40)
    with pytest.raises(ValueError, match=r"latent sites \['mu'\] lie outside every plate"):
        fit(model, guide, x, epochs=1, batch_size=10, progress=False, device=DEVICE)

    def scaled(x):
        with poutine.scale(scale=40 / x.shape[0]):
            model(x)

    fit(scaled, guide, x, epochs=1, batch_size=10, progress=False, device=DEVICE)


def test_a_model_with_no_observed_site_is_refused():
    """fit(m, g, TensorDataset(xs, ys)) once dropped ys, and Pyro's conditional VAE "trained" at ELBO -0.0."""
    def model(x, y=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(0.0, 1.0), obs=y)

    def guide(x, y=None):
        pyro.param("w", torch.tensor(0.0))

    with pytest.raises(ValueError, match="no observed sample site"):
        fit(model, guide, torch.randn(20, 3), epochs=1, progress=False, device=DEVICE)


def test_a_conditional_pair_trains_from_separate_tensors_a_tuple_a_dict_and_a_dataset():
    """fit(m, g, xs, ys) raised TypeError, a tuple was stacked into two "datapoints", and a dict was refused."""
    def model(xs, ys):
        w = pyro.param("w", torch.zeros(3))
        with pyro.plate("data", xs.shape[0]):
            z = pyro.sample("z", dist.Normal(xs.new_zeros(()), 1.0))
            pyro.sample("ys", dist.Normal(xs @ w + z, 0.5), obs=ys)

    def guide(xs, ys):
        with pyro.plate("data", xs.shape[0]):
            pyro.sample("z", dist.Normal(ys * 0.5, 0.5))

    xs = torch.randn(60, 3)
    ys = xs @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 * torch.randn(60)
    results = {}
    for form, data in {"args": (xs, ys), "tuple": ((xs, ys),), "dict": ({"xs": xs, "ys": ys},),
                       "dataset": (torch.utils.data.TensorDataset(xs, ys),)}.items():
        pyro.clear_param_store()
        fit(model, guide, *data, epochs=30, batch_size=20, lr=0.05, progress=False, device=DEVICE)
        results[form] = pyro.param("w").detach().clone()
    for form, w in results.items():
        assert torch.equal(w, results["args"]), form  # the same batches, the same answer
    # ys reached the model: w moved towards the direction that generated them (this guide halves its scale)
    cosine = torch.nn.functional.cosine_similarity(results["args"], torch.tensor([1.0, -2.0, 0.5]), dim=0)
    assert cosine > 0.95, (results["args"], cosine)


# ---------------------------------------------------------------------------- several sources (M2)
@seeded_data
def _clusters(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centres = torch.tensor([[3.0, 0, 0, 0, 0, 0], [0, 3.0, 0, 0, 0, 0], [0, 0, 3.0, 0, 0, 0]])
    return centres[y] + 0.5 * torch.randn(n, 6, generator=g), torch.nn.functional.one_hot(y, 3).float()


def _m2(run_dir=None, *, resume=False, stop_at_call=None, epochs=6):
    pyro.clear_param_store()
    torch.manual_seed(0)
    k = 3
    dec, enc_y, enc_z = nn.Linear(2 + k, 6), nn.Linear(6, k), nn.Linear(6 + k, 4)
    model, guide = _ss_model(dec, k), _ss_guide(enc_y, enc_z, k)
    calls = {"n": 0}

    def model_classify(xs, ys):
        calls["n"] += 1
        if calls["n"] == stop_at_call:
            raise KeyboardInterrupt("simulated kill")
        pyro.module("enc_y", enc_y)
        with pyro.plate("data", xs.shape[0]):
            pyro.sample("y_aux", dist.OneHotCategorical(logits=enc_y(xs)), obs=ys)

    def guide_classify(xs, ys):
        pass

    x_u, _ = _clusters(120, 1)
    x_l, y_l = _clusters(12, 2)
    sources = {
        "unlabelled": Source((x_u,)),
        "labelled": Source((x_l, y_l), batch_size=4),
        "classify": Source((x_l, y_l), batch_size=4, weight=10.0, model=model_classify, guide=guide_classify,
                           elbo=Trace_ELBO()),
    }
    r = fit(model, guide, sources, elbo=TraceEnum_ELBO(max_plate_nesting=1), epochs=epochs, batch_size=20,
            lr=0.03, progress=False, device=DEVICE, run_dir=None if resume else run_dir,
            resume=run_dir if resume else None)
    return r, enc_y


def test_m2_mixes_labelled_and_unlabelled_batches_and_a_user_term():
    """Labelled and unlabelled batches could not be mixed in one run."""
    r, enc_y = _m2(epochs=20)
    x_test, y_test = _clusters(300, 3)
    accuracy = (enc_y(x_test).argmax(-1) == y_test.argmax(-1)).float().mean().item()
    assert accuracy > 0.85, accuracy  # 12 labels; chance is 1/3 (0.88 to 0.9+ across devices' random streams)
    assert set(r.history[-1]["sources"]) == {"labelled", "classify"}
    assert not r.static_graph


def test_several_sources_resume_mid_epoch_bitwise(tmp_path):
    full, _ = _m2(tmp_path / "full", epochs=3)
    with pytest.raises(KeyboardInterrupt):
        _m2(tmp_path / "part", stop_at_call=9, epochs=3)  # epoch 2, step 3: every source mid-pass
    resumed, _ = _m2(tmp_path / "part", resume=True, epochs=3)
    for name in full.params:
        assert torch.equal(full.params[name], resumed.params[name]), name
    assert [h["sources"] for h in full.history] == [h["sources"] for h in resumed.history]
