"""Images per second of `pyrovae train` in one process and data-parallel under torchrun.

The 784-400-50 Bernoulli VAE on MNIST (dynamic binarisation), batch 128 per
process, for --epochs epochs; the figure is the median epoch time from the
run's own metrics.csv (epoch 1, which records the static graph, excluded when
there are more). Configurations, alternated --repeats times so drift hits all:
one process with all cores as torch threads, one process with one thread, and
N processes with one thread each. On N cores the last is the data-parallel
speed-up; on a GPU machine, add --device cuda and N GPUs.

    python benchmarks/distributed_speed.py --data-dir ../shared/data --procs 2
"""

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(procs, threads, args, run_dir):
    train = ["train", "--dataset", "mnist", "--data-dir", args.data_dir, "--hidden", "400", "--latent-dim", "50",
             "--batch-size", "128", "--epochs", str(args.epochs), "--eval-particles", "0", "--no-progress",
             "--device", args.device, "--run-dir", str(run_dir)] + (["--subset", str(args.subset)] if args.subset else [])
    if procs == 1:
        cmd = [sys.executable, "-m", "pyrovae", *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               "-m", "pyrovae", *train]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(p.stdout[-2000:] + p.stderr[-2000:])
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    secs = [float(r["seconds"]) for r in rows]
    return statistics.median(secs[1:] if len(secs) > 1 else secs)


def main(args):
    cores = os.cpu_count()
    configs = [(1, cores), (1, 1), (args.procs, max(1, cores // args.procs))]
    times = {c: [] for c in configs}
    tmp = Path(tempfile.mkdtemp())
    for r in range(args.repeats):
        for i, c in enumerate(configs[r % 3:] + configs[:r % 3]):
            t = run(*c, args, tmp / f"r{r}-{c[0]}x{c[1]}")
            times[c].append(t)
            print(f"repeat {r + 1}: {c[0]} process(es) x {c[1]} thread(s): {t:.2f} s/epoch", flush=True)
    n_train = 50000 if not args.subset else args.subset
    base = statistics.median(times[configs[0]])
    print(f"\nMNIST train split ({n_train} images), {args.epochs} epochs per run, {cores} cores, median of {args.repeats}")
    print(f"{'configuration':32s}{'s/epoch':>9s}{'images/s':>10s}{'speed-up':>10s}")
    for c in configs:
        t = statistics.median(times[c])
        print(f"{f'{c[0]} process(es) x {c[1]} thread(s)':32s}{t:9.2f}{n_train / t:10.0f}{base / t:10.2f}")


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--device", default="cpu")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
