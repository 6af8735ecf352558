"""log_marginal speed and memory versus a hand-vectorised PyTorch sampler and pyro.infer.Importance.

Model: the 784-400-50 Bernoulli VAE (untrained weights do not change the cost).
Data: the first N MNIST test images (random binary images if the files are absent).
Runs alternate (ours, hand-written) so machine drift cancels; the median of each is reported.
Pyro's Importance runs image by image, on a subset, and is scaled to N images.
Peak memory of K = 5000 is measured in a fresh subprocess (ru_maxrss).

    python benchmarks/importance_speed.py --data-dir ../shared/data --images 1000 --particles 1000
"""

import argparse
import math
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from pyro.infer import Importance

import pyrovae


def hand_vectorised(vae, x, K, chunk):
    """What a careful PyTorch user writes: chunked particles, streaming float64 log-sum-exp."""
    with torch.no_grad():
        loc, scale = vae.encoder(x)
        m = s = None
        for start in range(0, K, chunk):
            c = min(chunk, K - start)
            z = loc + scale * torch.randn(c, *loc.shape)
            (logits,) = vae.decoder(z)
            log_px = -F.binary_cross_entropy_with_logits(logits, x.expand(c, *x.shape), reduction="none").flatten(2).sum(-1)
            log_pz = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1)
            log_qz = (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
            lw = (log_px + log_pz - log_qz).double()
            cm = lw.max(0).values
            nm = cm if m is None else torch.maximum(m, cm)
            t = (lw - nm).exp().sum(0)
            s = t if s is None else s * (m - nm).exp() + t
            m = nm
        return m + s.log() - math.log(K)


def pyro_importance(vae, x, K):
    out = []
    for i in range(len(x)):
        xi = x[i : i + 1]
        imp = Importance(vae.model, vae.guide, num_samples=K).run(xi)
        out.append(imp.get_log_normalizer().item())
    return torch.tensor(out)


def load(args):
    try:
        s = pyrovae.load_dataset("mnist", root=args.data_dir, binarize="static", subset=args.images)
        return s.test, "MNIST test (statically binarised)"
    except ValueError:
        return torch.bernoulli(torch.full((args.images, 1, 28, 28), 0.13)), "random binary images"


def peak_memory_child(args):
    torch.manual_seed(0)
    vae = pyrovae.VAE((1, 28, 28), latent_dim=50, hidden=(400,))
    x, _ = load(args)
    x = x[: args.mem_images]
    est = pyrovae.log_marginal(vae.model, vae.guide, x, num_particles=5000, chunk_size=args.chunk_size)
    print(f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} {est.log_marginal.mean().item():.3f}")


def main(args):
    if args.memory_child:
        return peak_memory_child(args)
    torch.manual_seed(0)
    vae = pyrovae.VAE((1, 28, 28), latent_dim=50, hidden=(400,)).eval()
    x, what = load(args)
    K, chunk = args.particles, args.chunk_size
    print(f"{what}: N={len(x)}, K={K}, chunk={chunk}, torch threads {torch.get_num_threads()}")
    # One-time costs (importing ArviZ for k-hat) are paid before timing.
    pyrovae.log_marginal(vae.model, vae.guide, x[:4], num_particles=20)
    ours, hand = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        pyrovae.log_marginal(vae.model, vae.guide, x, num_particles=K, chunk_size=chunk)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        hand_vectorised(vae, x, K, chunk)
        hand.append(time.perf_counter() - t)
    mo, mh = statistics.median(ours), statistics.median(hand)
    print(f"pyrovae.log_marginal      : {mo:8.2f} s  (median of {args.repeats}, includes PSIS k-hat and bound ladder)")
    print(f"hand-vectorised PyTorch   : {mh:8.2f} s")
    print(f"ratio ours / hand         : {mo / mh:8.2f}   (target <= 1.25)")
    n_imp = min(args.importance_images, len(x))
    t = time.perf_counter()
    pyro_importance(vae, x[:n_imp], K)
    ti = (time.perf_counter() - t) * len(x) / n_imp
    print(f"pyro Importance, per image: {ti:8.2f} s  (timed on {n_imp} images, scaled to {len(x)})")
    print(f"speed-up over Importance  : {ti / mo:8.1f}x  (target >= 30)")
    out = subprocess.run([sys.executable, __file__, "--memory-child", "--data-dir", str(args.data_dir),
                          "--images", str(args.images), "--mem-images", str(args.mem_images),
                          "--chunk-size", str(chunk)], capture_output=True, text=True, check=True)
    rss, mean = out.stdout.split()
    print(f"peak RSS, K=5000 on {args.mem_images} images, chunk {chunk}: {rss} MiB (target < 2048)")


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--particles", type=int, default=1000)
    p.add_argument("--chunk-size", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--importance-images", type=int, default=20)
    p.add_argument("--mem-images", type=int, default=1000)
    p.add_argument("--memory-child", action="store_true")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
