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
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=c, cmap="tab10", s=6, alpha=0.8)
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
