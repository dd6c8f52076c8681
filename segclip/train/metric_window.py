"""Loss terms and timings averaged over the steps between two log lines."""

from __future__ import annotations

from collections import defaultdict

from segclip.train.step import StepRecord


class MetricWindow:
    """Loss terms and timings since the last log line, averaged when flushed."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.steps, self.waiting, self.computing = 0, 0.0, 0.0
        self.lrs: dict[str, float] = {}

    def add(self, record: StepRecord) -> None:
        for name, value in record.losses.items():
            self.sums[name] += value
        self.steps += 1
        self.waiting += record.waiting
        self.computing += record.computing
        self.lrs = record.lrs

    def flush(self, global_batch: int) -> dict[str, float]:
        """The window's mean losses, its pace and the learning rates of its last step."""
        elapsed = self.waiting + self.computing
        metrics = {name: total / self.steps for name, total in self.sums.items()}
        metrics["samples_per_s"] = global_batch * self.steps / elapsed
        metrics["data_wait_fraction"] = self.waiting / elapsed
        metrics.update(self.lrs)
        self.__init__()
        return metrics


def progress_line(step: int, total: int, metrics: dict[str, float]) -> str:
    losses = " ".join(
        f"{name.removeprefix('loss/')} {value:.3f}"
        for name, value in metrics.items()
        if name.startswith("loss/")
    )
    return (
        f"step {step}/{total} | {losses} | {metrics['samples_per_s']:.1f} samples/s | "
        f"data wait {100 * metrics['data_wait_fraction']:.0f}%"
    )
