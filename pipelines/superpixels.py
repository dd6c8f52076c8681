"""Superpixel stage: a Ray Data job over the ingest shards, one task per shard.

Each task writes an output shard with every original member plus the
superpixel label map and segment count, then a report; shards that already
have a report are not submitted again, so a rerun after an interruption only
does the missing ones. Shards are read and written where the workdir is, so
tasks on any node of a cluster reach them when it is an object store.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import ray

from pipelines.ray_runtime import connect, node_id
from segclip.config import DataConfig, SegCLIPConfig
from segclip.data.shards import SHARD_DIR, ShardReport, report_path, shard_name, superpixel_shard
from segclip.manifest import DataRef, ShardRef, load_result
from segclip.stage import Stage, StageContext, StageOutput

# The DataConfig fields the label maps depend on; the crop and patch settings act at training.
SETTINGS = (
    "superpixel_method",
    "felzenszwalb_scale",
    "felzenszwalb_sigma",
    "felzenszwalb_min_size",
)


def settings(config: SegCLIPConfig) -> dict[str, Any]:
    return {"data": config.data.model_dump(mode="json", include=set(SETTINGS))}


def _process(row: dict[str, Any], config: DataConfig) -> dict[str, Any]:
    report = superpixel_shard(row["source"], row["target"], config)
    return {"target": row["target"], "samples": report.samples, "node": node_id()}


def _ingest_shards(config: SegCLIPConfig, inputs: list[DataRef]) -> list[str]:
    return load_result(inputs[0].url).shard_urls


def _superpixel_shards(context: StageContext[list[str]]) -> StageOutput:
    config, output_dir, sources = context.config, context.output_dir, context.prepared
    targets = [output_dir / SHARD_DIR / shard_name(index) for index in range(len(sources))]
    todo = [
        {"source": source, "target": str(target)}
        for source, target in zip(sources, targets, strict=True)
        if not report_path(target).is_file()
    ]
    nodes = []
    if todo:
        connect(config.runtime.ray_address)
        dataset = ray.data.from_items(todo, override_num_blocks=len(todo))
        done = dataset.map(_process, fn_kwargs={"config": config.data}, num_cpus=1)
        nodes = [row["node"] for row in done.take_all()]
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
            ShardRef(path=f"{SHARD_DIR}/{target.name}", samples=report.samples)
            for target, report in zip(targets, reports, strict=True)
        ],
        timings={"shard_seconds": sum(report.seconds for report in reports)},
        nodes=nodes,
    )


STAGE = Stage[list[str]](
    name="superpixels",
    settings=settings,
    reads="ingest",
    prepare=_ingest_shards,
    body=_superpixel_shards,
)
run = STAGE.run
