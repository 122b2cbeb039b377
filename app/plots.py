"""Small PNG figures drawn with Pillow alone: line charts and mask overlays."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fednca.segment import overlay as draw_overlay

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def line_chart(
    path: str | Path,
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    ylim: tuple[float, float] | None = None,
    size: tuple[int, int] = (640, 400),
) -> None:
    """One PNG with a line per series (x = 1, 2, ...), axes, grid and a legend."""
    w, h = size
    left, right, top, bottom = 60, 150, 30, 45
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = _font()
    values = [v for ys in series.values() for v in ys if math.isfinite(v)]
    lo, hi = ylim or ((min(values), max(values)) if values else (0.0, 1.0))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    n = max((len(ys) for ys in series.values()), default=1)
    x0, x1, y0, y1 = left, w - right, h - bottom, top

    def px(i: int, v: float) -> tuple[float, float]:
        fx = (i / (n - 1)) if n > 1 else 0.5
        return x0 + fx * (x1 - x0), y0 - (v - lo) / (hi - lo) * (y0 - y1)

    for k in range(6):  # horizontal grid and y ticks
        v = lo + (hi - lo) * k / 5
        _, y = px(0, v)
        d.line([(x0, y), (x1, y)], fill=(230, 230, 230))
        d.text((5, y - 6), f"{v:.3g}", fill="black", font=font)
    for k in sorted({0, n - 1, (n - 1) // 2}):  # x ticks
        x, _ = px(k, lo)
        d.text((x - 4, y0 + 5), str(k + 1), fill="black", font=font)
    d.rectangle([x0, y1, x1, y0], outline="black")
    d.text((x0, 8), title, fill="black", font=font)
    d.text(((x0 + x1) // 2 - 20, h - 18), xlabel, fill="black", font=font)
    d.text((5, 15), ylabel, fill="black", font=font)
    for j, (name, ys) in enumerate(series.items()):
        colour = PALETTE[j % len(PALETTE)]
        pts = [px(i, v) for i, v in enumerate(ys) if math.isfinite(v)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts if len(pts) <= 40 else []:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        ly = top + 16 * j
        d.line([(x1 + 10, ly + 6), (x1 + 30, ly + 6)], fill=colour, width=3)
        d.text((x1 + 35, ly), name, fill="black", font=font)
    img.save(path)


def overlay(image: np.ndarray, truth: np.ndarray | None, pred: np.ndarray, *, scale: int = 1) -> Image.Image:
    """A grey uint8 image drawn as :func:`fednca.segment.overlay` draws it: the predicted mask
    tinted red with a red outline, the true outline in green; enlarged ``scale`` times first so
    the outlines stay one pixel wide."""
    if scale > 1:
        image = np.kron(image, np.ones((scale, scale), np.uint8))
        pred = np.kron(pred, np.ones((scale, scale), bool))
        truth = None if truth is None else np.kron(truth, np.ones((scale, scale), bool))
    return Image.fromarray(draw_overlay(image / 255.0, pred, truth=truth))


def overlay_grid(
    path: str | Path,
    images: np.ndarray,
    truths: np.ndarray,
    preds: np.ndarray,
    *,
    captions: Sequence[str] = (),
    columns: int = 4,
    scale: int = 3,
) -> None:
    """Tiles of image + truth outline (green) + prediction (red), a caption under each."""
    n = len(images)
    rows = math.ceil(n / columns)
    side = images.shape[-1] * scale
    cell_h = side + 16
    sheet = Image.new("RGB", (columns * (side + 4), rows * cell_h + 18), "white")
    d = ImageDraw.Draw(sheet)
    d.text((4, 2), "green: ground truth outline   red: prediction", fill="black", font=_font())
    for i in range(n):
        r, c = divmod(i, columns)
        x, y = c * (side + 4), 18 + r * cell_h
        sheet.paste(overlay(images[i], truths[i], preds[i], scale=scale), (x, y))
        if i < len(captions):
            d.text((x + 2, y + side + 2), captions[i], fill="black", font=_font())
    sheet.save(path)
