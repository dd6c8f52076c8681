"""Image tensors as the model expects them."""

from __future__ import annotations

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

_MEAN = torch.tensor(OPENAI_DATASET_MEAN).view(3, 1, 1)
_STD = torch.tensor(OPENAI_DATASET_STD).view(3, 1, 1)


def normalize_images(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> CLIP-normalised float (B, 3, H, W)."""
    writable = np.require(images, requirements="W")  # PIL-backed arrays are read-only
    tensor = torch.from_numpy(writable).permute(0, 3, 1, 2).float() / 255
    return (tensor - _MEAN) / _STD
