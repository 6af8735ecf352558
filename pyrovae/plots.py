"""Pictures of a trained VAE and of training, as PNG files (matplotlib, Agg).

Every function takes what it draws and a ``path``, writes one PNG and returns
the path. Images are drawn from tensors of shape ``(n, C, H, W)`` or
``(n, H, W)`` with values in ``[0, 1]``; other event shapes are drawn as
1-row images. Nothing here changes matplotlib's global backend: figures are
made with the Agg canvas directly.
"""

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = [
    "image_grid",
    "plot_samples",
    "plot_reconstructions",
    "plot_interpolation",
    "plot_latent_map",
    "plot_curves",
    "plot_khat",
]


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    if hasattr(path, "write"):  # a file object, e.g. io.BytesIO for a run folder's commit
        fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
        return path
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _as_images(x: torch.Tensor) -> np.ndarray:
    x = x.detach().cpu().float()
    if x.dim() == 4:  # (n, C, H, W): first channel, or RGB as is
        x = x[:, 0] if x.shape[1] != 3 else x.permute(0, 2, 3, 1)
    elif x.dim() == 2:  # flat vectors: square if possible
        side = math.isqrt(x.shape[1])
        x = x.reshape(len(x), side, side) if side * side == x.shape[1] else x[:, None, :]
    return x.clamp(0, 1).numpy()


def image_grid(x: torch.Tensor, ncols: int) -> np.ndarray:
    """Tile ``(n, ...)`` images into one array with a one-pixel border."""
    imgs = _as_images(x)
    n, h, w = imgs.shape[:3]
    nrows = math.ceil(n / ncols)
    grid = np.ones((nrows * (h + 1) + 1, ncols * (w + 1) + 1) + imgs.shape[3:], dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, ncols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = imgs[i]
    return grid


def _show_grid(x, ncols, title, path):
    fig = _figure((max(3, ncols * 0.6), max(2, math.ceil(len(x) / ncols) * 0.6 + 0.4)))
    ax = fig.add_subplot()
    ax.imshow(image_grid(x, ncols), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title)
    return _save(fig, path)


@torch.no_grad()
def plot_samples(vae, path, *, num_samples: int = 64, ncols: int = 8) -> Path:
    """Means of p(x|z) for z drawn from the prior."""
    return _show_grid(vae.sample(num_samples), ncols, "samples from the prior (means of p(x|z))", path)


@torch.no_grad()
def plot_reconstructions(vae, x: torch.Tensor, path, *, ncols: int = 8) -> Path:
    """Rows alternate: originals, then reconstructions (mean of p(x|z) at the posterior mean)."""
    x = x[:ncols * 4]
    recon = vae.reconstruct(x)
    rows = []
    for i in range(0, len(x), ncols):
        rows.extend([x[i : i + ncols], recon[i : i + ncols]])
    return _show_grid(torch.cat(rows), ncols, "originals (odd rows) and reconstructions (even rows)", path)


@torch.no_grad()
def plot_interpolation(vae, x_a: torch.Tensor, x_b: torch.Tensor, path, *, steps: int = 10) -> Path:
    """Decode straight-line interpolations between the posterior means of pairs of images.

    :param x_a: ``(n, *event_shape)`` start images; ``x_b`` the same shape.
    """
    za, zb = vae.encode(x_a)[0], vae.encode(x_b)[0]
    t = torch.linspace(0, 1, steps, device=za.device)[:, None, None]
    z = (1 - t) * za + t * zb  # (steps, n, latent)
    imgs = vae.decode(z.transpose(0, 1)).mean  # (n, steps, *event)
    return _show_grid(imgs.reshape(-1, *imgs.shape[2:]), steps, "interpolation between encodings", path)


@torch.no_grad()
def plot_latent_map(vae, x: torch.Tensor, path, *, labels: Optional[torch.Tensor] = None) -> Path:
    """Posterior means in 2-D, coloured by label: the latent itself if 2-D, else its first two principal components."""
    loc = vae.encode(x)[0].cpu().double()
    if loc.shape[1] == 2:
        xy, axes = loc.numpy(), ("z[0]", "z[1]")
    elif loc.shape[1] == 1:
        xy, axes = torch.cat([loc, torch.zeros_like(loc)], 1).numpy(), ("z[0]", "")
    else:
        centred = loc - loc.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        xy, axes = (centred @ v[:2].T).numpy(), ("PC 1 of posterior means", "PC 2")
    fig = _figure((5, 4.5))
    ax = fig.add_subplot()
    c = None if labels is None else labels.cpu().numpy()
    colour = {} if c is None else {"c": c, "cmap": "tab10"}  # a colour map without labels is an error
    sc = ax.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.8, **colour)
    if labels is not None:
        fig.colorbar(sc, ax=ax, label="label")
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_title("latent map (posterior means)")
    return _save(fig, path)


