import json
import socket
import time

import pytest

from segclip.config import load_config
from segclip.tracking import (
    EXPERIMENT,
    EXPERIMENT_KIND_TAG,
    Lineage,
    experiment_id,
    finish_pipeline_run,
    flatten,
    log_metrics,
    metric_histories,
    runs_page_url,
    save_runs_view,
    start_pipeline_run,
    tracking_client,
    tracking_uri,
)


def test_configs_flatten_to_dotted_params():
    assert flatten({"model": {"num_centers": 8, "betas": [0.9, 0.98]}, "profile": "tiny"}) == {
        "model.num_centers": "8",
        "model.betas": "[0.9, 0.98]",
        "profile": "tiny",
    }


def test_store_is_the_config_then_the_environment_then_the_workdir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_config("tiny", [f"runtime.workdir={tmp_path}"])
    assert tracking_uri(config) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracker:5000")
    assert tracking_uri(config) == "http://tracker:5000"
    configured = load_config("tiny", ["runtime.tracking_uri=sqlite:////data/runs.db"])
    assert tracking_uri(configured) == "sqlite:////data/runs.db"


def test_local_store_keeps_artifacts_in_the_workdir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_config("tiny", [f"runtime.workdir={tmp_path}"])
    client = tracking_client(config)
    experiment = client.get_experiment(experiment_id(client, config))
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert experiment_id(client, config) == experiment.experiment_id  # found, not created again


def test_the_experiment_is_a_model_training_experiment_for_the_ui(tmp_path, monkeypatch):
    """Created with MLflow 3's classic kind; an experiment an older version created untagged
    gets it; a kind someone chose in the UI is kept."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_config("tiny", [f"runtime.workdir={tmp_path}"])
    client = tracking_client(config)
    created = client.get_experiment(experiment_id(client, config))
    assert created.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    client.delete_experiment_tag(created.experiment_id, EXPERIMENT_KIND_TAG)
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(created.experiment_id).tags
    assert experiment_id(client, config) == created.experiment_id
    tags = client.get_experiment_by_name(EXPERIMENT).tags
    assert tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    client.set_experiment_tag(created.experiment_id, EXPERIMENT_KIND_TAG, "genai_development")
    experiment_id(client, config)
    assert client.get_experiment(created.experiment_id).tags[EXPERIMENT_KIND_TAG] == (
        "genai_development"
    )


def test_the_parent_run_carries_the_final_losses_and_the_results(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_config("tiny", [f"runtime.workdir={tmp_path}"])
    client = tracking_client(config)
    lineage = start_pipeline_run(config, "pipeline-test", {})

    def child(stage, metrics_by_step):
        tags = {**Lineage(lineage.parent_run_id).run_tags(), "segclip.stage": stage}
        run = client.create_run(experiment_id(client, config), tags=tags)
        for step, metrics in metrics_by_step.items():
            log_metrics(client, run.info.run_id, metrics, step)
        return run.info.run_id

    train = child(
        "train",
        {
            step: {"loss/total": 10.0 - step, "loss/contrastive": 5.0 - step, "lr/new": 0.1}
            for step in (2, 4, 6)
        },
    )
    evaluate = child(
        "evaluate",
        {0: {"miou/segclip/segclip/demo": 0.25, "miou/segclip/segclip/voc": 0.5, "count/x": 3}},
    )
    finish_pipeline_run(config, lineage, {"train": train, "evaluate": evaluate}, failed=False)
    parent = client.get_run(lineage.parent_run_id)
    assert parent.data.metrics == {
        "loss/total": 4.0,  # the last step's, not the first's
        "loss/contrastive": -1.0,
        "miou/segclip/segclip/demo": 0.25,
        "miou/segclip/segclip/voc": 0.5,
        "count/x": 3.0,  # the last stage's metrics, as before
    }
    assert parent.data.tags["segclip.run.train"] == train
    assert parent.info.status == "FINISHED"
    # A pipeline that stopped after training still shows how far its losses got.
    stopped = start_pipeline_run(config, "pipeline-stopped", {})
    finish_pipeline_run(config, stopped, {"train": train}, failed=True)
    run = client.get_run(stopped.parent_run_id)
    assert run.data.metrics["loss/total"] == 4.0 and run.info.status == "FAILED"


def test_the_runs_view_has_a_column_for_each_miou_and_loss(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_config("tiny", [f"runtime.workdir={tmp_path}"])
    client = tracking_client(config)
    experiment = experiment_id(client, config)
    for metrics in (
        {"miou/segclip/segclip/voc": 0.5, "pixel_accuracy/segclip/segclip/voc": 0.9},
        {"miou/maskclip/tcl448/demo": 0.1, "loss/total": 2.0, "lr/new": 0.1, "count/x": 1},
    ):
        log_metrics(client, client.create_run(experiment).info.run_id, metrics, step=0)

    def columns():
        view = save_runs_view(client, experiment)
        saved = json.loads(client.get_experiment(experiment).tags[f"mlflow.sharedViewState.{view}"])
        assert saved["name"] and isinstance(saved["createdAt"], int)
        return view, json.loads(saved["state"])["selectedColumns"]

    view, selected = columns()
    assert selected == [
        "metrics.`miou/maskclip/tcl448/demo`",
        "metrics.`miou/segclip/segclip/voc`",
        "metrics.`loss/total`",
    ]
    # Rewritten each time: a benchmark measured since appears; so many that the tag would
    # pass MLflow's limit are cut, the losses kept.
    run = client.create_run(experiment).info.run_id
    many = {f"miou/segclip/segclip_learned_scale/benchmark_{i:04d}": 0.0 for i in range(600)}
    log_metrics(client, run, many, step=0)
    again, selected = columns()
    assert again == view and 200 < len(selected) < 600 and selected[-1] == "metrics.`loss/total`"
    assert runs_page_url("http://127.0.0.1:5001/", experiment, view) == (
        f"http://127.0.0.1:5001/#/experiments/{experiment}/runs"
        f"?workflowType=machine_learning&viewStateShareKey={view}"
    )


def test_metric_histories_keep_the_last_value_logged_at_each_step(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_config("tiny", [f"runtime.workdir={tmp_path}"])
    client = tracking_client(config)
    run = client.create_run(experiment_id(client, config)).info.run_id
    for step in (2, 4, 6):
        log_metrics(client, run, {"loss/total": 10 - step, "loss/kl": step, "lr/new": 1}, step)
    time.sleep(0.01)  # later, in milliseconds: restarted from the step-2 checkpoint
    log_metrics(client, run, {"loss/total": 0.5}, 4)
    log_metrics(client, run, {"loss/total": 0.25}, 6)
    assert metric_histories(client, run, "loss/") == {
        "loss/kl": ([2, 4, 6], [2.0, 4.0, 6.0]),
        "loss/total": ([2, 4, 6], [8.0, 0.5, 0.25]),
    }


def test_an_unreachable_server_fails_fast_naming_the_fix():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = load_config("tiny", [f"runtime.tracking_uri=http://127.0.0.1:{port}"])
    with pytest.raises(
        ConnectionError, match=r"(?s)does not answer.*mlflow server --host 127.0.0.1"
    ):
        tracking_client(config)
