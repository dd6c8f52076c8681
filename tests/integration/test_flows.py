"""The end-to-end Prefect flow on a tiny demo: real Prefect (temporary API), Ray and MLflow.

The flows run in a child process: a temporary Prefect server leaves threads and
exit handlers behind that break DataLoader workers forked later by other tests.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.stages import STAGES
from segclip.config import load_config
from segclip.stage import read_manifest
from segclip.tracking import RUN_ID_FILE, tracking_client
from segclip.train.loop import RESUMED

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
report["again"] = pipeline_flow(config)
report["again_created"] = created(report["again"])
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
    check_lineage(load_config("tiny", [f"runtime.workdir={tmp_path}", *TINY_RUN]), report)


def check_lineage(config, report):
    """Four parent runs, each with one child per stage: the producing run where the pipeline
    ran the stage, a link child naming the producing run where it reused the output."""
    client = tracking_client(config)
    experiment = client.get_experiment_by_name("segclip").experiment_id
    runs = client.search_runs([experiment], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags["segclip.stage"] == "pipeline"]
    assert len(parents) == 4
    produced = {}  # stage folder -> id of the run that produced it
    for name in ("first", "again", "changed", "forced"):
        parent = parents[["first", "again", "changed", "forced"].index(name)]
        assert (
            parent.data.tags["prefect.flow_run_id"] and parent.data.tags["mlflow.source.git.commit"]
        )
        assert parent.info.status == "FINISHED"
        children = {
            r.data.tags["segclip.stage"]: r
            for r in runs
            if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
        }
        assert list(children) == list(STAGES)
        outputs = report[name]
        for stage, child in children.items():
            folder = str(outputs[stage])
            assert child.data.tags["prefect.flow_run_id"] == parent.data.tags["prefect.flow_run_id"]
            assert parent.data.tags[f"segclip.run.{stage}"] == child.info.run_id
            if "segclip.link" not in child.data.tags:  # ran here
                assert child.data.tags["segclip.stage_key"] == Path(folder).name
                produced[folder] = child.info.run_id
            else:  # reused: linked to the run that produced the output, with its metrics
                assert child.data.tags["segclip.link"] == "reused"
                producer = client.get_run(produced[folder])
                assert child.data.tags["segclip.produced_by"] == producer.info.run_id
                assert child.data.metrics == producer.data.metrics
        assert children["train"].data.metrics["loss/total"] > 0
        miou = children["evaluate"].data.metrics["miou/demo"]
        assert 0 <= miou <= 1 and parent.data.metrics["miou/demo"] == miou
        assert children["ingest"].data.metrics["count/samples"] > 0
    for folder, run_id in produced.items():  # the folder names the run of its current output
        assert (Path(folder) / RUN_ID_FILE).read_text() == run_id
    # Which stages ran in which parent follows from the stage keys.
    ran = [
        sorted(
            r.data.tags["segclip.stage"]
            for r in runs
            if r.data.tags.get("mlflow.parentRunId") == p.info.run_id
            and "segclip.link" not in r.data.tags
        )
        for p in parents
    ]
    assert ran == [sorted(STAGES), [], ["evaluate", "train"], ["evaluate", "superpixels", "train"]]


def segclip_run(workdir: Path, log: Path, *overrides: str) -> subprocess.Popen:
    """`segclip run` on the tiny profile, as a user starts it; output goes to `log`."""
    command = [sys.executable, "-m", "flows.cli", "run", "--profile", "tiny"]
    with log.open("w") as stream:  # a file, not a pipe: a full pipe would block the run
        return subprocess.Popen(
            [*command, f"runtime.workdir={workdir}", *TINY_RUN, *overrides],
            stdout=stream,
            stderr=subprocess.STDOUT,
        )


def test_an_interrupted_run_resumes_training_from_its_last_checkpoint(tmp_path):
    workdir, long_training = tmp_path / "work", ["train.steps=150", "runtime.checkpoint_every=5"]
    first = segclip_run(workdir, tmp_path / "first.log", *long_training)
    deadline = time.monotonic() + 600
    while not list(workdir.glob("train/*/ray/checkpoint_*")):  # mid-training: interrupt
        assert first.poll() is None and time.monotonic() < deadline, tail(tmp_path / "first.log")
        time.sleep(0.2)
    first.send_signal(signal.SIGINT)  # what Ctrl-C sends
    assert first.wait(timeout=120) != 0
    [train_dir] = workdir.glob("train/*")
    assert read_manifest(train_dir) is None, tail(tmp_path / "first.log")  # unfinished
    run_id = (train_dir / RUN_ID_FILE).read_text()

    second = segclip_run(workdir, tmp_path / "second.log", *long_training)
    assert second.wait(timeout=900) == 0, tail(tmp_path / "second.log")
    output = (tmp_path / "second.log").read_text()
    resumed_at = int(output.split(RESUMED, 1)[1].split()[0])
    assert 5 <= resumed_at < 150 and resumed_at % 5 == 0
    assert read_manifest(train_dir).counts["steps"] == 150
    assert (train_dir / RUN_ID_FILE).read_text() == run_id  # one MLflow run for the stage
    client = tracking_client(load_config("tiny", [f"runtime.workdir={workdir}", *TINY_RUN]))
    history = client.get_metric_history(run_id, "loss/total")
    assert [m.step for m in history].count(1) == 1  # step 1 was not trained twice
    assert max(m.step for m in history) == 150
    # The second pipeline's parent links to the training run begun under the first.
    link = client.search_runs(
        [client.get_run(run_id).info.experiment_id],
        filter_string="tags.`segclip.link` = 'resumed'",
    )
    assert [r.data.tags["segclip.produced_by"] for r in link] == [run_id]


def tail(log: Path) -> str:
    return log.read_text()[-3000:]


def test_a_stage_alone_names_the_missing_upstream_output(tmp_path):
    from flows.stages import upstream_inputs

    config = load_config("tiny", [f"runtime.workdir={tmp_path}", *TINY_RUN])
    # The earliest stage that has not finished is the one named.
    with pytest.raises(
        FileNotFoundError, match=r"superpixels needs the ingest output .* run `segclip ingest`"
    ):
        upstream_inputs("train", config)
