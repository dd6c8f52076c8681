"""Trivial baselines a trained model must beat, evaluated like the model itself.

- `all_background`: every pixel is background (what a model that never fires scores).
- `random_centers`: the model's own grouping, but each center gets a class (or,
  on benchmarks with background, background) drawn uniformly at random. The gap
  to the model measures what its text alignment adds to its grouping.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from segclip.eval.datasets import BenchmarkSpec
from segclip.eval.scoring import Predictor
from segclip.eval.segment import CenterLabeller, Segmenter
from segclip.model import ImageEncoding


class AllBackground:
    def predict(self, image: np.ndarray) -> np.ndarray:
        return np.zeros(image.shape[:2], dtype=np.uint8)


def random_center_labeller(seed: int, background: bool) -> CenterLabeller:
    """One-hot center scores for a uniformly random class per center; with background, one
    more choice that scores 0 everywhere (below any threshold, so its pixels are background)."""
    generator = torch.Generator().manual_seed(seed)

    def labeller(encoding: ImageEncoding, text: torch.Tensor) -> torch.Tensor:
        batch, groups = encoding.center_embeddings.shape[:2]
        classes = text.shape[0]
        choice = torch.randint(classes + background, (batch, groups), generator=generator)
        scores = torch.zeros(batch, groups, classes + 1)
        scores.scatter_(2, choice[..., None], 1.0)
        scores = scores.to(encoding.center_embeddings.device)
        return scores[..., :classes]  # the extra column (background) is dropped

    return labeller


@dataclass(frozen=True)
class Baseline:
    needs_background: bool  # only defined on benchmarks whose id 0 is background
    build: Callable[[Segmenter, BenchmarkSpec, int], Predictor]  # (model's segmenter, spec, seed)


def _random_centers(segmenter: Segmenter, spec: BenchmarkSpec, seed: int) -> Segmenter:
    return segmenter.with_labeller(random_center_labeller(seed, spec.background))


BASELINES: dict[str, Baseline] = {
    "all_background": Baseline(True, lambda segmenter, spec, seed: AllBackground()),
    "random_centers": Baseline(False, _random_centers),
}
