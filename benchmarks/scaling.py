"""How fit's time per step grows with batch size, latent size, hidden width and particles.

Synthetic binary 784-pixel data (no files needed); the 784-H-Z Bernoulli VAE;
each point is `pyrovae.fit` for one epoch of --steps steps, timed from fit's own
per-epoch clock (setup excluded), median of --repeats. For batch size, latent
size and width, a plain PyTorch step of the same network is timed alternately
for a ratio. Writes a markdown table and a PNG of the curves.

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
    x = torch.bernoulli(torch.full((setting["batch_size"] * steps, 1, 28, 28), 0.13))
    vae = pyrovae.VAE((1, 28, 28), latent_dim=setting["latent_dim"], hidden=(setting["hidden"],), name=f"s{time.time_ns()}")
    ours, plain = [], []
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    for _ in range(repeats):
        r = pyrovae.fit(vae.model, vae.guide, x, epochs=1, batch_size=setting["batch_size"], seed=0, device="cpu",
                        progress=False, num_particles=setting["num_particles"], shuffle=False)
        ours.append(r.history[-1]["seconds"] / steps)
        if setting["num_particles"] == 1:
            t = time.perf_counter()
            for i in range(steps):
                loss = -elbo_terms(vae, x[i * setting["batch_size"] : (i + 1) * setting["batch_size"]]).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            plain.append((time.perf_counter() - t) / steps)
    return statistics.median(ours), (statistics.median(plain) if plain else None)


def main(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, values in SWEEPS.items():
        for v in values:
            setting = {**DEFAULTS, name: v}
            ms, plain = one(setting, args.steps, args.repeats)
            rows.append((name, v, ms * 1e3, setting["batch_size"] / ms, None if plain is None else ms / plain))
            print(f"{name:>14s} = {v:<5d} {ms * 1e3:8.2f} ms/step {setting['batch_size'] / ms:9.0f} images/s"
                  + ("" if plain is None else f"   vs plain {ms / plain:.2f}"), flush=True)
    lines = [f"Defaults {DEFAULTS}; one factor varied at a time; torch threads {torch.get_num_threads()}.", "",
             "| factor | value | ms/step | images/s | fit / plain PyTorch |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {n} | {v} | {ms:.2f} | {ips:.0f} | {'' if r is None else f'{r:.2f}'} |" for n, v, ms, ips, r in rows]
    (out / "scaling.md").write_text("\n".join(lines) + "\n")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7))
    FigureCanvasAgg(fig)
    for i, name in enumerate(SWEEPS):
        ax = fig.add_subplot(2, 2, i + 1)
        pts = [(v, ms) for n, v, ms, _, _ in rows if n == name]
        ax.plot(*zip(*pts), marker="o")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("ms per step")
        ax.grid(alpha=0.3)
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
