"""Facts about a CLIP architecture read from its open_clip JSON config, without importing open_clip.

Config validation needs only the vision depth and sizes; reading the JSON
directly keeps `load_config` (and every CLI command) free of the seconds that
importing torch-heavy open_clip costs.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

MODEL_CONFIG_DIR = Path(__file__).parent / "model" / "model_configs"


@dataclass(frozen=True)
class ClipArchitecture:
    vision_layers: int
    patch_size: int
    image_size: int


def _config_dirs() -> list[Path]:
    """This package's architectures first, then open_clip's bundled ones (found, not imported)."""
    spec = importlib.util.find_spec("open_clip")
    bundled = [Path(p) / "model_configs" for p in (spec.submodule_search_locations or [])]
    return [MODEL_CONFIG_DIR, *bundled]


@cache
def clip_config(name: str) -> dict[str, Any]:
    for folder in _config_dirs():
        path = folder / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
    raise ValueError(
        f"unknown open_clip architecture {name!r}; e.g. 'ViT-B-16' or one of this "
        f"package's {sorted(p.stem for p in MODEL_CONFIG_DIR.glob('*.json'))}"
    )


def describe_clip(name: str) -> ClipArchitecture:
    """The vision-tower facts configs are validated against, without building a model."""
    vision = clip_config(name)["vision_cfg"]
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
