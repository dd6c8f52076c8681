"""Paired augmentation: one crop box for an image and its label map (docs/method.md 4)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import functional as TF


def nearest_resized_crop(
    labels: np.ndarray, *, top: int, left: int, height: int, width: int, size: int
) -> np.ndarray:
    """Crop a label map and resize it to size x size by nearest pixel centre, any int dtype.

    Output pixel i samples source row `top + floor((i + 0.5) * height / size)`, the
    centre convention PIL's resampling uses, so labels stay aligned with the image.
    """
    rows = top + np.minimum(((np.arange(size) + 0.5) * height / size).astype(np.int64), height - 1)
    cols = left + np.minimum(((np.arange(size) + 0.5) * width / size).astype(np.int64), width - 1)
    return labels[rows[:, None], cols[None, :]]


def paired_random_resized_crop(
    image: Image.Image,
    labels: np.ndarray,
    size: int,
    *,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> tuple[Image.Image, torch.Tensor]:
    """Crop image and label map with the same random box; image bicubic, labels nearest.

    The box comes from `generator` alone: torchvision draws from torch's global CPU RNG, so
    it draws in a fork of it seeded from `generator`, which leaves the caller's RNGs as they
    were. Only the CPU generator is seeded: `torch.manual_seed` would also reseed every
    accelerator's RNG (outside the fork) and costs a quarter of a millisecond per sample.
    """
    if labels.shape != (image.height, image.width):
        raise ValueError(
            f"label map {labels.shape} does not match the image ({image.height}, {image.width})"
        )
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(torch.randint(2**62, (), generator=generator)))
        top, left, height, width = RandomResizedCrop.get_params(image, list(scale), list(ratio))
    crop = TF.resized_crop(
        image, top, left, height, width, [size, size], interpolation=InterpolationMode.BICUBIC
    )
    box = {"top": top, "left": left, "height": height, "width": width}
    return crop, torch.from_numpy(nearest_resized_crop(labels, **box, size=size))
