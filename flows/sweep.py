"""The sweep flow: one configuration over several seeds and/or a grid of settings.

Every member is a whole pipeline run with today's lineage (a parent run, one child per
stage); members are children of the sweep's own MLflow run, which holds each distinct
config's mean, standard deviation and count of every result and final loss. Stages whose
output does not change between members run once (one ingest and one superpixel pass for a
seed sweep); the others run side by side as Ray tasks (`flows.pipeline.run_pipelines`).
The sweep's folder (`segclip.sweep.SweepRecord`) keeps the runs, so an interrupted sweep
continues where it stopped and a rerun skips every finished member.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from prefect import flow, runtime

from flows.pipeline import (
    PipelineRun,
    StageName,
    checked_force,
    flow_run_tags,
    run_pipelines,
)
from segclip.config import SegCLIPConfig, load_config
from segclip.sweep import (
    Axis,
    Member,
    SweepRecord,
    aggregate_metrics,
    plan_sweep,
    summarize,
    sweep_members,
)
from segclip.tracking import (
    Lineage,
    end_run,
    finish_pipeline_run,
    log_metrics,
    log_params,
    start_pipeline_run,
    summary_metrics,
    tracking_client,
)


@flow(name="segclip-sweep")
def sweep_flow(
    profile: str = "demo",
    overrides: list[str] | None = None,
    seeds: list[int] | None = None,
    force: list[StageName] | None = None,
) -> str:
    """Every member of the sweep, then the aggregates; returns the sweep's folder."""
    fixed, axes = plan_sweep(overrides or [], seeds=seeds or [])
    members = sweep_members(axes)
    configs = [load_config(profile, [*fixed, *member.overrides]) for member in members]
    force = checked_force(force)
    record = SweepRecord.open(configs)
    client = tracking_client(configs[0])
    tags = flow_run_tags()
    _open_runs(record, load_config(profile, fixed), axes, members, configs, tags)
    pending = [i for i, member in enumerate(members) if force or not record.finished(member)]
    runs = [
        PipelineRun(configs[i], Lineage(parent_run_id=_run_of(record, members[i]), tags=tags))
        for i in pending
    ]
    try:
        outcomes = run_pipelines(runs, force) if runs else []
    except BaseException:  # interrupted: the runs show it; a rerun continues them
        for run in [*(r.lineage.parent_run_id for r in runs), record.run_id]:
            end_run(client, run, failed=True)
        raise
    failed = []
    for i, run, outcome in zip(pending, runs, outcomes, strict=True):
        entry = record.members[members[i].label]
        finish_pipeline_run(
            run.config, run.lineage, outcome.mlflow_runs, failed=outcome.error is not None
        )
        if outcome.error is None:
            entry["evaluate"] = outcome.stages["evaluate"].output.url
        else:
            entry.pop("evaluate", None)
            failed.append(f"{members[i].label}: {outcome.error!r}")
        record.save()
    done = [member for member in members if record.finished(member)]
    record.groups = summarize(done, [summary_metrics(client, _run_of(record, m)) for m in done])
    record.save()
    aggregates = [aggregate_metrics(group) for group in record.groups]
    log_metrics(client, record.run_id, {k: v for a in aggregates for k, v in a.items()}, step=0)
    end_run(client, record.run_id, failed=bool(failed))
    if failed:
        raise RuntimeError(
            f"{len(failed)} of {len(members)} sweep members failed (the aggregates cover the "
            f"{len(done)} finished ones; rerun the same command to retry them):\n  "
            + "\n  ".join(failed)
        )
    return str(record.folder)


def _run_of(record: SweepRecord, member: Member) -> str:
    return record.members[member.label]["run_id"]


def _open_runs(
    record: SweepRecord,
    shared: SegCLIPConfig,
    axes: Sequence[Axis],
    members: Sequence[Member],
    configs: Sequence[SegCLIPConfig],
    tags: dict[str, str],
) -> None:
    """The sweep's MLflow run and one child per member, created on the first run of the sweep
    (and for members it did not reach) and kept in its record."""
    name = f"sweep-{runtime.flow_run.name}"
    if record.run_id is None:
        folder = {"segclip.sweep.folder": str(record.folder)}
        lineage = start_pipeline_run(shared, name, tags, kind="sweep", tags=folder)
        record.run_id = lineage.parent_run_id
        values = {f"sweep.{axis.field}": json.dumps(list(axis.values)) for axis in axes}
        log_params(tracking_client(shared), record.run_id, values)
    for member, config in zip(members, configs, strict=True):
        if member.label not in record.members:
            member_tags = {"segclip.member": member.label, "segclip.sweep": record.run_id}
            lineage = start_pipeline_run(
                config, f"{name} {member.label}", tags, parent=record.run_id, tags=member_tags
            )
            record.members[member.label] = {"run_id": lineage.parent_run_id}
    record.save()
