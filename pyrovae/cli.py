"""Command line: ``pyrovae train | evaluate | sample | reconstruct``.

Thin by design: arguments become a :class:`TrainJob` (or plain options) and
the library does the work. Errors the user can fix print one line, ``pyrovae:
error: ...``, and exit with status 2; a diverged run exits 3; Ctrl-C exits 130
after saying how to resume.
"""

import argparse
import dataclasses
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Tuple

import pyro
import torch

from . import plots, runs
from .data import BINARIZATIONS, load_dataset
from .importance import LogMarginal, log_marginal
from .likelihoods import LIKELIHOODS
from .nn import NETWORKS
from .runs import CheckpointError, load_run, write_json
from .distributed import _resolve_device
from .train import ELBOS, LR_SCHEDULES, NonFiniteLossError, fit
from .vae import VAE, VAEConfig

__all__ = ["main", "TrainJob"]


#: ``--static-graph`` values and what they mean for :func:`~pyrovae.fit`
STATIC_GRAPH = {"auto": "auto", "on": True, "off": False}


@dataclass(frozen=True)
class TrainJob:
    """Everything ``pyrovae train`` does, as data (stored in ``config.json``)."""

    dataset: str = "digits"
    data_dir: Optional[str] = None
    binarize: str = "dynamic"
    subset: Optional[int] = None
    latent_dim: int = 8
    network: str = "mlp"
    hidden: Tuple[int, ...] = (256,)
    likelihood: str = "bernoulli"
    beta: float = 1.0
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    elbo: str = "trace"
    num_particles: int = 1
    kl_warmup_epochs: float = 0.0
    lr_schedule: Optional[str] = None
    clip_norm: Optional[float] = None
    patience: Optional[int] = None
    seed: int = 0
    device: str = "auto"
    eval_particles: int = 100
    checkpoint_every: int = 1
    progress: bool = True
    static_graph: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(self.hidden))
        if self.binarize not in BINARIZATIONS:
            raise ValueError(f"binarize must be one of {BINARIZATIONS}, got {self.binarize!r}")
        if isinstance(self.eval_particles, bool) or not isinstance(self.eval_particles, int) or self.eval_particles < 0 or self.eval_particles == 1:
            raise ValueError(f"eval_particles must be 0 (skip) or an int >= 2, got {self.eval_particles!r}")
        if self.static_graph not in STATIC_GRAPH:
            raise ValueError(f"static_graph must be one of {sorted(STATIC_GRAPH)}, got {self.static_graph!r}")


def _vae_config(job: TrainJob, event_shape) -> VAEConfig:
    return VAEConfig(
        event_shape=tuple(event_shape), latent_dim=job.latent_dim, network=job.network,
        hidden=job.hidden, likelihood=job.likelihood, beta=job.beta,
    )


def _load_job_data(job: TrainJob):
    return load_dataset(job.dataset, root=job.data_dir, binarize=job.binarize, seed=job.seed, subset=job.subset)


def _evaluate(vae, x, *, num_particles, chunk_size=None, batch_size=100) -> LogMarginal:
    """Importance-sampled log p(x) over a dataset, batch by batch of datapoints."""
    parts = []
    for i in range(0, len(x), batch_size):
        parts.append(log_marginal(vae.model, vae.guide, x[i : i + batch_size],
                                  num_particles=num_particles, chunk_size=chunk_size,
                                  bounds=[k for k in (1, 5, 50) if k <= num_particles]))
    return LogMarginal.cat(parts)


