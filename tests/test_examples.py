"""Every example runs with tiny arguments; an example not listed here fails the suite."""

import importlib.util
from pathlib import Path

import pytest

from .common import data_dir, requires_mnist

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LISTED = {
    "custom_model_guide.py": ["--n", "200", "--epochs", "30", "--num-particles", "200"],
    "vae_mnist.py": ["--data-dir", str(data_dir()), "--subset", "256", "--epochs", "1", "--hidden", "32",
                     "--latent-dim", "4", "--num-particles", "20", "--eval-images", "50", "--device", "cpu", "--quiet"],
}


def _load(name):
    spec = importlib.util.spec_from_file_location(name[:-3], EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(name):
    module = _load(name)
    return module.main(module.parser().parse_args(LISTED[name]))


def test_every_example_is_listed():
    assert {p.name for p in EXAMPLES.glob("*.py")} == set(LISTED)


def test_custom_model_guide():
    result, est, exact = _run("custom_model_guide.py")
    assert result.train_elbo[-1] > result.train_elbo[0]
    z = (est.log_marginal - exact).abs() / est.stderr
    assert (z < 4).double().mean() > 0.95, z  # range check: ~0 false failures expected at 4 SE


@requires_mnist
def test_vae_mnist():
    result, est = _run("vae_mnist.py")
    assert len(result.history) == 1 and len(est) == 50
