"""Training stage: Ray Train's TorchTrainer over the superpixel shards, tracked in MLflow.

The driver plans the run (per-worker batch, accumulation, steps), opens the
MLflow run, and starts N workers running `segclip.train.loop.train_worker`.
Ray Train keeps the last K checkpoints under the stage folder and restarts a
crashed worker group from the latest one. A finished run's final checkpoint is
copied to `final/`; a later run that only adds steps starts from it.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.ray_runtime import connect
from segclip.config import SegCLIPConfig
from segclip.stage import (
    InputRef,
    StageOutput,
    StageResult,
    keyed_dir,
    load_result,
    read_manifest,
    single_input,
)
from segclip.tracking import (
    NO_LINEAGE,
    Lineage,
    TrackedRun,
    set_tags,
    tracked_stage,
    tracking_uri,
)
from segclip.train.loop import MODEL_FILE, LoopSettings, saved_step, train_worker
from segclip.train.plan import TrainPlan, plan_training

STAGE = "train"
FINAL_DIR = "final"
RAY_DIR = "ray"  # Ray Train's run folder (its checkpoints) inside the stage folder
# Settings a run may change and still continue from a shorter run's final state.
EXTENSION_FIELDS = ("steps", "epochs")


def stage_config(config: SegCLIPConfig) -> dict[str, Any]:
    return {
        section: getattr(config, section).model_dump(mode="json")
        for section in ("model", "loss", "data", "train")
    }


def final_model(result: StageResult) -> Path:
    return result.output_dir / FINAL_DIR / MODEL_FILE


def _without_length(settings: dict[str, Any]) -> dict[str, Any]:
    train = {k: v for k, v in settings["train"].items() if k not in EXTENSION_FIELDS}
    return {**settings, "train": train}


def _run_to_extend(config: SegCLIPConfig, inputs: Sequence[InputRef], steps: int) -> Path | None:
    """The final state of the longest finished run with these settings but fewer steps."""
    wanted = _without_length(stage_config(config))
    digests = [ref.digest for ref in inputs]
    best: tuple[int, Path] | None = None
    for manifest_path in (Path(config.runtime.workdir) / STAGE).glob("*/manifest.json"):
        manifest = read_manifest(manifest_path.parent)
        done = manifest.counts.get("steps", 0)
        if (
            _without_length(manifest.config) == wanted
            and [ref.digest for ref in manifest.inputs] == digests
            and done < steps
            and (manifest_path.parent / FINAL_DIR).is_dir()
            and (best is None or done > best[0])
        ):
            best = (done, manifest_path.parent / FINAL_DIR)
    return best[1] if best else None


def _latest_checkpoint(output_dir: Path) -> Path | None:
    """This run's newest complete checkpoint folder. Ray restores the checkpoints it recorded;
    a run interrupted between a checkpoint's upload and Ray's record of it leaves only the
    folder, which this finds."""
    folders = sorted((output_dir / RAY_DIR).glob("checkpoint_*"), reverse=True)  # time-stamped
    return next((folder for folder in folders if saved_step(folder) is not None), None)


def _cpus_per_worker(configured: int | None, plan: TrainPlan) -> int:
    """Unless configured, the workers share all of the cluster's CPUs equally."""
    import ray

    if configured is not None:
        return configured
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // plan.world_size)


def _fit(
    config: SegCLIPConfig,
    plan: TrainPlan,
    shards: list[str],
    run_id: str,
    output_dir: Path,
    start_from: Path | None,
) -> Any:
    import ray.train
    from ray.train.torch import TorchTrainer

    connect(config.runtime.ray_address)
    runtime = config.runtime
    settings = LoopSettings(
        config=config.model_dump(mode="json"),
        plan=plan.as_dict(),
        shards=shards,
        run_id=run_id,
        tracking_uri=tracking_uri(config),
        start_from=str(start_from) if start_from else None,
        failure_marker=str(output_dir / ".injected_failure"),
    )
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=dataclasses.asdict(settings),
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.world_size,
            use_gpu=runtime.use_gpu,
            resources_per_worker={"CPU": _cpus_per_worker(runtime.cpus_per_worker, plan)},
        ),
        run_config=ray.train.RunConfig(
            name=RAY_DIR,
            storage_path=str(output_dir.resolve()),
            failure_config=ray.train.FailureConfig(max_failures=runtime.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=runtime.keep_checkpoints),
        ),
    )
    return trainer.fit()


def output_dir(config: SegCLIPConfig, inputs: Sequence[InputRef]) -> Path:
    """This stage's folder for the config and inputs (finished or not), without running it."""
    return keyed_dir(config.runtime.workdir, STAGE, stage_config(config), inputs)


def run(
    config: SegCLIPConfig,
    inputs: Sequence[InputRef],
    force: bool = False,
    lineage: Lineage = NO_LINEAGE,
) -> StageResult:
    """Train on one finished superpixel output; skipped when this exact run has finished."""
    upstream = load_result(single_input(inputs, STAGE, "superpixel output").path)
    plan = plan_training(config, upstream.manifest.counts["samples"])  # bad settings fail here

    def body(output_dir: Path, tracked: TrackedRun) -> StageOutput:
        # A restarted run continues from its own latest checkpoint; a new one may extend a
        # shorter finished run.
        extends = _run_to_extend(config, inputs, plan.total_steps)
        if extends is not None:
            set_tags(tracked.client, tracked.run_id, {"segclip.extends": str(extends.parent)})
        start_from = _latest_checkpoint(output_dir) or extends
        start = time.perf_counter()
        result = _fit(config, plan, upstream.shard_paths, tracked.run_id, output_dir, start_from)
        with result.checkpoint.as_directory() as folder:
            shutil.copytree(folder, output_dir / FINAL_DIR, dirs_exist_ok=True)
        tracked.client.log_artifact(tracked.run_id, str(output_dir / FINAL_DIR / MODEL_FILE))
        return StageOutput(
            counts={
                "steps": plan.total_steps,
                "world_size": plan.world_size,
                "global_batch": config.train.global_batch_size,
            },
            timings={"fit": time.perf_counter() - start},
        )

    plan_params = {f"plan.{k}": str(v) for k, v in plan.as_dict().items()}
    return tracked_stage(
        STAGE, config, stage_config(config), inputs, body, force, lineage, plan_params
    )