def plot_curves(history: Sequence[dict], path) -> Path:
    """Training and validation ELBO per epoch (nats per datapoint)."""
    fig = _figure((6, 4))
    ax = fig.add_subplot()
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_elbo"] for h in history], label="train ELBO")
    val = [(h["epoch"], h["val_elbo"]) for h in history if h.get("val_elbo") is not None]
    if val:
        ax.plot(*zip(*val), label="validation ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO (nats per datapoint)")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_khat(khat: torch.Tensor, path, *, threshold: Optional[float] = None) -> Path:
    """Histogram of per-datapoint PSIS k-hat with the reliability threshold(s)."""
    k = khat.detach().cpu().double()
    k = k[torch.isfinite(k)].numpy()
    fig = _figure((6, 4))
    ax = fig.add_subplot()
    ax.hist(k, bins=40, color="tab:blue", alpha=0.8)
    for t, style in ((0.5, ":"), (0.7, "--")):
        ax.axvline(t, color="k", linestyle=style, linewidth=1, label=f"k = {t}")
    if threshold is not None and threshold not in (0.5, 0.7):
        ax.axvline(threshold, color="tab:red", linewidth=1, label=f"threshold for K draws ({threshold:.2f})")
    ax.set_xlabel("PSIS k-hat per datapoint")
    ax.set_ylabel("datapoints")
    ax.legend()
    return _save(fig, path)


# ------------------------------------------------------------------ workflow diagnostics
# Pictures of pyrovae.diagnostics results; the numbers come from the result objects.
__all__ += ["plot_sbc", "plot_ppc", "plot_collapse", "plot_prior_predictive", "plot_paired_differences"]


def plot_sbc(result, path, *, level: float = 0.95, max_dimensions: int = 8) -> Path:
    """SBC ranks of each latent coordinate: histograms with the 99% pointwise interval of a
    bin's count (top), and ECDF minus uniform CDF with a simultaneous ``level`` band (bottom).

    :param result: a :class:`~pyrovae.diagnostics.SBCResult`; the first ``max_dimensions`` columns are drawn.
    """
    counts, low, high = result.rank_histogram(level=0.99)
    band = result.ecdf_band(level=level)
    diff = result.ecdf_difference(band)
    pvalues = result.pvalues
    d = min(len(result.names), max_dimensions)
    fig = _figure((2.3 * d + 0.6, 4.8))
    axes = fig.subplots(2, d, squeeze=False)
    edges = np.arange(result.bins + 1)
    z = band.grid.numpy()
    for j in range(d):
        top, bottom = axes[0, j], axes[1, j]
        top.fill_between(edges, np.r_[low.numpy(), low[-1].item()], np.r_[high.numpy(), high[-1].item()],
                         step="post", color="0.85", label="99% if calibrated")
        top.stairs(counts[j].numpy(), edges, color="tab:blue", baseline=None)
        top.set_title(f"{result.names[j]}  (p = {float(pvalues[j]):.2g})", fontsize=9)
        top.set_xticks([])
        bottom.fill_between(z, band.lower.numpy(), band.upper.numpy(), color="0.85", label=f"{level:.0%} band")
        bottom.plot(z, diff[j].numpy(), color="tab:blue")
        bottom.axhline(0, color="k", linewidth=0.5)
        bottom.set_xlabel("fractional rank")
    axes[0, 0].set_ylabel("simulations per bin")
    axes[1, 0].set_ylabel("ECDF - uniform")
    axes[0, 0].legend(fontsize=7, loc="lower left")
    axes[1, 0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"SBC: {result.num_simulations} simulations, {result.num_draws} draws of q(z|x) each", fontsize=10)
    return _save(fig, path)


