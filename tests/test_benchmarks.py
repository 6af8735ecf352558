"""The speed benchmarks run end to end at a tiny size (their numbers are meaningless here; see
benchmarks/README.md): every section, both pairs, the subprocess runs and the tables."""

import subprocess
import sys
from pathlib import Path

from .common import data_dir, requires_mnist

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script, *argv):
    out = subprocess.run([sys.executable, str(BENCHMARKS / script), *argv], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@requires_mnist
def test_train_throughput_runs_both_pairs(tmp_path):
    table = tmp_path / "tables.txt"
    out = _run("train_throughput.py", "--data-dir", str(data_dir()), "--subset", "300", "--epochs", "2",
               "--tutorial-epochs", "1", "--tutorial-repeats", "2", "--out", str(table))
    text = table.read_text()
    for line in ("plain PyTorch", "pyrovae.fit", "Pyro SVI (tutorial)", "pyrovae.fit, whole call"):
        assert line in text, out
    assert "tutorial pair, repeat 2: plain" in out


def test_importance_speed_runs_both_pairs():
    out = _run("importance_speed.py", "--data-dir", str(data_dir()), "--images", "12", "--particles", "40",
               "--chunk-size", "8", "--repeats", "1", "--importance-images", "2", "--mem-images", "4")
    for line in ("library VAE", "tutorial pair (sigmoid, probs)", "speed-up over Importance", "K=5000 on 4 images"):
        assert line in out, out


def test_importance_speed_times_only_the_pairs_asked_for():
    out = _run("importance_speed.py", "--data-dir", str(data_dir()), "--images", "12", "--particles", "40",
               "--chunk-size", "8", "--repeats", "1", "--importance-images", "2", "--mem-images", "0",
               "--pairs", "tutorial")
    assert "tutorial pair (sigmoid, probs)" in out and "faults o/h" in out, out
    assert "library VAE" not in out and "Importance" not in out, out


def test_importance_chunk_runs_and_its_contenders_compute_the_same_weights():
    out = _run("importance_chunk.py", "--data-dir", str(data_dir()), "--images", "12", "--calls", "2")
    rows = {line[:12].strip(): line.split() for line in out.splitlines()[2:]}
    assert set(rows) == {"hand", "pyrovae", "plain Pyro", "replayed"}, out
    assert float(rows["hand"][-1]) == 1.0, out

    # The contenders compute the same log weights from the same random state (float32 round-off apart;
    # the replay bitwise, tests/test_tape.py).
    import importlib.util

    import pyro
    import torch

    spec = importlib.util.spec_from_file_location("importance_chunk", BENCHMARKS / "importance_chunk.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # it puts benchmarks/ on sys.path for its sibling modules
    from pyrovae import weights

    torch.manual_seed(0)
    tut = bench.tutorial_vae.copies(["chunk_test"])["chunk_test"].eval()
    x = torch.bernoulli(torch.full((6, 784), 0.3))
    with torch.no_grad(), pyro.validation_enabled(False):
        structure = weights.inspect_pair(tut.model, tut.guide, (x,), {}, plate="data")
        torch.manual_seed(1)
        ours = weights.particle_pass(tut.model, tut.guide, (x,), {}, structure, 5).log_weights
        torch.manual_seed(1)
        plain = bench.plain_pyro_pass(tut.model, tut.guide, x, 5)
        loc, scale = tut.encoder(x)
        torch.manual_seed(1)
        hand = bench.tutorial_vae.hand_chunk(tut, x, loc, scale, 5)
    assert ours.shape == plain.shape == hand.shape == (5, 6)
    torch.testing.assert_close(plain.double(), ours, rtol=0, atol=1e-3)  # |log w| ~ 500: float32 ulp ~ 6e-5
    torch.testing.assert_close(hand.double(), ours, rtol=0, atol=1e-3)


def test_static_threshold_times_both_modes_and_gives_a_break_even():
    out = _run("static_threshold.py", "--steps", "2", "4", "--repeats", "1")
    rows = [line.split() for line in out.splitlines() if line[:6].strip() in ("2", "4")]
    assert len(rows) == 2 and all(len(r) == 4 for r in rows), out
    assert "per step: eager" in out and "break-even:" in out and "first calls of the process" in out, out
