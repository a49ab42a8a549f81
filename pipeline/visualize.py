"""Overlay images and training plots (PNG) for people to look at."""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def _colour(index: int) -> tuple[int, int, int]:
    """Distinct, stable colours: golden-ratio steps around the hue circle."""
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_overlay(
    image: np.ndarray,
    masks: np.ndarray,
    labels: list[int] | np.ndarray,
    scores: list[float] | np.ndarray | None,
    boxes: np.ndarray | None = None,
    class_names: dict[int, str] | None = None,
    alpha: float = 0.45,
    scale: int = 1,
) -> Image.Image:
    """Colour each instance mask over the image and write `class score` at its box corner.

    Args:
        image: H x W x 3 uint8 RGB.
        masks: K x H x W bool.
        labels, scores: K class ids (contiguous) and confidences (None: no score caption).
        boxes: K x 4 xyxy; derived from the masks when omitted.
        class_names: contiguous id -> name for the captions.
        scale: integer upscaling of the drawing (image bilinear, masks and boxes exact), so
            that captions stay readable on small images.
    """
    if scale > 1:
        height, width = image.shape[:2]
        resized = Image.fromarray(image).resize((width * scale, height * scale))
        image = np.asarray(resized, dtype=np.uint8)
        masks = np.asarray(masks).repeat(scale, axis=1).repeat(scale, axis=2)
        boxes = None if boxes is None else np.asarray(boxes, dtype=np.float64) * scale
    canvas = image.astype(np.float32).copy()
    for k, mask in enumerate(masks):
        colour = np.array(_colour(k), dtype=np.float32)
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * colour
    out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for k, mask in enumerate(masks):
        if boxes is not None:
            x0, y0, x1, y1 = (float(v) for v in boxes[k])
        else:
            ys, xs = np.nonzero(mask)
            if len(xs) == 0:
                continue
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
        label = int(labels[k])
        name = (class_names or {}).get(label, str(label))
        draw.rectangle([x0, y0, x1, y1], outline=_colour(k), width=1)
        caption = name if scores is None else f"{name} {float(scores[k]):.2f}"
        tx, ty = x0, max(y0 - 11, 0)
        draw.rectangle([tx, ty, tx + 6 * len(caption) + 2, ty + 10], fill=(0, 0, 0))
        draw.text((tx + 1, ty), caption, fill=_colour(k))
    return out


def upscale_factor(height: int, width: int, min_size: int) -> int:
    """The smallest integer factor that brings the longer side to at least `min_size`."""
    return max(1, math.ceil(min_size / max(height, width, 1)))


def side_by_side(panels: dict[str, Image.Image], gap: int = 6) -> Image.Image:
    """Images left to right on a white strip, each under its title."""
    title_height = 16
    width = sum(panel.width for panel in panels.values()) + gap * (len(panels) - 1)
    height = max(panel.height for panel in panels.values()) + title_height
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for title, panel in panels.items():
        draw.text((x + 2, 2), title, fill=(0, 0, 0))
        canvas.paste(panel, (x, title_height))
        x += panel.width + gap
    return canvas


def plot_curves(
    series: dict[str, list[tuple[int, float]]], path: str | Path, title: str, xlabel: str
) -> Path:
    """One line per named series of (x, y) points, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, points in sorted(series.items()):
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
