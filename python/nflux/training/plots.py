"""The run's pictures: samples over the data (2-D), pair plots (tabular), an image grid
(images), and the loss curve. matplotlib is imported only here (Agg backend, no display)."""

from __future__ import annotations

import math
import os

import torch

__all__ = ["GRID_IMAGES", "plot_image_grid", "plot_loss", "plot_samples"]

GRID_IMAGES = 64  # images in a sample grid


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_samples(data: torch.Tensor | None, samples: torch.Tensor, path: str | os.PathLike,
                 max_dims: int = 4) -> None:
    """2-D: data and samples side by side (as examples/fit_spline.py). More dimensions: a
    pair plot of the first `max_dims`, data and samples overlaid. Images `[n, C, H, W]`: a
    grid of the samples (beside a grid of data images when given). `data` may be None."""
    if samples.dim() == 4:
        plot_image_grid(data, samples, path)
        return
    plt = _plt()
    samples = samples.detach().double().cpu()
    if data is not None:
        data = data.detach().double().cpu()[: max(len(samples), 1)]
    d = samples.shape[1]
    if d == 2:
        panels = ([(data, "data")] if data is not None else []) + [(samples, "nflux samples")]
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), sharex=True, sharey=True,
                                 squeeze=False)
        for ax, (points, title) in zip(axes[0], panels):
            ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.4)
            ax.set_title(title)
            ax.set_aspect("equal")
    else:
        k = min(d, max_dims)
        fig, axes = plt.subplots(k, k, figsize=(2.2 * k, 2.2 * k), squeeze=False)
        for i in range(k):
            for j in range(k):
                ax = axes[i][j]
                if i == j:
                    if data is not None:
                        ax.hist(data[:, i], bins=40, density=True, alpha=0.5, label="data")
                    ax.hist(samples[:, i], bins=40, density=True, alpha=0.5, label="samples")
                else:
                    if data is not None:
                        ax.scatter(data[:, j], data[:, i], s=1, alpha=0.3, label="data")
                    ax.scatter(samples[:, j], samples[:, i], s=1, alpha=0.3, label="samples")
                if i == k - 1:
                    ax.set_xlabel(f"x{j}")
                if j == 0:
                    ax.set_ylabel(f"x{i}")
        axes[0][0].legend(fontsize="small")
        fig.suptitle(f"first {k} of {d} dimensions: data vs samples")
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=110)
    plt.close(fig)


def plot_loss(rows: list[dict], path: str | os.PathLike) -> None:
    """Train and validation NLL (nats, data units) against the step."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    tr = [(r["step"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    va = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if tr:
        ax.plot(*zip(*tr), label="train")
    if va:
        ax.plot(*zip(*va), marker="o", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("NLL (nats)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=110)
    plt.close(fig)


def _grid(images: torch.Tensor, columns: int) -> torch.Tensor:
    """[n, C, H, W] -> one [rows*(H+1)-1, columns*(W+1)-1, C] array, images 1 px apart."""
    n, C, H, W = images.shape
    rows = math.ceil(n / columns)
    canvas = images.new_zeros(rows * (H + 1) - 1, columns * (W + 1) - 1, C)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[r * (H + 1): r * (H + 1) + H, c * (W + 1): c * (W + 1) + W] = images[i].permute(1, 2, 0)
    return canvas


def plot_image_grid(data: torch.Tensor | None, samples: torch.Tensor, path: str | os.PathLike,
                    max_images: int = GRID_IMAGES) -> None:
    """A grid of up to `max_images` samples `[n, C, H, W]` (any range: each grid is scaled by
    its own min and max), beside a grid of data images when given. 1 channel: greyscale; 3:
    RGB; 4: RGBA; any other count: each channel in greyscale, side by side in the image's cell."""
    plt = _plt()
    panels = ([(data, "data")] if data is not None else []) + [(samples, "nflux samples")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.3), squeeze=False)
    for ax, (images, title) in zip(axes[0], panels):
        images = images.detach().double().cpu()[:max_images]
        n, C, H, W = images.shape
        if C not in (1, 3, 4):  # matplotlib shows 1, 3 or 4 channels only
            images = images.permute(0, 2, 1, 3).reshape(n, 1, H, C * W)
            title = f"{title} ({C} channels side by side)"
        lo, hi = images.min(), images.max()
        grid = _grid((images - lo) / (hi - lo).clamp_min(1e-12), math.ceil(math.sqrt(len(images))))
        if grid.shape[-1] == 1:
            ax.imshow(grid[..., 0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(grid.numpy(), interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=110)
    plt.close(fig)
