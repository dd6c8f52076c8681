"""The end-to-end Prefect flow on a tiny demo: real Prefect (temporary API), Ray and MLflow."""

from pathlib import Path

import pytest

from segclip.config import load_config
from segclip.stage import read_manifest

pytestmark = pytest.mark.slow

TINY_RUN = [
    "demo.train_images=48",
    "ingest.samples_per_shard=16",
    "runtime.ingest_processes=1",
    "train.steps=3",
    "train.global_batch_size=8",
    "runtime.log_every=1",
    "demo.benchmark_images=4",
    "demo.image_size=96",
    "ingest.image_size=96",
    "eval.benchmarks=[demo]",
]


def test_pipeline_reuses_finished_stages_and_reruns_what_a_change_touches(tmp_path):
    from flows.stages import pipeline_flow, superpixels_flow

    config = load_config("tiny", [f"runtime.workdir={tmp_path}", *TINY_RUN])
    first = pipeline_flow(config)
    assert list(first) == ["ingest", "superpixels", "train", "evaluate"]
    for stage, folder in first.items():
        manifest = read_manifest(folder)
        assert manifest.stage == stage and Path(folder).parent.name == stage

    def created(outputs):
        return {stage: read_manifest(folder).created_at for stage, folder in outputs.items()}

    before = created(first)
    assert created(pipeline_flow(config)) == before  # everything reused

    changed = pipeline_flow(
        config.model_copy(update={"train": config.train.model_copy(update={"lr_new": 5e-4})})
    )
    assert changed["ingest"] == first["ingest"] and changed["superpixels"] == first["superpixels"]
    assert changed["train"] != first["train"] and changed["evaluate"] != first["evaluate"]

    forced = pipeline_flow(config, force=["superpixels"])
    assert forced["ingest"] == first["ingest"]
    assert created(forced)["superpixels"] != before["superpixels"]
    assert forced["train"] != first["train"]  # new superpixel manifest -> new keys downstream
    assert superpixels_flow(config) == forced["superpixels"]  # one stage alone finds its input


def test_a_stage_alone_names_the_missing_upstream_output(tmp_path):
    from flows.stages import upstream_inputs

    config = load_config("tiny", [f"runtime.workdir={tmp_path}", *TINY_RUN])
    # The earliest stage that has not finished is the one named.
    with pytest.raises(
        FileNotFoundError, match=r"superpixels needs the ingest output .* run `segclip ingest`"
    ):
        upstream_inputs("train", config)
