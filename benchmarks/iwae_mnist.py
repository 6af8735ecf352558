"""Test log p(x) at K=5000: a VAE trained with the IWAE-K bound against the same VAE trained with the ELBO.

The 784-400-50 Bernoulli VAE of Burda et al. (2016), smaller training budget:
dynamically binarised MNIST (a fresh Bernoulli draw of every training batch),
50,000 training images, batch 128, Adam 1e-3, 20 epochs. Both runs start from
the same initial weights and the same seed and see the same number of
particles per datapoint per step; only the objective differs:

* ``elbo="trace"`` with ``num_particles=K``: Trace_ELBO, the mean of K ELBO estimates;
* ``elbo="iwae"`` with ``num_particles=K``: the per-datapoint IWAE-K bound.

Both are scored by ``pyrovae.log_marginal`` at K=5000 on a fixed subset of the
test split: its first ``--eval-images`` images, binarised once by
``load_dataset`` (static draw with seed 2). The figure of merit is the paired
per-datapoint difference ``log p_iwae(x_i) - log p_elbo(x_i)`` with its
standard error over the images; the Monte Carlo error of each estimate is
reported too, with its k-hat verdict.

    nice -n 10 python benchmarks/iwae_mnist.py --data-dir /work/shared/data

writes ``benchmarks/results/iwae_mnist.txt`` (the report), ``.json`` (every
figure) and ``.csv`` (the per-image estimates, to recompute the difference).
On a shared machine the seconds per epoch of the long runs are disturbed by
other jobs; ``--timing-repeats 3`` times the two objectives alone, alternating
(``iwae_mnist.timing.txt``), with CPU time beside wall time.
"""

import argparse
import csv
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import pyro

import pyrovae
from pyrovae.data import dynamic_binarize

RESULTS = Path(__file__).resolve().parent / "results"


def train(name, init_state, splits, args, elbo):
    """One run from the shared initial weights; returns the VAE and its epoch history.

    With ``--checkpoint-dir`` the run keeps a pyrovae run folder there and resumes
    from it, so a run that was killed continues where its last epoch ended.
    """
    pyro.clear_param_store()
    vae = pyrovae.VAE(splits.event_shape, latent_dim=50, hidden=(400,), likelihood="bernoulli", name=name)
    vae.load_state_dict(init_state)
    folder = {}
    if args.checkpoint_dir is not None:
        path = Path(args.checkpoint_dir) / name
        path.mkdir(parents=True, exist_ok=True)
        folder = {"resume": path}
    result = pyrovae.fit(vae.model, vae.guide, splits.train, transform=dynamic_binarize, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, elbo=elbo, num_particles=args.particles,
                         seed=args.seed, device="cpu", progress=False, **folder)
    history = [dict(h, static_graph=result.static_graph, static_graph_off=result.static_graph_off)
               for h in result.history]
    return vae, history


_FIELDS = ("log_marginal", "stderr", "ess", "khat")


def score(vae, x, args, name):
    """log p(x_i) at K=args.eval_particles for every image, in slices of args.eval_batch images.

    Each slice has its own seed, so a slice kept in ``--checkpoint-dir`` by an
    earlier, interrupted call is the one this call would compute.
    """
    parts = []
    for i in range(0, len(x), args.eval_batch):
        path = None if args.checkpoint_dir is None else \
            Path(args.checkpoint_dir) / f"{name}_K{args.eval_particles}_{i}_{args.eval_batch}.pt"
        if path is not None and path.exists():
            saved = torch.load(path, weights_only=True)
            parts.append(pyrovae.LogMarginal(**{k: saved[k] for k in _FIELDS}, bounds=saved["bounds"],
                                             num_particles=args.eval_particles))
            continue
        pyro.set_rng_seed(args.seed + 1 + i)
        est = pyrovae.log_marginal(vae.model, vae.guide, x[i:i + args.eval_batch], num_particles=args.eval_particles)
        if path is not None:
            torch.save({**{k: getattr(est, k) for k in _FIELDS}, "bounds": est.bounds}, path)
        parts.append(est)
    return pyrovae.LogMarginal.cat(parts)


