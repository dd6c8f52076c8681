"""Training stage: Ray Train's TorchTrainer over the superpixel shards, tracked in MLflow.

The driver plans the run (per-worker batch, accumulation, steps), and starts N
workers running `pipelines.train_worker.train_worker`. Ray Train keeps the last K
checkpoints in the stage folder (a local folder or an object store every node can
reach) and restarts a crashed worker group from the latest one. A finished run's
final checkpoint is copied to `final/`, the stage's `model` file; a later run that
only adds steps starts from it.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from math import isfinite
from pathlib import Path
from typing import Any

from upath import UPath

from pipelines.ray_runtime import alive_nodes, connect, ray_address, ray_storage
from pipelines.train_worker import WorkerPayload, train_worker
from segclip.charts import loss_curves_chart
from segclip.config import TRAIN_KEY_RUNTIME, ConfigError, SegCLIPConfig
from segclip.data.loader import SAMPLE_STREAM_VERSION
from segclip.manifest import DataRef, load_result, read_result
from segclip.stage import Stage, StageContext, StageOutput
from segclip.storage import location, publish_folder
from segclip.tracking import TrackedRun, log_params, metric_histories, set_tags, tracking_uri
from segclip.train.plan import TrainPlan, plan_training
from segclip.train.state import MODEL_FILE, saved_step

FINAL_DIR = "final"
LOSS_CHART = "loss_curves.png"  # an artifact of the stage's MLflow run
RAY_DIR = "ray"  # Ray Train's run folder (its checkpoints) inside the stage folder
# Settings a run may change and still continue from a shorter run's final state.
EXTENSION_FIELDS = ("steps", "epochs")


def settings(config: SegCLIPConfig) -> dict[str, Any]:
    """Everything that changes the trained weights (see RuntimeConfig for what is not)."""
    keyed = {
        section: getattr(config, section).model_dump(mode="json")
        for section in ("model", "loss", "data", "train")
    }
    if not config.loss.caption_word_weight:  # off, its words change nothing: keys stay as before
        keyed["loss"] = {k: v for k, v in keyed["loss"].items() if not k.startswith("caption_word")}
    if config.train.start_trials == 1:  # one start: its trial length changes nothing
        keyed["train"] = {k: v for k, v in keyed["train"].items() if not k.startswith("start_")}
    keyed["runtime"] = config.runtime.model_dump(mode="json", include=set(TRAIN_KEY_RUNTIME))
    keyed["sample_stream_version"] = SAMPLE_STREAM_VERSION
    return keyed


def _without_length(keyed: dict[str, Any]) -> dict[str, Any]:
    train = {k: v for k, v in keyed["train"].items() if k not in EXTENSION_FIELDS}
    return {**keyed, "train": train}


def _run_to_extend(config: SegCLIPConfig, inputs: list[DataRef], steps: int) -> UPath | None:
    """The final state of the longest finished run with these settings but fewer steps."""
    wanted = _without_length(settings(config))
    digests = [ref.digest for ref in inputs]
    best: tuple[int, UPath] | None = None
    for folder in (location(config.runtime.workdir) / STAGE.name).glob("*"):
        finished = read_result(folder)
        if finished is None or "model" not in finished.manifest.files:
            continue
        done = finished.manifest.counts.get("steps", 0)
        if (
            _without_length(finished.manifest.config) == wanted
            and [ref.digest for ref in finished.manifest.inputs] == digests
            and done < steps
            and (best is None or done > best[0])
        ):
            best = (done, folder / FINAL_DIR)
    return best[1] if best else None


def _latest_checkpoint(output_dir: UPath) -> UPath | None:
    """This run's newest complete checkpoint folder. Ray restores the checkpoints it recorded;
    a run interrupted between a checkpoint's upload and Ray's record of it leaves only the
    folder, which this finds."""
    folders = sorted((output_dir / RAY_DIR).glob("checkpoint_*"), key=lambda p: p.name)
    return next((f for f in reversed(folders) if saved_step(f) is not None), None)


def _cpus_per_worker(configured: int | None, plan: TrainPlan) -> int:
    """Unless configured, the workers share all of the cluster's CPUs equally."""
    import ray

    if configured is not None:
        return configured
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // plan.world_size)


