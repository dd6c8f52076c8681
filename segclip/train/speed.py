"""Measuring the training step: a synthetic batch, the recipe's step at any precision, timing.

benchmarks/train_step.py and benchmarks/gpu_check.py both measure with these, so a
number from one compares with a number from the other.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from segclip.config import SegCLIPConfig
from segclip.data.batch import Batch
from segclip.losses import LossTerms
from segclip.model import CaptionTokenizer, SegCLIP
from segclip.train.step import TrainStep, build_train_step

SCHEDULE_STEPS = 1000  # long enough that a measurement never reaches the end of the schedule


def synthetic_batch(model: SegCLIP, batch_size: int) -> Batch:
    """Random pixels at the model's training size, 12 superpixels per image and captions
    of the full `caption_tokens`: the text tower runs up to a batch's longest caption, so
    this is the step's worst case; otherwise the cost does not depend on the values."""
    size = model.grid[0] * model.patch_size
    generator = torch.Generator().manual_seed(0)
    tokens = CaptionTokenizer(model.config)(["word " * model.config.caption_tokens] * batch_size)
    return Batch(
        images=torch.randn(batch_size, 3, size, size, generator=generator),
        tokens=tokens,
        superpixels=torch.randint(
            0, 12, (batch_size, model.grid[0] * model.grid[1]), generator=generator
        ),
    )


def benchmark_step(
    model: SegCLIP,
    config: SegCLIPConfig,
    *,
    precision: str,
    device_type: str = "cpu",
    wrap: Callable[[SegCLIP], nn.Module] | None = None,
) -> TrainStep:
    """The recipe's optimiser, schedule and losses around `model`, at `precision`."""
    train_config = config.train.model_copy(update={"precision": precision})
    return build_train_step(
        model,
        config.model_copy(update={"train": train_config}),
        total_steps=SCHEDULE_STEPS,
        device_type=device_type,
        wrap=wrap,
    )


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work: CUDA calls return before the work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class StepTimes:
    first_s: float  # the first step: allocation, autotuning, compilation
    median_s: float  # median of the timed steps after the warm-up
    losses: LossTerms  # the last step's, to tell a step that trains from one that diverged


def timed_steps(step: TrainStep, batch: Batch, *, warmup: int, steps: int) -> StepTimes:
    """Run `warmup` steps, then time `steps` more, each waiting for the device to finish."""
    if warmup < 1 or steps < 1:
        raise ValueError(f"need at least one warm-up and one timed step, got {warmup} and {steps}")
    device = batch.images.device
    seconds = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        losses = step(batch)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return StepTimes(
        first_s=seconds[0], median_s=statistics.median(seconds[warmup:]), losses=losses
    )


def matmul_peak_flops(
    dtype: torch.dtype, *, device: torch.device | str = "cpu", size: int = 2048, repeats: int = 10
) -> float:
    """Best sustained FLOP/s of a square matmul: the device's practical ceiling."""
    device = torch.device(device)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
