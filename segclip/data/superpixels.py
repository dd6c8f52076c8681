"""Superpixel label maps and their reduction to one id per patch (docs/method.md section 4)."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import numpy as np
import torch
from skimage.segmentation import slic

from segclip.config import DataConfig


@cache
def felzenszwalb_implementation() -> Callable[..., np.ndarray]:
    """The compiled Felzenszwalb, or scikit-image's (the same labels, 2.5 times slower) where
    numba is missing: a lent GPU machine, whose carry cannot hold it. Imported on first use,
    as training ranks import this module for the patch ids alone."""
    try:
        from segclip.data.felzenszwalb import felzenszwalb
    except ModuleNotFoundError as missing:
        if missing.name != "numba":
            raise
        from skimage.segmentation import felzenszwalb
    return felzenszwalb


def felzenszwalb_parameters(config: DataConfig) -> dict[str, float]:
    """The configured `scale`, `sigma` and `min_size`, as either implementation takes them."""
    return {
        "scale": config.felzenszwalb_scale,
        "sigma": config.felzenszwalb_sigma,
        "min_size": config.felzenszwalb_min_size,
    }


def _felzenszwalb(image: np.ndarray, config: DataConfig) -> np.ndarray:
    return felzenszwalb_implementation()(image, **felzenszwalb_parameters(config))


def _slic(image: np.ndarray, config: DataConfig) -> np.ndarray:
    return slic(image, start_label=0)


SUPERPIXEL_METHODS: dict[str, Callable[[np.ndarray, DataConfig], np.ndarray]] = {
    "felzenszwalb": _felzenszwalb,
    "slic": _slic,
}


def compute_superpixels(image: np.ndarray, config: DataConfig) -> np.ndarray:
    """Full-resolution superpixel ids (H, W) int32 of an RGB uint8 image (H, W, 3)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {image.shape}")
    return SUPERPIXEL_METHODS[config.superpixel_method](image, config).astype(np.int32)


def _truncated_mean(patches: torch.Tensor) -> torch.Tensor:
    return patches.double().mean(dim=-1).floor().long()


def _majority(patches: torch.Tensor) -> torch.Tensor:
    """Most frequent id per row; ties go to the smallest id."""
    ordered = patches.sort(dim=-1).values
    counts = torch.searchsorted(ordered, ordered, right=True) - torch.searchsorted(ordered, ordered)
    return ordered.gather(-1, counts.argmax(dim=-1, keepdim=True)).squeeze(-1)


PATCH_REDUCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean": _truncated_mean,  # [ref]
    "majority": _majority,  # [fix]: the mean of two ids can be a third, unrelated one
}


def patch_superpixel_ids(labels: torch.Tensor, patch_size: int, reduce: str) -> torch.Tensor:
    """Label maps (..., H, W) -> one superpixel id per patch (..., N), row-major patches."""
    *lead, height, width = labels.shape
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"label map {height}x{width} is not a whole number of {patch_size}px patches"
        )
    gh, gw = height // patch_size, width // patch_size
    patches = labels.reshape(*lead, gh, patch_size, gw, patch_size).transpose(-3, -2)
    return PATCH_REDUCTIONS[reduce](patches.reshape(*lead, gh * gw, patch_size * patch_size))