def plot_ppc(statistics, path) -> Path:
    """Posterior predictive checks, the importance-reweighted posterior against raw q.

    One row per statistic T: its distribution over the datapoints, in the data
    and in the replicated data sets (left), and the per-datapoint p-values
    (right: flat when the model reproduces T; mass at 0 or 1 flags datapoints
    it does not).

    :param statistics: :class:`~pyrovae.diagnostics.PPCStatistic` objects.
    """
    rows = len(statistics)
    fig = _figure((9, 2.8 * rows))
    axes = fig.subplots(rows, 2, squeeze=False)
    hist = {"density": True, "histtype": "step", "bins": 30}
    for i, st in enumerate(statistics):
        left, right = axes[i, 0], axes[i, 1]
        left.hist(st.observed.double().numpy(), color="k", label="data", linewidth=1.5, **hist)
        for rep, p, colour, label in ((st.replicated, st.pvalues, "tab:blue", "reweighted posterior"),
                                      (st.replicated_raw, st.pvalues_raw, "tab:orange", "raw q")):
            left.hist(rep.double().numpy().ravel(), color=colour, label=label, **hist)
            right.hist(p.double().numpy(), bins=20, range=(0, 1), color=colour, alpha=0.5, label=label)
        left.set_xlabel(f"{st.name} per datapoint")
        right.set_xlabel(f"p-value of {st.name} per datapoint")
        left.legend(fontsize=7)
        right.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_collapse(usage, path) -> Path:
    """Activity and KL of each latent coordinate, and the KL term split into the mutual
    information and the marginal KL (nats per datapoint).

    :param usage: a :class:`~pyrovae.diagnostics.LatentUsage`.
    """
    units = usage.units
    fig = _figure((12, 3.8))
    a, k, e = fig.subplots(1, 3)
    xs = np.arange(len(units.names))
    colours = ["tab:blue" if on else "0.6" for on in units.active.tolist()]
    activity = units.activity.double().clamp(min=1e-8).numpy()
    a.bar(xs, activity, color=colours)
    a.set_yscale("log")
    a.set_ylim(min(activity.min(), units.threshold) / 3, max(activity.max(), units.threshold) * 3)
    a.axhline(units.threshold, color="tab:red", linewidth=1, label=f"threshold {units.threshold:g}")
    a.set_xticks(xs, units.names, rotation=90, fontsize=7)
    a.set_ylabel("activity Var_x E_q[z_u | x]")
    a.set_title(f"{units.count} of {len(units.names)} units active (blue)", fontsize=10)
    a.legend(fontsize=7)
    kx = np.arange(len(usage.kl_names))
    k.bar(kx, usage.kl.numpy(), color="tab:purple")
    k.set_xticks(kx, usage.kl_names, rotation=90, fontsize=7)
    k.set_ylabel("nats per datapoint")
    k.set_title("KL(q(z_u|x) || p(z_u)) per dimension", fontsize=10)
    parts = [usage.kl_total, usage.mutual_information, usage.marginal_kl]
    e.bar([0, 1, 2], parts, color=["tab:purple", "tab:blue", "tab:orange"])
    e.axhline(math.log(usage.num_datapoints), color="k", linestyle=":", linewidth=1, label="log N (most MI measurable)")
    e.set_xticks([0, 1, 2], ["KL", "mutual\ninformation", "marginal\nKL"])
    e.set_ylabel("nats per datapoint")
    e.set_title(f"ELBO {usage.elbo:.2f} = reconstruction {usage.reconstruction:.2f} - KL {usage.kl_total:.2f}",
                fontsize=9)
    e.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


@torch.no_grad()
def plot_prior_predictive(vae, path, *, num_samples: int = 64, ncols: int = 8) -> Path:
    """Data drawn from the model, x ~ p(x|z) with z ~ p(z) (draws, not means: what the model says data look like)."""
    return _show_grid(vae.model(num_samples=num_samples), ncols, "prior predictive draws x ~ p(x)", path)


def plot_paired_differences(a, b, path, *, names=("a", "b")) -> Path:
    """Histogram of per-datapoint ``log p_a(x_i) - log p_b(x_i)`` of two estimates on the same data.

    :param a: a :class:`~pyrovae.LogMarginal`; ``b`` the other, same datapoints.
    """
    d = (a.log_marginal - b.log_marginal).detach().cpu().double()
    fig = _figure((6, 4))
    ax = fig.add_subplot()
    ax.hist(d.numpy(), bins=40, color="tab:blue", alpha=0.8)
    ax.axvline(0, color="k", linewidth=1)
    ax.axvline(float(d.mean()), color="tab:red", linewidth=1, label=f"mean {float(d.mean()):+.3f}")
    ax.set_xlabel(f"log p({names[0]}) - log p({names[1]}) per datapoint, nats")
    ax.set_ylabel("datapoints")
    ax.legend()
    return _save(fig, path)
