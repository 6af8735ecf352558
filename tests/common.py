"""Helpers shared by the tests: data location, small models with known answers."""

import contextlib
import functools
import os
from pathlib import Path

import pytest
import torch
import pyro
import pyro.distributions as dist

DEVICE = os.environ.get("PYROVAE_DEVICE", "cpu")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _to_default_device(value):
    if isinstance(value, torch.Tensor):
        return value.to(torch.get_default_device())
    if isinstance(value, (tuple, list)):
        return type(value)(_to_default_device(v) for v in value)
    if isinstance(value, torch.utils.data.TensorDataset):
        return torch.utils.data.TensorDataset(*_to_default_device(value.tensors))
    return value


@contextlib.contextmanager
def default_device(device):
    """``torch.set_default_device(device)`` for the block, then the default that was there before.

    Put back what was there, not the CPU: with PYROVAE_DEVICE=cuda the suite's default is
    CUDA, and a test that reset it to the CPU sent the tests after it in the same worker
    onto the CPU (on a GPU machine two of them then failed with networks and data on two
    devices). A CPU default is restored as no default at all, as torch starts."""
    before = torch.get_default_device()
    torch.set_default_device(device)
    try:
        yield
    finally:
        restore_default_device(before)


def restore_default_device(before: torch.device) -> None:
    """Make ``before`` (from ``torch.get_default_device()``) the default device again."""
    torch.set_default_device(None if before.type == "cpu" else before)


def seeded_data(fn):
    """Run a data helper on the CPU, then move what it returns to the suite's default device.

    Seeded CPU generators give the same numbers on every machine, and a CPU
    generator cannot drive an op on a CUDA tensor: with PYROVAE_DEVICE=cuda the
    default device is CUDA, so helpers that seed a generator make their data here.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.device("cpu"):
            out = fn(*args, **kwargs)
        return _to_default_device(out)

    return wrapper


def load_example(name):
    """Import examples/<name>.py as a module (examples are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def data_dir():
    """The verified datasets: $PYROVAE_DATA, else ../shared/data beside the repo."""
    env = os.environ.get("PYROVAE_DATA")
    return Path(env) if env else SHARED_DATA


requires_mnist = pytest.mark.skipif(
    not (data_dir() / "mnist" / "t10k-images-idx3-ubyte.gz").exists(),
    reason="MNIST files not found (set PYROVAE_DATA or provide ../shared/data)",
)
requires_binarized_mnist = pytest.mark.skipif(
    not (data_dir() / "binarized-mnist" / "binarized_mnist_test.amat.gz").exists(),
    reason="binarized MNIST files not found",
)


class PPCA:
    """Linear-Gaussian model p(z)=N(0,I), p(x|z)=N(Wz+b, s^2 I), with its exact answers."""

    def __init__(self, d=5, k=2, sigma=0.5, seed=0):
        self.W, self.b = self._weights(d, k, seed)
        self.sigma, self.d, self.k = sigma, d, k
        prec = torch.eye(k, dtype=torch.float64) + self.W.T @ self.W / sigma**2
        self.post_cov = torch.linalg.inv(prec)

    @staticmethod
    @seeded_data
    def _weights(d, k, seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(d, k, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)

    def sample(self, n, seed=1):
        z, noise = self._draws(n, seed)
        return z @ self.W.T + self.b + self.sigma * noise

    @seeded_data
    def _draws(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.k, generator=g, dtype=torch.float64)
        return z, torch.randn(n, self.d, generator=g, dtype=torch.float64)

    def exact_log_marginal(self, x):
        cov = self.W @ self.W.T + self.sigma**2 * torch.eye(self.d, dtype=torch.float64)
        return dist.MultivariateNormal(self.b, covariance_matrix=cov).log_prob(x)

    def posterior(self, x):
        mean = (x - self.b) @ self.W @ self.post_cov.T / self.sigma**2
        return mean, self.post_cov

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.k, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.sigma).to_event(1), obs=x)

    def exact_guide(self, x):
        mean, cov = self.posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(mean, covariance_matrix=cov))

    def diag_guide(self, x, inflate=1.5):
        """Mean-field guide with inflated variances: imperfect but safe (heavier tails)."""
        mean, cov = self.posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(mean, inflate * cov.diagonal().sqrt()).to_event(1))


def beta_bernoulli(a=2.0, b=3.0, d=10):
    """p(z)=Beta(a,b), x_j|z ~ Bernoulli(z): log p(x) = log B(a+s, b+d-s) - log B(a, b)."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Beta(torch.tensor(a, dtype=x.dtype), torch.tensor(b, dtype=x.dtype)))
            pyro.sample("x", dist.Bernoulli(z.unsqueeze(-1).expand(*z.shape, d)).to_event(1), obs=x)

    def guide(x, exact=True):
        s = x.sum(-1)
        with pyro.plate("data", x.shape[0]):
            if exact:
                pyro.sample("z", dist.Beta(a + s, b + d - s))
            else:
                pyro.sample("z", dist.Beta(torch.ones_like(s), torch.ones_like(s)))

    def exact(x):
        s = x.sum(-1)
        lbeta = lambda p, q: torch.lgamma(p) + torch.lgamma(q) - torch.lgamma(p + q)
        return lbeta(a + s, b + d - s) - lbeta(torch.tensor(a, dtype=x.dtype), torch.tensor(b, dtype=x.dtype))

    return model, guide, exact
