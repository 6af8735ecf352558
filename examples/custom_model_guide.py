"""Probabilistic PCA written by hand as a Pyro model/guide pair, trained with pyrovae.fit.

The model p(z) = N(0, I), p(x | z) = N(W z + b, sigma^2 I) has an exact log p(x)
(x ~ N(b, W W^T + sigma^2 I)), so after training we can check pyrovae's
importance-sampled estimate against the truth.

    python examples/custom_model_guide.py --epochs 200
"""

import argparse

import torch
import pyro
import pyro.distributions as dist
from torch import nn

import pyrovae


def make_pair(d, k):
    encoder = nn.Linear(d, 2 * k)  # amortised guide: x -> (loc, raw scale)

    def model(x):
        # Global weights as point estimates (pyro.param), created from the data's dtype/device.
        W = pyro.param("W", lambda: 0.1 * torch.randn(d, k, dtype=x.dtype, device=x.device))
        b = pyro.param("b", lambda: x.new_zeros(d))
        sigma = pyro.param("sigma", lambda: x.new_tensor(1.0), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(k), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + b, sigma).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            loc, raw = encoder(x).chunk(2, dim=-1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-4).to_event(1))

    return model, guide


def exact_log_marginal(x):
    W, b, sigma = pyro.param("W").detach(), pyro.param("b").detach(), pyro.param("sigma").detach()
    cov = W @ W.T + sigma**2 * torch.eye(len(b), device=b.device)
    return dist.MultivariateNormal(b, covariance_matrix=cov).log_prob(x)


def main(args):
    pyro.clear_param_store()
    torch.manual_seed(args.seed)
    d, k = 8, 2
    with torch.device(args.device):  # the data and the encoder are created on the training device
        true_W = torch.randn(d, k)
        x = torch.randn(args.n, k) @ true_W.T + 0.3 * torch.randn(args.n, d)
        model, guide = make_pair(d, k)
    result = pyrovae.fit(model, guide, x, epochs=args.epochs, batch_size=64, lr=0.02, seed=args.seed,
                         device=args.device, progress=False, run_dir=args.run_dir)
    print(f"ELBO: {result.train_elbo[0]:.3f} -> {result.train_elbo[-1]:.3f} nats per datapoint")
    est = pyrovae.log_marginal(model, guide, x[:100], num_particles=args.num_particles)
    exact = exact_log_marginal(x[:100]).double()
    print(est.summary())
    print(f"exact mean log p(x): {exact.mean():.3f}; largest |error| / stderr: "
          f"{((est.log_marginal - exact).abs() / est.stderr.clamp(min=1e-12)).max():.2f}")
    return result, est, exact


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--num-particles", type=int, default=1000)
    p.add_argument("--run-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
