"""Measuring segmentation: images per second, and how many pixels two runs label alike.

benchmarks/eval_speed.py and benchmarks/gpu_check.py both measure with these.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

VOC_SIZE = (375, 500)  # (height, width) of a typical PASCAL VOC image


def random_images(
    count: int, *, size: tuple[int, int] = VOC_SIZE, seed: int = 0
) -> list[np.ndarray]:
    """RGB uint8 noise images: inference costs the same whatever the pixels."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (*size, 3), dtype=np.uint8) for _ in range(count)]


def images_per_second(
    predict: Callable[[np.ndarray], np.ndarray], images: Sequence[np.ndarray]
) -> tuple[float, list[np.ndarray]]:
    """The rate of `predict` over `images` and their label maps, after one untimed warm-up."""
    predict(images[0])
    start = time.perf_counter()
    labels = [predict(image) for image in images]
    return len(images) / (time.perf_counter() - start), labels


def pixel_agreement(labels: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """Share of all pixels, over every image pair, that carry the same label in both."""
    same = sum(int(np.sum(a == b)) for a, b in zip(labels, reference, strict=True))
    return same / sum(b.size for b in reference)
