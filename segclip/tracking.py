"""MLflow conventions: where runs are stored, how configs become params, lineage tags.

Default store: `<workdir>/mlflow.db` (SQLite) with artifacts in
`<workdir>/mlartifacts`; for a workdir on an object store the SQLite file lives in
a local cache folder (artifacts still go to the store). `runtime.tracking_uri` or
`MLFLOW_TRACKING_URI` points at any other store, e.g. an MLflow server.

Lineage: each stage output has one MLflow run, created when the stage first
runs. An end-to-end run gets a parent run; the stages it runs become its
children, and a stage whose output it reuses (or whose run began under an
earlier parent, as when an interrupted training resumes) gets a link child that
names the producing run and carries a copy of its latest metrics, so every
parent shows all four stages side by side.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID
from upath import UPath

from segclip.config import SegCLIPConfig
from segclip.manifest import MANIFEST_NAME, DataRef, StageResult, code_revision, json_digest
from segclip.storage import is_local, local_copy, location

EXPERIMENT = "segclip"
RUN_ID_FILE = "mlflow_run_id"
# Metric prefixes a pipeline's parent run copies from its stages: the losses training logs
# (their values at the last step) and the results evaluation logs.
SUMMARY_METRICS = ("loss/", "miou/", "pixel_accuracy/")
MAX_PARAM_LENGTH = 6000
SERVER_PROBE_TIMEOUT_S = 5.0
# The experiment's kind for MLflow 3's UI: "custom_model_development" is its classic
# model-training kind ("Machine learning": runs, metrics, charts) as opposed to a GenAI project
# (traces first); the value is the ExperimentKind enum of the UI bundled with MLflow 3.17. That
# UI also keeps a per-browser GenAI / model-training switch, so the runs page URL names it too
# (runs_page_url).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# A saved view of the runs table (the UI's "Views" menu; the UI stores each as an experiment tag
# with this prefix): the mIoU columns, then the losses.
RUNS_VIEW, RUNS_VIEW_NAME = "segclip-results", "segclip: mIoU and losses"
RUNS_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
RUNS_VIEW_MAX_RUNS = 1000  # the newest runs name the columns
RUNS_VIEW_MAX_LENGTH = 20_000  # MLflow's limit on an experiment tag's value


def _local_store_folder(workdir: UPath) -> Path:
    """Beside a local workdir; for a workdir on an object store, a local cache folder of its
    own (SQLite needs a local file; on a cluster use an MLflow server)."""
    if is_local(workdir):
        return Path(workdir)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "segclip"
    return cache / "mlflow" / json_digest(str(workdir))[:16]


def tracking_uri(config: SegCLIPConfig) -> str:
    configured = config.runtime.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        return configured
    folder = _local_store_folder(location(config.runtime.workdir))
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def _check_server(uri: str) -> None:
    """Fail fast, naming the fix, instead of MLflow's long retry loop on a server that is down."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=SERVER_PROBE_TIMEOUT_S)
    except (urllib.error.URLError, OSError) as error:
        raise ConnectionError(
            f"MLflow tracking server {uri} does not answer ({error}); start it "
            "(`mlflow server --host 127.0.0.1 --port 5000`) or unset runtime.tracking_uri "
            "and MLFLOW_TRACKING_URI to use the workdir's local store"
        ) from None


def tracking_client(config: SegCLIPConfig) -> MlflowClient:
    uri = tracking_uri(config)
    _check_server(uri)
    return MlflowClient(tracking_uri=uri)


