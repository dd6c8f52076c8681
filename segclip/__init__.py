"""SegCLIP: open-vocabulary semantic segmentation learned from image-text pairs."""

import os

# Before anything imports torchvision (open_clip does), in every process that
# imports segclip: Ray and Prefect workers included.
from segclip._torchvision_compat import ensure_torchvision_importable

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home on import
os.environ.setdefault("WANDB_MODE", "disabled")
ensure_torchvision_importable()

__version__ = "0.1.0"
