"""Evaluate a segmenter over one benchmark split: confusion matrix, per-class IoU, overlays."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm
from upath import UPath

from segclip.eval.datasets import BenchmarkSpec, read_sample
from segclip.eval.metrics import ConfusionMatrix
from segclip.eval.overlay import render_overlay


class Predictor(Protocol):
    """Anything that labels an image: a `Segmenter` or a baseline."""

    def predict(self, image: np.ndarray) -> np.ndarray: ...


@dataclass
class BenchmarkResult:
    name: str
    images: int
    confusion: ConfusionMatrix
    overlays: list[tuple[str, Image.Image]] = field(default_factory=list)

    @property
    def mean_iou(self) -> float:
        return self.confusion.mean_iou()

    def write(self, folder: Path, class_names: tuple[str, ...]) -> Path:
        """per_class_iou.csv, confusion.csv and overlays/ under folder/<benchmark>."""
        out = folder / self.name
        (out / "overlays").mkdir(parents=True, exist_ok=True)
        with open(out / "per_class_iou.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["class", "iou"])
            for name, iou in zip(class_names, self.confusion.iou(), strict=True):
                writer.writerow([name, "" if np.isnan(iou) else f"{iou:.6f}"])
        np.savetxt(out / "confusion.csv", self.confusion.matrix, fmt="%d", delimiter=",")
        for sample_id, overlay in self.overlays:
            overlay.save(out / "overlays" / f"{sample_id.replace('/', '_')}.png")
        return out


def evaluate_benchmark(
    segmenter: Predictor,
    spec: BenchmarkSpec,
    folder: UPath,
    ids: Sequence[str],
    *,
    overlays: int = 0,
    progress: bool = True,
) -> BenchmarkResult:
    """Confusion matrix over the samples `ids`; overlays of the first `overlays` of them."""
    result = BenchmarkResult(spec.name, len(ids), ConfusionMatrix(len(spec.class_names)))
    shown = tqdm(ids, desc=f"evaluate {spec.name}", unit="image", disable=not progress)
    for index, sample_id in enumerate(shown):
        sample = read_sample(spec, folder, sample_id)
        prediction = segmenter.predict(sample.image)
        result.confusion.update(prediction, sample.label)
        if index < overlays:
            overlay = render_overlay(sample.image, prediction, spec.class_names, sample.label)
            result.overlays.append((sample_id, overlay))
    return result
