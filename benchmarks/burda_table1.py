"""Burda, Grosse & Salakhutdinov (2016), Table 1: MNIST test log p(x) of VAEs and IWAEs, on their protocol.

Every configuration is a Pyro model/guide pair trained by :func:`pyrovae.fit`
(``elbo="trace"`` with ``num_particles=k`` for the VAE column: the mean of k
ELBO estimates; ``elbo="iwae"`` for the IWAE column: the per-datapoint IWAE-k
bound) and scored by :func:`pyrovae.log_marginal`. The protocol:

* MNIST, the 60,000 official training images in file order: the first 59,600
  train, the last 400 validate (their ELBO is logged, not used to stop).
  Training batches are binarised afresh every time they are drawn
  (:func:`pyrovae.data.dynamic_binarize`). The test set (and the validation
  set) are binarised once, ``torch.bernoulli`` with a CPU generator seeded by
  ``--test-seed`` (validation: ``--test-seed + 1``), so every configuration
  is scored on the same binary images.
* tanh networks; Gaussian layers give a diagonal Normal with scale ``exp(.)``
  (as in Burda et al.'s code), the last layer Bernoulli logits.
  1 stochastic layer: 784-200-200-(50), decoder its mirror.
  2 stochastic layers: 784-200-200-(100)-100-100-(50), decoder its mirror.
* Adam, batch 20; 8 stages, stage i = 0..7 runs 3^i passes at learning rate
  1e-3 * 10^(-i/7): 3,280 passes in all (``--budget full``). A smaller
  ``--budget`` (a fraction such as 0.05, or a number of passes such as 160)
  compresses the same stages proportionally, with at least one pass each.
  Each stage is one :func:`pyrovae.fit` call that resumes the run folder with
  a larger ``epochs`` and the stage's ``lr``.
* log p(x) with K = 5,000 importance samples per test image (``--eval-particles``),
  with the PSIS k-hat verdict, the IWAE-k bound ladder (k = 1, 5, 50, from the
  same weights) and active units (Cov_x(E_q[u|x]) > 0.01), counted per layer.

Adam runs with the paper's beta1 = 0.9, beta2 = 0.999 and epsilon = 1e-4
(``optimizer_options={"eps": 1e-4}``). Deviations from the paper, also written
into the results: with k = 1 the VAE and IWAE objectives are the same bound,
so one run (``elbo="trace"``) fills both columns.

Results: ``--results`` (default ``benchmarks/results``) gets ``burda_table1.md``
(side by side with the paper, NLL = -log p(x) in nats) and ``burda_table1.json``
(everything). Run folders live under ``--out-dir``, one per configuration and
seed; rerunning the same command resumes unfinished runs and skips finished
ones (and their evaluation, if the checkpoint and evaluation options are
unchanged). A different budget, batch size or training subset is a different
folder.

The reduced CPU run of issue 14: 1 layer, k in {1, 5}, VAE and IWAE, seeds 0 and 1,
the schedule compressed to 40 passes, batch 100, the first 2,000 test images at
K = 5,000. One process per seed, one thread each, then the same command over both
seeds, which trains and scores nothing again and writes the table (about 60
minutes on 2 idle cores, 90 on shared ones; timings in benchmarks/README.md)::

    mkdir -p runs/burda; for s in 0 1; do
      nice -n 10 python benchmarks/burda_table1.py --data-dir ../shared/data --layers 1 --k 1 5 \\
        --budget 40 --batch-size 100 --eval-images 2000 --threads 1 --device cpu --out-dir runs/burda \\
        --seeds $s --results runs/burda/seed$s > runs/burda-seed$s.log 2>&1 &
    done; wait
    python benchmarks/burda_table1.py --data-dir ../shared/data --layers 1 --k 1 5 \\
        --budget 40 --batch-size 100 --eval-images 2000 --threads 1 --device cpu --out-dir runs/burda --seeds 0 1

The paper's full protocol on a GPU::

    python benchmarks/burda_table1.py --data-dir ../shared/data --budget full --device cuda --out-dir runs/burda-full

References:

* Burda, Grosse, Salakhutdinov (2016). Importance Weighted Autoencoders. ICLR. Table 1.
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import time
from pathlib import Path

import torch
import pyro
import pyro.distributions as dist
from torch import nn

import pyrovae
from pyrovae.data import dynamic_binarize
from pyrovae.distributed import resolve_device
from pyrovae.runs import RunFolder

RESULTS = Path(__file__).resolve().parent / "results"
#: Burda et al. (2016), Table 1, MNIST test NLL in nats: (layers, k) -> (VAE, IWAE)
PAPER_NLL = {
    (1, 1): (86.76, 86.76), (1, 5): (86.47, 85.54), (1, 50): (86.35, 84.78),
    (2, 1): (85.33, 85.33), (2, 5): (85.01, 83.89), (2, 50): (84.78, 82.90),
}
#: (deterministic width, stochastic units) of each stochastic layer, bottom up
ARCHITECTURES = {1: ((200, 50),), 2: ((200, 100), (100, 50))}
STAGES = 8
FULL_PASSES = sum(3 ** i for i in range(STAGES))  # 3,280
TRAIN_IMAGES, VAL_IMAGES = 59_600, 400
ACTIVITY_THRESHOLD = 0.01
#: test images used to count active units (the first of the evaluation subset)
AU_IMAGES = 2000
EVAL_SEED = 0
#: Adam as in the paper: beta1 0.9 and beta2 0.999 (torch's defaults) and epsilon 1e-4
ADAM_OPTIONS = {"betas": (0.9, 0.999), "eps": 1e-4}
DEVIATIONS = (
    "k = 1: the VAE and IWAE objectives are the same bound; one run (elbo='trace') fills both columns",
)


# ---------------------------------------------------------------------- the pairs
class _Gaussian(nn.Module):
    """``d_in`` -> tanh -> tanh -> (loc, scale) of a diagonal Normal, scale = exp(linear)."""

    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.loc, self.log_scale = nn.Linear(hidden, d_out), nn.Linear(hidden, d_out)

    def forward(self, h):
        h = self.body(h)
        return self.loc(h), self.log_scale(h).exp()


class BurdaPair(nn.Module):
    """The paper's VAE with 1 or 2 stochastic layers, as a Pyro model and guide.

    ``model(x)``: ``z_L ~ N(0, I)``, ``z_i ~ N(p_i(z_{i+1}))``, ``x ~ Bernoulli(logits=p_0(z_1))``;
    ``guide(x)``: ``z_1 ~ N(q_1(x))``, ``z_{i+1} ~ N(q_{i+1}(z_i))``. Sites ``z1`` (, ``z2``) and
    ``x``, all in the plate ``"data"``; ``x`` has shape ``(batch, 784)``.
    """

    def __init__(self, layers: int, pixels: int = 784):
        super().__init__()
        arch = ARCHITECTURES[layers]
        ins = [pixels] + [units for _, units in arch[:-1]]
        self.q = nn.ModuleList(_Gaussian(d_in, hidden, units) for d_in, (hidden, units) in zip(ins, arch))
        # The decoder mirrors the encoder: p_x(z1) gives the pixels' logits (mirror of q[0]),
        # p[i](z_{i+2}) the Normal over z_{i+1} (mirror of q[i+1]).
        hidden0, units0 = arch[0]
        self.p_x = nn.Sequential(nn.Linear(units0, hidden0), nn.Tanh(), nn.Linear(hidden0, hidden0), nn.Tanh(),
                                 nn.Linear(hidden0, pixels))
        self.p = nn.ModuleList(_Gaussian(arch[i + 1][1], arch[i + 1][0], arch[i][1]) for i in range(len(arch) - 1))
        self.top = arch[-1][1]

    def model(self, x):
        pyro.module("burda", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample(f"z{len(self.q)}", dist.Normal(x.new_zeros(self.top), 1.0).to_event(1))
            for i in reversed(range(len(self.p))):
                z = pyro.sample(f"z{i + 1}", dist.Normal(*self.p[i](z)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.p_x(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("burda", self)
        with pyro.plate("data", x.shape[0]):
            h = x
            for i, q in enumerate(self.q):
                h = pyro.sample(f"z{i + 1}", dist.Normal(*q(h)).to_event(1))


# ---------------------------------------------------------------------- protocol
def total_passes(budget: str) -> int:
    """Passes of a ``--budget``: ``full`` (3,280), a fraction in (0, 1] of it, or a number of passes."""
    if budget == "full":
        return FULL_PASSES
    try:
        value = float(budget)
    except ValueError:
        raise ValueError(f"--budget must be 'full', a fraction or a number of passes, got {budget!r}") from None
    is_fraction = any(c in budget for c in ".eE")
    if is_fraction and not 0 < value <= 1:
        raise ValueError(f"a fractional --budget must lie in (0, 1], got {budget!r}")
    if not is_fraction and (value < 1 or value != int(value)):
        raise ValueError(f"--budget in passes must be an int >= 1, got {budget!r}")
    return max(STAGES, round(value * FULL_PASSES) if is_fraction else int(value))


def schedule(passes: int):
    """Burda's 8 stages compressed to ``passes`` in all: ``[(end_pass, lr)]``, at least one pass a stage.

    Stage boundaries are the paper's (3^0 + ... + 3^i passes) scaled and rounded, so
    ``schedule(3280)`` is the paper's: stage i runs 3^i passes at 1e-3 * 10^(-i/7).

    >>> [end for end, _ in schedule(3280)]
    [1, 4, 13, 40, 121, 364, 1093, 3280]
    >>> [end for end, _ in schedule(8)]
    [1, 2, 3, 4, 5, 6, 7, 8]
    """
    ends, prev = [], 0
    for i in range(STAGES):
        end = max(prev + 1, round(passes * (3 ** (i + 1) - 1) / 2 / FULL_PASSES))
        ends.append(end)
        prev = end
    return [(end, 1e-3 * 10 ** (-i / 7)) for i, end in enumerate(ends)]


def load_mnist(data_dir, *, train_images: int, val_images: int, test_seed: int):
    """``(train, val, test)``: float32 ``(n, 784)``; train in [0, 1] intensities, val and test binarised once."""
    splits = pyrovae.load_dataset("mnist", root=data_dir, binarize="none", seed=0)
    if not splits.split.startswith("official test set; last"):
        raise RuntimeError(f"unexpected MNIST split rule {splits.split!r}: cannot restore the file order")
    official = torch.cat([splits.train, splits.val]).flatten(1)  # load_dataset keeps the last images as val
    if len(official) != TRAIN_IMAGES + VAL_IMAGES:
        raise RuntimeError(f"expected 60,000 MNIST training images, found {len(official)}")
    # Copies, not views: a checkpoint saves an example batch, and a view would carry its whole storage.
    train = official[:TRAIN_IMAGES][:train_images].clone()
    val = official[TRAIN_IMAGES:][:val_images].clone()
    binarize = lambda x, seed: torch.bernoulli(x, generator=torch.Generator().manual_seed(seed))
    return train, binarize(val, test_seed + 1), binarize(splits.test.flatten(1), test_seed)


def configurations(args):
    """One dict per run, seed outermost (a cut-short run has whole seeds); k = 1 once for both objectives."""
    out = []
    for seed in args.seeds:
        for layers in args.layers:
            for k in args.k:
                objectives = ["both"] if k == 1 else args.objectives
                for objective in objectives:
                    elbo = "iwae" if objective == "iwae" else "trace"
                    name = (f"L{layers}-{objective}-k{k}-b{args.batch_size}-P{args.passes}"
                            f"-n{args.train_images}-seed{seed}")
                    out.append({"name": name, "layers": layers, "k": k, "objective": objective, "elbo": elbo,
                                "seed": seed})
    return out


# ---------------------------------------------------------------------- one configuration
def _done_passes(run_dir: Path) -> int:
    folder = RunFolder(run_dir)
    if not folder.exists():
        return 0
    latest = folder.manifest().get("latest")
    return 0 if latest is None else int(latest["epoch"])


def train(cfg, data, args) -> dict:
    """Run the stages this run folder has not finished; returns what this call did."""
    run_dir = Path(args.out_dir) / cfg["name"] / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    start = done = _done_passes(run_dir)
    train_x, val_x, _ = data
    t0 = time.perf_counter()
    with pyro.get_param_store().scope():
        torch.manual_seed(cfg["seed"])  # initial weights: the same for VAE and IWAE of one seed
        pair = BurdaPair(cfg["layers"])
        for end, lr in args.stages:
            if end <= done:
                continue
            pyrovae.fit(pair.model, pair.guide, train_x, val_data=val_x if len(val_x) else None,
                        transform=dynamic_binarize, epochs=end, batch_size=args.batch_size, lr=lr,
                        optimizer="adam", optimizer_options=ADAM_OPTIONS, elbo=cfg["elbo"], num_particles=cfg["k"],
                        seed=cfg["seed"], device=args.device, resume=run_dir, progress=False)
            done = end
    return {"run_dir": run_dir, "passes_this_call": done - start, "seconds_this_call": time.perf_counter() - t0}


def evaluate(cfg, run_dir: Path, data, args) -> dict:
    """log p(x) at K = ``--eval-particles`` and active units of the run's latest checkpoint (cached)."""
    folder = RunFolder(run_dir)
    key = {"checkpoint_sha256": folder.checkpoint_entry("latest")["sha256"], "eval_images": args.eval_images,
           "eval_particles": args.eval_particles, "test_seed": args.test_seed, "eval_seed": EVAL_SEED,
           "au_images": AU_IMAGES}
    cache = run_dir.parent / "evaluation.json"
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return {**saved, "evaluated_this_call": False}
    test = data[2][: args.eval_images]
    dev = resolve_device(args.device)
    t0 = time.perf_counter()
    with pyro.get_param_store().scope():
        pair = BurdaPair(cfg["layers"])
        run = pyrovae.load_run(run_dir, model=pair.model, guide=pair.guide)
        pair.to(dev)
        pyro.set_rng_seed(EVAL_SEED)
        parts = [pyrovae.log_marginal(pair.model, pair.guide, test[i: i + args.eval_batch].to(dev),
                                      num_particles=args.eval_particles,
                                      bounds=[k for k in (1, 5, 50) if k <= args.eval_particles])
                 for i in range(0, len(test), args.eval_batch)]
        summary = pyrovae.LogMarginal.cat(parts).summary()
        units = pyrovae.diagnostics.active_units(pair.model, pair.guide, test[:AU_IMAGES].to(dev),
                                                 threshold=ACTIVITY_THRESHOLD, seed=EVAL_SEED)
    sites = [f"z{i + 1}" for i in range(cfg["layers"])]
    active = {s: sum(bool(a) for n, a in zip(units.names, units.active) if n.split("[")[0] == s) for s in sites}
    of = {s: sum(n.split("[")[0] == s for n in units.names) for s in sites}
    seconds = [h["seconds"] for h in run.history]
    result = {
        "key": key,
        "log_marginal": summary.to_dict(),
        "nll": -summary.log_marginal,
        "nll_data_se": summary.data_stderr,
        "neg_bounds": {str(k): -v for k, v in summary.bounds.items()},
        "reliable": summary.reliable,
        "verdict": summary.verdict,
        "headline": str(summary),
        "active_units": {"per_layer": active, "of": of, "total": units.count,
                         "images": min(AU_IMAGES, len(test)), "threshold": ACTIVITY_THRESHOLD},
        "passes": len(run.history),
        "seconds_per_pass_median": statistics.median(seconds) if seconds else None,
        "train_seconds": sum(seconds),
        "final_train_objective": run.history[-1]["train_elbo"] if run.history else None,
        "final_val_objective": run.history[-1]["val_elbo"] if run.history else None,
        "eval_seconds": time.perf_counter() - t0,
    }
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, cache)  # a killed run leaves the old file or none, never half of one
    return {**result, "evaluated_this_call": True}


