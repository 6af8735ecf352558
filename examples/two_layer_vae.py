"""A VAE with two stochastic layers, z2 -> z1 -> x, after Burda et al.'s (2016) two-layer architecture, smaller.

    model(x):  z2 ~ N(0, I),  z1 ~ N(mu(z2), sigma(z2)),  x ~ Bernoulli(decoder(z1))
    guide(x):  z1 ~ N(mu(x), sigma(x)),  z2 ~ N(mu(z1), sigma(z1))

Each conditional is a small network returning a diagonal Normal, registered
with ``pyro.module``; the guide runs bottom-up, the model top-down, as in the
paper (where the widths are 784-100-100-z1(100)-50-50-z2(50); the defaults
here are 64-64-z1(8)-32-z2(4) for 8x8 digits). Nothing in pyrovae needs to
know there are two layers: ``fit``, ``log_marginal`` and the ArviZ export
read every site from the traces.

Top layers of hierarchical VAEs tend to go unused (their posterior collapses
to the prior). The script reports active units per layer (Burda et al.'s
measure, ``pyrovae.diagnostics.active_units``), and offers the two remedies of
the literature: ``--elbo iwae`` (Burda et al.) and KL warm-up
(``--kl-warmup-epochs``, Sønderby et al. 2016).

    python examples/two_layer_vae.py                              # 8x8 digits
    python examples/two_layer_vae.py --dataset mnist --data-dir /work/shared/data --hidden1 100 --z1 100 \\
        --hidden2 50 --z2 50 --elbo iwae
"""

import argparse

import arviz as az
import torch
import pyro
import pyro.distributions as dist
from torch import nn

import pyrovae


class GaussianNet(nn.Module):
    """input -> tanh hidden -> tanh hidden -> (loc, scale) of a diagonal Normal."""

    def __init__(self, d_in, hidden, d_out):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 2 * d_out))

    def forward(self, x):
        loc, raw = self.net(x).chunk(2, -1)
        return loc, nn.functional.softplus(raw) + 1e-4


def make_pair(pixels, hidden1, z1_dim, hidden2, z2_dim):
    q_z1, q_z2 = GaussianNet(pixels, hidden1, z1_dim), GaussianNet(z1_dim, hidden2, z2_dim)
    p_z1 = GaussianNet(z2_dim, hidden2, z1_dim)
    p_x = nn.Sequential(nn.Linear(z1_dim, hidden1), nn.Tanh(), nn.Linear(hidden1, hidden1), nn.Tanh(),
                        nn.Linear(hidden1, pixels))

    def model(x):
        pyro.module("p_z1", p_z1)
        pyro.module("p_x", p_x)
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(x.new_zeros(z2_dim), 1.0).to_event(1))
            z1 = pyro.sample("z1", dist.Normal(*p_z1(z2)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=p_x(z1)).to_event(1), obs=x)

    def guide(x):
        pyro.module("q_z1", q_z1)
        pyro.module("q_z2", q_z2)
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(*q_z1(x)).to_event(1))
            pyro.sample("z2", dist.Normal(*q_z2(z1)).to_event(1))

    return model, guide


def load(args):
    if args.dataset == "digits":
        splits = pyrovae.load_dataset("digits", binarize="dynamic", seed=args.seed)
    else:
        splits = pyrovae.load_dataset("mnist", root=args.data_dir, binarize="dynamic", seed=args.seed,
                                      subset=args.subset)
    return splits.train.flatten(1), splits.test.flatten(1)


def main(args):
    pyro.clear_param_store()
    torch.manual_seed(args.seed)
    x_train, x_test = load(args)
    x_test = x_test[:args.eval_images]
    model, guide = make_pair(x_train.shape[1], args.hidden1, args.z1, args.hidden2, args.z2)
    result = pyrovae.fit(model, guide, x_train, transform=torch.bernoulli, elbo=args.elbo,
                         num_particles=args.particles, kl_warmup_epochs=args.kl_warmup_epochs, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, seed=args.seed, device="cpu", progress=False)
    print(f"elbo={args.elbo!r}, K={args.particles}, KL warm-up over {args.kl_warmup_epochs} epochs: training "
          f"objective {result.train_elbo[0]:.2f} -> {result.train_elbo[-1]:.2f} nats/image")

    est = pyrovae.log_marginal(model, guide, x_test, num_particles=args.num_particles)
    print(est.summary())

    units = pyrovae.diagnostics.active_units(model, guide, x_test)
    per_layer = {site: sum(bool(a) for n, a in zip(units.names, units.active) if n.split("[")[0] == site)
                 for site in ("z1", "z2")}
    print(f"active units: z1 {per_layer['z1']} of {args.z1}, z2 {per_layer['z2']} of {args.z2} "
          f"(activity above {units.threshold:g})")

    idata = pyrovae.diagnostics.to_inference_data(model, guide, x_test[:4], num_samples=args.export_samples)
    summary = az.summary(idata, var_names=["z2"])
    print(summary.head(8).to_string())
    return {"fit": result, "log_marginal": est, "active_units": units, "per_layer": per_layer, "idata": idata,
            "summary": summary}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits", choices=["digits", "mnist"])
    p.add_argument("--data-dir", default=None, help="folder holding mnist/ (default $PYROVAE_DATA)")
    p.add_argument("--subset", type=int, default=None, help="MNIST: first N images of each split")
    p.add_argument("--hidden1", type=int, default=64)
    p.add_argument("--z1", type=int, default=8)
    p.add_argument("--hidden2", type=int, default=32)
    p.add_argument("--z2", type=int, default=4)
    p.add_argument("--elbo", default="trace", choices=["trace", "iwae", "iwae-dreg"])
    p.add_argument("--particles", type=int, default=1, help="K per datapoint in training")
    p.add_argument("--kl-warmup-epochs", type=float, default=10.0)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-particles", type=int, default=1000)
    p.add_argument("--eval-images", type=int, default=359)
    p.add_argument("--export-samples", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    return p


if __name__ == "__main__":
    main(parser().parse_args())
