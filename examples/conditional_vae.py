"""A conditional VAE that fills in the hidden part of an image from the part it can see.

The idea of Pyro's CVAE example (Sohn et al., 2015): a network sees one quadrant
of a digit (``xs``, hidden pixels set to -1) and must predict the other three
(``ys``, visible pixels set to -1). A plain network (the *baseline*) predicts
one blurry average; the CVAE draws a latent z from a prior that depends on what
it sees, p(z | xs), and so can produce several sharp completions:

    model(xs, ys):  z ~ p(z | xs, baseline(xs)),   ys[hidden] ~ Bernoulli(generation(z))
    guide(xs, ys):  z ~ q(z | xs, ys)

Both programs take two tensors, so ``fit`` gets ``(xs, ys)``. The likelihood
reads only the hidden pixels, chosen by boolean-mask indexing, as Pyro's
example does: ``logits[xs == -1].view(len(xs), -1)``. That indexing cannot take
an extra particle dimension, so ``log_marginal`` cannot vectorise the particles
and falls back to running them one at a time; the script prints whether it did.

What is reported: log p(ys | xs) per test image, exactly for the baseline (it
has no latent) and by importance sampling for the CVAE, and their paired
difference.

    python examples/conditional_vae.py                       # 8x8 digits, no files needed
    python examples/conditional_vae.py --dataset mnist --data-dir /work/shared/data --epochs 20
"""

import argparse
import math

import arviz as az
import torch
import pyro
import pyro.distributions as dist
from torch import nn

import pyrovae


def quadrant_mask(side, visible):
    """True on the pixels the network sees: the first `visible` quadrants (top-left, top-right, bottom-left)."""
    half = side // 2
    seen = torch.zeros(side, side, dtype=torch.bool)
    for q in range(visible):
        r, c = divmod(q, 2)
        seen[r * half:(r + 1) * half, c * half:(c + 1) * half] = True
    return seen.flatten()


def split_images(images, seen):
    """(xs, ys): the visible pixels with the rest at -1, and the hidden pixels with the rest at -1."""
    xs, ys = images.clone(), images.clone()
    xs[:, ~seen] = -1.0
    ys[:, seen] = -1.0
    return xs, ys


def mlp(sizes):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class Encoder(nn.Module):
    """(loc, scale) of a diagonal Normal from the concatenated inputs."""

    def __init__(self, d_in, hidden, z_dim):
        super().__init__()
        self.net = mlp([d_in, hidden, 2 * z_dim])

    def forward(self, *inputs):
        loc, raw = self.net(torch.cat(inputs, -1)).chunk(2, -1)
        return loc, nn.functional.softplus(raw) + 1e-4


def make_cvae(d, hidden, z_dim, baseline):
    prior_net = Encoder(2 * d, hidden, z_dim)        # p(z | xs, baseline guess)
    recognition_net = Encoder(d, hidden, z_dim)      # q(z | the whole image)
    generation_net = mlp([z_dim, hidden, d])         # logits of every pixel

    def model(xs, ys=None):
        pyro.module("prior_net", prior_net)
        pyro.module("generation_net", generation_net)
        with pyro.plate("data", xs.shape[0]):
            y_hat = torch.sigmoid(baseline(xs))      # frozen: trained first, not registered here
            loc, scale = prior_net(xs, y_hat)
            z = pyro.sample("z", dist.Normal(loc, scale).to_event(1))
            logits = generation_net(z)
            if ys is not None:
                hidden = xs == -1
                pyro.sample("y", dist.Bernoulli(logits=logits[hidden].view(xs.shape[0], -1)).to_event(1),
                            obs=ys[hidden].view(xs.shape[0], -1))
            return logits

    def guide(xs, ys=None):
        pyro.module("recognition_net", recognition_net)
        with pyro.plate("data", xs.shape[0]):
            if ys is None:  # prediction: sample from the prior network
                loc, scale = prior_net(xs, torch.sigmoid(baseline(xs)))
            else:
                whole = torch.where(xs == -1, ys, xs)  # the full image, as Pyro's example rebuilds it
                loc, scale = recognition_net(whole)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return model, guide