# ---------------------------------------------------------------------- report
def _fmt(values, digits=2):
    if not values:
        return "—"
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f}" + (f" ({', '.join(f'{v:.{digits}f}' for v in values)})" if len(values) > 1 else "")


def _cell(rows):
    """Mean NLL over seeds (each seed's in brackets), flagged when any seed's estimate is unreliable."""
    ok = [r for r in rows if "nll" in r]
    text = _fmt([r["nll"] for r in ok])
    if any(not r["reliable"] for r in ok):
        text += " ⚠"
    if len(ok) < len(rows):
        text += f" [{len(rows) - len(ok)} failed]"
    return text


def _yes_no(flag) -> str:
    return "n/a (one seed)" if flag is None else "yes" if flag else "no"


def _select(rows, layers, k, objective):
    return [r for r in rows if r["layers"] == layers and r["k"] == k and r["objective"] in (objective, "both")]


def comparisons(rows, args):
    """IWAE-k against VAE-k and against k = 1, per layers: differences of mean NLL, paired by seed."""
    out = []
    for layers in args.layers:
        for k in [k for k in args.k if k > 1]:
            iwae = {r["seed"]: r["nll"] for r in _select(rows, layers, k, "iwae") if "nll" in r}
            for other, label in (("vae", f"VAE-{k}"), (None, "k=1")):
                ref = {r["seed"]: r["nll"] for r in (_select(rows, layers, k, "vae") if other else
                                                     _select(rows, layers, 1, "both")) if "nll" in r}
                seeds = sorted(set(iwae) & set(ref))
                if not seeds:
                    continue
                diffs = [iwae[s] - ref[s] for s in seeds]
                spread = max(max(iwae.values()) - min(iwae.values()), max(ref.values()) - min(ref.values()))
                beyond = None if len(seeds) < 2 else all(d < 0 for d in diffs) and -max(diffs) > spread
                out.append({"layers": layers, "k": k, "against": label, "seeds": seeds, "nll_differences": diffs,
                            "mean_difference": statistics.fmean(diffs), "seed_spread": spread,
                            "iwae_better_beyond_spread": beyond})
    return out


