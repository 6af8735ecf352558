"""A VAE trained on the importance-weighted bound (IWAE, Burda et al. 2016), compared with one trained on the ELBO.

The pair is an ordinary Bernoulli VAE written as a ``PyroModule``; what
changes is the objective only. With K particles per datapoint:

* ``fit(..., elbo="trace", num_particles=K)`` averages K ELBO estimates;
* ``fit(..., elbo="iwae", num_particles=K)`` maximises the IWAE-K bound
  log (1/K) sum_k p(x, z_k) / q(z_k | x), one log-sum-exp per datapoint,
  which is tighter than the ELBO and rewards a guide that covers the posterior
  rather than one that sits inside it (``--elbo iwae-dreg`` uses the
  doubly-reparameterised gradient for the guide).

Both runs start from the same weights and seed. Then ``log_marginal`` scores
both at a large K on the test images, and the script prints the paired
per-image difference log p_iwae(x) - log p_elbo(x) with its standard error,
and the ladder of bounds (k=1 is the ELBO): the IWAE-trained model usually has
the higher log p(x) and the lower ELBO.

    python examples/iwae_vae.py                                  # 8x8 digits
    python examples/iwae_vae.py --dataset mnist --data-dir /work/shared/data --hidden 400 --latent-dim 50
"""

import argparse
import math

import arviz as az
import torch
import pyro
import pyro.distributions as dist
from pyro.nn import PyroModule
from pyro.nn.module import to_pyro_module_
from torch import nn

import pyrovae


class BernoulliVAE(PyroModule):
    """pixels -> hidden -> (loc, scale) of z; z -> hidden -> logits of every pixel."""

    def __init__(self, pixels, hidden, z_dim, name):
        super().__init__(name)
        self.z_dim = z_dim
        self.encoder = nn.Sequential(nn.Linear(pixels, hidden), nn.Tanh(), nn.Linear(hidden, 2 * z_dim))
        self.decoder = nn.Sequential(nn.Linear(z_dim, hidden), nn.Tanh(), nn.Linear(hidden, pixels))
        to_pyro_module_(self)  # every layer a PyroModule: its parameters are Pyro params named "<name>.<path>"

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


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
    pixels = x_train.shape[1]
    vaes, results, estimates = {}, {}, {}
    initial = None
    for objective in ("trace", args.elbo):
        vae = BernoulliVAE(pixels, args.hidden, args.latent_dim, name=f"vae_{objective}")
        if initial is None:
            initial = {k: v.clone() for k, v in vae.state_dict().items()}
        vae.load_state_dict(initial)  # the same starting weights for both objectives
        results[objective] = pyrovae.fit(vae.model, vae.guide, x_train, transform=torch.bernoulli, elbo=objective,
                                         num_particles=args.particles, epochs=args.epochs,
                                         batch_size=args.batch_size, lr=args.lr, seed=args.seed, device="cpu",
                                         progress=False)
        pyro.set_rng_seed(args.seed + 1)
        estimates[objective] = pyrovae.log_marginal(vae.model, vae.guide, x_test, num_particles=args.num_particles)
        vaes[objective] = vae
        r, s = results[objective], estimates[objective].summary()
        print(f"elbo={objective!r}, K={args.particles}: training objective {r.train_elbo[0]:.2f} -> "
              f"{r.train_elbo[-1]:.2f} nats/image ({sum(h['seconds'] for h in r.history):.1f} s)")
        print(f"  {s}")

    d = (estimates[args.elbo].log_marginal - estimates["trace"].log_marginal).double()
    n = len(d)
    diff, se = float(d.mean()), float(d.std() / math.sqrt(n))
    print(f"test log p(x), K={args.num_particles}, {n} images: {args.elbo} - trace = {diff:+.3f} ± {se:.3f} "
          f"nats/image (z = {diff / se:.1f}); higher on {100 * float((d > 0).double().mean()):.0f}% of images")
    for objective, est in estimates.items():
        ladder = ", ".join(f"k={k}: {float(v.mean()):.2f}" for k, v in est.bounds.items())
        print(f"  bounds of the {objective}-trained VAE: {ladder}")

    vae = vaes[args.elbo]
    idata = pyrovae.diagnostics.to_inference_data(vae.model, vae.guide, x_test[:4], num_samples=args.export_samples)
    summary = az.summary(idata, var_names=["z"])
    print(summary.head(8).to_string())
    return {"fit": results, "log_marginal": estimates, "difference": (diff, se), "idata": idata,
            "summary": summary}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits", choices=["digits", "mnist"])
    p.add_argument("--data-dir", default=None, help="folder holding mnist/ (default $PYROVAE_DATA)")
    p.add_argument("--subset", type=int, default=None, help="MNIST: first N images of each split")
    p.add_argument("--elbo", default="iwae", choices=["iwae", "iwae-dreg"], help="compared with 'trace'")
    p.add_argument("--particles", type=int, default=5, help="K in training, for both objectives")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--latent-dim", type=int, default=8)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-particles", type=int, default=2000, help="K for log p(x)")
    p.add_argument("--eval-images", type=int, default=359)
    p.add_argument("--export-samples", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    return p


if __name__ == "__main__":
    main(parser().parse_args())
