"""log_marginal speed and memory versus a hand-vectorised PyTorch sampler and pyro.infer.Importance.

Two pairs: the library's 784-400-50 Bernoulli VAE, and a pair written as Pyro's
tutorial writes it (``tutorial_vae.py``: sigmoid decoder, Bernoulli ``probs``).
Untrained weights do not change the cost. ``log_marginal`` runs at its default
settings (chunks sized by memory, PSIS k-hat and the bound ladder included);
the hand-written sampler uses ``--chunk-size`` particles per pass.
Data: the first N MNIST test images (random binary images if the files are absent).
Runs alternate (ours, hand-written) so machine drift cancels; the median of each is reported,
their ratio, and the median of the ratios of the runs made back to back. With ``--isolate``
every timed call runs in a fresh process (after one warm-up call there), so that neither
runs on the allocator state the other left; the minor page faults per call are printed.
Pyro's Importance runs image by image, on a subset, and is scaled to N images.
Peak memory of K = 5000 is measured in a fresh subprocess, as the peak of the bytes held by tensors
during the call above those held before it (``torch.profiler``'s allocation records on a CPU, the
caching allocator's statistics on CUDA).

    python benchmarks/importance_speed.py --data-dir ../shared/data --images 300 --particles 1000
    python benchmarks/importance_speed.py --data-dir ../shared/data --images 10000 --particles 5000 --device cuda \
        --importance-images 0
"""

import argparse
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from pyro.infer import Importance

import pyrovae
from pyrovae.distributed import resolve_device

sys.path.insert(0, str(Path(__file__).parent))
import tutorial_vae  # noqa: E402
from timing import timed  # noqa: E402


