"""The pipeline's stages in order: the one list that the flows, the CLI and `status` read.

Adding a stage is one entry here (and its module, `pipelines.<name>`, defining `STAGE`).
Each stage reads the output of the stage named by its `reads`, so a stage run alone
finds its input from the config by walking back through this list. A stage's module
is imported when the stage is first used: they pull in torch, open_clip, Ray and MLflow,
which `segclip --help` or `segclip config` should not wait for.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from importlib import import_module
from typing import TYPE_CHECKING

from segclip.config import SegCLIPConfig
from segclip.manifest import DataRef, StageResult, read_result
from segclip.storage import location, use_s3_endpoint

if TYPE_CHECKING:
    from segclip.stage import Stage
    from segclip.tracking import Lineage

STAGE_HELP: dict[str, str] = {  # name -> what the stage does, in pipeline order
    "ingest": "download or adopt image-text pairs into webdataset shards",
    "superpixels": "add superpixel label maps to the ingested shards (Ray Data)",
    "train": "train SegCLIP on the superpixel shards (Ray Train, MLflow)",
    "evaluate": "zero-shot segmentation benchmarks of the trained model",
}
STAGE_NAMES: tuple[str, ...] = tuple(STAGE_HELP)


@cache
def get_stage(name: str) -> Stage:
    if name not in STAGE_HELP:
        raise ValueError(f"unknown stage {name!r}; stages are {list(STAGE_NAMES)}")
    stage = import_module(f"pipelines.{name}").STAGE
    if stage.name != name:
        raise TypeError(f"pipelines.{name}.STAGE is named {stage.name!r}")
    return stage


def stages() -> tuple[Stage, ...]:
    """Every stage, in pipeline order."""
    return tuple(get_stage(name) for name in STAGE_NAMES)


def run_stage(
    name: str,
    config: SegCLIPConfig,
    inputs: Sequence[DataRef],
    *,
    force: bool,
    lineage: Lineage,
    on_ray: bool = False,
) -> StageResult:
    """Run (or reuse) one stage's output. `on_ray` runs it as a Ray task on this process's node
    instead, so several outputs (a sweep's trainings) proceed side by side: the task reserves no
    CPU (the stage's own Ray work reserves what it uses) and gets the workdir and the MLflow
    store resolved here, since a Ray worker has another cwd and maybe another environment."""
    if not on_ray:
        return get_stage(name).run(config, inputs, force=force, lineage=lineage)
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipelines.ray_runtime import connect, node_id
    from segclip.tracking import tracking_uri

    runtime = config.runtime.model_copy(
        update={
            "workdir": str(location(config.runtime.workdir)),
            "tracking_uri": tracking_uri(config),
        }
    )
    connect(config.runtime.ray_address)
    task = ray.remote(num_cpus=0)(run_stage).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id(), soft=False)
    )
    return ray.get(
        task.remote(
            name,
            config.model_copy(update={"runtime": runtime}),
            list(inputs),
            force=force,
            lineage=lineage,
        )
    )


def upstream_inputs(stage: Stage, config: SegCLIPConfig) -> list[DataRef]:
    """The finished output a stage reads, found from the config (for a stage run alone)."""
    if stage.reads is None or stage.given(config) is not None:
        return []
    use_s3_endpoint(config.runtime.s3_endpoint_url)
    previous = get_stage(stage.reads)
    folder = previous.output_dir(
        config, previous.resolve_inputs(config, upstream_inputs(previous, config))
    )
    finished = read_result(folder)
    if finished is None:
        raise FileNotFoundError(
            f"{stage.name} needs the {previous.name} output for this configuration at {folder}, "
            f"which has not finished; run `segclip {previous.name}` (or `segclip run`) with the "
            "same settings"
        )
    return [finished.ref]


def stage_status(config: SegCLIPConfig) -> list[str]:
    """One line per stage: finished (with its counts), started, or not run; nothing is run."""
    use_s3_endpoint(config.runtime.s3_endpoint_url)
    lines: list[str] = []
    upstream: list[DataRef] | None = []
    for stage in stages():
        if upstream is None:
            lines.append(f"{stage.name:12s} waiting for the stage before it")
            continue
        folder = stage.output_dir(config, stage.resolve_inputs(config, upstream))
        finished = read_result(folder)
        if finished is not None:
            counts = ", ".join(f"{k}={v}" for k, v in finished.manifest.counts.items())
            lines.append(f"{stage.name:12s} finished  {folder}  {counts}")
            upstream = [finished.ref]
        else:
            state = "started (will resume)" if folder.exists() else "not run"
            lines.append(f"{stage.name:12s} {state}  {folder}")
            upstream = None
    return lines
