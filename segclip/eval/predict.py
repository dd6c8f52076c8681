"""Open-vocabulary prediction on user images: a label map and an overlay with legend each.

`Predictor` is the one per-image path: `segclip predict` runs it over files and
`segclip app` over uploads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from segclip.config import ConfigError
from segclip.data.voc import palette_image
from segclip.device import resolve_device
from segclip.eval.overlay import LegendEntry, legend, render_overlay
from segclip.eval.protocol import PROTOCOLS
from segclip.eval.segment import METHODS, Segmenter
from segclip.model import SegCLIP, load_model


@dataclass(frozen=True)
class Prediction:
    """One image's label map (H, W), its names (label -> name) and the overlay picture."""

    label: np.ndarray
    names: list[str]
    overlay: Image.Image

    @property
    def legend(self) -> list[LegendEntry]:
        """The rows of the overlay's legend: the labels present, with their colours."""
        return legend(self.label, self.names)


def check_settings(classes: Sequence[str], protocol: str, method: str) -> None:
    """ConfigError unless there is a class and the protocol and method exist."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; choose one of {sorted(PROTOCOLS)}")
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not classes:
        raise ConfigError("name at least one class to segment")


def label_names(classes: Sequence[str], background_threshold: float | None) -> list[str]:
    """With a background threshold label 0 is background and k + 1 is classes[k]; without
    one, k is classes[k]."""
    return ["background", *classes] if background_threshold is not None else list(classes)


class Predictor:
    """A model with one vocabulary, protocol and method: RGB images -> `Prediction`s.

    The class texts are encoded once here; calls only run the vision side."""

    def __init__(
        self,
        model: SegCLIP,
        classes: Sequence[str],
        *,
        background_threshold: float | None = None,
        protocol: str = "segclip",
        method: str = "segclip",
        device: str = "auto",
    ) -> None:
        check_settings(classes, protocol, method)
        self.names = label_names(classes, background_threshold)
        self.segmenter = Segmenter(
            model,
            classes,
            PROTOCOLS[protocol],
            background_threshold,
            device=resolve_device(str(device)),
            method=method,
        )

    def __call__(self, rgb: np.ndarray) -> Prediction:
        """RGB uint8 (H, W, 3) -> its label map and overlay."""
        label = self.segmenter.predict(rgb)
        return Prediction(label, self.names, render_overlay(rgb, label, self.names))


def predict_images(
    checkpoint: str | Path,
    classes: Sequence[str],
    images: Sequence[Path],
    output: Path,
    *,
    background_threshold: float | None = None,
    protocol: str = "segclip",
    method: str = "segclip",
    device: str = "auto",
) -> Iterator[tuple[Path, Path]]:
    """Yields (label PNG, overlay PNG) per image. With a background threshold, label 0 is
    background and k + 1 is classes[k]; without one, k is classes[k]."""
    check_settings(classes, protocol, method)  # before loading the model
    missing = [str(path) for path in images if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"no such image: {', '.join(missing)}")
    predictor = Predictor(
        load_model(checkpoint),
        classes,
        background_threshold=background_threshold,
        protocol=protocol,
        method=method,
        device=device,
    )
    output.mkdir(parents=True, exist_ok=True)
    for path in images:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
        prediction = predictor(rgb)
        label_path = output / f"{path.stem}_label.png"
        overlay_path = output / f"{path.stem}_overlay.png"
        palette_image(prediction.label).save(label_path)
        prediction.overlay.save(overlay_path)
        yield label_path, overlay_path
