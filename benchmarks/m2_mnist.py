"""M2 (Kingma et al. 2014) on MNIST with 3,000 labels: test accuracy of q(y|x) after 10 epochs.

Runs ``examples/ss_vae_m2.py`` (the pair, the three Sources, TraceEnum_ELBO)
with the protocol below, so the figure is what the example gives:

* 50,000 training images (the last 10,000 of the official training set are the
  validation split and are not used), dynamically binarised per batch;
  3,000 of them labelled, 300 per class, drawn with the seed; the other 47,000 unlabelled;
* 784-500-10 classifier q(y|x), 784+10-500-50 q(z|x,y), 50+10-500-784 decoder (softplus);
* unlabelled batch 200 (235 steps per epoch), labelled batch ceil(3000/235) = 13, so every
  image counts once per epoch; classification term weight alpha = 50 per labelled image;
  Adam 1e-3, 10 epochs, seed 0;
* test accuracy on the 10,000 official test images (intensities binarised once, statically).

    nice -n 10 python benchmarks/m2_mnist.py --data-dir /work/shared/data

writes ``benchmarks/results/m2_mnist.txt`` and ``.json``.
"""

import argparse
import importlib.util
import json
import platform
import statistics
from pathlib import Path

import torch
import pyro

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def load_example():
    spec = importlib.util.spec_from_file_location("ss_vae_m2", ROOT / "examples" / "ss_vae_m2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(args):
    torch.set_num_threads(args.threads)
    example = load_example()
    argv = ["--dataset", "mnist", "--data-dir", args.data_dir, "--labels", str(args.labels), "--epochs",
            str(args.epochs), "--hidden", "500", "--latent-dim", "50", "--batch-size", "200", "--alpha",
            str(args.alpha), "--lr", str(args.lr), "--num-particles", "500", "--eval-images", "500",
            "--export-samples", "20", "--seed", str(args.seed), "--quiet"]
    if args.run_dir is not None:
        argv += ["--run-dir", args.run_dir]
    out = example.main(example.parser().parse_args(argv))
    result, est = out["fit"], out["log_marginal"].summary()
    per_epoch = [h["seconds"] for h in result.history]
    record = {
        "command_arguments_of_the_example": [a for a in argv if a != args.run_dir and a != "--run-dir"],
        "test_accuracy": out["accuracy"],
        "test_images": 10000,
        "labels": args.labels,
        "labelled_batch": out["labelled_batch"],
        "epochs": len(result.history),
        "train_elbo_unlabelled": result.train_elbo,
        "sources_per_epoch": [h["sources"] for h in result.history],
        "seconds_per_epoch": per_epoch,
        "median_seconds_per_epoch": statistics.median(per_epoch),
        "test_log_marginal_first_500": {"K": est.num_particles, "mean": est.log_marginal,
                                        "data_stderr": est.data_stderr, "verdict": est.verdict},
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "pyro": pyro.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(record, indent=2) + "\n")
    text = "\n".join([
        f"M2 on MNIST (examples/ss_vae_m2.py), {args.labels} labels (balanced), 47,000 unlabelled, dynamic "
        f"binarisation, hidden 500, z 50, unlabelled batch 200 / labelled batch {out['labelled_batch']}, "
        f"alpha {args.alpha}, Adam {args.lr}, {len(result.history)} epochs, seed {args.seed}, "
        f"torch threads {torch.get_num_threads()}",
        f"test accuracy of q(y|x): {100 * out['accuracy']:.2f}% on the 10,000 test images",
        f"unlabelled ELBO per epoch (nats/image): " + ", ".join(f"{e:.2f}" for e in result.train_elbo),
        f"median seconds per epoch: {statistics.median(per_epoch):.1f} (total {sum(per_epoch):.0f} s)",
        f"test log p(x), first 500 test images, K={est.num_particles}: {est.log_marginal:.3f} "
        f"± {est.data_stderr:.3f} (data SE); {est.verdict}",
    ]) + "\n"
    (RESULTS / f"{args.out}.txt").write_text(text)
    print(text)
    return record


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="/work/shared/data")
    p.add_argument("--labels", type=int, default=3000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--alpha", type=float, default=50.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", default=None, help="run folder: a rerun after a kill resumes from its last epoch")
    p.add_argument("--out", default="m2_mnist", help="stem of the result files in benchmarks/results/")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
