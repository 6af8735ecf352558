"""Command line: ``pyrovae train | evaluate | sample | reconstruct | check | compare``.

Thin by design: arguments become a :class:`~pyrovae.job.TrainJob` (or the
options of a command in :mod:`pyrovae.job`) and the library does the work. Errors the user can fix print one line, ``pyrovae:
error: ...``, and exit with status 2; a diverged run exits 3; Ctrl-C exits 130
after saying how to resume.
"""

import argparse
import sys
import time
from pathlib import Path

from .data import BINARIZATIONS
from .job import TrainJob, evaluate_run, job_of_run, reconstruct_run, run_job, sample_run
from .workflow import check_run, compare_runs
from .likelihoods import LIKELIHOODS
from .nn import NETWORKS
from .runs import CheckpointError, RunFolder
from .train import ELBOS, LR_SCHEDULES, RESUMABLE_CHANGES, NonFiniteLossError

__all__ = ["main"]


#: ``--static-graph`` and ``--cuda-graph`` values and what they mean for :func:`~pyrovae.fit`
STATIC_GRAPH = {"auto": "auto", "on": True, "off": False}
#: options of ``pyrovae train`` that are job fields (the rest steer the command)
_COMMAND_ONLY = {"run_dir", "resume", "func", "command"}


def _job_options(args) -> dict:
    """The options given on the command line, by job field name."""
    options = {k: v for k, v in vars(args).items() if k not in _COMMAND_ONLY and v is not None}
    for name in ("static_graph", "cuda_graph"):
        if name in options:
            options[name] = STATIC_GRAPH[options[name]]
    if "hidden" in options:
        options["hidden"] = tuple(options["hidden"])
    return options


def _cmd_train(args) -> int:
    options = _job_options(args)
    if args.resume:
        if args.run_dir is not None and Path(args.run_dir).resolve() != Path(args.resume).resolve():
            raise ValueError(f"--resume {args.resume} and --run-dir {args.run_dir} differ; a resumed run writes to "
                             "its own folder (drop --run-dir)")
        folder = RunFolder(args.resume)
        if not folder.path.is_dir():
            raise CheckpointError(f"run folder {folder.path} does not exist; start a run with --run-dir")
        if not folder.exists():
            raise CheckpointError(f"run folder {folder.path} holds no run yet (it was stopped before its "
                                  f"configuration was written); start it again: pyrovae train --run-dir {folder.path}")
        stored = job_of_run(folder)
        changed = sorted(k for k in options if k not in RESUMABLE_CHANGES | {"eval_particles"}
                         and options[k] != _current(stored, k))
        if changed:
            raise ValueError(f"--resume keeps the run's model, data and objective; these options cannot change: {changed}")
        return _report(run_job(stored.replace(**options), folder.path, resume=True), folder.path)
    job = TrainJob().replace(**options)
    run_dir = Path(args.run_dir or f"runs/{Path(job.data.dataset).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ValueError(f"run folder {run_dir} exists and is not empty; pass --resume {run_dir} or another --run-dir")
    return _report(run_job(job, run_dir), run_dir)


def _current(job: TrainJob, name: str):
    for part in (job.data, job.vae, job.fit):
        if hasattr(part, name):
            return getattr(part, name)
    return getattr(job, name)


def _report(report, run_dir) -> int:
    final = report.get("final") or {}
    if report.get("rank"):
        return 0
    print(f"run folder: {run_dir}")
    val = final.get("val_elbo")
    print(f"final train ELBO {final.get('train_elbo', float('nan')):.3f}, validation ELBO "
          f"{val if val is None else round(val, 3)} nats per datapoint")
    return 0


def _cmd_evaluate(args) -> int:
    result = evaluate_run(args.run, num_particles=args.num_particles, chunk_size=args.chunk_size,
                          batch_size=args.batch_size, split=args.split, limit=args.limit, data_dir=args.data_dir,
                          device=args.device)
    print(result["summary"])
    out = Path(args.run) / "evaluate"
    print(f"wrote {out / 'evaluation.json'} and {out / 'khat.png'}")
    return 0


def _cmd_sample(args) -> int:
    print(f"wrote {sample_run(args.run, num=args.num, seed=args.seed, out=args.out, device=args.device)}")
    return 0


def _cmd_reconstruct(args) -> int:
    print(f"wrote {reconstruct_run(args.run, num=args.num, out=args.out, data_dir=args.data_dir, device=args.device)}")
    return 0


def _cmd_check(args) -> int:
    report = check_run(args.run, out_dir=args.out_dir, split=args.split, limit=args.limit,
                       num_particles=args.num_particles, ppc_samples=args.ppc_samples,
                       num_simulations=args.num_simulations, num_draws=args.num_draws,
                       usage_samples=args.usage_samples, seed=args.seed, data_dir=args.data_dir)
    print("\n".join(report["verdicts"]))
    where = Path(args.out_dir) if args.out_dir else Path(args.run) / "check"
    print(f"wrote {where / 'check.json'} and its pictures")
    return 0


def _cmd_compare(args) -> int:
    import warnings

    from .diagnostics import UnreliableEstimateWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreliableEstimateWarning)  # the printed table says it first
        result = compare_runs(args.runs, names=args.names, split=args.split, limit=args.limit,
                              num_particles=args.num_particles, seed=args.seed, data_dir=args.data_dir,
                              out=args.out)
    print(result)
    return 0


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text}")
    return value


