"""Recorded chunks of particles: a replay is the program run afresh, or the tape is refused."""

import logging
import subprocess
import sys

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pyrovae
from pyrovae import weights
from pyrovae.tape import Refused, Tape


def _replays_as_run(chunk, replays=3):
    """Record ``chunk``; each replay must equal a run of ``chunk`` from the same random state, and
    leave the generator where that run left it."""
    torch.manual_seed(0)
    recorded, tape = Tape.record(chunk)
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(tape(), recorded))
    for seed in range(1, replays + 1):
        torch.manual_seed(seed)
        run = chunk()
        after = torch.get_rng_state()
        torch.manual_seed(seed)
        replayed = tape()
        assert all(torch.equal(a, b) for a, b in zip(replayed, run)), seed
        assert torch.equal(torch.get_rng_state(), after)
    return tape


def test_a_replay_draws_fresh_numbers_and_folds_what_does_not_depend_on_them():
    w = torch.linspace(0.5, 2.0, 4)
    tape = _replays_as_run(lambda: [(w.log() * 2 + torch.randn(3, 4)).sum(-1)])
    assert tape.folded == 2  # log(w), and log(w) * 2: computed once
    assert not torch.equal(tape()[0], tape()[0])  # fresh particles at every replay


def test_in_place_writes_on_tensors_the_chunk_makes_are_replayed_and_never_folded():
    w = torch.ones(3)

    def chunk():
        buf = torch.zeros(2, 3)  # made from no random input, then written with draws
        view = buf[0]  # a view taken before the write sees it
        buf.add_(torch.randn(2, 3))
        noise = torch.empty(3).normal_()
        return [view * w, buf.sum(0) + noise]

    _replays_as_run(chunk)


def test_operations_with_several_outputs_are_replayed():
    def chunk():
        z = torch.randn(4, 3)
        top, where = z.max(-1)
        first, *_ = z.unbind(0)
        return [top, where.float(), first, torch.stack(z.split(2, 0)).sum(0)]

    _replays_as_run(chunk)


def test_indexing_with_integer_tensors_is_replayed():
    table = torch.randn(5, 2)
    labels = torch.tensor([0, 3, 3, 1])

    _replays_as_run(lambda: [table[labels] + torch.randn(4, 2)])


@pytest.mark.parametrize("read, why", [
    (lambda z: z.sum().item(), "reads a tensor's value"),
    (lambda z: 1.0 if z.sum() > 0 else 0.0, "reads a tensor's value"),
    (lambda z: z.tolist()[0], "reads a tensor's value"),
    (lambda z: float(z.cpu().numpy()[0]), "reads a tensor's value"),
])
def test_reading_a_value_into_python_is_refused(read, why):
    def chunk():
        z = torch.randn(3)
        return [z * read(z)]

    with pytest.raises(Refused, match=why):
        Tape.record(chunk)


def test_values_that_set_a_shape_are_refused():
    with pytest.raises(Refused, match="depends on values"):
        Tape.record(lambda: [torch.randn(5)[torch.rand(5) > 0.5]])
    with pytest.raises(Refused, match="depends on values"):
        Tape.record(lambda: [torch.randn(5).nonzero().float()])


def test_writing_into_a_tensor_the_chunk_did_not_make_is_refused():
    w = torch.zeros(3)
    with pytest.raises(Refused, match="in place a tensor that the chunk did not make"):
        Tape.record(lambda: [w.add_(torch.randn(3))])
    with pytest.raises(Refused, match="in place a tensor that the chunk did not make"):
        Tape.record(lambda: [w[:2].mul_(2.0) + torch.randn(2)])
    assert torch.equal(w[2:], torch.zeros(1))


def test_a_generator_argument_is_refused():
    gen = torch.Generator(device=torch.get_default_device()).manual_seed(0)
    with pytest.raises(Refused, match="Generator"):
        Tape.record(lambda: [torch.randn(3, generator=gen)])


def test_recording_does_not_import_dynamo():
    """torch wraps a dispatch mode in torch._dynamo.disable, whose import took 2 s (pyrovae._compat.DispatchMode)."""
    code = ("import sys, torch; from pyrovae.tape import Tape; w = torch.ones(2); "
            "Tape.record(lambda: [w + torch.randn(2)]); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "False", out.stderr


# --------------------------------------------------------------------------- in log_marginal
class Pair(nn.Module):
    """A small Gaussian pair; ``extra`` adds Python-side state to the model's arithmetic."""

    def __init__(self, extra=None):
        super().__init__()
        torch.manual_seed(0)
        self.encoder, self.decoder, self.extra = nn.Linear(4, 4), nn.Linear(2, 4), extra

    def model(self, x):
        pyro.module("tape_decoder", self.decoder)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(len(x), 2), 1.0).to_event(1))
            loc = self.decoder(z) + (self.extra() if self.extra else 0.0)
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("tape_encoder", self.encoder)
        with pyro.plate("data", len(x)):
            h = self.encoder(x)
            pyro.sample("z", dist.Normal(h[:, :2], h[:, 2:].exp()).to_event(1))


