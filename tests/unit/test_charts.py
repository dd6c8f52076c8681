"""The run charts: PNG files of the expected size, drawn (not blank), inputs checked."""

import math

import numpy as np
import pytest
from PIL import Image

from segclip.charts import (
    BAR_COLOR,
    LINE_COLOR,
    loss_curves_chart,
    per_class_iou_chart,
)

CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat")


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB")).astype(int)


def share_of(image: np.ndarray, color: str) -> float:
    """The share of the image's pixels within a few levels of `color` (#rrggbb)."""
    rgb = np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)])
    return float((np.abs(image - rgb).max(axis=-1) <= 8).mean())


def test_per_class_bars_grow_with_the_iou_and_the_chart_grows_with_the_classes(tmp_path):
    low = pixels(per_class_iou_chart(CLASSES, [0.1] * 5, tmp_path / "low.png", title="t"))
    high = pixels(per_class_iou_chart(CLASSES, [0.9] * 5, tmp_path / "high.png", title="t"))
    assert low.shape == high.shape == (260, 800, 3)  # (1.2 + 0.28 x 5) in x 8 in at 100 dpi
    for image in (low, high):
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20  # text and bars, not blank
        assert share_of(image, "#ffffff") > 0.3  # on a white background
    assert share_of(high, BAR_COLOR) > 5 * share_of(low, BAR_COLOR) > 0
    many = pixels(per_class_iou_chart([f"c{i}" for i in range(60)], [0.5] * 60, tmp_path / "m.png"))
    assert many.shape[:2] == (1800, 800)


def test_a_class_without_pixels_has_no_bar(tmp_path):
    absent = pixels(per_class_iou_chart(CLASSES, [math.nan] * 5, tmp_path / "nan.png"))
    assert share_of(absent, BAR_COLOR) == 0
    some = pixels(per_class_iou_chart(CLASSES, [math.nan, 1, 1, 1, 1], tmp_path / "some.png"))
    assert share_of(some, BAR_COLOR) > 0


@pytest.mark.parametrize(
    ("names", "iou", "file", "problem"),
    [
        (CLASSES, [0.5] * 4, "a.png", "one IoU per class"),
        ((), (), "a.png", "at least one class"),
        (CLASSES, [0.5, 0.5, 0.5, 0.5, 1.5], "a.png", r"\[0, 1\]"),
        (CLASSES, [0.5, 0.5, 0.5, 0.5, -0.1], "a.png", r"\[0, 1\]"),
        (CLASSES, [0.5] * 5, "a.jpg", "PNG"),
    ],
)
def test_per_class_inputs_are_checked(tmp_path, names, iou, file, problem):
    with pytest.raises(ValueError, match=problem):
        per_class_iou_chart(names, iou, tmp_path / file)
    assert not (tmp_path / file).exists()


def test_loss_curves_have_a_panel_per_loss(tmp_path):
    steps = list(range(2, 42, 2))
    curves = {
        "loss/total": (steps, [5 / s for s in steps]),
        "loss/contrastive": (steps, [3 / s for s in steps]),
        "loss/superpixel_kl": ([40], [0.5]),  # one point is still drawn
    }
    image = pixels(loss_curves_chart(curves, tmp_path / "sub" / "loss_curves.png", title="t"))
    assert image.shape == (740, 800, 3)  # (0.8 + 2.2 x 3) in x 8 in at 100 dpi
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20
    assert share_of(image, LINE_COLOR) > 0.001
    one = pixels(loss_curves_chart({"loss/total": curves["loss/total"]}, tmp_path / "one.png"))
    assert one.shape[:2] == (300, 800)


@pytest.mark.parametrize(
    ("curves", "problem"),
    [
        ({}, "no loss curve"),
        ({"loss/total": ([1, 2], [1.0])}, "one value per step"),
        ({"loss/total": ([], [])}, "at least one step"),
        ({"loss/total": ([1, 3, 2], [1.0, 1.0, 1.0])}, "steps must increase"),
        ({"loss/total": ([1, 1], [1.0, 1.0])}, "steps must increase"),
        ({"loss/total": ([1, 2], [1.0, math.nan])}, "finite"),
    ],
)
def test_loss_curve_inputs_are_checked(tmp_path, curves, problem):
    with pytest.raises(ValueError, match=problem):
        loss_curves_chart(curves, tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()