def experiment_id(client: MlflowClient, config: SegCLIPConfig) -> str:
    """The project's experiment, created on first use (artifacts beside a local store) and
    tagged as a model-training experiment, also when an older version created it untagged."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            client.set_experiment_tag(
                experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
            )
        return experiment.experiment_id
    artifacts = None
    if client.tracking_uri.startswith("sqlite:///"):
        workdir = location(config.runtime.workdir)
        folder = workdir / "mlartifacts"
        artifacts = Path(folder).as_uri() if is_local(workdir) else str(folder)
    return client.create_experiment(
        EXPERIMENT, artifact_location=artifacts, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    )


def save_runs_view(client: MlflowClient, experiment: str) -> str:
    """A saved view of the experiment's runs table with a column for each mIoU and loss its runs
    logged (MLflow's runs table shows no metric column until one is picked); rewritten on each
    call, so new benchmarks appear. Returns the view's key, for `runs_page_url`."""
    keys: set[str] = set()
    for run in client.search_runs([experiment], max_results=RUNS_VIEW_MAX_RUNS):
        keys.update(run.data.metrics)
    results = sorted(key for key in keys if key.startswith("miou/"))
    losses = sorted(key for key in keys if key.startswith("loss/"))
    now = int(time.time() * 1000)
    while True:
        columns = [f"metrics.`{key}`" for key in results + losses]
        state = json.dumps({"selectedColumns": columns})
        view = {"name": RUNS_VIEW_NAME, "createdAt": now, "updatedAt": now, "state": state}
        if len(json.dumps(view)) <= RUNS_VIEW_MAX_LENGTH:
            break
        results = results[: len(results) * 9 // 10]  # more than a tag holds: the first ones
    client.set_experiment_tag(experiment, RUNS_VIEW_TAG_PREFIX + RUNS_VIEW, json.dumps(view))
    return RUNS_VIEW


def runs_page_url(ui: str, experiment: str, view: str | None = None) -> str:
    """The experiment's runs table in the MLflow UI served at `ui`, in the model-training view
    (MLflow 3 opens the GenAI one by default), with a saved view's columns if given."""
    query = {"workflowType": "machine_learning"} | ({"viewStateShareKey": view} if view else {})
    return f"{ui.rstrip('/')}/#/experiments/{experiment}/runs?{urllib.parse.urlencode(query)}"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"model.num_centers": "8", ...}, the form MLflow params take."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    items = [Param(key, value) for key, value in params.items()]
    for start in range(0, len(items), 100):  # MLflow's per-request parameter limit
        client.log_batch(run_id, params=items[start : start + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    stamp = int(time.time() * 1000)
    client.log_batch(
        run_id, metrics=[Metric(key, float(value), stamp, step) for key, value in metrics.items()]
    )


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])


@dataclass(frozen=True)
class Lineage:
    """Where new runs belong: the end-to-end parent run (if any) and orchestrator tags
    (e.g. the Prefect flow-run id)."""

    parent_run_id: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)

    def run_tags(self) -> dict[str, str]:
        parent = {MLFLOW_PARENT_RUN_ID: self.parent_run_id} if self.parent_run_id else {}
        return {**self.tags, **parent, MLFLOW_GIT_COMMIT: code_revision()}


NO_LINEAGE = Lineage()  # a stage run on its own, outside any orchestrator


@dataclass(frozen=True)
class TrackedRun:
    """A stage's MLflow run, handed to the stage body so it can log to it."""

    client: MlflowClient
    run_id: str


def open_stage_run(
    client: MlflowClient,
    config: SegCLIPConfig,
    *,
    stage: str,
    output_dir: UPath,
    inputs: Sequence[DataRef],
    lineage: Lineage,
) -> TrackedRun:
    """The MLflow run of one stage output, created once: an interrupted stage that resumes
    keeps logging into the same run. Tags link it to its stage key and input digests."""
    saved = output_dir / RUN_ID_FILE
    if saved.is_file():
        return TrackedRun(client, saved.read_text().strip())
    run = client.create_run(
        experiment_id(client, config),
        run_name=f"{stage}-{output_dir.name}",
        tags={
            **lineage.run_tags(),
            "segclip.stage": stage,
            "segclip.stage_key": output_dir.name,
        },
    )
    run_id = run.info.run_id
    log_params(client, run_id, flatten(config.model_dump(mode="json")))
    set_tags(
        client,
        run_id,
        {
            **{f"segclip.input.{i}": ref.url for i, ref in enumerate(inputs)},
            **{f"segclip.input_digest.{i}": ref.digest for i, ref in enumerate(inputs)},
        },
    )
    saved.write_text(run_id)
    return TrackedRun(client, run_id)


def fail_stage_run(tracked: TrackedRun) -> None:
    end_run(tracked.client, tracked.run_id, failed=True)


def finish_stage_run(tracked: TrackedRun, result: StageResult) -> None:
    """Counts and failures by reason as metrics, the manifest as an artifact; FINISHED."""
    manifest = result.manifest
    metrics = {f"count/{name}": value for name, value in manifest.counts.items()}
    metrics |= {f"failed/{reason}": value for reason, value in manifest.failures.items()}
    log_metrics(tracked.client, tracked.run_id, metrics, step=0)
    with local_copy(result.output_dir / MANIFEST_NAME) as manifest_file:
        tracked.client.log_artifact(tracked.run_id, str(manifest_file))
    tracked.client.set_terminated(tracked.run_id)


