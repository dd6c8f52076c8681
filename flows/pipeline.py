"""Prefect flows: one for any single stage and one for the whole pipeline, both generated from
the stage registry; parameters are a profile and dotted overrides, resolved when the flow runs.

Stage keys decide what runs: each task calls the stage's `run`, which returns at
once when a finished output with the same key exists. Forcing a stage reruns it;
its new manifest digest changes the keys of everything after it, so they rerun too.
A stage retries with backoff only on errors a retry can fix (see
`segclip.stage.can_succeed_on_retry`). MLflow runs carry the Prefect flow-run id;
the pipeline flow opens a parent run with one child per stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prefect import flow, get_run_logger, runtime, task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from prefect.tasks import Task, exponential_backoff

import segclip  # noqa: F401  (torchvision fix before open_clip, in every flow process)
from pipelines.registry import STAGE_NAMES, STAGES, get_stage, upstream_inputs
from segclip.config import SegCLIPConfig, load_config
from segclip.manifest import DataRef
from segclip.stage import Stage, can_succeed_on_retry
from segclip.tracking import (
    Lineage,
    finish_pipeline_run,
    link_stage_run,
    start_pipeline_run,
    tracking_client,
)

StageName = Literal[STAGE_NAMES]  # type: ignore[valid-type]  (the registry's names)


@dataclass(frozen=True)
class StageRun:
    """What a stage task hands on: its output for the next stage, its MLflow run for lineage."""

    output: DataRef
    mlflow_run_id: str


def _worth_retrying(task: Task, task_run: TaskRun, state: State) -> bool:
    return not isinstance(state.data, BaseException) or can_succeed_on_retry(state.data)


@task(retry_condition_fn=_worth_retrying, retry_delay_seconds=exponential_backoff(10))
def _run_stage(
    name: str, config: SegCLIPConfig, inputs: list[DataRef], *, force: bool, lineage: Lineage
) -> StageRun:
    result = get_stage(name).run(config, inputs, force=force, lineage=lineage)
    state = "reused" if result.skipped else "finished"
    get_run_logger().info("%s %s: %s", name, state, result.output_dir)
    return StageRun(result.ref, link_stage_run(tracking_client(config), result, lineage))


def _stage_task(stage: Stage) -> Task:
    return _run_stage.with_options(name=stage.name, retries=stage.retries)


def _flow_run_tags() -> dict[str, str]:
    return {
        "prefect.flow_run_id": str(runtime.flow_run.id),
        "prefect.flow": str(runtime.flow_run.flow_name),
    }


@flow(name="segclip-stage", flow_run_name="{stage}")
def stage_flow(
    stage: StageName,
    profile: str = "demo",
    overrides: list[str] | None = None,
    force: bool = False,
) -> str:
    """One stage alone; its input is the finished output the same config gives upstream."""
    config = load_config(profile, overrides or [])
    chosen = get_stage(stage)
    inputs = upstream_inputs(chosen, config)
    lineage = Lineage(tags=_flow_run_tags())
    done = _stage_task(chosen)(chosen.name, config, inputs, force=force, lineage=lineage)
    return done.output.url


@flow(name="segclip-pipeline")
def pipeline_flow(
    profile: str = "demo",
    overrides: list[str] | None = None,
    force: list[StageName] | None = None,
) -> dict[str, str]:
    """Every stage in order; finished ones with unchanged keys are reused."""
    config = load_config(profile, overrides or [])
    force = force or []
    unknown = set(force) - set(STAGE_NAMES)
    if unknown:
        raise ValueError(f"cannot force {sorted(unknown)}: stages are {list(STAGE_NAMES)}")
    lineage = start_pipeline_run(config, f"pipeline-{runtime.flow_run.name}", _flow_run_tags())
    outputs: dict[str, str] = {}
    stage_runs: dict[str, str] = {}
    inputs: list[DataRef] = []
    try:
        for stage in STAGES:
            forced = stage.name in force
            done = _stage_task(stage)(stage.name, config, inputs, force=forced, lineage=lineage)
            outputs[stage.name], inputs = done.output.url, [done.output]
            stage_runs[stage.name] = done.mlflow_run_id
    finally:
        finish_pipeline_run(config, lineage, stage_runs, failed=len(stage_runs) < len(STAGES))
    return outputs
