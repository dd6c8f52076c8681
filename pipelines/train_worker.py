"""The per-worker training loop that Ray Train runs on every rank.

Rank 0 logs metrics to MLflow every `runtime.log_every` steps and writes a
checkpoint every `runtime.checkpoint_every` steps through `ray.train.report`,
which every rank calls together. A restarted worker group (after a crash, or a
rerun of an interrupted stage) resumes from the latest reported checkpoint, or,
when none was recorded, from the stage's newest complete checkpoint folder.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from mlflow.tracking import MlflowClient

from pipelines.ray_runtime import node_id, use_reserved_cpus
from segclip.config import SegCLIPConfig
from segclip.data.loader import training_loader
from segclip.model import build_model
from segclip.storage import location
from segclip.tracking import log_metrics
from segclip.train import Batch, TrainStep, build_train_step
from segclip.train.metric_window import MetricWindow, progress_line
from segclip.train.plan import TrainPlan
from segclip.train.starts import choose_start, start_line, start_metrics, start_seed
from segclip.train.state import load_training_state, reseed_for_resume, save_training_state
from segclip.train.step import DDP_OPTIONS, StepRecord, timed_step

RESUMED = "training resumed at step"  # printed by rank 0, followed by the step and the total


@dataclass(frozen=True, kw_only=True)
class WorkerPayload:
    """Everything a worker needs; Ray pickles it to each rank as it is."""

    config: SegCLIPConfig
    plan: TrainPlan
    shards: list[str]  # superpixel shard URLs
    run_id: str | None = None  # the MLflow run rank 0 logs to
    tracking_uri: str | None = None  # resolved by the driver: workers have another cwd
    start_from: str | None = None  # final state of a shorter run this one extends
    failure_marker: str | None = None  # set once an injected failure has happened


def _build(config: SegCLIPConfig, plan: TrainPlan, device: torch.device) -> TrainStep:
    return build_train_step(
        build_model(config.model),
        config,
        total_steps=plan.total_steps,
        device_type=device.type,
        wrap=partial(  # device placement and DDP
            ray.train.torch.prepare_model, parallel_strategy_kwargs=DDP_OPTIONS
        ),
    )


def _maybe_inject_failure(payload: WorkerPayload, step: int) -> None:
    """Testing fault tolerance: rank 0 crashes once at `runtime.inject_failure_at_step`."""
    if payload.config.runtime.inject_failure_at_step != step or payload.failure_marker is None:
        return
    marker = location(payload.failure_marker)
    if marker.exists():
        return
    marker.write_text(str(step))
    raise RuntimeError(f"injected failure at step {step} (runtime.inject_failure_at_step)")


def _resumes(payload: WorkerPayload) -> bool:
    """Whether this run goes on from a checkpoint (after a restart, or of a run it extends)."""
    return ray.train.get_checkpoint() is not None or bool(payload.start_from)


def _resume_step(payload: WorkerPayload, step_fn: TrainStep) -> int:
    """Restore this run's latest checkpoint after a restart, else the run it extends."""
    total = payload.plan.total_steps
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            return load_training_state(folder, step_fn, total)
    return load_training_state(payload.start_from, step_fn, total)


def _group_nodes() -> list[str]:
    """The Ray nodes of every rank, gathered so rank 0 can report where the run trained."""
    nodes = [node_id()]
    if dist.is_initialized():
        nodes = [""] * dist.get_world_size()
        dist.all_gather_object(nodes, node_id())
    return nodes


def train_worker(loop_config: dict[str, WorkerPayload]) -> None:
    """Ray Train's `train_loop_per_worker`."""
    logging.getLogger().setLevel(logging.WARNING)  # open_clip's INFO lines, once per worker
    payload = loop_config["payload"]
    config, plan, runtime = payload.config, payload.plan, payload.config.runtime
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    use_reserved_cpus()
    device = ray.train.torch.get_device()
    client = MlflowClient(payload.tracking_uri) if rank == 0 and payload.run_id else None
    window, metrics = MetricWindow(), {}

    def batches_from(step: int, stream: int = 0) -> Iterator[Batch]:
        # Resampled shards: a restart draws a fresh stream (seeded by the step) rather than
        # replaying the samples it has already seen.
        loader = training_loader(
            payload.shards,
            config,
            plan.worker_batch,
            rank=rank,
            world_size=world_size,
            num_workers=runtime.loader_workers,
            resampled=True,
            epoch=step,
            stream=stream,
        )
        return iter(loader)

    def train_step(step_fn: TrainStep, batches: Iterator[Batch]) -> StepRecord:
        return timed_step(step_fn, batches, device=device, micro_batches=plan.micro_batches)

    def log(step: int, record: StepRecord) -> None:
        nonlocal metrics
        window.add(record)
        if step % runtime.log_every == 0 or step == plan.total_steps:
            metrics = window.flush(config.train.global_batch_size)
            if rank == 0:  # Ray forwards worker output: this is the driver's progress line
                print(progress_line(step, plan.total_steps, metrics), flush=True)
            if client is not None:
                log_metrics(client, payload.run_id, metrics, step)

    if _resumes(payload):
        torch.manual_seed(start_seed(config.train.seed, rank, 0))  # DDP broadcasts rank 0's
        step_fn = _build(config, plan, device)
        step = _resume_step(payload, step_fn)
        reseed_for_resume(config.train.seed, rank, step)
        if rank == 0:
            print(f"{RESUMED} {step} of {plan.total_steps}", flush=True)
        batches = batches_from(step)
    else:
        start, losses = choose_start(
            config.train,
            rank=rank,
            open_start=lambda index: (_build(config, plan, device), batches_from(0, index)),
            step=train_step,
        )
        step_fn, batches, step = start.step_fn, start.batches, len(start.records)
        if losses and rank == 0:
            print(start_line(start, losses), flush=True)
        if losses and client is not None:
            log_metrics(client, payload.run_id, start_metrics(start, losses), step)
        for done, record in enumerate(start.records, 1):  # the trial steps of the start kept
            log(done, record)
    nodes = _group_nodes()

    while step < plan.total_steps:
        record = train_step(step_fn, batches)
        step += 1
        if rank == 0:
            _maybe_inject_failure(payload, step)
        log(step, record)
        last = step == plan.total_steps
        if step % runtime.checkpoint_every == 0 or last:
            with tempfile.TemporaryDirectory() as folder:
                if rank == 0:
                    save_training_state(Path(folder), step_fn, step)
                ray.train.report(
                    {"step": step, "nodes": nodes, **metrics},
                    checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None,
                )
