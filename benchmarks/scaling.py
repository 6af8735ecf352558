"""How fit's time per step grows with batch size, latent size, hidden width and particles.

Synthetic binary 784-pixel data (no files needed); the 784-H-Z Bernoulli VAE.
Each point runs `pyrovae.fit` for two epochs of --steps steps and times the
second from fit's own per-epoch clock, so setup, the first (validated) step and
the one-time recording and check of a static graph are excluded: this is the
steady state. fit runs both with static-graph steps (what it uses for runs of
300 steps and more) and eagerly; a plain PyTorch step of the same network is
timed in between for the ratios (not for particles > 1). Median of --repeats.
Writes a markdown table and a PNG of the curves.

    python benchmarks/scaling.py --out benchmarks/results
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import pyrovae

sys.path.insert(0, str(Path(__file__).parent))
from mnist_elbo import elbo_terms  # noqa: E402

DEFAULTS = {"batch_size": 128, "latent_dim": 50, "hidden": 400, "num_particles": 1}
SWEEPS = {
    "batch_size": [32, 64, 128, 256, 512, 1024],
    "latent_dim": [2, 10, 50, 200],
    "hidden": [100, 400, 1000],
    "num_particles": [1, 5, 10, 50],
}


def one(setting, steps, repeats):
    torch.manual_seed(0)
    bs = setting["batch_size"]
    x = torch.bernoulli(torch.full((bs * steps, 1, 28, 28), 0.13))
    vae = pyrovae.VAE((1, 28, 28), latent_dim=setting["latent_dim"], hidden=(setting["hidden"],), name=f"s{time.time_ns()}")
    times = {"static": [], "eager": [], "plain": []}
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    for _ in range(repeats):
        for mode in ("static", "eager"):
            r = pyrovae.fit(vae.model, vae.guide, x, epochs=2, batch_size=bs, seed=0, device="cpu", progress=False,
                            num_particles=setting["num_particles"], shuffle=False, static_graph=mode == "static")
            assert r.static_graph == (mode == "static"), r.static_graph_off
            times[mode].append(r.history[-1]["seconds"] / steps)
            if setting["num_particles"] == 1:
                t = time.perf_counter()
                for i in range(steps):
                    loss = -elbo_terms(vae, x[i * bs : (i + 1) * bs]).sum()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                times["plain"].append((time.perf_counter() - t) / steps)
    return {k: statistics.median(v) if v else None for k, v in times.items()}


def main(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, values in SWEEPS.items():
        for v in values:
            setting = {**DEFAULTS, name: v}
            t = one(setting, args.steps, args.repeats)
            ratio = {k: None if t["plain"] is None else t[k] / t["plain"] for k in ("static", "eager")}
            rows.append((name, v, t, setting["batch_size"] / t["static"], ratio))
            print(f"{name:>14s} = {v:<5d} static {t['static'] * 1e3:8.2f} ms/step, eager {t['eager'] * 1e3:8.2f}"
                  + ("" if t["plain"] is None else f", plain {t['plain'] * 1e3:8.2f}; "
                     f"vs plain: static {ratio['static']:.2f}, eager {ratio['eager']:.2f}"), flush=True)
    fmt = lambda r: "" if r is None else f"{r:.2f}"
    lines = [f"Defaults {DEFAULTS}; one factor varied at a time; steady state (second epoch of {args.steps} steps), "
             f"median of {args.repeats}; torch threads {torch.get_num_threads()}.", "",
             "| factor | value | fit ms/step (static graph) | fit ms/step (eager) | plain ms/step | images/s (static) "
             "| static / plain | eager / plain |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {n} | {v} | {t['static'] * 1e3:.2f} | {t['eager'] * 1e3:.2f} | "
              f"{fmt(None if t['plain'] is None else t['plain'] * 1e3)} | "
              f"{ips:.0f} | {fmt(r['static'])} | {fmt(r['eager'])} |" for n, v, t, ips, r in rows]
    (out / "scaling.md").write_text("\n".join(lines) + "\n")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7))
    FigureCanvasAgg(fig)
    for i, name in enumerate(SWEEPS):
        ax = fig.add_subplot(2, 2, i + 1)
        for mode, style in (("static", "o-"), ("eager", "s--"), ("plain", "^:")):
            pts = [(v, t[mode] * 1e3) for n, v, t, _, _ in rows if n == name and t[mode] is not None]
            if pts:
                ax.plot(*zip(*pts), style, label={"static": "fit, static graph", "eager": "fit, eager Pyro",
                                                 "plain": "plain PyTorch"}[mode])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("ms per step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("pyrovae.fit time per step (784-pixel Bernoulli VAE, 2 CPU cores)")
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=100)
    print(f"wrote {out / 'scaling.md'} and {out / 'scaling.png'}")


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    return p


if __name__ == "__main__":
    main(parser().parse_args())
