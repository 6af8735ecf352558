"""Test ELBO and time per epoch: pyrovae.fit versus plain PyTorch, same network.

The 784-400-50 Bernoulli VAE on grayscale MNIST pixels (as in Pyro's VAE
tutorial: Bernoulli likelihood on intensities in [0, 1]), batch 128, Adam 1e-3.
Both runs start from the same initial weights; both are scored by the same
plain-PyTorch ELBO evaluator on the 10,000 test images.

    python benchmarks/mnist_elbo.py --data-dir ../shared/data --epochs 10
"""

import argparse
import copy
import math
import statistics
import time

import torch
import torch.nn.functional as F

import pyrovae


def elbo_terms(vae, x):
    """Single-sample ELBO per image, written directly in PyTorch (the reference)."""
    loc, scale = vae.encoder(x)
    z = loc + scale * torch.randn_like(loc)
    (logits,) = vae.decoder(z)
    log_px = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    log_pz = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(1)
    log_qz = (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(1)
    return log_px + log_pz - log_qz


@torch.no_grad()
def test_elbo(vae, x, samples=5):
    torch.manual_seed(123)
    vals = torch.stack([torch.cat([elbo_terms(vae, x[i:i + 1000]) for i in range(0, len(x), 1000)]) for _ in range(samples)]).mean(0)
    return vals.mean().item(), (vals.std() / math.sqrt(len(vals))).item()


def plain_torch(vae, x_train, *, epochs, batch_size, lr, seed):
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(x_train), batch_size):
            xb = x_train[perm[i:i + batch_size]]
            loss = -elbo_terms(vae, xb).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    return times


def main(args):
    splits = pyrovae.load_dataset("mnist", root=args.data_dir, binarize="none", subset=args.subset)
    torch.manual_seed(args.seed)
    vae0 = pyrovae.VAE(splits.event_shape, latent_dim=50, hidden=(400,), likelihood="bernoulli",
                       likelihood_options={"allow_fractional": True})
    vae_fit, vae_plain = copy.deepcopy(vae0), copy.deepcopy(vae0)

    result = pyrovae.fit(vae_fit.model, vae_fit.guide, splits.train, epochs=args.epochs, batch_size=128,
                         lr=1e-3, seed=args.seed, device="cpu", progress=False)
    fit_times = [h["seconds"] for h in result.history]
    plain_times = plain_torch(vae_plain, splits.train, epochs=args.epochs, batch_size=128, lr=1e-3, seed=args.seed)

    e_fit, se_fit = test_elbo(vae_fit, splits.test)
    e_plain, se_plain = test_elbo(vae_plain, splits.test)
    print(f"MNIST grayscale, 784-400-50 Bernoulli VAE, {args.epochs} epochs, batch 128, Adam 1e-3, "
          f"{len(splits.train)} train / {len(splits.test)} test images, torch threads {torch.get_num_threads()}")
    print(f"test ELBO  pyrovae.fit : {e_fit:9.3f} ± {se_fit:.3f} nats/image")
    print(f"test ELBO  plain torch : {e_plain:9.3f} ± {se_plain:.3f} nats/image")
    print(f"difference             : {e_fit - e_plain:+9.3f} nats/image")
    mf, mp = statistics.median(fit_times), statistics.median(plain_times)
    print(f"median s/epoch  fit {mf:.2f}  plain {mp:.2f}  ratio {mf / mp:.2f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    main(p.parse_args())
