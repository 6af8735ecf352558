"""One chunk of log_marginal's particles against the same chunk by hand and by plain Pyro.

``importance_speed.py`` times whole calls, whose ratio moves by several percent from run to
run on a shared VM (page faults, neighbours). This script takes the steady-state unit of
work instead, one chunk of particles, and alternates three ways of computing its log
weights many times in one process:

* ``hand``: the tutorial pair's networks and densities in plain PyTorch, the encoder computed
  once (``tutorial_vae.hand_chunk``, as ``hand_log_marginal`` runs it);
* ``pyrovae``: the particle pass that ``log_marginal`` runs for every chunk after the first
  (its plate, the guide's density by broadcasting, early scoring, the round-off scale, the
  encoder reused), at the chunk size ``log_marginal`` picks by default;
* ``plain Pyro``: the shortest vectorised pass a Pyro user writes: a particle plate around
  ``trace(guide)`` and ``trace(replay(model))``, and ``Trace.compute_log_prob``.
* ``replayed``: the same pass replayed from a :class:`pyrovae.tape.Tape` of it, as
  ``log_marginal`` runs its chunks once a call has ``TAPE_MIN_CHUNKS`` of them.

The medians and the median of the back-to-back ratios are printed. ``plain Pyro`` shows
the cost of running a Pyro program once per chunk, below which no pass that runs it can go.
With ``--threads 1`` the difference to ``hand`` is what runs serially (Python and small
operations); with more threads the parallel operations shrink and it stays.

    python benchmarks/importance_chunk.py --data-dir ../shared/data --images 300 --calls 200
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from pyrovae import weights
from pyrovae.reuse import ReusedCalls
from pyrovae.tape import Tape

sys.path.insert(0, str(Path(__file__).parent))
import importance_speed  # noqa: E402
import tutorial_vae  # noqa: E402


def default_chunk(tut, x, structure) -> int:
    """The particles per chunk that ``log_marginal`` uses after its first chunk, on the CPU."""
    probe = weights.first_chunk_size(structure, 10**9)
    first = weights.particle_pass(tut.model, tut.guide, (x,), {}, structure, probe)
    return weights.auto_chunk_size(weights._trace_bytes(first), probe, x.device, 10**9)


def plain_pyro_pass(model, guide, x, num: int) -> torch.Tensor:
    with pyro.plate("particles", num, dim=-2):
        guide_trace = poutine.trace(guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    lw = 0.0
    for trace, sign in ((model_trace, 1), (guide_trace, -1)):
        trace.compute_log_prob()
        for site in trace.nodes.values():
            if site["type"] == "sample" and not site_is_subsample(site):
                lw = lw + sign * site["log_prob"]
    return lw


def _outputs(tut, x, structure, num, broadcasting):
    p = weights.particle_pass(tut.model, tut.guide, (x,), {}, structure, num, broadcasting)
    return [p.log_weights, p.roundoff]


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tut = tutorial_vae.copies(["chunk"])["chunk"].eval()
    data, what = importance_speed.load(args)
    x = data.flatten(1)
    with torch.no_grad(), pyro.validation_enabled(False), ReusedCalls([tut.encoder, tut.decoder]):
        structure = weights.inspect_pair(tut.model, tut.guide, (x,), {}, plate="data")
        num = args.particles or default_chunk(tut, x, structure)
        first = weights.particle_pass(tut.model, tut.guide, (x,), {}, structure, num)
        broadcasting = weights._Broadcasting()
        broadcasting.approve(first)
        del first
        loc, scale = tut.encoder(x)
        _, tape = Tape.record(lambda: _outputs(tut, x, structure, num, broadcasting))
        contenders = {
            "hand": lambda: tutorial_vae.hand_chunk(tut, x, loc, scale, num),
            "pyrovae": lambda: weights.particle_pass(tut.model, tut.guide, (x,), {}, structure, num,
                                                     broadcasting).log_weights,
            "plain Pyro": lambda: plain_pyro_pass(tut.model, tut.guide, x, num),
            "replayed": tape,
        }
        times = {name: [] for name in contenders}
        for fn in contenders.values():
            fn(), fn()
        for _ in range(args.calls):
            for name, fn in contenders.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    print(f"{what}: N={len(x)}, {num} particles per chunk, {args.calls} alternating calls, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'':12s}{'median ms':>10s}{'paired ratio to hand':>22s}")
    for name, ts in times.items():
        paired = statistics.median(a / b for a, b in zip(ts, times["hand"]))
        print(f"{name:12s}{statistics.median(ts) * 1e3:10.2f}{paired:22.3f}")


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--particles", type=int, default=0, help="particles per chunk; 0: log_marginal's default")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