def _fit(payload: WorkerPayload, output_dir: UPath) -> Any:
    import ray.train
    from ray.train.torch import TorchTrainer

    runtime = payload.config.runtime
    connect(runtime.ray_address)
    storage_path, storage_filesystem = ray_storage(output_dir)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"payload": payload},
        scaling_config=ray.train.ScalingConfig(
            num_workers=payload.plan.world_size,
            use_gpu=runtime.use_gpu,
            resources_per_worker={"CPU": _cpus_per_worker(runtime.cpus_per_worker, payload.plan)},
        ),
        run_config=ray.train.RunConfig(
            name=RAY_DIR,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=runtime.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=runtime.keep_checkpoints),
        ),
    )
    return trainer.fit()


@dataclass(frozen=True)
class TrainingInput:
    plan: TrainPlan
    shards: list[str]


def _check_shared_tracking(config: SegCLIPConfig) -> None:
    """Rank 0 logs the training metrics from whichever node it lands on; a local MLflow store
    is a file on the driver's node, which the other nodes of a cluster cannot write to."""
    if ray_address(config.runtime.ray_address) is None:
        return
    uri = tracking_uri(config)
    if uri.startswith(("http://", "https://", "databricks")):
        return
    connect(config.runtime.ray_address)
    nodes = alive_nodes()
    if nodes > 1:
        raise ConfigError(
            f"training on a {nodes}-node Ray cluster needs an MLflow server every node can "
            f"reach, not the local store {uri}: set MLFLOW_TRACKING_URI (or "
            "runtime.tracking_uri) to the server's http:// URL (infra/local/stack.py starts one)"
        )


def _plan(config: SegCLIPConfig, inputs: list[DataRef]) -> TrainingInput:
    """Bad batch, worker or tracking settings fail here, before any work."""
    _check_shared_tracking(config)
    upstream = load_result(inputs[0].url)
    return TrainingInput(
        plan_training(config, upstream.manifest.counts["samples"]), upstream.shard_urls
    )


def _log_loss_curves(tracked: TrackedRun, steps: int) -> None:
    """Every loss rank 0 logged, against the step, as the run's `loss_curves.png`; points that
    are not finite (a diverged run) are left out and counted in the title."""
    curves, dropped = {}, 0
    for name, (at, values) in metric_histories(tracked.client, tracked.run_id, "loss/").items():
        kept = [(step, value) for step, value in zip(at, values, strict=True) if isfinite(value)]
        dropped += len(at) - len(kept)
        if kept:
            curves[name] = ([step for step, _ in kept], [value for _, value in kept])
    if not curves:
        return
    ordered = dict(sorted(curves.items(), key=lambda item: (item[0] != "loss/total", item[0])))
    title = f"training losses, {steps} steps" + (
        f" ({dropped} non-finite values left out)" if dropped else ""
    )
    with tempfile.TemporaryDirectory() as scratch:
        chart = loss_curves_chart(ordered, Path(scratch) / LOSS_CHART, title=title)
        tracked.client.log_artifact(tracked.run_id, str(chart))


def _train(context: StageContext[TrainingInput]) -> StageOutput:
    config, output_dir, tracked = context.config, context.output_dir, context.tracked
    plan = context.prepared.plan
    log_params(
        tracked.client, tracked.run_id, {f"plan.{k}": str(v) for k, v in plan.as_dict().items()}
    )
    # A restarted run continues from its own latest checkpoint; a new one may extend a
    # shorter finished run.
    extends = _run_to_extend(config, context.inputs, plan.total_steps)
    if extends is not None:
        set_tags(tracked.client, tracked.run_id, {"segclip.extends": str(extends.parent)})
    start_from = _latest_checkpoint(output_dir) or extends
    payload = WorkerPayload(
        config=config,
        plan=plan,
        shards=context.prepared.shards,
        run_id=tracked.run_id,
        tracking_uri=tracking_uri(config),
        start_from=str(start_from) if start_from else None,
        failure_marker=str(output_dir / ".injected_failure"),
    )
    start = time.perf_counter()
    result = _fit(payload, output_dir)
    with result.checkpoint.as_directory() as folder:
        publish_folder(Path(folder), output_dir / FINAL_DIR)
        tracked.client.log_artifact(tracked.run_id, str(Path(folder) / MODEL_FILE))
    _log_loss_curves(tracked, plan.total_steps)
    return StageOutput(
        counts={
            "steps": plan.total_steps,
            "world_size": plan.world_size,
            "global_batch": config.train.global_batch_size,
        },
        files={"model": f"{FINAL_DIR}/{MODEL_FILE}"},
        timings={"fit": time.perf_counter() - start},
        nodes=result.metrics.get("nodes", []),
    )


STAGE = Stage[TrainingInput](
    name="train",
    settings=settings,
    reads="superpixels",
    prepare=_plan,
    body=_train,
)
run = STAGE.run
