"""When does recording a static graph pay for itself? The figures behind ``STATIC_GRAPH_MIN_STEPS``.

With ``static_graph="auto"``, ``fit`` records the step as a static graph (and, on CUDA, replays
it as CUDA graphs) only when the call has at least ``STATIC_GRAPH_MIN_STEPS[device type]``
steps to run: recording and checking are a one-off cost that faster steps must pay back.
This script times whole ``fit`` calls of the library's VAE (784-400-50 by default) at batch 128 on
random intensities (no data files), with ``static_graph=False`` and ``True``, for several
numbers of steps, alternating the two in one process after one warm-up call of each. A fresh
model per call, so every static call records its graph from scratch. It fits each mode's
times with ``a + b * steps`` and prints the break-even ``(a_static - a_eager) / (b_eager -
b_static)``. The first calls of a process cost more: the first eager call pays the device's own
start (CUDA loads its kernels lazily), the first static call what recording needs once (imports,
first compilations). The script makes these two calls first, in that order, reports each one's
excess over the later calls, and gives the break-even of a process's first static call too.

    python benchmarks/static_threshold.py --device cuda
    python benchmarks/static_threshold.py --device cpu --steps 25 50 100 200 400
"""

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
import pyro

import pyrovae
from pyrovae.distributed import resolve_device
from pyrovae.train import STATIC_GRAPH_MIN_STEPS

sys.path.insert(0, str(Path(__file__).parent))
from timing import sync  # noqa: E402

BATCH = 128


def one_call(x, steps, static, device, i, hidden=400, latent=50):
    """Seconds of one whole fit call of ``steps`` steps; a fresh VAE (own param names) each time."""
    torch.manual_seed(0)
    vae = pyrovae.VAE((784,), latent_dim=latent, hidden=(hidden,), name=f"vae{i}",
                      likelihood_options={"allow_fractional": True}).to(device)
    data = x[:steps * BATCH]
    sync(device)
    t0 = time.perf_counter()
    r = pyrovae.fit(vae.model, vae.guide, data, epochs=1, batch_size=BATCH, lr=1e-3, seed=0, device=str(device),
                    progress=False, static_graph=static)
    sync(device)
    seconds = time.perf_counter() - t0
    if static and not r.static_graph:
        raise SystemExit(f"static_graph=True did not replay a static graph: {r.static_graph_off}")
    pyro.clear_param_store()
    return seconds, r


def line_fit(ns, ts):
    mean_n, mean_t = statistics.fmean(ns), statistics.fmean(ts)
    b = sum((n - mean_n) * (t - mean_t) for n, t in zip(ns, ts)) / sum((n - mean_n) ** 2 for n in ns)
    return mean_t - b * mean_n, b


def main(args):
    device = resolve_device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(max(args.steps) * BATCH, 784, generator=gen).to(device)
    counter = itertools.count()
    # the process's first calls: eager first (it pays the device's own start, such as CUDA's lazy
    # kernel loading), then static (it pays what only recording needs the first time)
    first_eager, _ = one_call(x, args.steps[0], False, device, next(counter), args.hidden, args.latent)
    first_static, _ = one_call(x, args.steps[0], True, device, next(counter), args.hidden, args.latent)
    times = {(n, s): [] for n in args.steps for s in (False, True)}
    graphs = None
    for rep in range(args.repeats):
        for n in args.steps:
            for s in ((False, True) if rep % 2 == 0 else (True, False)):
                t, r = one_call(x, n, s, device, next(counter), args.hidden, args.latent)
                times[(n, s)].append(t)
                if s:
                    graphs = r.cuda_graph
        print(f"repeat {rep + 1} done", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    a_e, b_e = line_fit(args.steps, [med[(n, False)] for n in args.steps])
    a_s, b_s = line_fit(args.steps, [med[(n, True)] for n in args.steps])
    print(f"\nfit of the 784-{args.hidden}-{args.latent} VAE, batch {BATCH}, on {device} (torch threads {torch.get_num_threads()}), "
          f"whole calls, median of {args.repeats}; static calls {'replay CUDA graphs' if graphs else 'replay the graph'}")
    print(f"{'steps':>6s}{'eager s':>10s}{'static s':>10s}{'ratio':>8s}")
    for n in args.steps:
        print(f"{n:6d}{med[(n, False)]:10.3f}{med[(n, True)]:10.3f}{med[(n, True)] / med[(n, False)]:8.2f}")
    print(f"per step: eager {1e3 * b_e:.2f} ms, static {1e3 * b_s:.2f} ms; per call: eager {a_e:.2f} s, "
          f"static {a_s:.2f} s (recording and checking: {a_s - a_e:.2f} s more)")
    n0 = args.steps[0]
    once = first_static - med[(n0, True)]
    print(f"first calls of the process, over the later ones: eager {first_eager - med[(n0, False)]:+.2f} s "
          f"(the device's own start), then static {once:+.2f} s (recording's own first time)")
    if b_e > b_s:
        print(f"break-even: {(a_s - a_e) / (b_e - b_s):.0f} steps for a later call of a process, "
              f"{(a_s - a_e + once) / (b_e - b_s):.0f} for its first static call "
              f"(STATIC_GRAPH_MIN_STEPS[{device.type!r}] = {STATIC_GRAPH_MIN_STEPS.get(device.type)})")
    else:
        print("break-even: none (static steps are not faster here)")


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100, 200, 400, 800])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=400, help="width of the one hidden layer")
    p.add_argument("--latent", type=int, default=50)
    return p


if __name__ == "__main__":
    sys.exit(main(parser().parse_args()))
