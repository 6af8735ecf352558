"""Property-based fuzzing: bad input gets a ValueError/TypeError naming the problem, nothing else."""

import gzip
import struct

import numpy as np
import pytest
import pyro
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pyrovae import VAE, fit, from_arrays, log_marginal
from pyrovae.cli import main
from pyrovae.data import read_amat, read_idx

from .common import DEVICE

# derandomize: the same examples on every run, so the suite is deterministic (new examples: run
# with --hypothesis-seed=random locally).
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.int64, np.uint8, np.bool_]),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=6),
    elements=None,
)


@FUZZ
@given(x=arrays)
def test_from_arrays_accepts_or_names_the_problem(x):
    try:
        s = from_arrays(x, val_fraction=0.0, test_fraction=0.0)
    except (ValueError, TypeError) as e:
        assert any(w in str(e) for w in ("x ", "x must", "empty", "NaN", "training examples", "numeric")), str(e)
    else:
        assert torch.isfinite(s.train).all() and len(s.train) == len(x)


@FUZZ
@given(raw=st.binary(max_size=200), gz=st.booleans())
def test_read_idx_never_crashes(tmp_path_factory, raw, gz):
    path = tmp_path_factory.mktemp("idx") / ("f.gz" if gz else "f")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    try:
        out = read_idx(path)
    except ValueError as e:
        assert str(path) in str(e)
    else:
        assert out.dtype == np.uint8


@FUZZ
@given(dims=st.lists(st.integers(0, 5), min_size=1, max_size=3), extra=st.integers(-3, 3), magic=st.sampled_from([2049, 2051, 2052, 0]))
def test_read_idx_header_payload_mismatch(tmp_path_factory, dims, extra, magic):
    n = int(np.prod(dims))
    payload = bytes(max(0, n + extra))
    path = tmp_path_factory.mktemp("idx") / "f.gz"
    path.write_bytes(gzip.compress(struct.pack(">I", magic) + struct.pack(">" + "I" * len(dims), *dims) + payload))
    try:
        out, accepted = read_idx(path), True
    except ValueError as e:
        assert "f.gz" in str(e)
        accepted = False
    matches = (magic, len(dims)) in ((2049, 1), (2051, 3))
    if matches:
        assert accepted == (len(payload) == n), (dims, extra)
        if accepted:
            assert out.shape == tuple(dims)
    if magic not in (2049, 2051):
        assert not accepted


@FUZZ
@given(raw=st.binary(max_size=3000))
def test_read_amat_never_crashes(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("amat") / "f.amat"
    path.write_bytes(raw)
    try:
        out = read_amat(path)
    except ValueError as e:
        assert "f.amat" in str(e)
    else:
        assert out.shape[1:] == (28, 28) and set(np.unique(out)) <= {0, 1}


def _vae():
    pyro.clear_param_store()  # hypothesis runs many examples inside one test
    return VAE((1, 2, 2), latent_dim=1, hidden=(4,))


@FUZZ
@given(
    n=st.integers(0, 5),
    value=st.one_of(st.sampled_from([0.0, 1.0]), floats),
    shape=st.sampled_from([(1, 2, 2), (2, 2), (4,), (1, 2, 3)]),
)
def test_fit_accepts_or_names_the_problem(tmp_path_factory, n, value, shape):
    run_dir = tmp_path_factory.mktemp("fit") / "run"
    x = torch.full((n, *shape), value)
    vae = _vae()
    try:
        fit(vae.model, vae.guide, x, epochs=1, batch_size=2, progress=False, device=DEVICE, run_dir=run_dir)
    except (ValueError, TypeError) as e:
        assert "data" in str(e), str(e)
        assert not run_dir.exists(), "a run folder was left behind by bad input"
    else:
        assert (run_dir / "manifest.json").exists()


@FUZZ
@given(
    epochs=st.one_of(st.integers(-10**12, 10**12), floats, st.none(), st.text(max_size=3)),
    batch_size=st.one_of(st.integers(-10**12, 10**12), st.just(True)),
)
def test_fit_options_are_validated_eagerly(epochs, batch_size):
    vae = _vae()
    x = torch.bernoulli(torch.full((4, 1, 2, 2), 0.5))
    valid = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1
    if not (valid(epochs) and valid(batch_size)):  # valid values would train, possibly for ever
        with pytest.raises((ValueError, TypeError), match="epochs|batch_size"):
            fit(vae.model, vae.guide, x, epochs=epochs, batch_size=batch_size, progress=False, device=DEVICE)


@FUZZ
@given(value=floats, k=st.integers(-5, 5), shape=st.sampled_from([(3, 1, 2, 2), (3, 4), (0, 1, 2, 2)]))
def test_log_marginal_accepts_or_names_the_problem(value, k, shape):
    vae = _vae()
    x = torch.full(shape, value)
    try:
        est = log_marginal(vae.model, vae.guide, x, num_particles=k, khat=False)
    except (ValueError, TypeError) as e:
        assert any(w in str(e) for w in ("num_particles", "x must", "NaN", "args[0]", "weight", "plate", "binary", "x is empty")), str(e)
    else:
        assert torch.isfinite(est.log_marginal).all()


@pytest.mark.filterwarnings("ignore:Encountered NaN:UserWarning")  # Pyro's warning precedes our exit 3
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flag=st.sampled_from(["--epochs", "--batch-size", "--latent-dim", "--lr", "--beta", "--eval-particles", "--subset"]),
    # out-of-range and malformed values only: a huge valid --epochs would simply train for ever
    value=st.sampled_from(["0", "-1", "nan", "inf", "-inf", "1e300", "abc", "", "1.5"]),
)
def test_cli_rejects_bad_numbers_cleanly(tmp_path_factory, capsys, flag, value):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    try:
        code = main(["train", "--run-dir", str(run_dir), "--epochs", "1", "--no-progress", "--eval-particles", "0",
                     "--subset", "20", "--device", "cpu", flag, value])
    except SystemExit as e:  # argparse: usage error, exit 2
        code = e.code
    err = capsys.readouterr().err
    assert code in (0, 2, 3), (code, err)  # 3: a clear "training diverged" (e.g. --lr 1e300)
    assert "Traceback" not in err
    if code in (2, 3):
        assert "error" in err or "diverged" in err, err
