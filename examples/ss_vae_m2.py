"""Semi-supervised VAE (Kingma et al. 2014, "M2") with the label enumerated, trained on three data sources.

The generative model draws a class y and a style z, then the image:

    model(xs, ys):  y ~ Categorical(uniform), z ~ N(0, I), x ~ Bernoulli(decoder(z, y))
    guide(xs, ys):  y ~ q(y | x)  (only where ys is None), z ~ q(z | x, y)

On a labelled batch ``ys`` is observed in both programs. On an unlabelled
batch the guide's ``y`` is marked for enumeration (``config_enumerate``) and
``TraceEnum_ELBO`` sums over the ten classes exactly instead of sampling one.
The classifier q(y | x) is then trained only through unlabelled data, so M2
adds a third term, the log-likelihood of the labels under q(y | x), weighted by
``--alpha``. In ``pyrovae.fit`` these are three named ``Source`` objects:
unlabelled images (which set the epoch), labelled images, and the
classification term with its own model and an empty guide.

Reported: test accuracy of q(y | x), and log p(x) of unlabelled test images by
importance sampling. There the guide proposes the label too: ``log_marginal``
draws y from q(y | x) and weighs it by p(y) / q(y | x) (the enumeration mark on
the guide matters to ``TraceEnum_ELBO`` only). The ArviZ export shows the
guide's draws of y, so the mean of ``y[i, c]`` estimates q(y = c | x_i).

    python examples/ss_vae_m2.py                               # 8x8 digits, 100 labels
    python examples/ss_vae_m2.py --dataset mnist --data-dir /work/shared/data --labels 3000 --epochs 10
"""

import argparse
import math
import time
from pathlib import Path

import arviz as az
import torch
import pyro
import pyro.distributions as dist
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, config_enumerate
from torch import nn

import pyrovae
from pyrovae import Source


def cat_broadcast(*tensors):
    """Concatenate on the last dimension after broadcasting the others: an enumerated y has
    shape (10, 1, 10) while x has shape (batch, pixels)."""
    batch = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
    return torch.cat([t.expand(*batch, t.shape[-1]) for t in tensors], -1)


class M2(nn.Module):
    def __init__(self, pixels, classes, z_dim, hidden):
        super().__init__()
        self.classes, self.z_dim = classes, z_dim
        self.encoder_y = nn.Sequential(nn.Linear(pixels, hidden), nn.Softplus(), nn.Linear(hidden, classes))
        self.encoder_z = nn.Sequential(nn.Linear(pixels + classes, hidden), nn.Softplus(),
                                       nn.Linear(hidden, 2 * z_dim))
        self.decoder = nn.Sequential(nn.Linear(z_dim + classes, hidden), nn.Softplus(), nn.Linear(hidden, pixels))

    def model(self, xs, ys=None):
        pyro.module("m2", self)
        with pyro.plate("data", xs.shape[0]):
            z = pyro.sample("z", dist.Normal(xs.new_zeros(self.z_dim), 1.0).to_event(1))
            ys = pyro.sample("y", dist.OneHotCategorical(logits=xs.new_zeros(self.classes)), obs=ys)
            logits = self.decoder(cat_broadcast(z, ys))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=xs)

    @config_enumerate
    def guide(self, xs, ys=None):
        pyro.module("m2", self)
        with pyro.plate("data", xs.shape[0]):
            if ys is None:
                ys = pyro.sample("y", dist.OneHotCategorical(logits=self.encoder_y(xs)))
            loc, raw = self.encoder_z(cat_broadcast(xs, ys)).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-4).to_event(1))

    def model_classify(self, xs, ys):
        """The extra term: log q(y | x) of the labelled data, written as a model with ys observed."""
        pyro.module("m2", self)
        with pyro.plate("data", xs.shape[0]):
            pyro.sample("y_aux", dist.OneHotCategorical(logits=self.encoder_y(xs)), obs=ys)

    def guide_classify(self, xs, ys):
        pass

    @torch.no_grad()
    def accuracy(self, xs, labels):
        return (self.encoder_y(xs).argmax(-1) == labels).double().mean().item()


def binarize_images(batch):
    """Dynamic binarisation of a batch (xs,) or (xs, ys): a fresh Bernoulli draw of the images only."""
    return (torch.bernoulli(batch[0]), *batch[1:])


def load(args):
    if args.dataset == "digits":
        splits = pyrovae.load_dataset("digits", binarize="dynamic", seed=args.seed)
    else:
        splits = pyrovae.load_dataset("mnist", root=args.data_dir, binarize="dynamic", seed=args.seed,
                                      subset=args.subset)
    return splits


