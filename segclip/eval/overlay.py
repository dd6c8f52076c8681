"""Side-by-side pictures of image, prediction and ground truth, with a colour legend."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from segclip.data.voc import IGNORE_INDEX, palette_image, voc_palette

SWATCH = 12
LEGEND_ROW = 16


class LegendEntry(NamedTuple):
    label: int
    name: str
    colour: tuple[int, int, int]  # VOC palette RGB, as painted in the overlay


def colourise(label: np.ndarray) -> Image.Image:
    return palette_image(label).convert("RGB")


def legend(
    prediction: np.ndarray, class_names: Sequence[str], truth: np.ndarray | None = None
) -> list[LegendEntry]:
    """The labels present in the prediction (and truth), in label order, with their colours:
    the rows `render_overlay` draws under the panels."""
    present = set(np.unique(prediction)) | (set(np.unique(truth)) if truth is not None else set())
    palette = voc_palette()
    return [
        LegendEntry(label, class_names[label], tuple(palette[3 * label : 3 * label + 3]))
        for label in sorted(int(c) for c in present)
        if label != IGNORE_INDEX and label < len(class_names)
    ]


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
    shown = legend(prediction, class_names, truth)
    width, height = photo.width * len(panels), photo.height
    canvas = Image.new("RGB", (width, height + LEGEND_ROW * len(shown) + 4), "white")
    for index, panel in enumerate(panels):
        canvas.paste(panel, (index * photo.width, 0))
    draw = ImageDraw.Draw(canvas)
    for row, entry in enumerate(shown):
        top = height + 2 + row * LEGEND_ROW
        draw.rectangle((4, top, 4 + SWATCH, top + SWATCH), fill=entry.colour)
        draw.text((8 + SWATCH, top), entry.name, fill="black")
    return canvas
