"""Helpers shared by the tests: data location, small models with known answers."""

import os
from pathlib import Path

import pytest
import torch
import pyro
import pyro.distributions as dist

DEVICE = os.environ.get("PYROVAE_DEVICE", "cpu")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


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
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(d, k, generator=g, dtype=torch.float64)
        self.b = torch.randn(d, generator=g, dtype=torch.float64)
        self.sigma, self.d, self.k = sigma, d, k
        prec = torch.eye(k, dtype=torch.float64) + self.W.T @ self.W / sigma**2
        self.post_cov = torch.linalg.inv(prec)

    def sample(self, n, seed=1):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.k, generator=g, dtype=torch.float64)
        return z @ self.W.T + self.b + self.sigma * torch.randn(n, self.d, generator=g, dtype=torch.float64)

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
