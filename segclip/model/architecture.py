"""open_clip's architecture registry, extended with the configs shipped in this package."""

from __future__ import annotations

from functools import cache

import open_clip

from segclip.architecture import MODEL_CONFIG_DIR


@cache
def register_model_configs() -> None:
    """Make the package's JSON architectures (e.g. `segclip-tiny`) known to open_clip."""
    open_clip.add_model_config(MODEL_CONFIG_DIR)