def timing(init_state, splits, args):
    """Seconds per epoch of the two objectives alone, alternating which runs first.

    Each run trains 2 epochs from the shared initial weights; the second epoch's
    wall time is kept (the first includes recording the static graph of the
    trace run), and so is the CPU time of the whole call (all threads), which a
    machine shared with other jobs disturbs less than wall time.
    """
    rows = []
    for r in range(args.timing_repeats):
        for elbo in (("trace", "iwae") if r % 2 == 0 else ("iwae", "trace")):
            pyro.clear_param_store()
            vae = pyrovae.VAE(splits.event_shape, latent_dim=50, hidden=(400,), likelihood="bernoulli",
                              name=f"timing_{elbo}")
            vae.load_state_dict(init_state)
            cpu0 = time.process_time()
            result = pyrovae.fit(vae.model, vae.guide, splits.train, transform=dynamic_binarize, epochs=2,
                                 batch_size=args.batch_size, lr=args.lr, elbo=elbo, num_particles=args.particles,
                                 seed=args.seed, device="cpu", progress=False)
            rows.append({"repeat": r, "elbo": elbo, "second_epoch_seconds": result.history[1]["seconds"],
                         "cpu_seconds_two_epochs": time.process_time() - cpu0,
                         "static_graph": result.static_graph})
            print(rows[-1], flush=True)
    med = lambda elbo, key: statistics.median(row[key] for row in rows if row["elbo"] == elbo)
    out = {"rows": rows, "load_average_at_end": os.getloadavg(),
           "wall_ratio_iwae_over_trace": med("iwae", "second_epoch_seconds") / med("trace", "second_epoch_seconds"),
           "cpu_ratio_iwae_over_trace": med("iwae", "cpu_seconds_two_epochs") / med("trace", "cpu_seconds_two_epochs")}
    text = "\n".join([
        f"seconds per epoch, 784-400-50 VAE, MNIST {len(splits.train)} images, batch {args.batch_size}, "
        f"K={args.particles}; "
        f"{args.timing_repeats} alternating repeats of 2-epoch runs, medians; torch threads {torch.get_num_threads()}",
        f"wall, second epoch : trace {med('trace', 'second_epoch_seconds'):.2f} s, iwae "
        f"{med('iwae', 'second_epoch_seconds'):.2f} s, ratio iwae/trace {out['wall_ratio_iwae_over_trace']:.2f}",
        f"CPU, both epochs   : trace {med('trace', 'cpu_seconds_two_epochs'):.1f} s, iwae "
        f"{med('iwae', 'cpu_seconds_two_epochs'):.1f} s, ratio iwae/trace {out['cpu_ratio_iwae_over_trace']:.2f}",
        f"load average at the end (1, 5, 15 min): {', '.join(f'{v:.1f}' for v in out['load_average_at_end'])}",
    ]) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.timing.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / f"{args.out}.timing.txt").write_text(text)
    print(text)
    return out


