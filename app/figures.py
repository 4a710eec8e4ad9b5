"""The assignment's figures as PNG, drawn server-side with matplotlib's Agg backend.

matplotlib is imported lazily (the first figure, not at API start-up) and only its
object-oriented API is used (``Figure`` + ``FigureCanvasAgg``, never pyplot's global state), so
figures can be drawn from several threads at once.

Sizes are fixed by the layout, so a client (and the tests) know them in advance:
``samples_png`` is ``cols * SAMPLE_TILE_PX`` x ``rows * (SAMPLE_TILE_PX + SAMPLE_TITLE_PX)``,
``curves_png`` is ``CURVES_SIZE_PX`` (two panels side by side), ``confusion_png`` is
``CONFUSION_SIZE_PX``.
"""

from __future__ import annotations

import io
import math
from typing import Any

import anyio
import numpy as np
import torch
from PIL import Image

DPI = 100
SAMPLE_TILE_PX = 120
SAMPLE_TITLE_PX = 24
CURVES_SIZE_PX = (1200, 450)
CONFUSION_SIZE_PX = (800, 700)
PNG = {200: {"content": {"image/png": {}}, "description": "A PNG image."}}  # OpenAPI ``responses``

# Figures and dataset reads run in worker threads, at most this many at once per API process, so
# they cannot crowd /predict out of the thread pool.
FIGURE_THREADS = 2
_limiter: anyio.CapacityLimiter | None = None


async def run_bounded(function, *args):
    """Run blocking ``function(*args)`` in a worker thread, at most ``FIGURE_THREADS`` at a time."""
    global _limiter
    if _limiter is None:
        _limiter = anyio.CapacityLimiter(FIGURE_THREADS)
    return await anyio.to_thread.run_sync(function, *args, limiter=_limiter)


def _figure(width_px: int, height_px: int) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of a near-square grid of ``n`` tiles."""
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def samples_png(images: torch.Tensor, titles: list[str]) -> bytes:
    """A grid of images with a title above each.

    Args:
        images: uint8 (n, C, H, W), C = 1 (grey) or 3 (RGB), n >= 1.
        titles: n strings (class names).

    Returns PNG bytes of ``cols * SAMPLE_TILE_PX`` x ``rows * (SAMPLE_TILE_PX + SAMPLE_TITLE_PX)``
    pixels (see ``grid_shape``).
    """
    rows, cols = grid_shape(len(images))
    tile_h = SAMPLE_TILE_PX + SAMPLE_TITLE_PX
    figure = _figure(cols * SAMPLE_TILE_PX, rows * tile_h)
    for i, (image, title) in enumerate(zip(images, titles, strict=True)):
        row, col = divmod(i, cols)
        # axes rectangles in figure fractions: [left, bottom, width, height], a title strip on top
        ax = figure.add_axes(
            [
                (col * SAMPLE_TILE_PX + 4) / (cols * SAMPLE_TILE_PX),
                1 - (row * tile_h + SAMPLE_TITLE_PX + SAMPLE_TILE_PX - 4) / (rows * tile_h),
                (SAMPLE_TILE_PX - 8) / (cols * SAMPLE_TILE_PX),
                (SAMPLE_TILE_PX - 8) / (rows * tile_h),
            ]
        )
        pixels = image.permute(1, 2, 0).numpy()
        if pixels.shape[2] == 1:
            ax.imshow(pixels[:, :, 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(pixels, interpolation="nearest")
        ax.set_title(title, fontsize=9, pad=3)
        ax.set_xticks([])
        ax.set_yticks([])
    return _png(figure)


def curves_png(metrics: list[dict], eval_split: str, title: str) -> bytes:
    """Training loss (left) and train / eval accuracy (right) per epoch, as the assignment plots.

    Args:
        metrics: the job's per-epoch metrics (``EpochMetrics`` dicts), possibly empty (a job that
            has not finished an epoch: empty axes with a note).
        eval_split: ``test`` or ``val``: which accuracy to plot next to the training one.
        title: figure title.

    Returns PNG bytes of ``CURVES_SIZE_PX``.
    """
    figure = _figure(*CURVES_SIZE_PX)
    loss_ax, acc_ax = figure.subplots(1, 2)
    epochs = [m["epoch"] for m in metrics]
    loss_ax.plot(epochs, [m["train_loss"] for m in metrics], marker="o", label="training loss")
    acc_ax.plot(epochs, [m["train_accuracy"] for m in metrics], marker="o", label="train accuracy")
    eval_values = [m.get(f"{eval_split}_accuracy") for m in metrics]
    acc_ax.plot(
        [e for e, v in zip(epochs, eval_values, strict=True) if v is not None],
        [v for v in eval_values if v is not None],
        marker="o",
        label=f"{eval_split} accuracy",
    )
    loss_ax.set(xlabel="epoch", ylabel="loss", title="Training loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0, 1.02))
    for ax in (loss_ax, acc_ax):
        ax.grid(True, alpha=0.3)
        if epochs:
            ax.set_xticks(_epoch_ticks(epochs))
        else:
            ax.text(0.5, 0.5, "no finished epoch yet", ha="center", va="center", transform=ax.transAxes)
    acc_ax.legend(loc="lower right")
    loss_ax.legend(loc="upper right")
    figure.suptitle(title)
    figure.tight_layout()
    return _png(figure)


def _epoch_ticks(epochs: list[int]) -> list[int]:
    step = max(1, math.ceil(len(epochs) / 20))
    return epochs[::step]


def confusion_png(matrix: list[list[int]], classes: list[str], title: str) -> bytes:
    """The confusion matrix as a heat map, rows = true class, columns = predicted, with the
    counts written in the cells (up to 20 classes). Returns PNG bytes of ``CONFUSION_SIZE_PX``."""
    counts = np.asarray(matrix, dtype=np.int64)
    figure = _figure(*CONFUSION_SIZE_PX)
    ax = figure.add_subplot(1, 1, 1)
    shown = ax.imshow(counts, cmap="Blues")
    figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    k = len(classes)
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    if k <= 20:
        threshold = counts.max() / 2 if counts.size else 0
        for i in range(k):
            for j in range(k):
                colour = "white" if counts[i, j] > threshold else "black"
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=colour, fontsize=8)
    figure.tight_layout()
    return _png(figure)


def image_png(image: torch.Tensor) -> bytes:
    """One uint8 image (C, H, W), C = 1 or 3, as PNG (mode L or RGB), pixel for pixel."""
    pixels = image.permute(1, 2, 0).numpy()
    pil = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()
