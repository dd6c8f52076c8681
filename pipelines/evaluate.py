"""Evaluate stage: zero-shot segmentation benchmarks of a trained (or any) checkpoint.

Every benchmark folder is checked before the model is loaded, so a missing
dataset fails in seconds with the path it expected and how to get it. Results:
`results.json`, per benchmark `per_class_iou.csv`, `confusion.csv` and overlay
images, all logged to the stage's MLflow run with the protocol's name, version
and values. The model runs on `runtime.device`; on a Ray cluster or with GPUs,
`runtime.eval_actors` model copies share the images, each on the GPU it reserves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from upath import UPath

from pipelines.ray_runtime import connect, node_id, ray_address, use_reserved_cpus
from segclip.config import ConfigError, SegCLIPConfig
from segclip.data.demo_data import demo_data_key
from segclip.device import resolve_device
from segclip.eval.baselines import BASELINES
from segclip.eval.datasets import BenchmarkSpec, get_benchmark, sample_ids
from segclip.eval.metrics import ConfusionMatrix
from segclip.eval.protocol import PROTOCOLS
from segclip.eval.scoring import BenchmarkResult, evaluate_benchmark
from segclip.eval.segment import Segmenter
from segclip.manifest import DataRef, StageResult, read_result
from segclip.model import load_model
from segclip.stage import Stage, StageContext, StageOutput
from segclip.storage import local_folder, location
from segclip.tracking import log_metrics, log_params

RESULTS_FILE = "results.json"
# Every model copy is loaded before the images are shared out, so all of them take part
# (the first ready would otherwise take a short benchmark alone); a cluster that cannot
# place them fails after this long instead of waiting for ever.
ACTORS_START_TIMEOUT_S = 600


def settings(config: SegCLIPConfig) -> dict[str, Any]:
    keyed = {
        "eval": config.eval.model_dump(mode="json"),
        "protocol": PROTOCOLS[config.eval.protocol].as_dict(),
        "seed": config.train.seed,  # the random_centers baseline draws with it
    }
    if "demo" in config.eval.benchmarks:
        keyed["demo"] = demo_data_key(config.demo)
    return keyed


@dataclass(frozen=True)
class LocatedBenchmark:
    spec: BenchmarkSpec
    folder: UPath
    ids: list[str]


@dataclass(frozen=True)
class EvaluationInput:
    model: UPath  # the model file: a training output's `model`, or a checkpoint given directly
    benchmarks: list[LocatedBenchmark]


def _model_file(ref: DataRef) -> UPath:
    trained = read_result(ref.url)
    return trained.file("model") if trained is not None else location(ref.url)


def _locate(config: SegCLIPConfig, inputs: list[DataRef]) -> EvaluationInput:
    """Each benchmark with its checked folder and sample ids; also checks the protocol has
    its threshold. Runs before any model work."""
    protocol = PROTOCOLS[config.eval.protocol]
    located = []
    for name in config.eval.benchmarks:
        spec = get_benchmark(name)
        if spec.background and spec.name not in protocol.background_thresholds:
            raise ConfigError(f"protocol {protocol.name!r} has no background threshold for {name}")
        folder = spec.locate(config)
        # sample_ids raises naming the missing path and how to get the data.
        located.append(LocatedBenchmark(spec, folder, sample_ids(spec, folder)))
    return EvaluationInput(_model_file(inputs[0]), located)


def _segmenter(model, spec: BenchmarkSpec, config: SegCLIPConfig, device: torch.device):
    protocol = PROTOCOLS[config.eval.protocol]
    return Segmenter(
        model,
        spec.text_classes,
        protocol,
        protocol.background_thresholds[spec.name] if spec.background else None,
        window_batch=config.eval.window_batch,
        bf16=config.eval.precision == "bf16",
        device=device,
    )


class _ConfusionActor:
    """A Ray Data actor holding one model copy on its own device (the GPU Ray gave it, when
    it reserved one); maps a batch of sample ids to a confusion matrix."""

    def __init__(self, model_file: str, spec_name: str, folder: str, config: SegCLIPConfig) -> None:
        use_reserved_cpus()
        self.spec, self.folder = get_benchmark(spec_name), location(folder)
        device = resolve_device(config.runtime.device)
        self.segmenter = _segmenter(load_model(model_file), self.spec, config, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(sample_id) for sample_id in batch["id"]]
        result = evaluate_benchmark(self.segmenter, self.spec, self.folder, ids, progress=False)
        return {"confusion": result.confusion.matrix[None], "node": np.array([node_id()])}


def _distributed_confusion(
    config: SegCLIPConfig, model_file: UPath, benchmark: LocatedBenchmark
) -> tuple[ConfusionMatrix, set[str]]:
    """The benchmark's confusion matrix from `runtime.eval_actors` model copies (Ray Data),
    and the nodes they ran on."""
    import ray

    connect(config.runtime.ray_address)
    ids = benchmark.ids
    batches = ray.data.from_items([{"id": i} for i in ids]).map_batches(
        _ConfusionActor,
        fn_constructor_kwargs={
            "model_file": str(model_file),
            "spec_name": benchmark.spec.name,
            "folder": str(benchmark.folder),
            "config": config,
        },
        batch_size=max(1, len(ids) // (4 * config.runtime.eval_actors)),
        concurrency=config.runtime.eval_actors,
        num_cpus=1,
        num_gpus=1 if config.runtime.use_gpu else 0,
    )
    batches.context.wait_for_min_actors_s = ACTORS_START_TIMEOUT_S
    confusion, nodes = ConfusionMatrix(len(benchmark.spec.class_names)), set()
    for row in batches.iter_rows():
        confusion.matrix += row["confusion"]
        nodes.add(str(row["node"]))
    return confusion, nodes


def _scores(result: BenchmarkResult) -> dict[str, float]:
    return {"miou": result.mean_iou, "pixel_accuracy": result.confusion.pixel_accuracy()}


def _baselines(
    config: SegCLIPConfig, segmenter: Segmenter, benchmark: LocatedBenchmark
) -> dict[str, dict[str, float]]:
    """The configured trivial baselines on this benchmark (those defined for it), locally."""
    spec, scores = benchmark.spec, {}
    for name in config.eval.baselines:
        baseline = BASELINES[name]
        if baseline.needs_background and not spec.background:
            continue
        predictor = baseline.build(segmenter, spec, config.train.seed)
        result = evaluate_benchmark(
            predictor, spec, benchmark.folder, benchmark.ids, progress=False
        )
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
    return json.loads(result.file("results").read_text())


def report(result: StageResult) -> str:
    """The protocol that measured the results, then their table: what a user is shown."""
    protocol = json.loads(result.file("protocol").read_text())
    table = results_table(read_results(result))
    return f"protocol {protocol['name']} v{protocol['version']}\n{table}"


def _evaluate(context: StageContext[EvaluationInput]) -> StageOutput:
    config, tracked, prepared = context.config, context.tracked, context.prepared
    client, run_id = tracked.client, tracked.run_id
    protocol = PROTOCOLS[config.eval.protocol]
    log_params(client, run_id, {f"protocol.{k}": str(v) for k, v in protocol.as_dict().items()})
    device = resolve_device(config.runtime.device)
    model = load_model(prepared.model)
    torch.manual_seed(config.train.seed)
    distributed = ray_address(config.runtime.ray_address) or config.runtime.use_gpu
    results, nodes = {}, set()
    with local_folder(context.output_dir) as folder:
        for benchmark in prepared.benchmarks:
            spec = benchmark.spec
            segmenter = _segmenter(model, spec, config, device)
            overlays = config.eval.overlays
            if distributed:  # Ray Data actors share the images; overlays are drawn here
                shown = benchmark.ids[:overlays]
                drawn = evaluate_benchmark(
                    segmenter, spec, benchmark.folder, shown, overlays=overlays
                )
                confusion, used = _distributed_confusion(config, prepared.model, benchmark)
                nodes |= used
                result = BenchmarkResult(spec.name, len(benchmark.ids), confusion, drawn.overlays)
            else:
                result = evaluate_benchmark(
                    segmenter, spec, benchmark.folder, benchmark.ids, overlays=overlays
                )
            written = result.write(folder, spec.class_names)
            client.log_artifacts(run_id, str(written), artifact_path=spec.name)
            scores = _scores(result)
            results[spec.name] = {"images": result.images, **scores}
            baselines = _baselines(config, segmenter, benchmark)
            if baselines:
                results[spec.name]["baselines"] = baselines
            metrics = {f"{k}/{spec.name}": v for k, v in scores.items()} | {
                f"baseline/{name}/{k}/{spec.name}": v
                for name, scores in baselines.items()
                for k, v in scores.items()
            }
            log_metrics(client, run_id, metrics, step=0)
        for name, content in ((RESULTS_FILE, results), ("protocol.json", protocol.as_dict())):
            (Path(folder) / name).write_text(json.dumps(content, indent=2))
            client.log_artifact(run_id, str(Path(folder) / name))
    return StageOutput(
        counts={f"images/{name}": int(r["images"]) for name, r in results.items()},
        files={"results": RESULTS_FILE, "protocol": "protocol.json"},
        nodes=sorted(nodes),
    )


STAGE = Stage[EvaluationInput](
    name="evaluate",
    help="zero-shot segmentation benchmarks of the trained model",
    settings=settings,
    reads="train",
    prepare=_locate,
    body=_evaluate,
    retries=2,  # data and tracking I/O: a second attempt can succeed
)
run = STAGE.run
