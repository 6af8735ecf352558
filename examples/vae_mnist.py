"""The 784-400-50 Bernoulli VAE on MNIST (Kingma & Welling's architecture), with pyrovae.

Trains with fit, then estimates the test log p(x) by importance sampling and
writes pictures to the run folder.

    python examples/vae_mnist.py --data-dir ../shared/data --epochs 10
"""

import argparse
from pathlib import Path

import torch

import pyrovae
from pyrovae import plots


def main(args):
    splits = pyrovae.load_dataset(args.dataset, root=args.data_dir, binarize=args.binarize, subset=args.subset)
    torch.manual_seed(args.seed)
    likelihood_options = {"allow_fractional": True} if args.binarize == "none" else {}
    vae = pyrovae.VAE(splits.event_shape, latent_dim=args.latent_dim, hidden=(args.hidden,),
                      likelihood="bernoulli", likelihood_options=likelihood_options)
    result = pyrovae.fit(vae.model, vae.guide, splits, epochs=args.epochs, batch_size=args.batch_size,
                         lr=args.lr, seed=args.seed, device=args.device, run_dir=args.run_dir,
                         progress=not args.quiet)
    print(f"validation ELBO after {len(result.history)} epochs: {result.history[-1]['val_elbo']:.3f} nats/image")
    vae.eval()
    x_test = splits.test[: args.eval_images].to(result.device)
    est = pyrovae.log_marginal(vae.model, vae.guide, x_test, num_particles=args.num_particles)
    print(est.summary())
    if args.run_dir:
        plots.plot_samples(vae, Path(args.run_dir) / "samples.png")
        plots.plot_reconstructions(vae, x_test[:32], Path(args.run_dir) / "reconstructions.png")
    return result, est


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist", help="mnist or binarized-mnist")
    p.add_argument("--data-dir", default=None, help="folder with the files (default $PYROVAE_DATA)")
    p.add_argument("--binarize", default="dynamic", choices=["dynamic", "static", "none"])
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--latent-dim", type=int, default=50)
    p.add_argument("--hidden", type=int, default=400)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-particles", type=int, default=1000)
    p.add_argument("--eval-images", type=int, default=1000)
    p.add_argument("--device", default="auto")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
