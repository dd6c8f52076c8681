"""Evaluate stage: zero-shot segmentation benchmarks of a trained (or any) checkpoint.

Every benchmark folder is checked before the model is loaded, so a missing
dataset fails in seconds with the path it expected and how to get it. Results:
`results.json`, per benchmark `per_class_iou.csv`, `confusion.csv` and overlay
images, all logged to the stage's MLflow run with the protocol's name, version
and values.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.ray_runtime import connect, ray_address
from pipelines.train import final_model
from segclip.config import ConfigError, SegCLIPConfig
from segclip.data.demo_data import demo_data_key
from segclip.eval.baselines import BASELINES
from segclip.eval.datasets import BenchmarkSpec, get_benchmark, sample_ids
from segclip.eval.evaluate import BenchmarkResult, evaluate_benchmark
from segclip.eval.metrics import ConfusionMatrix
from segclip.eval.protocol import PROTOCOLS
from segclip.eval.segment import Segmenter
from segclip.model import SegCLIP, load_model
from segclip.stage import (
    InputRef,
    StageOutput,
    StageResult,
    file_digest,
    keyed_dir,
    load_result,
    single_input,
)
from segclip.tracking import NO_LINEAGE, Lineage, TrackedRun, log_metrics, tracked_stage

STAGE = "evaluate"
RESULTS_FILE = "results.json"


def stage_config(config: SegCLIPConfig) -> dict[str, Any]:
    settings = {
        "eval": config.eval.model_dump(mode="json"),
        "protocol": PROTOCOLS[config.eval.protocol].as_dict(),
    }
    if "demo" in config.eval.benchmarks:
        settings["demo"] = demo_data_key(config.demo)
    return settings


def checkpoint_ref(path: str | Path) -> InputRef:
    """Input ref for a model file given directly (ours or the authors' released format)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return InputRef(path=str(path.resolve()), digest=file_digest(path))


def _model_path(ref: InputRef) -> Path:
    path = Path(ref.path)
    return final_model(load_result(path)) if path.is_dir() else path


def _benchmarks(config: SegCLIPConfig) -> list[tuple[BenchmarkSpec, Path, list[str]]]:
    """Each benchmark with its checked folder and sample ids; also checks the protocol has
    its threshold."""
    protocol = PROTOCOLS[config.eval.protocol]
    located = []
    for name in config.eval.benchmarks:
        try:
            spec = get_benchmark(name)
        except ValueError as error:
            raise ConfigError(f"eval.benchmarks: {error}") from None
        if spec.background and spec.name not in protocol.background_thresholds:
            raise ConfigError(f"protocol {protocol.name!r} has no background threshold for {name}")
        folder = spec.locate(config)
        # sample_ids raises naming the missing path and how to get the data.
        located.append((spec, folder, sample_ids(spec, folder)))
    return located


class _ConfusionActor:
    """A Ray Data actor holding one model copy; maps a batch of sample ids to a confusion matrix."""

    def __init__(self, model_path: str, spec_name: str, folder: str, config: dict) -> None:
        self.config = SegCLIPConfig.model_validate(config)
        self.spec, self.folder = get_benchmark(spec_name), Path(folder)
        self.segmenter = _segmenter(load_model(model_path), self.spec, self.config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(sample_id) for sample_id in batch["id"]]
        result = evaluate_benchmark(self.segmenter, self.spec, self.folder, ids, progress=False)
        return {"confusion": result.confusion.matrix[None]}


def _distributed_confusion(
    config: SegCLIPConfig, model_path: Path, spec: BenchmarkSpec, folder: Path, ids: list[str]
) -> ConfusionMatrix:
    """The benchmark's confusion matrix from `runtime.eval_actors` model copies (Ray Data)."""
    import ray

    connect(config.runtime.ray_address)
    batches = ray.data.from_items([{"id": i} for i in ids]).map_batches(
        _ConfusionActor,
        fn_constructor_kwargs={
            "model_path": str(model_path),
            "spec_name": spec.name,
            "folder": str(folder.resolve()),
            "config": config.model_dump(mode="json"),
        },
        batch_size=max(1, len(ids) // (4 * config.runtime.eval_actors)),
        concurrency=config.runtime.eval_actors,
        num_gpus=1 if config.runtime.use_gpu else 0,
    )
    confusion = ConfusionMatrix(len(spec.class_names))
    for row in batches.iter_rows():
        confusion.matrix += row["confusion"]
    return confusion


def _segmenter(model: SegCLIP, spec: BenchmarkSpec, config: SegCLIPConfig) -> Segmenter:
    protocol = PROTOCOLS[config.eval.protocol]
    return Segmenter(
        model,
        spec.text_classes,
        protocol,
        protocol.background_thresholds[spec.name] if spec.background else None,
        window_batch=config.eval.window_batch,
        bf16=config.eval.precision == "bf16",
    )


def _scores(result: BenchmarkResult) -> dict[str, float]:
    return {"miou": result.mean_iou, "pixel_accuracy": result.confusion.pixel_accuracy()}


def _baselines(
    config: SegCLIPConfig, segmenter: Segmenter, spec: BenchmarkSpec, folder: Path, ids: list[str]
) -> dict[str, dict[str, float]]:
    """The configured trivial baselines on this benchmark (those defined for it), locally."""
    scores = {}
    for name in config.eval.baselines:
        baseline = BASELINES[name]
        if baseline.needs_background and not spec.background:
            continue
        predictor = baseline.build(segmenter, spec, config.train.seed)
        result = evaluate_benchmark(predictor, spec, folder, ids, progress=False)
        scores[name] = _scores(result)
    return scores


def results_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table: each benchmark's model row, then its baseline rows."""
    lines = ["| benchmark | predictions | images | mIoU | pixel acc. |", "|---|---|---|---|---|"]
    for name, row in results.items():
        rows = {"model": row} | {f"baseline: {b}": s for b, s in row.get("baselines", {}).items()}
        for label, scores in rows.items():
            lines.append(
                f"| {name} | {label} | {row['images']} | {100 * scores['miou']:.1f} | "
                f"{100 * scores['pixel_accuracy']:.1f} |"
            )
    return "\n".join(lines)


def read_results(result: StageResult) -> dict[str, dict[str, Any]]:
    return json.loads((result.output_dir / RESULTS_FILE).read_text())


def output_dir(config: SegCLIPConfig, inputs: Sequence[InputRef]) -> Path:
    """This stage's folder for the config and inputs (finished or not), without running it."""
    return keyed_dir(config.runtime.workdir, STAGE, stage_config(config), inputs)


def run(
    config: SegCLIPConfig,
    inputs: Sequence[InputRef],
    force: bool = False,
    lineage: Lineage = NO_LINEAGE,
) -> StageResult:
    """Evaluate the model of one training output (or one checkpoint file) on eval.benchmarks."""
    single_input(inputs, STAGE, "model (a training output or a checkpoint file)")
    benchmarks = _benchmarks(config)
    protocol = PROTOCOLS[config.eval.protocol]

    def body(output_dir: Path, tracked: TrackedRun) -> StageOutput:
        client, run_id = tracked.client, tracked.run_id
        model_path = _model_path(inputs[0])
        model = load_model(model_path)
        torch.manual_seed(config.train.seed)
        distributed = ray_address(config.runtime.ray_address) or config.runtime.use_gpu
        results = {}
        for spec, folder, ids in benchmarks:
            segmenter = _segmenter(model, spec, config)
            overlays = config.eval.overlays
            if distributed:  # Ray Data actors share the images; overlays are drawn here
                drawn = evaluate_benchmark(segmenter, spec, folder, ids[:overlays], overlays)
                confusion = _distributed_confusion(config, model_path, spec, folder, ids)
                result = BenchmarkResult(spec.name, len(ids), confusion, drawn.overlays)
            else:
                result = evaluate_benchmark(segmenter, spec, folder, ids, overlays)
            written = result.write(output_dir, spec.class_names)
            client.log_artifacts(run_id, str(written), artifact_path=spec.name)
            scores = _scores(result)
            results[spec.name] = {"images": result.images, **scores}
            baselines = _baselines(config, segmenter, spec, folder, ids)
            if baselines:
                results[spec.name]["baselines"] = baselines
            metrics = {f"{k}/{spec.name}": v for k, v in scores.items()} | {
                f"baseline/{name}/{k}/{spec.name}": v
                for name, scores in baselines.items()
                for k, v in scores.items()
            }
            log_metrics(client, run_id, metrics, step=0)
        (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
        (output_dir / "protocol.json").write_text(json.dumps(protocol.as_dict(), indent=2))
        client.log_artifact(run_id, str(output_dir / RESULTS_FILE))
        client.log_artifact(run_id, str(output_dir / "protocol.json"))
        return StageOutput(
            counts={f"images/{name}": int(r["images"]) for name, r in results.items()}
        )

    params = {f"protocol.{k}": str(v) for k, v in protocol.as_dict().items()}
    result = tracked_stage(
        STAGE, config, stage_config(config), inputs, body, force, lineage, params
    )
    print(f"\nprotocol {protocol.name} v{protocol.version}\n{results_table(read_results(result))}")
    return result