def _estimate(pair, x, tape: bool, monkeypatch, caplog):
    monkeypatch.setattr(weights, "TAPE_MIN_CHUNKS", 3 if tape else 10**9)
    monkeypatch.setattr(weights, "PROBE_PAIRS", 8 * len(x))
    torch.manual_seed(1)
    np.random.seed(1)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="pyrovae"):
        est = pyrovae.log_marginal(pair.model, pair.guide, x, num_particles=100, chunk_size=None,
                                   return_log_weights=True)
    return est, caplog.text


def test_log_marginal_replays_chunks_and_gives_bitwise_what_the_programs_give(monkeypatch, caplog):
    pair, x = Pair(), torch.randn(6, 4)
    monkeypatch.setitem(weights.CHUNK_MEMORY, "cpu", 1)  # one particle per chunk after the first
    monkeypatch.setattr(weights, "auto_chunk_size", lambda *a: 8)
    taped, text = _estimate(pair, x, True, monkeypatch, caplog)
    assert "replayed from a tape" in text
    written, text = _estimate(pair, x, False, monkeypatch, caplog)
    assert "replayed" not in text
    assert torch.equal(taped.log_weights, written.log_weights)
    assert torch.equal(taped.khat, written.khat)


def test_a_value_read_into_python_keeps_the_chunks_as_written_with_the_same_result(monkeypatch, caplog):
    pair = Pair()
    pair.extra = lambda: pair.decoder.bias.sum().item()  # the same in every run: the first-chunk check passes
    x = torch.randn(6, 4)
    monkeypatch.setattr(weights, "auto_chunk_size", lambda *a: 8)
    taped, text = _estimate(pair, x, True, monkeypatch, caplog)
    assert "the recording was refused: the program reads a tensor's value" in text
    written, _ = _estimate(pair, x, False, monkeypatch, caplog)
    assert torch.equal(taped.log_weights, written.log_weights)


def test_python_state_that_changes_after_the_recording_is_caught_by_the_check(monkeypatch, caplog):
    """A model whose arithmetic depends on Python state: the tape would freeze the value it had when
    recorded. Here the state changes right after the recording; the check's fresh run sees it."""
    state = {"shift": 0.0}
    pair, x = Pair(lambda: state["shift"]), torch.randn(6, 4)
    real = Tape.record.__func__

    def record_then_shift(cls, fn):
        out = real(cls, fn)
        state["shift"] = 50.0
        return out

    monkeypatch.setattr(Tape, "record", classmethod(record_then_shift))
    monkeypatch.setattr(weights, "auto_chunk_size", lambda *a: 8)
    est, text = _estimate(pair, x, True, monkeypatch, caplog)
    assert "the replayed chunk differs from the programs run afresh" in text
    lw = est.log_weights  # chunks: 8 particles (first), 8 (recorded), then the check's and the rest
    assert (lw[:16] > -100).all() and (lw[16:] < -1000).all()  # every chunk after the shift sees it


def test_a_replay_that_fails_later_falls_back_from_the_same_random_state(monkeypatch, caplog):
    pair, x = Pair(), torch.randn(6, 4)
    monkeypatch.setattr(weights, "auto_chunk_size", lambda *a: 8)
    real, replays = Tape.__call__, []

    def flaky(self):
        replays.append(1)
        if len(replays) == 4:  # the check's replay, two good ones, then a failure
            torch.randn(5)  # after drawing: the fallback must start from the state before
            raise RuntimeError("device lost")
        return real(self)

    monkeypatch.setattr(Tape, "__call__", flaky)
    taped, text = _estimate(pair, x, True, monkeypatch, caplog)
    assert "the replay failed (RuntimeError: device lost)" in text
    monkeypatch.setattr(Tape, "__call__", real)
    written, _ = _estimate(pair, x, False, monkeypatch, caplog)
    assert torch.equal(taped.log_weights, written.log_weights)


def test_a_recording_that_fails_falls_back_from_the_same_random_state(monkeypatch, caplog):
    """An operation that a dispatch mode cannot follow must not fail a call that runs as written."""
    pair, x = Pair(), torch.randn(6, 4)
    monkeypatch.setattr(weights, "auto_chunk_size", lambda *a: 8)

    def failing(cls, fn):
        fn()  # the chunk runs and draws, then the recorder gives up
        raise NotImplementedError("no dispatch rule")

    monkeypatch.setattr(Tape, "record", classmethod(failing))
    taped, text = _estimate(pair, x, True, monkeypatch, caplog)
    assert "the recording failed (NotImplementedError: no dispatch rule)" in text
    written, _ = _estimate(pair, x, False, monkeypatch, caplog)
    assert torch.equal(taped.log_weights, written.log_weights)