def labelled_indices(labels, n, classes, generator):
    """n training indices, the same number from every class (as Kingma et al. choose them)."""
    per_class = n // classes
    picked = [torch.nonzero(labels == c)[:, 0] for c in range(classes)]
    picked = [idx[torch.randperm(len(idx), generator=generator)[:per_class]] for idx in picked]
    if any(len(idx) < per_class for idx in picked):
        raise ValueError(f"--labels {n}: some class has fewer than {per_class} training images")
    return torch.cat(picked)


def main(args):
    pyro.clear_param_store()
    torch.manual_seed(args.seed)
    splits = load(args)
    classes = 10
    x_train = splits.train.flatten(1)
    onehot = nn.functional.one_hot(splits.train_labels, classes).float()
    g = torch.Generator().manual_seed(args.seed)
    lab = labelled_indices(splits.train_labels, args.labels, classes, g)
    unlab = torch.ones(len(x_train), dtype=torch.bool)
    unlab[lab] = False
    x_u, x_l, y_l = x_train[unlab], x_train[lab], onehot[lab]

    m2 = M2(x_train.shape[1], classes, args.latent_dim, args.hidden)
    # One pass over the unlabelled images per epoch; the labelled batch size makes that one pass over the
    # labelled images too, so that every image counts once per epoch, as in the full-data objective.
    steps = math.ceil(len(x_u) / args.batch_size)
    labelled_batch = math.ceil(len(x_l) / steps)
    sources = {
        "unlabelled": Source((x_u,)),
        "labelled": Source((x_l, y_l), batch_size=labelled_batch),
        "classify": Source((x_l, y_l), batch_size=labelled_batch, weight=args.alpha,
                           model=m2.model_classify, guide=m2.guide_classify, elbo=Trace_ELBO()),
    }
    t0 = time.perf_counter()
    transform = binarize_images if splits.binarize == "dynamic" else None
    if args.run_dir is not None:  # checkpoints each epoch; a run stopped early continues from the last one
        Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    result = pyrovae.fit(m2.model, m2.guide, sources, transform=transform,
                         elbo=TraceEnum_ELBO(max_plate_nesting=1), epochs=args.epochs, batch_size=args.batch_size,
                         lr=args.lr, seed=args.seed, device="cpu", progress=not args.quiet, resume=args.run_dir)
    seconds = time.perf_counter() - t0
    x_test, y_test = splits.test.flatten(1), splits.test_labels
    accuracy = m2.accuracy(x_test, y_test)
    print(f"{args.labels} labels, {len(x_u)} unlabelled images, {args.epochs} epochs in {seconds:.0f} s; "
          f"unlabelled ELBO {result.train_elbo[0]:.2f} -> {result.train_elbo[-1]:.2f} nats/image")
    print(f"test accuracy of q(y|x): {accuracy:.4f} on {len(y_test)} images (chance {1 / classes:.2f})")

    # log p(x) of unlabelled test images, y and z both proposed by the guide.
    x_eval = x_test[:args.eval_images]
    est = pyrovae.log_marginal(m2.model, m2.guide, x_eval, num_particles=args.num_particles)
    print(est.summary())

    # The guide's draws of y and z for a few test images, summarised by ArviZ.
    idata = pyrovae.diagnostics.to_inference_data(m2.model, m2.guide, x_eval[:4], num_samples=args.export_samples)
    summary = az.summary(idata, var_names=["y"], kind="stats")
    print(summary.head(10).to_string())
    return {"fit": result, "accuracy": accuracy, "log_marginal": est, "idata": idata, "summary": summary,
            "model": m2, "seconds": seconds, "labelled_batch": labelled_batch}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits", choices=["digits", "mnist"])
    p.add_argument("--data-dir", default=None, help="folder holding mnist/ (default $PYROVAE_DATA)")
    p.add_argument("--subset", type=int, default=None, help="MNIST: first N images of each split")
    p.add_argument("--labels", type=int, default=100, help="labelled training images, balanced over classes")
    p.add_argument("--alpha", type=float, default=50.0, help="weight of the classification term")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--latent-dim", type=int, default=8)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-particles", type=int, default=200)
    p.add_argument("--eval-images", type=int, default=200)
    p.add_argument("--export-samples", type=int, default=100)
    p.add_argument("--run-dir", default=None, help="checkpoint here each epoch, and resume from it if it holds a run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
