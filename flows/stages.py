"""One Prefect flow per stage and the end-to-end flow; parameters are the typed config.

Stage keys decide what runs: each task calls the stage's `run`, which returns at
once when a finished output with the same key exists. Forcing a stage reruns it;
its new manifest digest changes the keys of everything after it, so they rerun too.
MLflow runs carry the Prefect flow-run id; the end-to-end flow opens a parent run
with one child per stage (see `segclip.tracking` for reused stages).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from prefect import flow, get_run_logger, runtime, task
from prefect.tasks import exponential_backoff

import segclip  # noqa: F401  (torchvision fix before open_clip, in every flow process)
from pipelines import evaluate, ingest, superpixels, train
from segclip.config import SegCLIPConfig
from segclip.stage import InputRef, manifest_ref, read_manifest
from segclip.tracking import (
    Lineage,
    finish_pipeline_run,
    link_stage_run,
    start_pipeline_run,
    tracking_client,
)

STAGES: dict[str, ModuleType] = {
    "ingest": ingest,
    "superpixels": superpixels,
    "train": train,
    "evaluate": evaluate,
}
# Retries where a second attempt can succeed: downloads, and evaluation's data and tracking I/O.
RETRIES = {"ingest": 2, "superpixels": 0, "train": 0, "evaluate": 2}


def upstream_inputs(stage: str, config: SegCLIPConfig) -> list[InputRef]:
    """The finished outputs a stage reads, found from the config (for a stage run alone)."""
    names = list(STAGES)
    position = names.index(stage)
    if position == 0:
        return []
    previous = names[position - 1]
    folder = STAGES[previous].output_dir(config, upstream_inputs(previous, config))
    try:
        return [manifest_ref(folder)]
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{stage} needs the {previous} output for this configuration at {folder}, which has "
            f"not finished; run `segclip {previous}` (or `segclip run`) with the same settings"
        ) from None


@dataclass(frozen=True)
class StageRun:
    """What a stage task hands on: its output for the next stage, its MLflow run for lineage."""

    output: InputRef
    mlflow_run_id: str


def _flow_run_tags() -> dict[str, str]:
    return {
        "prefect.flow_run_id": str(runtime.flow_run.id),
        "prefect.flow": str(runtime.flow_run.flow_name),
    }


def _stage_task(name: str) -> Callable[..., StageRun]:
    retries = RETRIES[name]

    @task(
        name=name,
        retries=retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=10) if retries else 0,
    )
    def run_stage(
        config: SegCLIPConfig, inputs: list[InputRef], force: bool, lineage: Lineage
    ) -> StageRun:
        result = STAGES[name].run(config, inputs, force=force, lineage=lineage)
        state = "reused" if result.skipped else "finished"
        get_run_logger().info("%s %s: %s", name, state, result.output_dir)
        return StageRun(result.ref, link_stage_run(tracking_client(config), result, lineage))

    return run_stage


STAGE_TASKS = {name: _stage_task(name) for name in STAGES}


def _run_alone(stage: str, config: SegCLIPConfig, force: bool) -> str:
    lineage = Lineage(tags=_flow_run_tags())
    return STAGE_TASKS[stage](config, upstream_inputs(stage, config), force, lineage).output.path


@flow(name="segclip-ingest")
def ingest_flow(config: SegCLIPConfig, force: bool = False) -> str:
    """Image-text pairs -> webdataset shards."""
    return _run_alone("ingest", config, force)


@flow(name="segclip-superpixels")
def superpixels_flow(config: SegCLIPConfig, force: bool = False) -> str:
    """Ingest shards -> shards with superpixel label maps."""
    return _run_alone("superpixels", config, force)


@flow(name="segclip-train")
def train_flow(config: SegCLIPConfig, force: bool = False) -> str:
    """Superpixel shards -> trained SegCLIP."""
    return _run_alone("train", config, force)


@flow(name="segclip-evaluate")
def evaluate_flow(config: SegCLIPConfig, force: bool = False) -> str:
    """Trained model -> zero-shot segmentation benchmarks."""
    return _run_alone("evaluate", config, force)


STAGE_FLOWS = {
    "ingest": ingest_flow,
    "superpixels": superpixels_flow,
    "train": train_flow,
    "evaluate": evaluate_flow,
}


@flow(name="segclip-pipeline")
def pipeline_flow(config: SegCLIPConfig, force: list[str] | None = None) -> dict[str, str]:
    """Every stage in order; finished ones with unchanged keys are reused."""
    force = force or []
    unknown = set(force) - set(STAGES)
    if unknown:
        raise ValueError(f"cannot force {sorted(unknown)}: stages are {list(STAGES)}")
    lineage = start_pipeline_run(config, f"pipeline-{runtime.flow_run.name}", _flow_run_tags())
    outputs: dict[str, str] = {}
    stage_runs: dict[str, str] = {}
    inputs: list[InputRef] = []
    try:
        for name, stage_task in STAGE_TASKS.items():
            done = stage_task(config, inputs, name in force, lineage)
            outputs[name], inputs = done.output.path, [done.output]
            stage_runs[name] = done.mlflow_run_id
    finally:
        failed = len(stage_runs) < len(STAGE_TASKS)
        finish_pipeline_run(config, lineage, stage_runs, failed)
    return outputs


def stage_status(config: SegCLIPConfig) -> list[str]:
    """One line per stage: finished (with its counts), started, or not run; nothing is run."""
    lines, inputs = [], []
    for name, module in STAGES.items():
        if inputs is None:
            lines.append(f"{name:12s} waiting for the stage before it")
            continue
        folder = module.output_dir(config, inputs)
        manifest = read_manifest(folder)
        if manifest is not None:
            counts = ", ".join(f"{k}={v}" for k, v in manifest.counts.items())
            lines.append(f"{name:12s} finished  {folder}  {counts}")
            inputs = [manifest_ref(folder)]
        else:
            state = "started (will resume)" if folder.exists() else "not run"
            lines.append(f"{name:12s} {state}  {folder}")
            inputs = None
    return lines
