"""The end-to-end Prefect flow on a tiny demo: real Prefect (temporary API), Ray and MLflow.

The flows run in a child process: a temporary Prefect server leaves threads and
exit handlers behind that break DataLoader workers forked later by other tests.
"""

import json
import subprocess
import sys
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

SCENARIO = """
import json, sys
from flows.stages import pipeline_flow, superpixels_flow
from segclip.config import load_config
from segclip.stage import read_manifest

config = load_config("tiny", sys.argv[1:])
created = lambda outputs: {s: read_manifest(f).created_at for s, f in outputs.items()}
first = pipeline_flow(config)
report = {"first": first, "first_created": created(first)}
report["again_created"] = created(pipeline_flow(config))
train = config.train.model_copy(update={"lr_new": 5e-4})
report["changed"] = pipeline_flow(config.model_copy(update={"train": train}))
report["forced"] = pipeline_flow(config, force=["superpixels"])
report["forced_created"] = created(report["forced"])
report["alone"] = superpixels_flow(config)
print("REPORT " + json.dumps(report))
"""


def test_pipeline_reuses_finished_stages_and_reruns_what_a_change_touches(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", SCENARIO, f"runtime.workdir={tmp_path}", *TINY_RUN],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.split("REPORT ", 1)[1])
    first = report["first"]
    assert list(first) == ["ingest", "superpixels", "train", "evaluate"]
    for stage, folder in first.items():
        assert read_manifest(folder).stage == stage and Path(folder).parent.name == stage
    assert report["again_created"] == report["first_created"]  # everything reused
    changed = report["changed"]  # a training setting: train and evaluate rerun, data reused
    assert changed["ingest"] == first["ingest"] and changed["superpixels"] == first["superpixels"]
    assert changed["train"] != first["train"] and changed["evaluate"] != first["evaluate"]
    forced = report["forced"]
    assert forced["ingest"] == first["ingest"]
    assert report["forced_created"]["ingest"] == report["first_created"]["ingest"]
    assert report["forced_created"]["superpixels"] != report["first_created"]["superpixels"]
    assert forced["train"] != first["train"]  # new superpixel manifest -> new keys downstream
    assert report["alone"] == forced["superpixels"]  # one stage alone finds its input


def test_a_stage_alone_names_the_missing_upstream_output(tmp_path):
    from flows.stages import upstream_inputs

    config = load_config("tiny", [f"runtime.workdir={tmp_path}", *TINY_RUN])
    # The earliest stage that has not finished is the one named.
    with pytest.raises(
        FileNotFoundError, match=r"superpixels needs the ingest output .* run `segclip ingest`"
    ):
        upstream_inputs("train", config)
