"""The numbers a distributed run derives from the config and the data, fixed before it starts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from segclip.config import ConfigError, SegCLIPConfig


@dataclass(frozen=True)
class TrainPlan:
    world_size: int
    worker_batch: int  # samples per worker per optimiser step
    micro_batches: int  # accumulated forward/backward passes per step
    steps_per_epoch: int
    total_steps: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def plan_training(config: SegCLIPConfig, samples: int) -> TrainPlan:
    """Per-worker batch and accumulation from the global batch; the step count from the data.

    The global batch is the config's whatever the worker count, so results do not
    depend on how wide the run is.
    """
    world = config.runtime.train_workers
    global_batch = config.train.global_batch_size
    if global_batch % world:
        raise ConfigError(
            f"train.global_batch_size={global_batch} does not split evenly over "
            f"runtime.train_workers={world}; use a multiple of {world}"
        )
    worker_batch = global_batch // world
    cap = config.runtime.max_worker_batch or worker_batch
    # The fewest equal micro-batches that each fit under the cap.
    micro_batches = next(
        k for k in range(math.ceil(worker_batch / cap), worker_batch + 1) if worker_batch % k == 0
    )
    steps_per_epoch = samples // global_batch
    if config.train.steps is None and steps_per_epoch == 0:
        raise ConfigError(
            f"{samples} training samples do not fill one global batch of {global_batch}; "
            "lower train.global_batch_size, ingest more data or set train.steps"
        )
    total_steps = config.train.steps or config.train.epochs * steps_per_epoch
    if problem := config.train.trials_problem(total_steps):
        raise ConfigError(problem)
    return TrainPlan(
        world_size=world,
        worker_batch=worker_batch,
        micro_batches=micro_batches,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
    )
