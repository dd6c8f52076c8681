"""Dataset-level segmentation metrics from one confusion matrix (docs/method.md section 6).

Intersections and unions are summed over the whole split before dividing, so
large images weigh more than small ones, as the standard protocol does.
"""

from __future__ import annotations

import numpy as np

from segclip.data.voc import IGNORE_INDEX


class ConfusionMatrix:
    """Rows: ground truth class, columns: predicted class; ignore-index pixels are skipped."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, prediction: np.ndarray, target: np.ndarray) -> None:
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {prediction.shape} and target {target.shape} differ")
        valid = target != IGNORE_INDEX
        truth, predicted = target[valid].astype(np.int64), prediction[valid].astype(np.int64)
        if truth.size and (truth.max() >= self.num_classes or predicted.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}) or be {IGNORE_INDEX}")
        counts = np.bincount(truth * self.num_classes + predicted, minlength=self.num_classes**2)
        self.matrix += counts.reshape(self.num_classes, self.num_classes)

    def iou(self) -> np.ndarray:
        """Per-class IoU; NaN for a class that is in neither the ground truth nor a prediction."""
        intersection = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - intersection
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, intersection / union, np.nan)

    def mean_iou(self) -> float:
        iou = self.iou()
        return float(np.nanmean(iou)) if not np.isnan(iou).all() else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else float("nan")
