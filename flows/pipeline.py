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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from prefect import flow, get_run_logger, runtime, task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from prefect.tasks import Task, exponential_backoff

import segclip  # noqa: F401  (torchvision fix before open_clip, in every flow process)
from pipelines.ray_runtime import disconnect
from pipelines.registry import STAGE_NAMES, get_stage, run_stage, stages, upstream_inputs
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
    name: str,
    config: SegCLIPConfig,
    inputs: list[DataRef],
    *,
    force: bool,
    lineage: Lineage,
    on_ray: bool = False,
) -> StageRun:
    result = run_stage(name, config, inputs, force=force, lineage=lineage, on_ray=on_ray)
    state = "reused" if result.skipped else "finished"
    get_run_logger().info("%s %s: %s", name, state, result.output_dir)
    return StageRun(result.ref, link_stage_run(tracking_client(config), result, lineage))


def _stage_task(stage: Stage) -> Task:
    return _run_stage.with_options(name=stage.name, retries=stage.retries)


@dataclass(frozen=True)
class PipelineRun:
    """One end-to-end run: its config and the MLflow parent its stage runs belong to."""

    config: SegCLIPConfig
    lineage: Lineage


@dataclass
class PipelineOutcome:
    """The stages a pipeline run got through, and what stopped it, if anything."""

    stages: dict[str, StageRun] = field(default_factory=dict)
    error: BaseException | None = None

    @property
    def mlflow_runs(self) -> dict[str, str]:
        return {name: done.mlflow_run_id for name, done in self.stages.items()}


def run_pipelines(runs: Sequence[PipelineRun], force: Sequence[str]) -> list[PipelineOutcome]:
    """Every stage in order, for several pipeline runs at once (a sweep's members, or one run).

    Runs whose stage output is the same (same settings, same inputs) share it: the first of
    them produces it and the others reuse it, as any rerun does. Distinct outputs of a stage
    run side by side as Ray tasks (a seed sweep's trainings and evaluations); a stage with one
    output runs here, in this thread (as `segclip run` always did: Ctrl-C stops it at once).
    A run that fails stops there; the others go on."""
    outcomes = [PipelineOutcome() for _ in runs]
    for position, stage in enumerate(stages()):
        going = [i for i, outcome in enumerate(outcomes) if outcome.error is None]
        previous = STAGE_NAMES[position - 1] if position else None
        inputs = {i: [outcomes[i].stages[previous].output] if previous else [] for i in going}
        source: dict[int, int] = {}  # run -> the run that produces its output of this stage
        producers: dict[str, int] = {}  # output folder -> that run
        for i in going:
            config = runs[i].config
            folder = str(stage.output_dir(config, stage.resolve_inputs(config, inputs[i])))
            source[i] = producers.setdefault(folder, i)
        side_by_side = len(producers) > 1
        submitted = {
            i: _stage_task(stage).submit(
                stage.name,
                runs[i].config,
                inputs[i],
                force=stage.name in force,
                lineage=runs[i].lineage,
                on_ray=True,
            )
            for i in producers.values()
            if side_by_side
        }
        try:
            for i in going:  # each output's producer comes before the runs that reuse it
                if source[i] != i and outcomes[source[i]].error is not None:
                    outcomes[i].error = outcomes[source[i]].error
                    continue
                forced = stage.name in force and source[i] == i
                try:
                    outcomes[i].stages[stage.name] = (
                        submitted[i].result()
                        if i in submitted
                        else _stage_task(stage)(
                            stage.name,
                            runs[i].config,
                            inputs[i],
                            force=forced,
                            lineage=runs[i].lineage,
                        )
                    )
                except Exception as error:  # kept with its run; the caller raises it
                    outcomes[i].error = error
        except BaseException:
            if submitted:  # interrupted: stop the Ray tasks, whose threads would hold the exit
                disconnect()
            raise
    return outcomes


def flow_run_tags() -> dict[str, str]:
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
    lineage = Lineage(tags=flow_run_tags())
    done = _stage_task(chosen)(chosen.name, config, inputs, force=force, lineage=lineage)
    return done.output.url


def checked_force(force: Sequence[str] | None) -> list[str]:
    unknown = set(force or []) - set(STAGE_NAMES)
    if unknown:
        raise ValueError(f"cannot force {sorted(unknown)}: stages are {list(STAGE_NAMES)}")
    return list(force or [])


@flow(name="segclip-pipeline")
def pipeline_flow(
    profile: str = "demo",
    overrides: list[str] | None = None,
    force: list[StageName] | None = None,
) -> dict[str, str]:
    """Every stage in order; finished ones with unchanged keys are reused."""
    config = load_config(profile, overrides or [])
    force = checked_force(force)
    name = f"pipeline-{runtime.flow_run.name}"
    run = PipelineRun(config, start_pipeline_run(config, name, flow_run_tags()))
    outcome = PipelineOutcome()
    try:
        [outcome] = run_pipelines([run], force)
    finally:
        failed = len(outcome.stages) < len(STAGE_NAMES)
        finish_pipeline_run(config, run.lineage, outcome.mlflow_runs, failed=failed)
    if outcome.error is not None:
        raise outcome.error
    return {name: done.output.url for name, done in outcome.stages.items()}
