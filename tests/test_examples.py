"""Every example runs with tiny arguments; an example not listed here fails the suite."""


from .common import EXAMPLES, data_dir, load_example, requires_mnist

LISTED = {
    "custom_model_guide.py": ["--n", "200", "--epochs", "30", "--num-particles", "200"],
    "vae_mnist.py": ["--data-dir", str(data_dir()), "--subset", "256", "--epochs", "1", "--hidden", "32",
                     "--latent-dim", "4", "--num-particles", "20", "--eval-images", "50", "--device", "cpu", "--quiet"],
}


def _run(name):
    module = load_example(name[:-3])
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
