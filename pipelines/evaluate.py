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

import torch

from pipelines.train import final_model
from segclip.config import ConfigError, SegCLIPConfig
from segclip.eval.datasets import BenchmarkSpec, get_benchmark, sample_ids
from segclip.eval.evaluate import evaluate_benchmark
from segclip.eval.protocol import PROTOCOLS
from segclip.eval.segment import Segmenter
from segclip.model import load_model
from segclip.stage import (
    InputRef,
    StageOutput,
    StageResult,
    file_digest,
    load_result,
    run_stage,
)
from segclip.tracking import (
    finish_stage_run,
    log_metrics,
    stage_run,
    tracking_client,
)

STAGE = "evaluate"
RESULTS_FILE = "results.json"


def stage_config(config: SegCLIPConfig) -> dict[str, Any]:
    settings = {
        "eval": config.eval.model_dump(mode="json"),
        "protocol": PROTOCOLS[config.eval.protocol].as_dict(),
    }
    if "demo" in config.eval.benchmarks:
        settings["demo"] = config.demo.model_dump(mode="json")
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


def _benchmarks(config: SegCLIPConfig) -> list[tuple[BenchmarkSpec, Path]]:
    """Each benchmark with its (checked) folder; also checks the protocol has its threshold."""
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
        sample_ids(spec, folder)  # raises naming the missing path and how to get the data
        located.append((spec, folder))
    return located


def results_table(results: dict[str, dict[str, float]]) -> str:
    lines = ["| benchmark | images | mIoU | pixel acc. |", "|---|---|---|---|"]
    for name, row in results.items():
        lines.append(
            f"| {name} | {row['images']} | {100 * row['miou']:.1f} | "
            f"{100 * row['pixel_accuracy']:.1f} |"
        )
    return "\n".join(lines)


def read_results(result: StageResult) -> dict[str, dict[str, float]]:
    return json.loads((result.output_dir / RESULTS_FILE).read_text())


def run(config: SegCLIPConfig, inputs: Sequence[InputRef], force: bool = False) -> StageResult:
    """Evaluate the model of one training output (or one checkpoint file) on eval.benchmarks."""
    if len(inputs) != 1:
        raise ValueError(f"the evaluate stage reads one model, got {len(inputs)}")
    benchmarks = _benchmarks(config)
    protocol = PROTOCOLS[config.eval.protocol]
    client = tracking_client(config)

    def body(output_dir: Path) -> StageOutput:
        params = {f"protocol.{k}": str(v) for k, v in protocol.as_dict().items()}
        run_id = stage_run(client, config, STAGE, output_dir, inputs, params)
        model = load_model(_model_path(inputs[0]))
        torch.manual_seed(config.train.seed)
        results = {}
        for spec, folder in benchmarks:
            segmenter = Segmenter(
                model,
                spec.text_classes,
                protocol,
                protocol.background_thresholds[spec.name] if spec.background else None,
                window_batch=config.eval.window_batch,
                bf16=config.eval.precision == "bf16",
            )
            result = evaluate_benchmark(segmenter, spec, folder, config.eval.overlays)
            written = result.write(output_dir, spec.class_names)
            client.log_artifacts(run_id, str(written), artifact_path=spec.name)
            results[spec.name] = {
                "images": result.images,
                "miou": result.mean_iou,
                "pixel_accuracy": result.confusion.pixel_accuracy(),
            }
            log_metrics(
                client,
                run_id,
                {
                    f"miou/{spec.name}": result.mean_iou,
                    f"pixel_accuracy/{spec.name}": results[spec.name]["pixel_accuracy"],
                },
                step=0,
            )
        (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
        (output_dir / "protocol.json").write_text(json.dumps(protocol.as_dict(), indent=2))
        client.log_artifact(run_id, str(output_dir / RESULTS_FILE))
        client.log_artifact(run_id, str(output_dir / "protocol.json"))
        return StageOutput(
            counts={f"images/{name}": int(r["images"]) for name, r in results.items()}
        )

    result = run_stage(STAGE, config.runtime.workdir, stage_config(config), inputs, body, force)
    if not result.skipped:
        finish_stage_run(client, result.output_dir)
    return result