def produced_by(output_dir: UPath) -> str:
    """The id of the MLflow run that produced a stage output."""
    return (output_dir / RUN_ID_FILE).read_text().strip()


def latest_metrics(client: MlflowClient, run_id: str) -> dict[str, float]:
    return dict(client.get_run(run_id).data.metrics)


def metric_histories(
    client: MlflowClient, run_id: str, prefix: str
) -> dict[str, tuple[list[int], list[float]]]:
    """Each of the run's metrics named `prefix...`: its steps in order and the value logged last
    at each (a training restarted from a checkpoint logs the steps since that checkpoint again)."""
    histories = {}
    for name in sorted(key for key in latest_metrics(client, run_id) if key.startswith(prefix)):
        by_step = {}
        for metric in sorted(
            client.get_metric_history(run_id, name), key=lambda m: (m.step, m.timestamp)
        ):
            by_step[metric.step] = metric.value
        steps = sorted(by_step)
        histories[name] = (steps, [by_step[step] for step in steps])
    return histories


def link_stage_run(client: MlflowClient, result: StageResult, lineage: Lineage) -> str:
    """The stage's run as seen from `lineage`'s parent: the producing run itself when it is
    already a child of that parent, else a new link child naming it, with its metrics."""
    source_id = produced_by(result.output_dir)
    source = client.get_run(source_id)
    if lineage.parent_run_id is None or source.data.tags.get(MLFLOW_PARENT_RUN_ID) == (
        lineage.parent_run_id
    ):
        return source_id
    stage = source.data.tags["segclip.stage"]
    state = "reused" if result.skipped else "resumed"
    link = client.create_run(
        source.info.experiment_id,
        run_name=f"{stage}-{result.output_dir.name} ({state})",
        tags={
            **lineage.run_tags(),
            "segclip.stage": stage,
            "segclip.stage_key": result.output_dir.name,
            "segclip.produced_by": source_id,
            "segclip.link": state,
        },
    )
    log_params(client, link.info.run_id, dict(source.data.params))
    log_metrics(client, link.info.run_id, latest_metrics(client, source_id), step=0)
    client.set_terminated(link.info.run_id)
    return link.info.run_id


def start_pipeline_run(
    config: SegCLIPConfig,
    name: str | None,
    lineage_tags: Mapping[str, str],
    *,
    kind: str = "pipeline",
    parent: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Lineage:
    """The parent run of one end-to-end run (or of a sweep: `kind`), itself a child of
    `parent` when given (a sweep's member); its stages (or members) become its children."""
    client = tracking_client(config)
    run = client.create_run(
        experiment_id(client, config),
        run_name=name,
        tags={
            **Lineage(parent_run_id=parent, tags=lineage_tags).run_tags(),
            **(tags or {}),
            "segclip.stage": kind,
        },
    )
    log_params(client, run.info.run_id, flatten(config.model_dump(mode="json")))
    return Lineage(parent_run_id=run.info.run_id, tags=lineage_tags)


def finish_pipeline_run(
    config: SegCLIPConfig, lineage: Lineage, stage_runs: Mapping[str, str], failed: bool
) -> None:
    """Record which run each stage came from and copy onto the parent the last stage's metrics
    (the benchmark results, once evaluation ran) and every stage's summary metrics (the final
    losses, the mIoU per method, protocol and benchmark), so parents compare directly in the UI
    and the runs table shows them as columns."""
    client = tracking_client(config)
    parent = lineage.parent_run_id
    assert parent is not None, "a pipeline run has a parent run"
    set_tags(client, parent, {f"segclip.run.{stage}": run for stage, run in stage_runs.items()})
    if stage_runs:
        metrics = {}
        for run in stage_runs.values():
            metrics |= summary_metrics(client, run)
        last = list(stage_runs.values())[-1]
        log_metrics(client, parent, latest_metrics(client, last) | metrics, step=0)
    end_run(client, parent, failed=failed)


def end_run(client: MlflowClient, run_id: str, *, failed: bool) -> None:
    status = RunStatus.FAILED if failed else RunStatus.FINISHED
    client.set_terminated(run_id, RunStatus.to_string(status))


def summary_metrics(client: MlflowClient, run_id: str) -> dict[str, float]:
    """A run's results and final losses (`SUMMARY_METRICS`): what a pipeline run copies from
    its stages and a sweep aggregates over its members."""
    return {
        k: v for k, v in latest_metrics(client, run_id).items() if k.startswith(SUMMARY_METRICS)
    }
