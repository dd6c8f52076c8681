"""Loss terms and timings averaged over the steps between two log lines."""

from __future__ import annotations

from collections import defaultdict

import torch

from segclip.losses import LossTerms


class MetricWindow:
    """Loss terms and timings since the last log line, averaged when flushed."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.steps, self.waiting, self.computing = 0, 0.0, 0.0

    def add(self, terms: LossTerms, waiting: float, computing: float) -> None:
        for name, value in terms.to_floats().items():
            self.sums[name] += value
        self.steps += 1
        self.waiting += waiting
        self.computing += computing

    def flush(self, global_batch: int, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        elapsed = self.waiting + self.computing
        metrics = {name: total / self.steps for name, total in self.sums.items()}
        metrics["samples_per_s"] = global_batch * self.steps / elapsed
        metrics["data_wait_fraction"] = self.waiting / elapsed
        for group in optimizer.param_groups:
            metrics[f"lr/{group['name']}"] = group["lr"]
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