def _add_workflow_commands(sub) -> None:
    c = sub.add_parser("check", help="the workflow report of a run: calibration (SBC), predictive checks, "
                                     "k-hat and collapse, as JSON and pictures")
    c.add_argument("run")
    c.add_argument("--out-dir", dest="out_dir", help="write here instead of RUN/check")
    c.add_argument("--split", choices=("test", "val", "train"), default="test")
    c.add_argument("--limit", type=_positive, default=1000, help="datapoints to diagnose (default 1000)")
    c.add_argument("--num-particles", dest="num_particles", type=_positive, default=1000)
    c.add_argument("--ppc-samples", dest="ppc_samples", type=_positive, default=1000)
    c.add_argument("--num-simulations", dest="num_simulations", type=_positive, default=1000, help="SBC simulations")
    c.add_argument("--num-draws", dest="num_draws", type=_positive, default=99, help="guide draws per SBC simulation")
    c.add_argument("--usage-samples", dest="usage_samples", type=_positive, default=10)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--data-dir", dest="data_dir")
    c.set_defaults(func=_cmd_check)

    m = sub.add_parser("compare", help="paired comparison of runs' log p(x) on the same datapoints")
    m.add_argument("runs", nargs="+")
    m.add_argument("--names", nargs="+")
    m.add_argument("--split", choices=("test", "val", "train"), default="test")
    m.add_argument("--limit", type=_positive, default=1000)
    m.add_argument("--num-particles", dest="num_particles", type=_positive, default=1000)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--data-dir", dest="data_dir")
    m.add_argument("--out", help="write the comparison as JSON here (and, for two runs, a picture beside it)")
    m.set_defaults(func=_cmd_compare)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyrovae", description="Variational autoencoders as Pyro programs.")
    sub = p.add_subparsers(dest="command", required=True)
    job = TrainJob()
    d = argparse.Namespace(**job.data.__dict__, **{k: v for k, v in job.vae.__dict__.items()},
                           **job.fit.__dict__, eval_particles=job.eval_particles)

    t = sub.add_parser("train", help="train a VAE and write a run folder (defaults: digits, under two minutes on 2 CPU cores)")
    t.add_argument("--dataset", help=f"digits, mnist, binarized-mnist or a .npy/.npz path (default {d.dataset})")
    t.add_argument("--data-dir", dest="data_dir", help="folder with the dataset files (default $PYROVAE_DATA); "
                   "stored absolute in the run folder")
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
    t.add_argument("--cuda-graph", dest="cuda_graph", choices=sorted(STATIC_GRAPH),
                   help="on CUDA, replay recorded steps with the optimiser's update as CUDA graphs (default auto)")
    t.add_argument("--run-dir", dest="run_dir", help="output folder, new or empty (default runs/<dataset>-<time>)")
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

    _add_workflow_commands(sub)

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
