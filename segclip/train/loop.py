"""The per-worker training loop that Ray Train runs on every rank.

Rank 0 logs metrics to MLflow every `runtime.log_every` steps and writes a
checkpoint every `runtime.checkpoint_every` steps through `ray.train.report`,
which every rank calls together. A restarted worker group (after a crash, or a
rerun of an interrupted stage) resumes from the latest reported checkpoint, or,
when none was recorded, from the stage's newest complete checkpoint folder.
"""

from __future__ import annotations

import logging
import pickle
import tempfile
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mlflow.tracking import MlflowClient
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from segclip.config import SegCLIPConfig
from segclip.data.loader import training_loader
from segclip.losses import LossTerms
from segclip.model import SegCLIP, build_model, save_checkpoint
from segclip.tracking import log_metrics
from segclip.train.optim import build_optimizer, build_scheduler
from segclip.train.plan import TrainPlan
from segclip.train.step import TrainStep

MODEL_FILE = "model.safetensors"
RESUMED = "training resumed at step"  # printed by rank 0, followed by the step and the total
STATE_FILE = "state.pt"


@dataclass(frozen=True)
class LoopSettings:
    """Everything a worker needs, as plain data Ray can ship to it."""

    config: dict[str, Any]
    plan: dict[str, int]
    shards: list[str]
    run_id: str | None = None  # the MLflow run rank 0 logs to
    tracking_uri: str | None = None  # resolved by the driver: workers have another cwd
    start_from: str | None = None  # final state of a shorter run this one extends
    failure_marker: str | None = None  # set once an injected failure has happened


def save_training_state(folder: Path, step_fn: TrainStep, step: int) -> None:
    """Model in our checkpoint format plus optimiser, schedule, scaler, step and RNG."""
    save_checkpoint(step_fn.segclip, folder / MODEL_FILE)
    torch.save(
        {
            "step": step,
            "optimizer": step_fn.optimizer.state_dict(),
            "scheduler": step_fn.scheduler.state_dict(),
            "scaler": step_fn.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        },
        folder / STATE_FILE,
    )


def saved_step(folder: Path) -> int | None:
    """The step a checkpoint folder holds, or None when it is incomplete (e.g. cut off while
    being copied to storage)."""
    try:
        with safe_open(str(folder / MODEL_FILE), framework="pt") as model:
            model.keys()
        # mmap: the archive's index is checked, the optimiser tensors are not read into memory
        state = torch.load(folder / STATE_FILE, weights_only=False, map_location="cpu", mmap=True)
        return int(state["step"])
    except (OSError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError, SafetensorError):
        return None


def load_training_state(folder: Path, step_fn: TrainStep, total_steps: int) -> int:
    """Restore what `save_training_state` wrote; returns the step to continue from.

    The schedule is rebuilt for this run's `total_steps` and moved to the saved step,
    so a run extended with more steps continues on its own (longer) schedule.
    """
    step_fn.segclip.load_state_dict(load_file(str(folder / MODEL_FILE)))
    state = torch.load(folder / STATE_FILE, weights_only=False)
    step_fn.optimizer.load_state_dict(state["optimizer"])
    step_fn.scaler.load_state_dict(state["scaler"])
    step = min(state["step"], total_steps)
    step_fn.scheduler.last_epoch = step - 1
    with warnings.catch_warnings():  # "scheduler before optimizer": intended, nothing is skipped
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
        step_fn.scheduler.step()
    torch.set_rng_state(state["torch_rng"])
    return step


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


def _progress_line(step: int, total: int, metrics: dict[str, float]) -> str:
    losses = " ".join(
        f"{name.removeprefix('loss/')} {value:.3f}"
        for name, value in metrics.items()
        if name.startswith("loss/")
    )
    return (
        f"step {step}/{total} | {losses} | {metrics['samples_per_s']:.1f} samples/s | "
        f"data wait {100 * metrics['data_wait_fraction']:.0f}%"
    )


def _build(config: SegCLIPConfig, plan: TrainPlan, device: torch.device) -> TrainStep:
    import ray.train.torch

    model: SegCLIP = build_model(config.model)
    optimizer = build_optimizer(model, config.train)
    scheduler = build_scheduler(optimizer, config.train, plan.total_steps)
    wrapped = ray.train.torch.prepare_model(model)  # device placement and DDP
    return TrainStep(wrapped, optimizer, scheduler, config.loss, config.train, device.type)


def _maybe_inject_failure(settings: LoopSettings, config: SegCLIPConfig, step: int) -> None:
    marker = Path(settings.failure_marker) if settings.failure_marker else None
    if config.runtime.inject_failure_at_step != step or marker is None or marker.exists():
        return
    marker.touch()
    raise RuntimeError(f"injected failure at step {step} (runtime.inject_failure_at_step)")


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`."""
    import ray
    import ray.train
    import ray.train.torch

    logging.getLogger().setLevel(logging.WARNING)  # open_clip's INFO lines, once per worker
    settings = LoopSettings(**loop_config)
    config = SegCLIPConfig.model_validate(settings.config)
    plan = TrainPlan(**settings.plan)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus:
        torch.set_num_threads(int(cpus))  # the CPUs this worker reserved, no more
    torch.manual_seed(config.train.seed + rank)  # DDP broadcasts rank 0's initial weights
    device = ray.train.torch.get_device()
    step_fn = _build(config, plan, device)

    step = 0
    checkpoint = ray.train.get_checkpoint()  # this run's latest, after a restart
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            step = load_training_state(Path(folder), step_fn, plan.total_steps)
    elif settings.start_from:
        step = load_training_state(Path(settings.start_from), step_fn, plan.total_steps)
    if step and rank == 0:
        print(f"{RESUMED} {step} of {plan.total_steps}", flush=True)

    # Resampled shards: a restart draws a fresh stream (seeded by the step) rather than
    # replaying the samples it has already seen.
    batches = iter(
        training_loader(
            settings.shards,
            config,
            plan.worker_batch,
            rank=rank,
            world_size=world_size,
            num_workers=config.runtime.loader_workers,
            resampled=True,
            epoch=step,
        )
    )
    client = MlflowClient(settings.tracking_uri) if rank == 0 and settings.run_id else None
    window, metrics = MetricWindow(), {}
    runtime = config.runtime
    while step < plan.total_steps:
        start = time.perf_counter()
        batch = next(batches).to(device)
        fetched = time.perf_counter()
        terms = step_fn(batch, plan.micro_batches)
        window.add(terms, fetched - start, time.perf_counter() - fetched)
        step += 1
        if rank == 0:
            _maybe_inject_failure(settings, config, step)
        last = step == plan.total_steps
        if step % runtime.log_every == 0 or last:
            metrics = window.flush(config.train.global_batch_size, step_fn.optimizer)
            if rank == 0:  # Ray forwards worker output: this is the driver's progress line
                print(_progress_line(step, plan.total_steps, metrics), flush=True)
            if client is not None:
                log_metrics(client, settings.run_id, metrics, step)
        if step % runtime.checkpoint_every == 0 or last:
            with tempfile.TemporaryDirectory() as folder:
                if rank == 0:
                    save_training_state(Path(folder), step_fn, step)
                ray.train.report(
                    {"step": step, **metrics},
                    checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None,
                )
