"""open_clip architecture registry, extended with the configs shipped in this package."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import open_clip

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"


@cache
def register_model_configs() -> None:
    """Make the package's JSON architectures (e.g. `segclip-tiny`) known to open_clip."""
    open_clip.add_model_config(MODEL_CONFIG_DIR)


@dataclass(frozen=True)
class ClipArchitecture:
    vision_layers: int
    patch_size: int
    image_size: int


def describe_clip(name: str) -> ClipArchitecture:
    """The vision-tower facts configs are validated against, without building a model."""
    register_model_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(
            f"unknown open_clip architecture {name!r}; e.g. 'ViT-B-16' or one of this "
            f"package's {sorted(p.stem for p in MODEL_CONFIG_DIR.glob('*.json'))}"
        )
    vision = cfg["vision_cfg"]
    if "timm_model_name" in vision or not isinstance(vision.get("layers", 12), int):
        raise ValueError(
            f"{name!r} is not a plain ViT; SegCLIP needs open_clip's VisionTransformer"
        )
    image_size = vision.get("image_size", 224)
    return ClipArchitecture(
        vision_layers=vision.get("layers", 12),
        patch_size=vision.get("patch_size", 16),
        image_size=image_size if isinstance(image_size, int) else image_size[0],
    )
