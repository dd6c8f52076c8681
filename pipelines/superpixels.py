"""Superpixel stage: a Ray Data job over the ingest shards, one task per shard.

Each task writes an output shard with every original member plus the
superpixel label map and segment count, then a report; shards that already
have a report are not submitted again, so a rerun after an interruption only
does the missing ones.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray

from pipelines.ray_runtime import connect
from segclip.config import DataConfig, SegCLIPConfig
from segclip.data.shards import ShardReport, report_path, superpixel_shard
from segclip.stage import (
    InputRef,
    ShardRef,
    StageOutput,
    StageResult,
    keyed_dir,
    load_result,
    single_input,
)
from segclip.tracking import NO_LINEAGE, Lineage, tracked_stage

STAGE = "superpixels"
SHARD_DIR = "shards"
# The DataConfig fields the label maps depend on; the crop and patch settings act at training.
SETTINGS = (
    "superpixel_method",
    "felzenszwalb_scale",
    "felzenszwalb_sigma",
    "felzenszwalb_min_size",
)


def stage_config(config: SegCLIPConfig) -> dict[str, Any]:
    return {"data": config.data.model_dump(mode="json", include=set(SETTINGS))}


def _process(row: dict[str, Any], config: DataConfig) -> dict[str, Any]:
    report = superpixel_shard(row["source"], row["target"], config)
    return {"target": row["target"], "samples": report.samples}


def _superpixel_shards(config: SegCLIPConfig, sources: list[str], output_dir: Path) -> StageOutput:
    targets = [output_dir / SHARD_DIR / f"{index:05d}.tar" for index in range(len(sources))]
    todo = [
        {"source": source, "target": str(target)}
        for source, target in zip(sources, targets, strict=True)
        if not report_path(target).is_file()
    ]
    if todo:
        (output_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        connect(config.runtime.ray_address)
        dataset = ray.data.from_items(todo, override_num_blocks=len(todo))
        dataset.map(_process, fn_kwargs={"config": config.data}, num_cpus=1).materialize()
    reports = [ShardReport.model_validate_json(report_path(t).read_text()) for t in targets]
    failures = Counter(failed.reason for report in reports for failed in report.failed)
    return StageOutput(
        counts={
            "samples": sum(report.samples for report in reports),
            "shards": len(targets),
            "shards_run": len(todo),
        },
        failures=dict(sorted(failures.items())),
        failed_samples=[failed for report in reports for failed in report.failed],
        shards=[
            ShardRef(path=str(target.relative_to(output_dir)), samples=report.samples)
            for target, report in zip(targets, reports, strict=True)
        ],
        timings={"shard_seconds": sum(report.seconds for report in reports)},
    )


def output_dir(config: SegCLIPConfig, inputs: Sequence[InputRef]) -> Path:
    """This stage's folder for the config and inputs (finished or not), without running it."""
    return keyed_dir(config.runtime.workdir, STAGE, stage_config(config), inputs)


def run(
    config: SegCLIPConfig,
    inputs: Sequence[InputRef],
    force: bool = False,
    lineage: Lineage = NO_LINEAGE,
) -> StageResult:
    """Superpixels for the shards of one finished ingest output."""
    upstream = load_result(single_input(inputs, STAGE, "ingest output").path)
    return tracked_stage(
        STAGE,
        config,
        stage_config(config),
        inputs,
        lambda output_dir, _tracked: _superpixel_shards(config, upstream.shard_paths, output_dir),
        force,
        lineage,
    )
