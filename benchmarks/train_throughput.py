"""Seconds per epoch and test ELBO: pyrovae.fit vs plain PyTorch vs Pyro's tutorial SVI loop.

Two pairs, both 784-400-50 on grayscale MNIST (Bernoulli on intensities, as in
Pyro's tutorial), batch 128, Adam 1e-3, identical initial weights:

1. **The library's VAE.** Each epoch, fit, plain PyTorch (with torch's default Adam, and
   with the fused Adam that ``fit`` uses on the CPU) and Pyro's SVI loop
   run one after another in rotating order, so machine drift hits all of them
   alike; fit continues across epochs through ``resume``, keeping its optimiser
   state. Reported: median seconds per epoch, images per second, ratios to plain
   PyTorch, and the test ELBO of each after the same number of epochs. On CUDA
   a fourth column replays the plain PyTorch step as one CUDA graph: the limit
   of what launching fewer kernels can give.
2. **A pair written as Pyro's tutorial writes it** (``tutorial_vae.py``: networks
   registered with ``pyro.module``, a sigmoid decoder giving Bernoulli ``probs``).
   Each repeat runs, in a fresh process, one whole ``fit(..., epochs=E)`` call,
   every one-off cost included (finding the modules, the checked first steps,
   the recording), and in another fresh process E plain PyTorch epochs of the
   same networks; the two alternate and the medians are compared.

    python benchmarks/train_throughput.py --data-dir ../shared/data --epochs 10 --tutorial-epochs 5
    python benchmarks/train_throughput.py --data-dir ../shared/data --epochs 10 --device cuda
"""

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import pyro
from pyro.infer import SVI, Trace_ELBO

import pyrovae
from pyrovae.distributed import resolve_device

sys.path.insert(0, str(Path(__file__).parent))
from mnist_elbo import elbo_terms, test_elbo  # noqa: E402  (the shared plain-PyTorch reference)
import tutorial_vae  # noqa: E402
from timing import sync  # noqa: E402

BATCH = 128


def _order(n, gen, device):
    return torch.randperm(n, generator=gen).to(device)  # one copy per epoch, not one per step


def plain_epoch(vae, opt, x, gen, terms=elbo_terms, batch_size=BATCH):
    t0 = time.perf_counter()
    perm = _order(len(x), gen, x.device)
    for i in range(0, len(x), batch_size):
        loss = -terms(vae, x[perm[i:i + batch_size]]).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(x.device)
    return time.perf_counter() - t0


class GraphedPlain:
    """The plain PyTorch step (loss, backward, Adam) captured as one CUDA graph: the reference for
    the limit. Full batches replay the graph; the last, smaller batch runs eagerly."""

    def __init__(self, vae, x, terms=elbo_terms, lr=1e-3, batch_size=BATCH):
        self.vae, self.terms, self.batch_size = vae, terms, batch_size
        self.opt = torch.optim.Adam(vae.parameters(), lr=lr, capturable=True)
        self.static_x = x[:batch_size].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: the optimiser's state and the libraries' workspaces
            for _ in range(3):
                self._step(self.static_x)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph, stream=side):  # the warm-up's stream: its AccumulateGrad nodes are there
            loss = -terms(vae, self.static_x).sum()
            loss.backward()
            self.opt.step()
        # Keep the output, not its autograd graph: the graph would keep the parameters' AccumulateGrad
        # nodes of the capture's stream alive, and the eager step of a last, smaller batch would meet them.
        self.loss = loss.detach()

    def _step(self, xb):
        self.opt.zero_grad(set_to_none=True)
        loss = -self.terms(self.vae, xb).sum()
        loss.backward()
        self.opt.step()

    def epoch(self, x, gen):
        t0 = time.perf_counter()
        perm = _order(len(x), gen, x.device)
        for i in range(0, len(x), self.batch_size):
            idx = perm[i:i + self.batch_size]
            if len(idx) == self.batch_size:
                self.static_x.copy_(x[idx])
                self.graph.replay()
            else:
                self._step(x[idx])
        sync(x.device)
        return time.perf_counter() - t0


