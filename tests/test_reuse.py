"""Reusing network calls whose inputs do not change between chunks of particles: exact, or not at all."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule
from torch import nn

import pyrovae
from pyrovae import pair as pair_module
from pyrovae.reuse import ReusedCalls


class Encoder(nn.Module):
    def __init__(self, noisy=False, sampling=False):
        super().__init__()
        self.net = nn.Linear(4, 4)
        self.noisy, self.sampling = noisy, sampling
        self.ran = 0

    def forward(self, x):
        self.ran += 1
        h = self.net(x)
        if self.noisy:  # a network that draws: its output differs at every call
            h = h + torch.randn_like(h)
        if self.sampling:  # a Pyro statement inside the network
            pyro.sample("inner", dist.Normal(0.0, 1.0))
        return h[..., :2], h[..., 2:].exp()


class Pair:
    """A Gaussian pair whose guide calls ``encoder(x)`` and whose model calls ``decoder(z)``;
    ``mutate`` makes the guide change the encoder's output in place, every call."""

    def __init__(self, encoder, mutate=False, sequential=False):
        torch.manual_seed(0)
        self.encoder, self.decoder, self.mutate, self.sequential = encoder, nn.Linear(2, 4), mutate, sequential

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(len(x), 2), 1.0).to_event(1))
            if self.sequential:  # fails with a particle dim: every particle runs on its own
                z = z.reshape(len(x), 2)
            pyro.sample("x", dist.Normal(self.decoder(z), 1.0).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", len(x)):
            loc, scale = self.encoder(x)
            if self.mutate:
                loc.add_(0.5)  # only right if loc is a fresh tensor each time
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def _data(n=5):
    return torch.randn(n, 4, generator=torch.Generator(device="cpu").manual_seed(1), device="cpu").to(
        torch.get_default_device())


_CALLED = pair_module.ModelGuidePair.called_modules


def _estimate(pair, x, reuse: bool, monkeypatch, calls):
    """log_marginal with many chunks, counting the real forward calls of both networks."""
    monkeypatch.setattr(pair_module.ModelGuidePair, "called_modules", _CALLED if reuse else (lambda self: []))
    handles = [m.register_forward_hook(lambda mod, a, o, name=name: calls.append(name))
               for name, m in (("encoder", pair.encoder), ("decoder", pair.decoder))]
    try:
        pyro.set_rng_seed(3)
        return pyrovae.log_marginal(pair.model, pair.guide, x, num_particles=40, chunk_size=4)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("encoder_kwargs, pair_kwargs, reused", [
    ({}, {}, True),
    ({}, {"sequential": True}, True),
    ({"noisy": True}, {}, False),
    ({}, {"mutate": True}, False),
])
def test_log_marginal_is_bitwise_the_same_with_and_without_reuse(encoder_kwargs, pair_kwargs, reused, monkeypatch):
    pair, x = Pair(Encoder(**encoder_kwargs), **pair_kwargs), _data()
    plain_calls, reuse_calls = [], []
    plain = _estimate(pair, x, False, monkeypatch, plain_calls)
    ran_plain, pair.encoder.ran = pair.encoder.ran, 0
    with_reuse = _estimate(pair, x, True, monkeypatch, reuse_calls)
    # reused: the encoder's body ran to find the modules, to inspect the pair, for the first
    # chunk and for the check, and no more
    assert pair.encoder.ran == (4 if reused else ran_plain)
    assert torch.equal(plain.log_marginal, with_reuse.log_marginal)
    assert torch.equal(plain.khat, with_reuse.khat)
    # (a noisy encoder fails the check of the first chunk, which replays a particle: sequential too)
    assert plain.sequential == with_reuse.sequential
    assert with_reuse.sequential or not pair_kwargs.get("sequential")
    # forward hooks fire on every call, reused or not: the program sees the same calls
    assert reuse_calls == plain_calls
    assert plain_calls.count("encoder") > 10


def test_encoder_runs_twice_decoder_every_chunk():
    enc, dec, x = nn.Linear(4, 4), nn.Linear(4, 4), _data()
    with torch.no_grad(), ReusedCalls([enc, dec]) as reuse:
        first = enc(x)
        outs = [enc(x) for _ in range(5)]
        for _ in range(5):
            dec(torch.randn(3, 4))
    assert reuse.computed == [2, 5]  # the encoder: its first call and the check; the decoder: every call
    assert all(o is first for o in outs[1:]) and outs[0] is not first


def test_nothing_is_reused_with_gradients_or_pyro_statements():
    enc, x = Encoder(sampling=True), _data()
    with torch.no_grad(), ReusedCalls([enc]) as reuse:
        for _ in range(4):
            with pyro.poutine.trace() as tr:
                enc(x)
            assert "inner" in tr.trace.nodes
    assert reuse.computed == [4]
    lin = nn.Linear(4, 4)
    with ReusedCalls([lin]) as reuse:  # gradients on
        for _ in range(3):
            lin(x)
    assert reuse.computed == [3]


def test_changed_inputs_or_outputs_are_recomputed():
    lin, x = nn.Linear(4, 4), _data()
    with torch.no_grad(), ReusedCalls([lin]) as reuse:
        lin(x), lin(x)  # confirmed
        x.add_(1.0)  # the same tensor, changed in place: a new version, so new inputs
        assert torch.equal(lin(x), x @ lin.weight.T + lin.bias)
    assert reuse.computed == [3]
    lin, y = nn.Linear(4, 4), _data()
    with torch.no_grad(), ReusedCalls([lin]) as reuse:
        lin(y), lin(y)
        out = lin(y)
        out.mul_(2.0)  # the program changed a handed-out output: never hand it out again
        assert torch.equal(lin(y), y @ lin.weight.T + lin.bias)
    assert reuse.computed == [3]


def test_other_inputs_outputs_and_modules_are_left_alone():
    class DictOut(nn.Module):
        def forward(self, x):
            return {"h": x * 2}

    class ListIn(nn.Module):
        def forward(self, xs):
            return xs[0] * 2

    x = _data()
    d, li, pm = DictOut(), ListIn(), PyroModule[nn.Linear](4, 4)
    with torch.no_grad(), ReusedCalls([d, li, pm]) as reuse:
        for _ in range(3):
            d(x), li([x]), pm(x)
    assert reuse.modules == [d, li] and reuse.computed == [3, 3]


def test_forward_is_restored_even_after_an_error():
    lin = nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), ReusedCalls([lin]):
        assert "forward" in vars(lin)
        raise RuntimeError("boom")
    assert "forward" not in vars(lin)
    assert lin(_data()).shape == (5, 4)
