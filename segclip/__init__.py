"""SegCLIP: open-vocabulary semantic segmentation learned from image-text pairs.

The package face: `segclip.load_config`, `segclip.load_model`, `segclip.build_model`,
`segclip.SegCLIPConfig`. They load on first use, so `import segclip` stays cheap.
"""

import os
from importlib import import_module
from typing import Any

# Before anything imports torchvision (open_clip does), in every process that
# imports segclip: Ray and Prefect workers included.
from segclip._torchvision_compat import fix_torchvision_on_import

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home on import
os.environ.setdefault("WANDB_MODE", "disabled")
fix_torchvision_on_import()

__version__ = "0.1.0"

_FACE = {
    "SegCLIPConfig": "segclip.config",
    "load_config": "segclip.config",
    "build_model": "segclip.model",
    "load_model": "segclip.model",
}
__all__ = [*_FACE, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _FACE:
        return getattr(import_module(_FACE[name]), name)
    raise AttributeError(f"module 'segclip' has no attribute {name!r}")