def hand_vectorised(vae, x, K, chunk):
    """What a careful PyTorch user writes: chunked particles, streaming float64 log-sum-exp."""
    with torch.no_grad():
        loc, scale = vae.encoder(x)

        def chunks():
            for start in range(0, K, chunk):
                c = min(chunk, K - start)
                z = loc + scale * torch.randn(c, *loc.shape, device=loc.device)
                (logits,) = vae.decoder(z)
                log_px = -F.binary_cross_entropy_with_logits(logits, x.expand(c, *x.shape),
                                                             reduction="none").flatten(2).sum(-1)
                log_pz = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1)
                log_qz = (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
                yield log_px + log_pz - log_qz

        return tutorial_vae.streaming_log_mean_exp(chunks(), K)


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
    """Prints the peak memory of one ``log_marginal`` call at K = 5000 above what the process held before
    it (the data, the network), and the number of images.

    The peak of the bytes held by tensors: on CUDA from the caching allocator's statistics, on a CPU
    from ``torch.profiler``'s allocation records. (The peak resident memory, VmHWM, is no measure of the
    call: loading MNIST peaks higher than the call, and after a reset before the call it varied from 76
    to 904 MiB between runs of 1000 images, with memory that the C allocator keeps after frees.)"""
    device = resolve_device(args.device)
    torch.manual_seed(0)
    vae = pyrovae.VAE((1, 28, 28), latent_dim=50, hidden=(400,)).to(device)
    x, _ = load(args)
    x = x[: args.mem_images].to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        pyrovae.log_marginal(vae.model, vae.guide, x, num_particles=5000)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            pyrovae.log_marginal(vae.model, vae.guide, x, num_particles=5000)
        peak = _tensor_peak(prof)
    print(f"{peak / 2**20:.0f} {len(x)}")


def _tensor_peak(prof) -> int:
    """The largest number of bytes held by tensors at once during ``prof``, above those held at its start."""
    held = peak = 0
    for event in prof.profiler.kineto_results.events():
        if event.name() == "[memory]":  # an allocation (positive) or a free (negative)
            held += event.nbytes()
            peak = max(peak, held)
    return peak


def timed_pair(label, ours, hand, repeats, device):
    """Alternate ``ours()`` and ``hand()``; returns a line of the table and the median of ours.

    The line ends with the median minor page faults per call of each (thousands): memory that
    the allocator gave back to the system and that a chunk faults in again, page by page,
    one source of the spread between runs on a shared machine."""
    ours(), hand()  # one-time costs (importing ArviZ for k-hat, kernels) are paid before timing
    t_ours, t_hand, f_ours, f_hand = [], [], [], []
    for _ in range(repeats):
        for fn, times, faults in ((ours, t_ours, f_ours), (hand, t_hand, f_hand)):
            seconds, minor = timed(fn, device)
            times.append(seconds)
            faults.append(minor)
    return _table_line(label, t_ours, t_hand, f_ours, f_hand)


def contenders(args, device):
    """The data, the library VAE, a description of the data, and ``{pair: (label, ours, hand)}``: the calls
    to time, with the same weights and data in every process."""
    torch.manual_seed(0)
    vae = pyrovae.VAE((1, 28, 28), latent_dim=50, hidden=(400,)).eval().to(device)
    tut = tutorial_vae.copies(["speed"])["speed"].eval().to(device)
    x, what = load(args)
    x = x.to(device)
    xf = x.flatten(1)
    K, chunk = args.particles, args.chunk_size
    return x, vae, what, {
        "library": ("library VAE", lambda: pyrovae.log_marginal(vae.model, vae.guide, x, num_particles=K),
                    lambda: hand_vectorised(vae, x, K, chunk)),
        "tutorial": ("tutorial pair (sigmoid, probs)",
                     lambda: pyrovae.log_marginal(tut.model, tut.guide, xf, num_particles=K),
                     lambda: tutorial_vae.hand_log_marginal(tut, xf, K, chunk)),
    }


def timing_child(args):
    """One warm-up call and one timed call of one contender, in a process of its own."""
    device = resolve_device(args.device)
    *_, calls = contenders(args, device)
    _, ours, hand = calls[args.pair]
    fn = ours if args.timing_child == "ours" else hand
    fn()
    print(*timed(fn, device))


def timed_isolated(label, pair, args):
    """As :func:`timed_pair`, but every timed call runs in a fresh process (after one warm-up call
    there), so that neither contender runs on the allocator state the other left."""
    t_ours, t_hand, f_ours, f_hand = [], [], [], []
    for _ in range(args.repeats):
        for who, times, faults in (("ours", t_ours, f_ours), ("hand", t_hand, f_hand)):
            out = subprocess.run([sys.executable, __file__, "--timing-child", who, "--pair", pair,
                                  "--data-dir", str(args.data_dir), "--images", str(args.images),
                                  "--particles", str(args.particles), "--chunk-size", str(args.chunk_size),
                                  "--device", args.device], capture_output=True, text=True, check=True)
            seconds, minor = out.stdout.split()[-2:]
            times.append(float(seconds))
            faults.append(int(minor))
    return _table_line(label, t_ours, t_hand, f_ours, f_hand)


def _table_line(label, t_ours, t_hand, f_ours, f_hand):
    mo, mh = statistics.median(t_ours), statistics.median(t_hand)
    paired = statistics.median(o / h for o, h in zip(t_ours, t_hand))  # each pair ran back to back
    faults = f"{statistics.median(f_ours) / 1e3:6.0f}k/{statistics.median(f_hand) / 1e3:.0f}k"
    return f"{label:34s}{mo:9.2f}{mh:9.2f}{mo / mh:8.2f}{paired:9.2f}{faults:>14s}", mo


def main(args):
    if args.memory_child:
        return peak_memory_child(args)
    if args.timing_child:
        return timing_child(args)
    device = resolve_device(args.device)
    x, vae, what, calls = contenders(args, device)
    K, chunk = args.particles, args.chunk_size
    where = "each timed call in a fresh process" if args.isolate else "alternating calls in one process"
    print(f"{what}: N={len(x)}, K={K}, hand-written chunk={chunk}, on {device}, torch threads "
          f"{torch.get_num_threads()}, {where}")
    print(f"{'':34s}{'ours s':>9s}{'hand s':>9s}{'ratio':>8s}{'paired':>9s}{'faults o/h':>14s}   (medians of "
          f"{args.repeats}; ratio: of the medians; paired: median of the ratios of runs made back to back; faults: "
          "minor page faults per call; ours at default settings, k-hat and bound ladder included)")
    ours_median = {}
    for pair in ("library", "tutorial"):
        if pair in args.pairs:
            label, ours, hand = calls[pair]
            if args.isolate:
                line, ours_median[pair] = timed_isolated(label, pair, args)
            else:
                line, ours_median[pair] = timed_pair(label, ours, hand, args.repeats, device)
            print(line, flush=True)
    n_imp = min(args.importance_images, len(x)) if "library" in ours_median else 0
    if n_imp:
        t = time.perf_counter()
        pyro_importance(vae, x[:n_imp], K)
        ti = (time.perf_counter() - t) * len(x) / n_imp
        print(f"pyro Importance, per image: {ti:8.2f} s  (timed on {n_imp} images, scaled to {len(x)})")
        print(f"speed-up over Importance  : {ti / ours_median['library']:8.1f}x  (target >= 30)")
    if args.mem_images:
        out = subprocess.run([sys.executable, __file__, "--memory-child", "--data-dir", str(args.data_dir),
                              "--images", str(args.images), "--mem-images", str(args.mem_images),
                              "--device", args.device], capture_output=True, text=True, check=True)
        peak, n = out.stdout.splitlines()[-1].split()
        kind = "GPU allocator" if device.type == "cuda" else "torch.profiler's allocation records"
        print(f"peak tensor memory of the call, K=5000 on {n} images, default chunks: {peak} MiB ({kind})")


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
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--isolate", action="store_true",
                   help="time every call in a fresh process of its own (after one warm-up call there)")
    p.add_argument("--timing-child", choices=["ours", "hand"], help=argparse.SUPPRESS)
    p.add_argument("--pair", choices=["library", "tutorial"], help=argparse.SUPPRESS)
    p.add_argument("--pairs", nargs="+", choices=["library", "tutorial"], default=["library", "tutorial"],
                   help="which pairs to time (the comparison with Importance needs 'library')")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
