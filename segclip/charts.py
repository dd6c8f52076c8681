"""Charts for a run's artifacts: per-class IoU bars and loss curves, data in, PNG file out.

Figures are drawn with matplotlib's Agg canvas directly (no pyplot, no global backend), so
drawing works in any process, display or not, and leaves no state behind.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
WIDTH_IN = 8.0
BAR_IN = 0.28  # height per class
LOSS_PANEL_IN = 2.2  # height per loss curve
BAR_COLOR = "#3b75af"
LINE_COLOR = "#c44e52"
MARKED_POINTS = 100  # longer curves are drawn as plain lines


def _png(path: Path | str) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"a chart is written as PNG: {path} does not end in .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=DPI, format="png")
    return path


def per_class_iou_chart(
    class_names: Sequence[str], iou: Sequence[float], path: Path | str, *, title: str = ""
) -> Path:
    """Horizontal bars, one per class in the given order, each labelled with its IoU in percent;
    the mean over the classes with a value (NaN: the class is in neither the labels nor the
    predictions, shown as n/a) in the title. Returns `path`."""
    path = _png(path)
    if len(class_names) == 0 or len(class_names) != len(iou):
        raise ValueError(
            f"need one IoU per class and at least one class: {len(class_names)} class names, "
            f"{len(iou)} values"
        )
    values = [float(v) for v in iou]
    if any(not math.isnan(v) and not 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"IoU values must lie in [0, 1] (or be NaN): {values}")
    measured = [v for v in values if not math.isnan(v)]
    mean = 100 * sum(measured) / len(measured) if measured else math.nan
    height = 1.2 + BAR_IN * len(values)
    figure = Figure(figsize=(WIDTH_IN, height), layout="constrained")
    axes = figure.add_subplot()
    rows = range(len(values))
    percent = [0.0 if math.isnan(v) else 100 * v for v in values]
    axes.barh(rows, percent, color=BAR_COLOR, height=0.7)
    for row, value in zip(rows, values, strict=True):
        label = "n/a" if math.isnan(value) else f"{100 * value:.1f}"
        axes.text(0 if math.isnan(value) else 100 * value, row, f" {label}", va="center")
    axes.set_yticks(list(rows), [str(name) for name in class_names])
    axes.invert_yaxis()  # the first class on top, as in the CSV
    axes.set_xlim(0, 112)
    axes.set_xlabel("IoU (%)")
    summary = "mIoU n/a" if math.isnan(mean) else f"mIoU {mean:.1f}"
    axes.set_title(f"{title}: {summary}" if title else summary)
    return _save(figure, path)


def loss_curves_chart(
    curves: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    path: Path | str,
    *,
    title: str = "",
) -> Path:
    """One panel per loss, its values against the training step, panels sharing the step
    axis; `curves` maps a name to (steps, values). Returns `path`."""
    path = _png(path)
    if not curves:
        raise ValueError("no loss curve to draw")
    for name, (steps, values) in curves.items():
        if len(steps) == 0 or len(steps) != len(values):
            raise ValueError(
                f"{name}: need one value per step and at least one step: {len(steps)} steps, "
                f"{len(values)} values"
            )
        if any(later <= earlier for earlier, later in pairwise(steps)):
            raise ValueError(f"{name}: steps must increase: {list(steps)}")
        if not all(math.isfinite(float(v)) for v in values):
            raise ValueError(f"{name}: values must be finite: {list(values)}")
    figure = Figure(figsize=(WIDTH_IN, 0.8 + LOSS_PANEL_IN * len(curves)), layout="constrained")
    panels = figure.subplots(len(curves), 1, sharex=True, squeeze=False)[:, 0]
    for axes, (name, (steps, values)) in zip(panels, curves.items(), strict=True):
        marker = "." if len(steps) <= MARKED_POINTS else None
        axes.plot(list(steps), [float(v) for v in values], color=LINE_COLOR, marker=marker)
        axes.set_ylabel(name)
        axes.grid(alpha=0.3)
    panels[-1].set_xlabel("step")
    if title:
        figure.suptitle(title)
    return _save(figure, path)