def _pictures(vae, splits, history, run_dir: Path) -> list:
    x = splits.test if len(splits.test) else splits.train
    labels = splits.test_labels if len(splits.test) else splits.train_labels
    dev = next(vae.parameters()).device
    x = x.to(dev)
    n = min(len(x), 8)
    written = [
        plots.plot_samples(vae, run_dir / "samples.png"),
        plots.plot_reconstructions(vae, x[:32], run_dir / "reconstructions.png"),
        plots.plot_latent_map(vae, x[:2000], run_dir / "latent_map.png", labels=None if labels is None else labels[:2000]),
        plots.plot_curves(history, run_dir / "elbo_curves.png"),
    ]
    if n >= 2:
        written.append(plots.plot_interpolation(vae, x[: n // 2], x[n // 2 : 2 * (n // 2)], run_dir / "interpolation.png"))
    return written


def train(job: TrainJob, run_dir: Path, *, resume: bool = False) -> dict:
    """Run the main job: train, draw, estimate log p(x), write ``report.json``.

    Runs in its own scope of Pyro's param store, so calling it twice in one
    process (a notebook, the tests) cannot mix two runs' registrations.
    """
    with pyro.get_param_store().scope():
        return _train(job, run_dir, resume=resume)


def _train(job: TrainJob, run_dir: Path, *, resume: bool) -> dict:
    t0 = time.perf_counter()
    splits = _load_job_data(job)
    torch.manual_seed(job.seed)  # network initialisation
    vae = VAE(config=_vae_config(job, splits.event_shape))
    result = fit(
        vae.model, vae.guide, splits,
        epochs=job.epochs, batch_size=job.batch_size, lr=job.lr, elbo=job.elbo,
        num_particles=job.num_particles, kl_warmup_epochs=job.kl_warmup_epochs,
        lr_schedule=job.lr_schedule, clip_norm=job.clip_norm, patience=job.patience,
        seed=job.seed, device=job.device, checkpoint_every=job.checkpoint_every,
        progress=job.progress, run_dir=None if resume else run_dir, resume=run_dir if resume else None,
        static_graph=STATIC_GRAPH[job.static_graph], metadata={"job": asdict(job)},
    )
    if result.rank != 0:  # under torchrun, rank 0 alone draws and reports
        return {"final": result.history[-1] if result.history else None, "rank": result.rank}
    vae.eval()
    pictures = _pictures(vae, splits, result.history, run_dir)
    report = {
        "dataset": splits.info(),
        "device": result.device,
        "epochs": len(result.history),
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "final": result.history[-1] if result.history else None,
        "static_graph": result.static_graph,
        "static_graph_off": result.static_graph_off,
        "pictures": [p.name for p in pictures],
        "metrics_note": "elbo: nats per datapoint, higher is better; log_marginal: importance-sampled log p(x) with K particles",
    }
    if job.eval_particles and len(splits.test):
        x_test = splits.test.to(result.device)
        est = _evaluate(vae, x_test, num_particles=job.eval_particles)
        summary = est.summary()
        plots.plot_khat(est.khat, run_dir / "khat.png", threshold=summary.khat_threshold)
        report["test_log_marginal"] = {**summary.to_dict(), "split": "test", "seed": job.seed,
                                       "binarize": splits.binarize}
        print(f"test set: {summary}")
    report["seconds"] = time.perf_counter() - t0
    write_json(run_dir / "report.json", report)
    return report


def _cmd_train(args) -> int:
    overrides = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(TrainJob)} and v is not None}
    if args.resume:
        run_dir = Path(args.resume)
        stored = runs.load_config(run_dir).get("metadata", {}).get("job")
        if not isinstance(stored, dict):
            raise CheckpointError(f"{run_dir / runs.CONFIG} holds no 'pyrovae train' job; resume it with pyrovae.fit")
        # A resumed run keeps its model and data; only these may change.
        allowed = {"epochs", "lr", "device", "progress", "eval_particles", "patience", "checkpoint_every", "static_graph"}
        changed = {k for k in overrides if k not in allowed and overrides[k] != stored.get(k)}
        if changed:
            raise ValueError(f"--resume keeps the run's model and data; these options cannot change: {sorted(changed)}")
        job = TrainJob(**{**stored, **{k: v for k, v in overrides.items() if k in allowed}})
        return _report(train(job, run_dir, resume=True), run_dir)
    job = TrainJob(**overrides)
    run_dir = Path(args.run_dir or f"runs/{Path(job.dataset).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ValueError(f"run folder {run_dir} exists and is not empty; pass --resume {run_dir} or another --run-dir")
    return _report(train(job, run_dir), run_dir)


def _report(report, run_dir) -> int:
    final = report.get("final") or {}
    if report.get("rank"):
        return 0
    print(f"run folder: {run_dir}")
    print(f"final train ELBO {final.get('train_elbo', float('nan')):.3f}, validation ELBO "
          f"{final.get('val_elbo') if final.get('val_elbo') is None else round(final['val_elbo'], 3)} nats per datapoint")
    return 0


def _run_data(run, data_dir):
    """The splits a run was trained on, optionally from another data folder."""
    job = TrainJob(**run.config.get("metadata", {}).get("job", {}))
    return _load_job_data(job if data_dir is None else dataclasses.replace(job, data_dir=data_dir))


def _load_vae_run(path, device):
    run = load_run(path)
    if run.vae is None:
        raise CheckpointError(f"{path} trained a custom model/guide pair; use the Python API to reload it")
    dev = _resolve_device(device)
    return run, run.vae.to(dev).eval(), dev


def _cmd_evaluate(args) -> int:
    run, vae, dev = _load_vae_run(args.run, args.device)
    splits = _run_data(run, args.data_dir)
    x = getattr(splits, args.split).to(dev)
    if args.limit:
        x = x[: args.limit]
    if len(x) == 0:
        raise ValueError(f"the {args.split} split of {splits.name!r} is empty")
    t0 = time.perf_counter()
    est = _evaluate(vae, x, num_particles=args.num_particles, chunk_size=args.chunk_size, batch_size=args.batch_size)
    summary = est.summary()
    out = Path(args.run)
    plots.plot_khat(est.khat, out / "khat.png", threshold=summary.khat_threshold)
    result = {**summary.to_dict(), "split": args.split, "dataset": splits.info(), "seconds": time.perf_counter() - t0}
    write_json(out / "evaluation.json", result)
    print(summary)
    print(f"wrote {out / 'evaluation.json'} and {out / 'khat.png'}")
    return 0


def _cmd_sample(args) -> int:
    run, vae, dev = _load_vae_run(args.run, args.device)
    torch.manual_seed(args.seed)
    path = plots.plot_samples(vae, args.out or Path(args.run) / "samples.png", num_samples=args.num)
    print(f"wrote {path}")
    return 0


def _cmd_reconstruct(args) -> int:
    run, vae, dev = _load_vae_run(args.run, args.device)
    splits = _run_data(run, args.data_dir)
    x = splits.test if len(splits.test) else splits.train
    path = plots.plot_reconstructions(vae, x[: args.num].to(dev), args.out or Path(args.run) / "reconstructions.png")
    print(f"wrote {path}")
    return 0


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyrovae", description="Variational autoencoders as Pyro programs.")
    sub = p.add_subparsers(dest="command", required=True)
    d = TrainJob()

    t = sub.add_parser("train", help="train a VAE and write a run folder (defaults: digits, under two minutes on 2 CPU cores)")
    t.add_argument("--dataset", help=f"digits, mnist, binarized-mnist or a .npy/.npz path (default {d.dataset})")
    t.add_argument("--data-dir", dest="data_dir", help="folder with the dataset files (default $PYROVAE_DATA)")
    t.add_argument("--binarize", choices=BINARIZATIONS, help=f"default {d.binarize}")
    t.add_argument("--subset", type=_positive, help="keep only the first N examples of each split")
    t.add_argument("--latent-dim", dest="latent_dim", type=_positive, help=f"default {d.latent_dim}")
    t.add_argument("--network", choices=sorted(NETWORKS), help=f"default {d.network}")
    t.add_argument("--hidden", type=_positive, nargs="+", help=f"MLP hidden widths (default {' '.join(map(str, d.hidden))})")
    t.add_argument("--likelihood", choices=sorted(LIKELIHOODS), help=f"default {d.likelihood}")
    t.add_argument("--beta", type=float, help="weight of the KL term (beta-VAE), default 1")
    t.add_argument("--epochs", type=_positive, help=f"default {d.epochs}")
    t.add_argument("--batch-size", dest="batch_size", type=_positive, help=f"default {d.batch_size}")
    t.add_argument("--lr", type=float, help=f"default {d.lr}")
    t.add_argument("--elbo", choices=sorted(ELBOS), help=f"default {d.elbo}")
    t.add_argument("--num-particles", dest="num_particles", type=_positive, help="ELBO particles per step")
    t.add_argument("--kl-warmup-epochs", dest="kl_warmup_epochs", type=float)
    t.add_argument("--lr-schedule", dest="lr_schedule", choices=sorted(LR_SCHEDULES))
    t.add_argument("--clip-norm", dest="clip_norm", type=float)
    t.add_argument("--patience", type=_positive, help="early stopping patience in epochs")
    t.add_argument("--seed", type=int)
    t.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    t.add_argument("--eval-particles", dest="eval_particles", type=int, help=f"K for the quick test log p(x) (0 skips; default {d.eval_particles})")
    t.add_argument("--checkpoint-every", dest="checkpoint_every", type=_positive)
    t.add_argument("--static-graph", dest="static_graph", choices=sorted(STATIC_GRAPH),
                   help="replay recorded steps, bitwise equal to eager Pyro (default auto: for runs of 300+ steps)")
    t.add_argument("--run-dir", dest="run_dir", help="output folder (default runs/<dataset>-<time>)")
    t.add_argument("--resume", metavar="RUN", help="continue the run in this folder")
    t.add_argument("--no-progress", dest="progress", action="store_const", const=False)
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="importance-sampled log p(x) on a split, with diagnostics")
    e.add_argument("run")
    e.add_argument("--num-particles", dest="num_particles", type=_positive, default=5000)
    e.add_argument("--chunk-size", dest="chunk_size", type=_positive, default=None)
    e.add_argument("--batch-size", dest="batch_size", type=_positive, default=100, help="datapoints per call")
    e.add_argument("--split", choices=("test", "val", "train"), default="test")
    e.add_argument("--limit", type=_positive, help="only the first N datapoints")
    e.add_argument("--data-dir", dest="data_dir")
    e.add_argument("--device", default="auto")
    e.set_defaults(func=_cmd_evaluate)

    for name, func, what in (("sample", _cmd_sample, "samples from the prior"), ("reconstruct", _cmd_reconstruct, "test images and reconstructions")):
        s = sub.add_parser(name, help=f"draw {what} from a run folder")
        s.add_argument("run")
        s.add_argument("--num", type=_positive, default=64 if name == "sample" else 32)
        s.add_argument("--out", type=Path)
        s.add_argument("--device", default="auto")
        if name == "sample":
            s.add_argument("--seed", type=int, default=0)
        else:
            s.add_argument("--data-dir", dest="data_dir")
        s.set_defaults(func=func)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except NonFiniteLossError as e:
        print(f"pyrovae: training diverged: {e}", file=sys.stderr)
        return 3
    except (ValueError, TypeError) as e:  # CheckpointError is a ValueError
        print(f"pyrovae: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"pyrovae: {e or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
