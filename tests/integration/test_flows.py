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

from pipelines.registry import STAGE_NAMES
from pipelines.train_worker import RESUMED
from segclip.config import load_config
from segclip.manifest import read_result
from segclip.tracking import RUN_ID_FILE, tracking_client
from tests.integration.tiny_run import TINY_RUN

pytestmark = pytest.mark.slow

SCENARIO = """
import json, sys
from flows.pipeline import pipeline_flow, stage_flow
from segclip.manifest import read_result

overrides = sys.argv[1:]
created = lambda outputs: {s: read_result(f).manifest.created_at for s, f in outputs.items()}
first = pipeline_flow("tiny", overrides)
report = {"first": first, "first_created": created(first)}
report["again"] = pipeline_flow("tiny", overrides)
report["again_created"] = created(report["again"])
report["changed"] = pipeline_flow("tiny", [*overrides, "train.lr_new=5e-4"])
report["forced"] = pipeline_flow("tiny", overrides, force=["superpixels"])
report["forced_created"] = created(report["forced"])
report["alone"] = stage_flow("superpixels", "tiny", overrides)
print("REPORT " + json.dumps(report))
"""


def run_scenario(script: str, workdir: Path) -> dict:
    """Run a flows script in a child process on the tiny run; returns the report it prints."""
    done = subprocess.run(
        [sys.executable, "-c", script, f"runtime.workdir={workdir}", *TINY_RUN],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.split("REPORT ", 1)[1])


def test_pipeline_reuses_finished_stages_and_reruns_what_a_change_touches(tmp_path):
    report = run_scenario(SCENARIO, tmp_path)
    first = report["first"]
    assert list(first) == ["ingest", "superpixels", "train", "evaluate"]
    for stage, folder in first.items():
        assert read_result(folder).manifest.stage == stage and Path(folder).parent.name == stage
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
        assert list(children) == list(STAGE_NAMES)
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
        loss = children["train"].data.metrics["loss/total"]
        assert loss > 0 and parent.data.metrics["loss/total"] == loss  # a column of the parent
        miou = children["evaluate"].data.metrics["miou/segclip/segclip/demo"]
        assert 0 <= miou <= 1 and parent.data.metrics["miou/segclip/segclip/demo"] == miou
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
    assert ran == [
        sorted(STAGE_NAMES),
        [],
        ["evaluate", "train"],
        ["evaluate", "superpixels", "train"],
    ]


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
    # Long enough that the interrupt, sent at the first checkpoint, lands mid-training.
    workdir, long_training = tmp_path / "work", ["train.steps=80", "runtime.checkpoint_every=5"]
    first = segclip_run(workdir, tmp_path / "first.log", *long_training)
    deadline = time.monotonic() + 600
    while not list(workdir.glob("train/*/ray/checkpoint_*")):  # mid-training: interrupt
        assert first.poll() is None and time.monotonic() < deadline, tail(tmp_path / "first.log")
        time.sleep(0.2)
    first.send_signal(signal.SIGINT)  # what Ctrl-C sends
    assert first.wait(timeout=120) != 0
    [train_dir] = workdir.glob("train/*")
    assert read_result(train_dir) is None, tail(tmp_path / "first.log")  # unfinished
    run_id = (train_dir / RUN_ID_FILE).read_text()

    second = segclip_run(workdir, tmp_path / "second.log", *long_training)
    assert second.wait(timeout=900) == 0, tail(tmp_path / "second.log")
    output = (tmp_path / "second.log").read_text()
    resumed_at = int(output.split(RESUMED, 1)[1].split()[0])
    assert 5 <= resumed_at < 80 and resumed_at % 5 == 0
    assert read_result(train_dir).manifest.counts["steps"] == 80
    assert (train_dir / RUN_ID_FILE).read_text() == run_id  # one MLflow run for the stage
    client = tracking_client(load_config("tiny", [f"runtime.workdir={workdir}", *TINY_RUN]))
    history = client.get_metric_history(run_id, "loss/total")
    assert [m.step for m in history].count(1) == 1  # step 1 was not trained twice
    assert max(m.step for m in history) == 80
    # The second pipeline's parent links to the training run begun under the first.
    link = client.search_runs(
        [client.get_run(run_id).info.experiment_id],
        filter_string="tags.`segclip.link` = 'resumed'",
    )
    assert [r.data.tags["segclip.produced_by"] for r in link] == [run_id]


def tail(log: Path) -> str:
    return log.read_text()[-3000:]


def test_a_stage_alone_names_the_missing_upstream_output(tmp_path):
    from pipelines.registry import get_stage, upstream_inputs

    config = load_config("tiny", [f"runtime.workdir={tmp_path}", *TINY_RUN])
    # The earliest stage that has not finished is the one named.
    with pytest.raises(
        FileNotFoundError, match=r"superpixels needs the ingest output .* run `segclip ingest`"
    ):
        upstream_inputs(get_stage("train"), config)


FAILING = """
import json, sys
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from flows.pipeline import pipeline_flow

def task_runs(state):
    flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        return {t.name.split("-")[0]: t.run_count for t in client.read_task_runs(flow_run_filter=flow_run)}

overrides = sys.argv[1:]
missing = pipeline_flow("tiny", [*overrides, "eval.benchmarks=[voc]", "eval.data_root=/nowhere"],
                        return_state=True)
# A new seed: the missing-dataset run above finished training with the same key.
crashed = pipeline_flow("tiny", [*overrides, "train.seed=7", "runtime.inject_failure_at_step=2",
                                 "runtime.max_failures=0"], return_state=True)
report = {
    "missing": [missing.type.value, missing.message, task_runs(missing)],
    "crashed": [crashed.type.value, crashed.message, task_runs(crashed)],
}
print("REPORT " + json.dumps(report))
"""


def test_a_failing_stage_fails_its_run_and_the_pipeline_and_permanent_errors_are_not_retried(
    tmp_path,
):
    report = run_scenario(FAILING, tmp_path)
    state, message, runs = report["missing"]
    assert state == "FAILED" and "VOCdevkit/VOC2012" in message
    assert runs["evaluate"] == 1  # a missing dataset is not retried (evaluate has retries=2)
    state, message, runs = report["crashed"]
    assert state == "FAILED" and "injected failure at step 2" in message

    client = tracking_client(load_config("tiny", [f"runtime.workdir={tmp_path}", *TINY_RUN]))
    experiment = client.get_experiment_by_name("segclip").experiment_id
    runs = client.search_runs([experiment], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags["segclip.stage"] == "pipeline"]
    assert [p.info.status for p in parents] == ["FAILED", "FAILED"]
    crashed_children = {
        r.data.tags["segclip.stage"]: r.info.status
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parents[1].info.run_id
    }
    assert crashed_children["train"] == "FAILED"


def test_the_cli_exits_2_naming_what_is_missing_for_a_stage_that_cannot_run(tmp_path):
    done = subprocess.run(
        [
            *(sys.executable, "-m", "flows.cli", "train", "--profile", "tiny"),
            *(f"runtime.workdir={tmp_path}", *TINY_RUN),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    # The earliest stage that has not finished is the one named, with the command to run.
    assert "segclip train: superpixels needs the ingest output" in done.stderr
    assert "run `segclip ingest`" in done.stderr