def make_baseline(d, hidden):
    """A plain network xs -> logits of every pixel, as a pair with no latent: fit finds its maximum likelihood."""
    net = mlp([d, hidden, hidden, d])

    def model(xs, ys):
        pyro.module("baseline", net)
        with pyro.plate("data", xs.shape[0]):
            hidden_px = xs == -1
            pyro.sample("y", dist.Bernoulli(logits=net(xs)[hidden_px].view(xs.shape[0], -1)).to_event(1),
                        obs=ys[hidden_px].view(xs.shape[0], -1))

    def guide(xs, ys):
        pass

    return net, model, guide


def load_images(args):
    if args.dataset == "digits":
        splits = pyrovae.load_dataset("digits", binarize="static", seed=args.seed)
    else:
        splits = pyrovae.load_dataset("mnist", root=args.data_dir, binarize="static", seed=args.seed,
                                      subset=args.subset)
    flat = lambda t: t.flatten(1)
    return flat(splits.train), flat(splits.test), splits.event_shape[-1]


def main(args):
    pyro.clear_param_store()
    torch.manual_seed(args.seed)
    train, test, side = load_images(args)
    seen = quadrant_mask(side, args.visible_quadrants)
    xs, ys = split_images(train, seen)
    xs_test, ys_test = split_images(test[:args.eval_images], seen)
    d = train.shape[1]

    # 1. The baseline, trained with fit like any pair (it has no latent, so the ELBO is its log-likelihood).
    baseline, base_model, base_guide = make_baseline(d, args.hidden)
    base = pyrovae.fit(base_model, base_guide, xs, ys, epochs=args.baseline_epochs, batch_size=args.batch_size,
                       lr=args.lr, seed=args.seed, device="cpu", progress=False)
    baseline.requires_grad_(False)
    with torch.no_grad():
        hidden_px = xs_test == -1
        baseline_log_p = dist.Bernoulli(logits=baseline(xs_test)[hidden_px].view(len(xs_test), -1)).to_event(1) \
            .log_prob(ys_test[hidden_px].view(len(xs_test), -1)).double()

    # 2. The CVAE on top of the frozen baseline.
    model, guide = make_cvae(d, args.hidden, args.latent_dim, baseline)
    result = pyrovae.fit(model, guide, xs, ys, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed, device="cpu", progress=False)
    print(f"baseline log p(y|x) on training data: {base.train_elbo[0]:.2f} -> {base.train_elbo[-1]:.2f} nats/image")
    print(f"CVAE ELBO on training data: {result.train_elbo[0]:.2f} -> {result.train_elbo[-1]:.2f} nats/image")

    # 3. log p(ys | xs) on test images: importance sampling with the recognition network as proposal.
    est = pyrovae.log_marginal(model, guide, xs_test, ys_test, num_particles=args.num_particles)
    print(est.summary())
    print("particles vectorised" if not est.sequential else f"particles ran one at a time: {est.fallback_reason}")
    diff = est.log_marginal - baseline_log_p
    n = len(diff)
    print(f"test log p(y|x), {n} images, {args.visible_quadrants} quadrant(s) visible: "
          f"CVAE {est.log_marginal.mean():.2f}, baseline {baseline_log_p.mean():.2f}; "
          f"paired difference {diff.mean():+.2f} ± {diff.std() / math.sqrt(n):.2f} nats/image")

    # 4. Export the guide's draws for a few test images and summarise them with ArviZ.
    idata = pyrovae.diagnostics.to_inference_data(model, guide, xs_test[:4], ys_test[:4],
                                                  num_samples=args.export_samples)
    summary = az.summary(idata, var_names=["z"], kind="all")
    print(summary.head(8).to_string())
    return {"baseline": base, "fit": result, "log_marginal": est, "baseline_log_p": baseline_log_p,
            "idata": idata, "summary": summary}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits", choices=["digits", "mnist"])
    p.add_argument("--data-dir", default=None, help="folder holding mnist/ (default $PYROVAE_DATA)")
    p.add_argument("--subset", type=int, default=None, help="MNIST: first N images of each split")
    p.add_argument("--visible-quadrants", type=int, default=1, choices=[1, 2, 3])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--latent-dim", type=int, default=8)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--baseline-epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-particles", type=int, default=500)
    p.add_argument("--eval-images", type=int, default=300)
    p.add_argument("--export-samples", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    return p


if __name__ == "__main__":
    main(parser().parse_args())
