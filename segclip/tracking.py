"""MLflow conventions: where runs are stored, how configs become params, lineage tags.

Default store: `<workdir>/mlflow.db` (SQLite) with artifacts in
`<workdir>/mlartifacts`; `runtime.tracking_uri` or `MLFLOW_TRACKING_URI` points
at any other store, e.g. an MLflow server.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from segclip.config import SegCLIPConfig
from segclip.stage import InputRef

EXPERIMENT = "segclip"
RUN_ID_FILE = "mlflow_run_id"
MAX_PARAM_LENGTH = 6000
SERVER_PROBE_TIMEOUT_S = 5.0


def tracking_uri(config: SegCLIPConfig) -> str:
    configured = config.runtime.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        return configured
    return f"sqlite:///{(Path(config.runtime.workdir) / 'mlflow.db').resolve()}"


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
    """The project's experiment, created on first use (artifacts beside a local store)."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:///"):
        location = (Path(config.runtime.workdir) / "mlartifacts").resolve().as_uri()
    return client.create_experiment(EXPERIMENT, artifact_location=location)


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


def stage_run(
    client: MlflowClient,
    config: SegCLIPConfig,
    stage: str,
    output_dir: Path,
    inputs: Sequence[InputRef],
    params: Mapping[str, str],
) -> str:
    """The MLflow run of one stage output, created once: an interrupted stage that resumes
    keeps logging into the same run. Tags link it to its stage key and input manifests."""
    saved = output_dir / RUN_ID_FILE
    if saved.is_file():
        return saved.read_text().strip()
    run = client.create_run(
        experiment_id(client, config),
        run_name=f"{stage}-{output_dir.name}",
        tags={"segclip.stage": stage, "segclip.stage_key": output_dir.name},
    )
    run_id = run.info.run_id
    log_params(client, run_id, {**flatten(config.model_dump(mode="json")), **params})
    set_tags(
        client,
        run_id,
        {
            **{f"segclip.input.{i}": ref.path for i, ref in enumerate(inputs)},
            **{f"segclip.input_digest.{i}": ref.digest for i, ref in enumerate(inputs)},
        },
    )
    saved.write_text(run_id)
    return run_id


def finish_stage_run(client: MlflowClient, output_dir: Path) -> None:
    """Attach the finished stage's manifest and mark its run finished."""
    run_id = (output_dir / RUN_ID_FILE).read_text().strip()
    client.log_artifact(run_id, str(output_dir / "manifest.json"))
    client.set_terminated(run_id)
