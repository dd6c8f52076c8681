"""Open-vocabulary prediction on user images: a label PNG and an overlay with legend each."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from segclip.config import ConfigError
from segclip.data.voc import palette_image
from segclip.device import resolve_device
from segclip.eval.overlay import render_overlay
from segclip.eval.protocol import PROTOCOLS
from segclip.eval.segment import Segmenter
from segclip.model import load_model


def predict_images(
    checkpoint: str | Path,
    classes: Sequence[str],
    images: Sequence[Path],
    output: Path,
    *,
    background_threshold: float | None = None,
    protocol: str = "segclip",
    device: str = "auto",
) -> Iterator[tuple[Path, Path]]:
    """Yields (label PNG, overlay PNG) per image. With a background threshold, label 0 is
    background and k + 1 is classes[k]; without one, k is classes[k]."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; choose one of {sorted(PROTOCOLS)}")
    if not classes:
        raise ConfigError("name at least one class to segment")
    missing = [str(path) for path in images if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"no such image: {', '.join(missing)}")
    segmenter = Segmenter(
        load_model(checkpoint),
        classes,
        PROTOCOLS[protocol],
        background_threshold,
        device=resolve_device(device),
    )
    names = ["background", *classes] if background_threshold is not None else list(classes)
    output.mkdir(parents=True, exist_ok=True)
    for path in images:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
        label = segmenter.predict(rgb)
        label_path = output / f"{path.stem}_label.png"
        overlay_path = output / f"{path.stem}_overlay.png"
        palette_image(label).save(label_path)
        render_overlay(rgb, label, names).save(overlay_path)
        yield label_path, overlay_path
