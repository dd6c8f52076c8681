"""The PASCAL VOC segmentation folder layout: palette, label conventions and a split writer.

Writing our own benchmarks in this layout means the evaluation reads them with
the same reader as the real VOC 2012 download.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from upath import UPath

from segclip.storage import atomic_write, location, write_text

IGNORE_INDEX = 255
IMAGE_DIR = "JPEGImages"
LABEL_DIR = "SegmentationClass"
SPLIT_DIR = "ImageSets/Segmentation"
CLASS_NAMES_FILE = "class_names.txt"


def voc_palette() -> list[int]:
    """VOC's 256-entry colour map (bits of the class index spread over R, G, B), flat RGB."""
    palette = []
    for index in range(256):
        rgb, value = [0, 0, 0], index
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << shift
            value >>= 3
        palette.extend(rgb)
    return palette


def palette_image(labels: np.ndarray) -> Image.Image:
    """A label map as an indexed PNG-ready image with VOC's colours (values stay the ids)."""
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(voc_palette())
    return image


def mark_borders(class_map: np.ndarray, width: int = 1) -> np.ndarray:
    """Set pixels within `width` of a class boundary to IGNORE_INDEX, as VOC's annotations do."""
    size = 2 * width + 1
    boundary = ndimage.maximum_filter(class_map, size) != ndimage.minimum_filter(class_map, size)
    return np.where(boundary, IGNORE_INDEX, class_map).astype(np.uint8)


def write_voc_split(
    root: str | Path | UPath,
    samples: Iterable[tuple[str, np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    split: str = "val",
) -> UPath:
    """Write (id, RGB image, label map) samples as JPEGImages/, SegmentationClass/, split list.

    The split list is written last and atomically, so its presence marks a complete folder.
    """
    root = location(root)
    ids = []
    for sample_id, image, labels in samples:
        with atomic_write(root / IMAGE_DIR / f"{sample_id}.jpg") as scratch:
            Image.fromarray(image).save(scratch, format="JPEG", quality=95)
        with atomic_write(root / LABEL_DIR / f"{sample_id}.png") as scratch:
            palette_image(labels).save(scratch, format="PNG")
        ids.append(sample_id)
    write_text(root / CLASS_NAMES_FILE, "\n".join(class_names) + "\n")
    write_text(root / SPLIT_DIR / f"{split}.txt", "\n".join(ids) + "\n")
    return root
