"""Where a run starts: its own start, or the best of several tried for a few steps each.

Trained from scratch, the demo's tiny model falls, by its seed, into a slow start about one
run in five: its loss trails the other seeds' from about step 60 and it ends with the
lowest mIoU (docs/demo_study.md). That shows early, so a run can try `train.start_trials`
starts (initial weights and the noise of the first steps), each for
`train.start_trial_steps` steps on samples of its own, and go on with the one whose mean
loss over the second half of those steps is lowest: successive halving over starts, for
(trials - 1) x trial steps more. Each start draws its own samples because a seed's data
order shapes its run as much as its initial weights do. Start 0 is the plain run's (seeded
`train.seed + rank`, the plain sample stream) and the start that goes on keeps its own
batches and random state, so a run whose start 0 wins is the plain run bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from segclip.config import TrainConfig
from segclip.data.batch import Batch
from segclip.train.step import StepRecord, TrainStep

START_SEED_STRIDE = 1_000_003  # start k > 0 seeds far from every plain run's seed + rank


@dataclass
class Start:
    """A start after its trial steps: what it needs to go on, and what those steps logged."""

    index: int
    step_fn: TrainStep
    batches: Iterator[Batch]
    records: list[StepRecord]  # one per trial step (none for a run with one start)
    loss: float  # mean total loss over the trial's second half, averaged over the ranks


def start_seed(seed: int, rank: int, index: int) -> int:
    return seed + rank + index * START_SEED_STRIDE


def choose_start(
    train: TrainConfig,
    *,
    rank: int,
    open_start: Callable[[int], tuple[TrainStep, Iterator[Batch]]],
    step: Callable[[TrainStep, Iterator[Batch]], StepRecord],
) -> tuple[Start, list[float]]:
    """The start a fresh run goes on from, and the loss of every start tried.

    `open_start(k)` builds a fresh model, optimiser and start k's batch stream (start 0's is
    the plain run's) after torch has been seeded for that start; `step` trains one step.
    Every rank takes the same decision: the losses are averaged over the ranks.
    """
    trials = train.start_trials
    steps = train.start_trial_steps if trials > 1 else 0  # one start: the plain run, untried
    best, losses = None, []
    for index in range(trials):
        torch.manual_seed(start_seed(train.seed, rank, index))
        step_fn, batches = open_start(index)
        records = [step(step_fn, batches) for _ in range(steps)]
        if trials == 1:
            return Start(index, step_fn, batches, records, float("nan")), losses
        scored = records[steps // 2 :]
        loss = _mean_over_ranks(
            sum(r.losses["loss/total"] for r in scored) / len(scored),
            device=next(step_fn.segclip.parameters()).device,
        )
        losses.append(loss)
        if best is None or loss < best[0].loss:
            best = Start(index, step_fn, batches, records, loss), _rng_state()
    start, rng = best
    _set_rng_state(rng)
    return start, losses


def _mean_over_ranks(value: float, *, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


def _rng_state() -> tuple[torch.Tensor, torch.Tensor | None]:
    """The CPU generator and the current CUDA device's, which draw the noise of the steps."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def start_metrics(start: Start, losses: list[float]) -> dict[str, float]:
    """For MLflow: which start went on and the loss each start was judged by."""
    return {"start/chosen": start.index} | {
        f"start/{index}/loss": loss for index, loss in enumerate(losses)
    }


def start_line(start: Start, losses: list[float]) -> str:
    tried = ", ".join(f"{index}: {loss:.3f}" for index, loss in enumerate(losses))
    return (
        f"start {start.index} of {len(losses)} goes on (mean loss over the second half of "
        f"each start's {len(start.records)} trial steps: {tried})"
    )
