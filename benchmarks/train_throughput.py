"""Seconds per epoch and test ELBO: pyrovae.fit vs plain PyTorch vs Pyro's tutorial SVI loop.

The 784-400-50 Bernoulli VAE on grayscale MNIST (Bernoulli on intensities, as in
Pyro's tutorial), batch 128, Adam 1e-3, identical initial weights. Each epoch,
the three are run one after another in rotating order, so machine drift hits
all of them alike; fit continues across epochs through `resume`, keeping its
optimiser state. Reported: median seconds per epoch, images per second, ratios
to plain PyTorch, and the test ELBO of each after the same number of epochs.

    python benchmarks/train_throughput.py --data-dir ../shared/data --epochs 5
"""

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import pyro
from pyro.infer import SVI, Trace_ELBO

import pyrovae

sys.path.insert(0, str(Path(__file__).parent))
from mnist_elbo import elbo_terms, test_elbo  # noqa: E402  (the shared plain-PyTorch reference)


def plain_epoch(vae, opt, x, gen, batch_size=128):
    t0 = time.perf_counter()
    perm = torch.randperm(len(x), generator=gen)
    for i in range(0, len(x), batch_size):
        loss = -elbo_terms(vae, x[perm[i:i + batch_size]]).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def svi_epoch(svi, x, gen, batch_size=128):
    """Exactly the tutorial's loop: svi.step per mini-batch, Pyro's default validation."""
    t0 = time.perf_counter()
    perm = torch.randperm(len(x), generator=gen)
    for i in range(0, len(x), batch_size):
        svi.step(x[perm[i:i + batch_size]])
    return time.perf_counter() - t0


def main(args):
    splits = pyrovae.load_dataset("mnist", root=args.data_dir, binarize="none", subset=args.subset)
    x = splits.train
    torch.manual_seed(0)
    vae0 = pyrovae.VAE(splits.event_shape, latent_dim=50, hidden=(400,), likelihood_options={"allow_fractional": True})
    models = {}
    for name in ("fit", "plain", "svi"):  # distinct pyro.module names: one param store serves all three
        models[name] = pyrovae.VAE(config=dataclasses.replace(vae0.config, name=name))
        models[name].load_state_dict(vae0.state_dict())
    pyro.clear_param_store()
    opt_plain = torch.optim.Adam(models["plain"].parameters(), lr=1e-3)
    svi = SVI(models["svi"].model, models["svi"].guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    gens = {name: torch.Generator().manual_seed(0) for name in ("plain", "svi")}
    times = {name: [] for name in models}
    run_dir = Path(tempfile.mkdtemp()) / "fit"

    def run_fit(epoch):
        r = pyrovae.fit(models["fit"].model, models["fit"].guide, x, epochs=epoch, batch_size=128, lr=1e-3,
                        seed=0, device="cpu", progress=False, run_dir=None if epoch > 1 else run_dir,
                        resume=run_dir if epoch > 1 else None, validate=args.validate)
        return r.history[-1]["seconds"]

    runners = {
        "fit": run_fit,
        "plain": lambda epoch: plain_epoch(models["plain"], opt_plain, x, gens["plain"]),
        "svi": lambda epoch: svi_epoch(svi, x, gens["svi"]),
    }
    names = list(runners)
    for epoch in range(1, args.epochs + 1):
        order = names[epoch % 3:] + names[:epoch % 3]
        for name in order:
            times[name].append(runners[name](epoch))
        print(f"epoch {epoch}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names), flush=True)

    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"\nMNIST {len(x)} train images, batch 128, torch threads {torch.get_num_threads()}, "
          f"{args.epochs} alternating epochs each (median)")
    print(f"{'':24s}{'s/epoch':>9s}{'images/s':>10s}{'vs plain':>10s}{'test ELBO':>12s}")
    for n, label in (("plain", "plain PyTorch"), ("fit", "pyrovae.fit"), ("svi", "Pyro SVI (tutorial)")):
        e, se = test_elbo(models[n], splits.test)
        print(f"{label:24s}{med[n]:9.2f}{len(x) / med[n]:10.0f}{med[n] / med['plain']:10.2f}{e:9.2f} ± {se:.2f}")


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--validate", default="first", choices=["first", "always"])
    return p


if __name__ == "__main__":
    main(parser().parse_args())
