"""A VAE whose guide is a normalizing flow: a diagonal Normal from the encoder, reshaped by learned invertible maps.

The diagonal Normal q(z | x) of a plain VAE cannot represent correlated or
skewed posteriors, and the ELBO pays for that with KL(q || p(z | x)). Here the
encoder gives the base Normal and a context vector h(x); a stack of
conditional flows (``--flow iaf``: inverse autoregressive flows, Kingma et al.
2016; ``--flow planar``: planar flows, Rezende & Mohamed 2015), each
conditioned on h(x), transforms the draw:

    guide(x):  z0 ~ N(loc(x), scale(x)),   z = f_L(...f_1(z0; h(x))...; h(x))

written with ``pyro.distributions.TransformedDistribution`` and the
transforms of ``pyro.distributions.transforms``. The transforms are
``nn.Module`` objects with their own weights: the guide registers them with
``pyro.module`` like any network, otherwise nothing would train them.

The script trains the same VAE twice from the same seed, with ``--flows`` flow
layers and with none, and reports for each the test ELBO (the IWAE-1 bound),
log p(x) by importance sampling, and their difference, which estimates
KL(q(z|x) || p(z|x)): the flow guide should leave a smaller gap.

    python examples/flow_guide.py                                # 8x8 digits
    python examples/flow_guide.py --dataset mnist --data-dir /work/shared/data --hidden 400 --latent-dim 20
"""

import argparse
import math

import arviz as az
import torch
import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
from torch import nn

import pyrovae

FLOWS = {
    "iaf": lambda z_dim, context: T.conditional_affine_autoregressive(z_dim, context, hidden_dims=[4 * z_dim]),
    "planar": lambda z_dim, context: T.conditional_planar(z_dim, context, hidden_dims=[4 * z_dim]),
}


class FlowVAE(nn.Module):
    def __init__(self, pixels, hidden, z_dim, *, flows, kind, context=16, name="vae"):
        super().__init__()
        self.z_dim, self.context, self.name = z_dim, context, name
        self.encoder = nn.Sequential(nn.Linear(pixels, hidden), nn.Softplus(),
                                     nn.Linear(hidden, 2 * z_dim + context))
        self.decoder = nn.Sequential(nn.Linear(z_dim, hidden), nn.Softplus(), nn.Linear(hidden, pixels))
        self.flows = nn.ModuleList([FLOWS[kind](z_dim, context) for _ in range(flows)])

    def model(self, x):
        pyro.module(f"{self.name}.decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module(f"{self.name}.encoder", self.encoder)
        pyro.module(f"{self.name}.flows", self.flows)  # the flows' weights are parameters too
        with pyro.plate("data", x.shape[0]):
            loc, raw_scale, h = self.encoder(x).split([self.z_dim, self.z_dim, self.context], -1)
            base = dist.Normal(loc, nn.functional.softplus(raw_scale) + 1e-4).to_event(1)
            q = dist.TransformedDistribution(base, [flow.condition(h) for flow in self.flows]) if self.flows \
                else base
            pyro.sample("z", q)


def load(args):
    if args.dataset == "digits":
        splits = pyrovae.load_dataset("digits", binarize="dynamic", seed=args.seed)
    else:
        splits = pyrovae.load_dataset("mnist", root=args.data_dir, binarize="dynamic", seed=args.seed,
                                      subset=args.subset)
    return splits.train.flatten(1), splits.test.flatten(1)


def main(args):
    pyro.clear_param_store()
    x_train, x_test = load(args)
    x_test = x_test[:args.eval_images]
    vaes, results, estimates, trained = {}, {}, {}, {}
    for flows in (0, args.flows):
        name = f"{args.flow}{flows}" if flows else "diagonal"
        torch.manual_seed(args.seed)
        vae = FlowVAE(x_train.shape[1], args.hidden, args.latent_dim, flows=flows, kind=args.flow, name=name)
        before = [p.detach().clone() for p in vae.flows.parameters()]
        results[name] = pyrovae.fit(vae.model, vae.guide, x_train, transform=torch.bernoulli, epochs=args.epochs,
                                    batch_size=args.batch_size, lr=args.lr, seed=args.seed, device="cpu",
                                    progress=False)
        moved = sum(not torch.equal(b, p) for b, p in zip(before, vae.flows.parameters()))
        pyro.set_rng_seed(args.seed + 1)
        est = pyrovae.log_marginal(vae.model, vae.guide, x_test, num_particles=args.num_particles)
        vaes[name], estimates[name], trained[name] = vae, est, (moved, len(before))
        elbo, log_p = est.bounds[1], est.log_marginal
        gap = (log_p - elbo).double()
        print(f"{name}: {sum(p.numel() for p in vae.parameters())} parameters ({moved} of "
              f"{len(before)} flow tensors trained); training ELBO {results[name].train_elbo[0]:.2f} -> "
              f"{results[name].train_elbo[-1]:.2f}")
        print(f"  test ELBO {elbo.mean():.3f}, log p(x) {log_p.mean():.3f} (K={args.num_particles}), "
              f"gap {gap.mean():.3f} ± {gap.std() / math.sqrt(len(gap)):.3f} nats/image")
        print(f"  {est.summary().verdict}")

    flow_name = f"{args.flow}{args.flows}"
    d = (estimates[flow_name].log_marginal - estimates["diagonal"].log_marginal).double()
    print(f"log p(x), flow guide - diagonal guide: {d.mean():+.3f} ± {d.std() / math.sqrt(len(d)):.3f} nats/image")

    vae = vaes[flow_name]
    idata = pyrovae.diagnostics.to_inference_data(vae.model, vae.guide, x_test[:4], num_samples=args.export_samples)
    summary = az.summary(idata, var_names=["z"])
    print(summary.head(8).to_string())
    return {"fit": results, "log_marginal": estimates, "models": vaes, "flow_tensors_trained": trained,
            "idata": idata, "summary": summary}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits", choices=["digits", "mnist"])
    p.add_argument("--data-dir", default=None, help="folder holding mnist/ (default $PYROVAE_DATA)")
    p.add_argument("--subset", type=int, default=None, help="MNIST: first N images of each split")
    p.add_argument("--flow", default="iaf", choices=sorted(FLOWS))
    p.add_argument("--flows", type=int, default=4, help="flow layers (compared with none)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--latent-dim", type=int, default=4)
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