def main(args):
    torch.set_num_threads(args.threads)
    splits = pyrovae.load_dataset("mnist", root=args.data_dir, binarize="dynamic", subset=args.subset)
    x_test = splits.test[:args.eval_images]
    torch.manual_seed(args.seed)
    init_state = pyrovae.VAE(splits.event_shape, latent_dim=50, hidden=(400,), likelihood="bernoulli").state_dict()
    if args.timing_repeats:
        return timing(init_state, splits, args)

    runs, estimates = {}, {}
    for elbo in ("trace", "iwae"):
        t0 = time.perf_counter()
        vae, history = train(f"vae_{elbo}", init_state, splits, args, elbo)
        t1 = time.perf_counter()
        est = score(vae, x_test, args, f"vae_{elbo}")
        t2 = time.perf_counter()
        estimates[elbo] = est
        s = est.summary()
        runs[elbo] = {
            "train_elbo_last_epoch": history[-1]["train_elbo"],
            "seconds_per_epoch": [h["seconds"] for h in history],
            "median_seconds_per_epoch": statistics.median(h["seconds"] for h in history),
            "static_graph": history[-1]["static_graph"], "static_graph_off": history[-1]["static_graph_off"],
            "test_log_marginal": s.log_marginal, "mc_stderr": s.mc_stderr, "data_stderr": s.data_stderr,
            "iwae_bounds": s.bounds, "khat_max": s.khat_max, "khat_threshold": s.khat_threshold,
            "unreliable_fraction": s.unreliable_fraction, "verdict": s.verdict, "ess_mean": s.ess_mean,
            "train_wall_seconds": t1 - t0, "eval_wall_seconds": t2 - t1,
        }
        print(f"{elbo}: trained in {t1 - t0:.0f} s, scored in {t2 - t1:.0f} s; test log p(x) {s.log_marginal:.3f}",
              flush=True)

    d = (estimates["iwae"].log_marginal - estimates["trace"].log_marginal).double()
    n = len(d)
    diff, diff_se = float(d.mean()), float(d.std() / math.sqrt(n))
    mc_se = float((estimates["iwae"].stderr.pow(2) + estimates["trace"].stderr.pow(2)).sum().sqrt() / n)
    ratio = runs["iwae"]["median_seconds_per_epoch"] / runs["trace"]["median_seconds_per_epoch"]
    out = {
        "protocol": {
            "data": splits.info(), "network": "784-400-50 MLP, Bernoulli likelihood (pyrovae.VAE)",
            "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "optimizer": "adam",
                      "particles": args.particles, "binarisation": "dynamic (fresh draw per batch)",
                      "seed": args.seed, "same_initial_weights": True},
            "eval": {"num_particles": args.eval_particles, "images": f"first {n} of the test split",
                     "binarisation": "static, load_dataset seed for the test split (seed + 2)",
                     "rng_seed": args.seed + 1},
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "pyro": pyro.__version__,
            "machine": platform.processor() or platform.machine(),
        },
        "runs": runs,
        "paired_difference": {"mean": diff, "stderr": diff_se, "z": diff / diff_se, "mc_stderr": mc_se,
                              "fraction_iwae_better": float((d > 0).double().mean())},
        "seconds_per_epoch_ratio_iwae_over_trace": ratio,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = str(RESULTS / args.out)
    Path(stem + ".json").write_text(json.dumps(out, indent=2) + "\n")
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["test_index", "log_marginal_trace", "log_marginal_iwae", "stderr_trace", "stderr_iwae"])
        for i in range(n):
            w.writerow([i, f"{float(estimates['trace'].log_marginal[i]):.4f}",
                        f"{float(estimates['iwae'].log_marginal[i]):.4f}",
                        f"{float(estimates['trace'].stderr[i]):.5f}", f"{float(estimates['iwae'].stderr[i]):.5f}"])
    lines = [
        f"MNIST, dynamic binarisation, 784-400-50 Bernoulli VAE, {args.epochs} epochs, batch {args.batch_size}, "
        f"Adam {args.lr}, K={args.particles} particles per datapoint in training for both objectives, "
        f"seed {args.seed}, same initial weights; {len(splits.train)} training images; "
        f"torch threads {torch.get_num_threads()}",
        f"test log p(x): pyrovae.log_marginal, K={args.eval_particles}, first {n} test images "
        f"(static binarisation of load_dataset)",
        "",
        f"{'objective':<10} {'log p(x)':>10} {'± data SE':>10} {'± MC SE':>9} {'k-hat max':>9} {'IWAE-5 bd':>10} "
        f"{'ELBO':>9} {'s/epoch':>8}",
    ]
    for elbo, r in runs.items():
        lines.append(f"{elbo:<10} {r['test_log_marginal']:10.3f} {r['data_stderr']:10.3f} {r['mc_stderr']:9.4f} "
                     f"{r['khat_max']:9.2f} {r['iwae_bounds'].get(5, float('nan')):10.3f} "
                     f"{r['iwae_bounds'][1]:9.3f} {r['median_seconds_per_epoch']:8.2f}")
    lines += [
        "",
        f"paired difference iwae - trace: {diff:+.3f} ± {diff_se:.3f} nats/image (SE over images; z = "
        f"{diff / diff_se:.1f}); MC SE of the difference {mc_se:.4f}; IWAE better on "
        f"{100 * out['paired_difference']['fraction_iwae_better']:.1f}% of images",
        f"seconds per epoch (median): iwae / trace = {ratio:.2f}",
        f"static graph: trace {runs['trace']['static_graph']} ({runs['trace']['static_graph_off']}), "
        f"iwae {runs['iwae']['static_graph']} ({runs['iwae']['static_graph_off']})",
        f"k-hat verdicts: trace: {runs['trace']['verdict']}; iwae: {runs['iwae']['verdict']}",
    ]
    text = "\n".join(lines) + "\n"
    Path(stem + ".txt").write_text(text)
    print(text)
    return out


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="/work/shared/data")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--particles", type=int, default=5, help="K in training, for both objectives")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-particles", type=int, default=5000)
    p.add_argument("--eval-images", type=int, default=2000)
    p.add_argument("--eval-batch", type=int, default=50, help="test images per log_marginal call")
    p.add_argument("--subset", type=int, default=None, help="cut every split (a smoke test; not the protocol)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", default=None,
                   help="keep run folders and scored slices here; a rerun resumes from them")
    p.add_argument("--timing-repeats", type=int, default=0,
                   help="only time the two objectives: this many alternating repeats of 2-epoch runs")
    p.add_argument("--out", default="iwae_mnist", help="stem of the result files in benchmarks/results/")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
