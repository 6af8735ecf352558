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
