"""Side-by-side pictures of image, prediction and ground truth, with a colour legend."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from segclip.data.voc import IGNORE_INDEX, palette_image, voc_palette

SWATCH = 12
LEGEND_ROW = 16


def colourise(label: np.ndarray) -> Image.Image:
    return palette_image(label).convert("RGB")


def render_overlay(
    image: np.ndarray,
    prediction: np.ndarray,
    class_names: Sequence[str],
    truth: np.ndarray | None = None,
) -> Image.Image:
    """[image | prediction blended on it | ground truth], legend of the classes shown below."""
    photo = Image.fromarray(image)
    panels = [photo, Image.blend(photo, colourise(prediction), 0.6)]
    if truth is not None:
        panels.append(colourise(truth))
    shown = sorted(
        set(np.unique(prediction)) | (set(np.unique(truth)) if truth is not None else set())
    )
    shown = [int(c) for c in shown if c != IGNORE_INDEX and c < len(class_names)]
    width, height = photo.width * len(panels), photo.height
    canvas = Image.new("RGB", (width, height + LEGEND_ROW * len(shown) + 4), "white")
    for index, panel in enumerate(panels):
        canvas.paste(panel, (index * photo.width, 0))
    draw, palette = ImageDraw.Draw(canvas), voc_palette()
    for row, class_id in enumerate(shown):
        top = height + 2 + row * LEGEND_ROW
        draw.rectangle(
            (4, top, 4 + SWATCH, top + SWATCH), fill=tuple(palette[3 * class_id : 3 * class_id + 3])
        )
        draw.text((8 + SWATCH, top), class_names[class_id], fill="black")
    return canvas