def write_report(rows, args, meta) -> dict:
    comps = comparisons(rows, args)
    lines = [
        "# Burda et al. (2016), Table 1, reproduced with pyrovae",
        "",
        f"MNIST test NLL = −log p(x) in nats (lower is better), importance-sampled with K = "
        f"{args.eval_particles:,} on the first {args.eval_images:,} test images, binarised once "
        f"(seed {args.test_seed}); seeds {', '.join(map(str, args.seeds))}: the mean, with each seed's value in "
        "brackets when there are several; ⚠: the k-hat verdict of some seed says the estimate is unreliable.",
        "",
        f"Training: {args.train_images:,} images, dynamic binarisation, batch {args.batch_size}, "
        f"{args.passes:,} passes in 8 stages (paper: 3,280), stage ends {[e for e, _ in args.stages]}, "
        f"device {meta['device']}, {meta['torch_threads']} torch thread(s).",
        "",
        "| layers | k | VAE (paper) | VAE (pyrovae) | IWAE (paper) | IWAE (pyrovae) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for layers in args.layers:
        for k in args.k:
            paper = PAPER_NLL.get((layers, k), (None, None))
            cells = []
            for j, objective in enumerate(("vae", "iwae")):
                sel = _select(rows, layers, k, objective)
                cells += [f"{paper[j]:.2f}" if paper[j] else "—", _cell(sel) if sel else "not run"]
            lines.append(f"| {layers} | {k} | " + " | ".join(cells) + " |")
    lines += ["", "Each run: NLL ± its standard error over the test images, the IWAE-k bounds as −L_k "
              "(upper bounds on the NLL, from the same weights), active units (activity above "
              f"{ACTIVITY_THRESHOLD}, on the first {min(AU_IMAGES, args.eval_images):,} test images), seconds per "
              "pass (median, validation included).", "",
              "| run | NLL ± SE | k-hat verdict | −L_1 | −L_5 | −L_50 | active units | s/pass | passes |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "nll" not in r:
            lines.append(f"| {r['name']} | failed: {r.get('error', '?')} | | | | | | | |")
            continue
        b = r["neg_bounds"]
        au = ", ".join(f"{s} {n}/{r['active_units']['of'][s]}" for s, n in r["active_units"]["per_layer"].items())
        lines.append(f"| {r['name']} | {r['nll']:.2f} ± {r['nll_data_se']:.2f} | {r['verdict'].split(':')[0]} | "
                     + " | ".join(f"{b[k]:.2f}" if k in b else "—" for k in ("1", "5", "50"))
                     + f" | {au} | {r['seconds_per_pass_median']:.3g} | {r['passes']} |")
    if comps:
        lines += ["", "IWAE-k against the VAE-k and k = 1 runs of the same seed (negative: IWAE better); "
                  "spread: the larger range over seeds of the two configurations.", "",
                  "| layers | k | IWAE against | NLL difference by seed | mean | seed spread | better beyond spread |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for c in comps:
            lines.append(f"| {c['layers']} | {c['k']} | {c['against']} | "
                         f"{', '.join(f'{d:+.2f}' for d in c['nll_differences'])} | {c['mean_difference']:+.2f} | "
                         f"{c['seed_spread']:.2f} | {_yes_no(c['iwae_better_beyond_spread'])} |")
    lines += ["", "Optimiser: Adam as in the paper, beta1 0.9, beta2 0.999, epsilon 1e-4 "
              f"(pyrovae.fit's optimizer_options={{'eps': 1e-4}}).",
              "", "Deviations from the paper's protocol:", ""] + [f"- {d}" for d in meta["deviations"] or ["none"]]
    lines += ["", f"Command: `{meta['command']}`", ""]
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    report = {**meta, "paper_nll": {f"{l}-{k}": v for (l, k), v in PAPER_NLL.items()}, "runs": rows,
              "comparisons": comps}
    (results / "burda_table1.md").write_text("\n".join(lines))
    (results / "burda_table1.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


# ---------------------------------------------------------------------- main
def main(args):
    """Train and score every configuration, then write the table; returns the report (a dict)."""
    _check(args)
    args = argparse.Namespace(**vars(args))  # the caller's namespace stays as it was
    args.passes = total_passes(args.budget)
    args.stages = schedule(args.passes)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = str(resolve_device(args.device))
    deviations = list(DEVIATIONS) if 1 in args.k else []
    if args.passes != FULL_PASSES:
        deviations.append(f"compressed schedule: {args.passes} passes instead of {FULL_PASSES}")
    if args.batch_size != 20:
        deviations.append(f"batch {args.batch_size} instead of 20")
    if args.train_images != TRAIN_IMAGES:
        deviations.append(f"{args.train_images} training images instead of {TRAIN_IMAGES}")
    if args.eval_images < 10_000 or args.eval_particles != 5000:
        deviations.append(f"evaluated on {args.eval_images} test images with K = {args.eval_particles} "
                          "(paper: 10,000 with K = 5,000)")
    for d in deviations:
        print(f"deviation: {d}", flush=True)
    print(f"schedule: {[(end, f'{lr:.2e}') for end, lr in args.stages]} (stage end in passes, lr)", flush=True)
    data = load_mnist(args.data_dir, train_images=args.train_images, val_images=args.val_images,
                      test_seed=args.test_seed)
    rows = []
    for cfg in configurations(args):
        row = dict(cfg)
        try:
            trained = train(cfg, data, args)
            row.update(trained, **evaluate(cfg, trained["run_dir"], data, args))
            print(f"{cfg['name']}: NLL {row['nll']:.2f} ± {row['nll_data_se']:.2f}; {row['headline']}; active "
                  f"units {row['active_units']['per_layer']}; {row['seconds_per_pass_median']:.1f} s/pass; trained "
                  f"{trained['passes_this_call']} passes in this call", flush=True)
        except pyrovae.NonFiniteLossError as e:  # one diverged run must not lose the others
            row["error"] = str(e).split(". ")[0]
            print(f"{cfg['name']}: FAILED: {e}", flush=True)
        rows.append(row)
    meta = {"command": _command(args),
            "device": device, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "pyro": pyro.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "settings": {k: v for k, v in vars(args).items() if k != "stages"},
            "schedule": [{"stage": i, "end_pass": end, "lr": lr} for i, (end, lr) in enumerate(args.stages)],
            "data": {"train": f"first {args.train_images} of the official training images 1-59,600, intensities, "
                              "binarised afresh per batch",
                     "val": f"official training images 59,601-{59_600 + args.val_images}, binarised once, "
                            f"seed {args.test_seed + 1}",
                     "test": f"first {args.eval_images} official test images, binarised once (torch.bernoulli, "
                             f"CPU generator seed {args.test_seed})"},
            "deviations": deviations}
    report = write_report(rows, args, meta)
    print(f"wrote {Path(args.results) / 'burda_table1.md'} and .json", flush=True)
    return report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2], choices=sorted(ARCHITECTURES))
    p.add_argument("--k", type=int, nargs="+", default=[1, 5, 50], help="particles per datapoint in training")
    p.add_argument("--objectives", nargs="+", default=["vae", "iwae"], choices=["vae", "iwae"])
    p.add_argument("--budget", default="full",
                   help="'full' (3,280 passes), a fraction of it (0.05), or a number of passes (160)")
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--train-images", type=int, default=TRAIN_IMAGES, help="first N of the 59,600 (tests)")
    p.add_argument("--val-images", type=int, default=VAL_IMAGES, help="validation images logged per pass (0: none)")
    p.add_argument("--eval-images", type=int, default=10_000, help="the first N test images")
    p.add_argument("--eval-particles", type=int, default=5000)
    p.add_argument("--eval-batch", type=int, default=100, help="test images per log_marginal call")
    p.add_argument("--test-seed", type=int, default=0, help="seeds the one binarisation of the test set")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 is fastest on a machine shared with other jobs")
    p.add_argument("--data-dir", default=None, help="folder holding mnist/ (default $PYROVAE_DATA)")
    p.add_argument("--out-dir", default="runs/burda", help="run folders, one per configuration and seed")
    p.add_argument("--results", default=str(RESULTS))
    return p


def _check(args) -> None:
    for name in ("batch_size", "train_images", "eval_images", "eval_batch", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.val_images <= VAL_IMAGES or args.train_images > TRAIN_IMAGES:
        raise ValueError(f"--val-images must be in [0, {VAL_IMAGES}] and --train-images at most {TRAIN_IMAGES}, "
                         f"got {args.val_images} and {args.train_images}")
    if min(args.k) < 1 or args.eval_particles < 2:
        raise ValueError(f"--k must be >= 1 and --eval-particles >= 2, got {args.k} and {args.eval_particles}")
    total_passes(args.budget)


def _command(args) -> str:
    """The command line that reproduces this run (what the report records)."""
    defaults = vars(parser().parse_args([]))
    parts = ["python", "benchmarks/burda_table1.py"]
    for name, default in defaults.items():
        value = getattr(args, name)
        if value != default or name in ("budget", "data_dir", "out_dir"):
            values = value if isinstance(value, list) else [value]
            parts += [f"--{name.replace('_', '-')}", *map(str, values)]
    return shlex.join(parts)


if __name__ == "__main__":
    main(parser().parse_args())
