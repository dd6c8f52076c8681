"""Image tensors as the model expects them."""

from __future__ import annotations

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

_MEAN = torch.tensor(OPENAI_DATASET_MEAN).view(3, 1, 1)
_STD = torch.tensor(OPENAI_DATASET_STD).view(3, 1, 1)


def normalize_images(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> CLIP-normalised float (B, 3, H, W).

    In place on the one float copy: a new tensor per operation cost a training batch four
    times as long on a 2-core CPU (fresh pages for each), for the same values."""
    if images.dtype != np.uint8:  # a float array would be its own "copy", changed in place
        raise TypeError(f"images must be uint8 RGB, not {images.dtype}")
    writable = np.require(images, requirements="W")  # PIL-backed arrays are read-only
    tensor = torch.from_numpy(writable).permute(0, 3, 1, 2).float()
    return tensor.div_(255).sub_(_MEAN).div_(_STD)