def svi_epoch(svi, x, gen, batch_size=BATCH):
    """Exactly the tutorial's loop: svi.step per mini-batch, Pyro's default validation."""
    t0 = time.perf_counter()
    perm = _order(len(x), gen, x.device)
    for i in range(0, len(x), batch_size):
        svi.step(x[perm[i:i + batch_size]])
    sync(x.device)
    return time.perf_counter() - t0


def library_vae(args, splits, device):
    x = splits.train.to(device)
    torch.manual_seed(0)
    vae0 = pyrovae.VAE(splits.event_shape, latent_dim=50, hidden=(400,), likelihood_options={"allow_fractional": True})
    names = ["fit", "plain", "plain_fused", "svi"] + (["plain_graph"] if device.type == "cuda" else [])
    models = {}
    for name in names:  # distinct pyro.module names: one param store serves all of them
        models[name] = pyrovae.VAE(config=dataclasses.replace(vae0.config, name=name))
        models[name].load_state_dict(vae0.state_dict())
        models[name].to(device)
    pyro.clear_param_store()
    opt_plain = torch.optim.Adam(models["plain"].parameters(), lr=1e-3)
    # fit uses torch's fused Adam on the CPU; this row shows the same choice made by hand
    opt_fused = torch.optim.Adam(models["plain_fused"].parameters(), lr=1e-3, fused=True)
    svi = SVI(models["svi"].model, models["svi"].guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    gens = {name: torch.Generator().manual_seed(0) for name in names}
    times = {name: [] for name in names}
    run_dir = Path(tempfile.mkdtemp()) / "fit"

    def run_fit(epoch):
        r = pyrovae.fit(models["fit"].model, models["fit"].guide, x, epochs=epoch, batch_size=BATCH, lr=1e-3,
                        seed=0, device=str(device), progress=False, run_dir=None if epoch > 1 else run_dir,
                        resume=run_dir if epoch > 1 else None, validate=args.validate)
        return r.history[-1]["seconds"]

    runners = {
        "fit": run_fit,
        "plain": lambda epoch: plain_epoch(models["plain"], opt_plain, x, gens["plain"]),
        "plain_fused": lambda epoch: plain_epoch(models["plain_fused"], opt_fused, x, gens["plain_fused"]),
        "svi": lambda epoch: svi_epoch(svi, x, gens["svi"]),
    }
    if device.type == "cuda":
        graphed = GraphedPlain(models["plain_graph"], x)
        runners["plain_graph"] = lambda epoch: graphed.epoch(x, gens["plain_graph"])
    for epoch in range(1, args.epochs + 1):
        order = names[epoch % len(names):] + names[:epoch % len(names)]
        for name in order:
            times[name].append(runners[name](epoch))
        print(f"epoch {epoch}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names), flush=True)

    med = {n: statistics.median(t) for n, t in times.items()}
    lines = [f"MNIST {len(x)} train images on {device}, batch {BATCH}, torch threads {torch.get_num_threads()}, "
             f"{args.epochs} alternating epochs each (median)",
             f"{'':30s}{'s/epoch':>9s}{'images/s':>10s}{'vs plain':>10s}{'test ELBO':>12s}"]
    labels = (("plain", "plain PyTorch"), ("plain_fused", "plain PyTorch, fused Adam"), ("fit", "pyrovae.fit"),
              ("svi", "Pyro SVI (tutorial)"),
              ("plain_graph", "plain PyTorch, one CUDA graph"))
    for n, label in labels:
        if n in med:
            e, se = test_elbo(models[n], splits.test.to(device))
            lines.append(f"{label:30s}{med[n]:9.3f}{len(x) / med[n]:10.0f}{med[n] / med['plain']:10.2f}"
                         f"{e:9.2f} ± {se:.2f}")
    return "\n".join(lines), {n: med[n] / med["plain"] for n in med}


# ------------------------------------------------------------------ the tutorial pair, one process per run
def tutorial_child(args):
    """One timed run in this fresh process: a whole fit call, or plain PyTorch epochs. Prints JSON."""
    device = resolve_device(args.device)
    splits = pyrovae.load_dataset("mnist", root=args.data_dir, binarize="none", subset=args.subset)
    x = splits.train.flatten(1).to(device)
    vae = tutorial_vae.copies([args.tutorial_child])[args.tutorial_child].to(device)
    sync(device)
    t0 = time.perf_counter()
    if args.tutorial_child == "fit":
        pyrovae.fit(vae.model, vae.guide, x, epochs=args.tutorial_epochs, batch_size=BATCH, lr=1e-3, seed=0,
                    device=str(device), progress=False)
    else:
        opt = torch.optim.Adam(vae.parameters(), lr=1e-3, **({"fused": True} if args.tutorial_child == "plain_fused"
                                                               else {}))
        gen = torch.Generator().manual_seed(0)
        for _ in range(args.tutorial_epochs):
            plain_epoch(vae, opt, x, gen, terms=tutorial_vae.elbo_terms)
    sync(device)
    seconds = time.perf_counter() - t0
    e, se = test_elbo_tutorial(vae, splits.test.flatten(1).to(device))
    print(json.dumps({"seconds": seconds, "test_elbo": e, "test_elbo_se": se}))


@torch.no_grad()
def test_elbo_tutorial(vae, x, samples=5):
    torch.manual_seed(123)
    vals = torch.stack([torch.cat([tutorial_vae.elbo_terms(vae, x[i:i + 1000]) for i in range(0, len(x), 1000)])
                        for _ in range(samples)]).mean(0)
    return vals.mean().item(), (vals.std() / len(vals) ** 0.5).item()


def tutorial_pair(args):
    names = ("fit", "plain", "plain_fused")
    runs = {n: [] for n in names}
    for r in range(args.tutorial_repeats):
        for name in names[r % 3:] + names[:r % 3]:
            cmd = [sys.executable, __file__, "--tutorial-child", name, "--data-dir", str(args.data_dir),
                   "--device", args.device, "--tutorial-epochs", str(args.tutorial_epochs)]
            if args.subset:
                cmd += ["--subset", str(args.subset)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"tutorial pair, repeat {r + 1}: {name} {runs[name][-1]['seconds']:.2f} s", flush=True)
    med = {n: statistics.median(v["seconds"] for v in runs[n]) for n in runs}
    lines = [f"Pyro's tutorial pair (pyro.module, sigmoid decoder, Bernoulli probs), {args.tutorial_epochs} epochs per "
             f"run, each run a fresh process, one-off costs included; {args.tutorial_repeats} alternating runs each "
             f"(median)",
             f"{'':30s}{'seconds':>9s}{'vs plain':>10s}{'test ELBO':>12s}"]
    for n, label in (("plain", "plain PyTorch"), ("plain_fused", "plain PyTorch, fused Adam"),
                     ("fit", "pyrovae.fit, whole call")):
        last = runs[n][-1]
        lines.append(f"{label:30s}{med[n]:9.2f}{med[n] / med['plain']:10.2f}{last['test_elbo']:9.2f} ± "
                     f"{last['test_elbo_se']:.2f}")
    return "\n".join(lines), med["fit"] / med["plain"]


def main(args):
    if args.tutorial_child:
        return tutorial_child(args)
    device = resolve_device(args.device)
    texts = []
    if args.epochs:
        text, _ = library_vae(args, pyrovae.load_dataset("mnist", root=args.data_dir, binarize="none",
                                                          subset=args.subset), device)
        print("\n" + text, flush=True)
        texts.append(text)
    if args.tutorial_epochs and args.tutorial_repeats:
        text, _ = tutorial_pair(args)
        print("\n" + text, flush=True)
        texts.append(text)
    if args.out:
        Path(args.out).write_text("\n\n".join(texts) + "\n")


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--epochs", type=int, default=5, help="epochs of the library VAE section (0: skip it)")
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--validate", default="first", choices=["first", "always"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--tutorial-epochs", type=int, default=5, help="epochs per run of the tutorial pair (0: skip)")
    p.add_argument("--tutorial-repeats", type=int, default=3)
    p.add_argument("--tutorial-child", choices=["fit", "plain", "plain_fused"], help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="also write the tables to this file")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
