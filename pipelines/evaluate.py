"""Evaluate stage: zero-shot segmentation benchmarks of a trained (or any) checkpoint.

Every benchmark folder is checked before the model is loaded, so a missing
dataset fails in seconds with the path it expected and how to get it. One run
measures every method (the model's centers, the training-free CLIP methods on a CLIP
tower, the trivial baselines) under every protocol on every benchmark. Results:
`results.json` (one row per method, protocol and benchmark), per row
`<method>/<protocol>/<benchmark>/` with `per_class_iou.csv` and its bar chart
`per_class_iou.png`, `confusion.csv` and overlay images, all logged to the stage's MLflow
run with each protocol's name, version and values. The model runs on `runtime.device`; on a
Ray cluster or with GPUs, `runtime.eval_actors` model copies share the images, each on the GPU
it reserves.
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
from segclip.charts import per_class_iou_chart
from segclip.config import ConfigError, SegCLIPConfig, available_profiles
from segclip.data.demo_data import demo_data_key
from segclip.device import resolve_device
from segclip.eval.baselines import BASELINES
from segclip.eval.datasets import BenchmarkSpec, get_benchmark, sample_ids
from segclip.eval.metrics import ConfusionMatrix
from segclip.eval.protocol import PROTOCOLS
from segclip.eval.scoring import BenchmarkResult, evaluate_benchmark
from segclip.eval.segment import TRAINING_FREE, Segmenter
from segclip.manifest import DataRef, StageResult, file_ref, json_digest, read_result
from segclip.model import load_model, named_model
from segclip.stage import Stage, StageContext, StageOutput
from segclip.storage import local_folder, location
from segclip.tracking import log_metrics, log_params

RESULTS_FILE = "results.json"
PROTOCOLS_FILE = "protocols.json"
PER_CLASS_CHART = "per_class_iou.png"  # beside per_class_iou.csv
# Every model copy is loaded before the images are shared out, so all of them take part
# (the first ready would otherwise take a short benchmark alone); a cluster that cannot
# place them fails after this long instead of waiting for ever.
ACTORS_START_TIMEOUT_S = 600


def _model_ref(source: str, setting: str) -> DataRef:
    """A model source named in the config: a checkpoint pinned by its content, or a name (a
    profile, an open_clip architecture and weights) pinned by the model it gives."""
    if (named := named_model(source)) is not None:
        return DataRef(url=source, digest=json_digest(named.model_dump()))
    try:
        return file_ref(source)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{setting} {source} is neither a checkpoint file nor a model name: a profile "
            f"({', '.join(available_profiles())}) or open_clip:ARCHITECTURE[:WEIGHTS]"
        ) from None


def _given_checkpoint(config: SegCLIPConfig) -> DataRef | None:
    checkpoint = config.eval.checkpoint
    return _model_ref(checkpoint, "eval.checkpoint") if checkpoint else None


def _training_free(config: SegCLIPConfig) -> list[str]:
    return [method for method in config.eval.methods if method in TRAINING_FREE]


def settings(config: SegCLIPConfig) -> dict[str, Any]:
    keyed = {
        "eval": config.eval.model_dump(mode="json", exclude={"checkpoint", "floor_model"}),
        "protocols": {name: PROTOCOLS[name].as_dict() for name in config.eval.protocols},
        "seed": config.train.seed,  # the random_centers baseline draws with it
    }
    if config.eval.floor_model and _training_free(config):
        keyed["floor_model"] = _model_ref(config.eval.floor_model, "eval.floor_model").digest
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
    model: str  # the model: a training output's `model`, a given checkpoint, or a profile
    floor_model: str  # whose CLIP tower the training-free methods use
    benchmarks: list[LocatedBenchmark]


def _model_source(ref: DataRef) -> str:
    if named_model(ref.url) is not None:
        return ref.url
    trained = read_result(ref.url)
    return str(trained.file("model") if trained is not None else location(ref.url))


def _locate(config: SegCLIPConfig, inputs: list[DataRef]) -> EvaluationInput:
    """Each benchmark with its checked folder and sample ids; also checks every protocol has
    its threshold. Runs before any model work."""
    located = []
    for name in config.eval.benchmarks:
        spec = get_benchmark(name)
        for protocol in (PROTOCOLS[p] for p in config.eval.protocols):
            if spec.background and spec.name not in protocol.background_thresholds:
                raise ConfigError(
                    f"protocol {protocol.name!r} has no background threshold for {name}"
                )
        folder = spec.locate(config)
        # sample_ids raises naming the missing path and how to get the data.
        located.append(LocatedBenchmark(spec, folder, sample_ids(spec, folder)))
    model = _model_source(inputs[0])
    floor = config.eval.floor_model
    floor_source = _model_source(_model_ref(floor, "eval.floor_model")) if floor else model
    return EvaluationInput(model, floor_source, located)


@dataclass(frozen=True)
class Measure:
    """One cell of the evaluation: a method under a protocol on a benchmark."""

    method: str
    protocol: str
    benchmark: str

    def model(self, prepared: EvaluationInput) -> str:
        return prepared.floor_model if self.method in TRAINING_FREE else prepared.model

    @property
    def path(self) -> str:
        return f"{self.method}/{self.protocol}/{self.benchmark}"


def _segmenter(model, measure: Measure, config: SegCLIPConfig, device: torch.device):
    protocol, spec = PROTOCOLS[measure.protocol], get_benchmark(measure.benchmark)
    return Segmenter(
        model,
        spec.text_classes,
        protocol,
        protocol.background_thresholds[spec.name] if spec.background else None,
        window_batch=config.eval.window_batch,
        bf16=config.eval.precision == "bf16",
        device=device,
        method=measure.method,
    )


class _ConfusionActor:
    """A Ray Data actor holding one model copy on its own device (the GPU Ray gave it, when
    it reserved one); maps a batch of sample ids to a confusion matrix."""

    def __init__(self, model: str, measure: Measure, folder: str, config: SegCLIPConfig) -> None:
        use_reserved_cpus()
        self.spec, self.folder = get_benchmark(measure.benchmark), location(folder)
        device = resolve_device(config.runtime.device)
        self.segmenter = _segmenter(load_model(model), measure, config, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(sample_id) for sample_id in batch["id"]]
        result = evaluate_benchmark(self.segmenter, self.spec, self.folder, ids, progress=False)
        return {"confusion": result.confusion.matrix[None], "node": np.array([node_id()])}


def _distributed_confusion(
    config: SegCLIPConfig, model: str, measure: Measure, benchmark: LocatedBenchmark
) -> tuple[ConfusionMatrix, set[str]]:
    """The benchmark's confusion matrix from `runtime.eval_actors` model copies (Ray Data),
    and the nodes they ran on."""
    import ray

    connect(config.runtime.ray_address)
    ids = benchmark.ids
    batches = ray.data.from_items([{"id": i} for i in ids]).map_batches(
        _ConfusionActor,
        fn_constructor_kwargs={
            "model": model,
            "measure": measure,
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


def _row(measure: Measure, result: BenchmarkResult, kind: str) -> dict[str, Any]:
    return {
        "method": measure.method,
        "protocol": measure.protocol,
        "benchmark": measure.benchmark,
        "kind": kind,  # model, training_free or baseline
        "images": result.images,
        "miou": result.mean_iou,
        "pixel_accuracy": result.confusion.pixel_accuracy(),
    }


def _baseline_rows(
    config: SegCLIPConfig, segmenter: Segmenter, benchmark: LocatedBenchmark, protocol: str
) -> list[dict[str, Any]]:
    """The configured trivial baselines on this benchmark (those defined for it), locally."""
    spec, rows = benchmark.spec, []
    for name in config.eval.baselines:
        baseline = BASELINES[name]
        if baseline.needs_background and not spec.background:
            continue
        predictor = baseline.build(segmenter, spec, config.train.seed)
        result = evaluate_benchmark(
            predictor, spec, benchmark.folder, benchmark.ids, progress=False
        )
        rows.append(_row(Measure(name, protocol, spec.name), result, "baseline"))
    return rows


def results_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: per benchmark and protocol (in the order measured), the model, the
    training-free methods and the trivial baselines side by side."""
    order = {"model": 0, "training_free": 1, "baseline": 2}
    lines = [
        "| benchmark | protocol | method | images | mIoU | pixel acc. |",
        "|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], int] = {}  # (benchmark, protocol) in the order measured
    for row in rows:
        groups.setdefault((row["benchmark"], row["protocol"]), len(groups))

    def place(row: dict[str, Any]) -> tuple[int, int]:
        return groups[row["benchmark"], row["protocol"]], order[row["kind"]]

    for row in sorted(rows, key=place):
        method = f"baseline: {row['method']}" if row["kind"] == "baseline" else row["method"]
        lines.append(
            f"| {row['benchmark']} | {row['protocol']} | {method} | {row['images']} | "
            f"{100 * row['miou']:.1f} | {100 * row['pixel_accuracy']:.1f} |"
        )
    return "\n".join(lines)


def read_results(result: StageResult) -> list[dict[str, Any]]:
    return json.loads(result.file("results").read_text())


def report(result: StageResult) -> str:
    """The protocols that measured the results, then their table: what a user is shown."""
    protocols = json.loads(result.file("protocols").read_text())
    named = ", ".join(f"{name} v{values['version']}" for name, values in protocols.items())
    return f"protocols {named}\n{results_table(read_results(result))}"


def _measure(
    context: StageContext[EvaluationInput],
    measure: Measure,
    benchmark: LocatedBenchmark,
    segmenter: Segmenter,
) -> tuple[BenchmarkResult, set[str]]:
    """One method under one protocol on one benchmark: on Ray Data actors when distributed
    (overlays are drawn here), else in this process."""
    config, spec, overlays = context.config, benchmark.spec, context.config.eval.overlays
    if not (ray_address(config.runtime.ray_address) or config.runtime.use_gpu):
        result = evaluate_benchmark(
            segmenter, spec, benchmark.folder, benchmark.ids, overlays=overlays
        )
        return result, set()
    shown = benchmark.ids[:overlays]
    drawn = evaluate_benchmark(segmenter, spec, benchmark.folder, shown, overlays=overlays)
    model = measure.model(context.prepared)
    confusion, nodes = _distributed_confusion(config, model, measure, benchmark)
    return BenchmarkResult(spec.name, len(benchmark.ids), confusion, drawn.overlays), nodes


def _evaluate(context: StageContext[EvaluationInput]) -> StageOutput:
    config, tracked, prepared = context.config, context.tracked, context.prepared
    client, run_id = tracked.client, tracked.run_id
    protocols = {name: PROTOCOLS[name].as_dict() for name in config.eval.protocols}
    log_params(
        client,
        run_id,
        {
            f"protocol.{name}.{k}": str(v)
            for name, values in protocols.items()
            for k, v in values.items()
        }
        | {"methods": ",".join(config.eval.methods)},
    )
    device = resolve_device(config.runtime.device)
    models = {source: load_model(source) for source in {prepared.model, prepared.floor_model}}
    torch.manual_seed(config.train.seed)
    rows, nodes = [], set()
    with local_folder(context.output_dir) as folder:
        for benchmark in prepared.benchmarks:
            spec = benchmark.spec
            for protocol in config.eval.protocols:
                for method in config.eval.methods:
                    measure = Measure(method, protocol, spec.name)
                    segmenter = _segmenter(models[measure.model(prepared)], measure, config, device)
                    result, used = _measure(context, measure, benchmark, segmenter)
                    nodes |= used
                    written = result.write(Path(folder) / method / protocol, spec.class_names)
                    per_class_iou_chart(
                        spec.class_names,
                        result.confusion.iou(),
                        written / PER_CLASS_CHART,
                        title=f"{measure.path} ({result.images} images)",
                    )
                    client.log_artifacts(run_id, str(written), artifact_path=measure.path)
                    kind = "training_free" if method in TRAINING_FREE else "model"
                    rows.append(_row(measure, result, kind))
                    if method == "segclip":
                        rows += _baseline_rows(config, segmenter, benchmark, protocol)
        metrics = {
            f"{name}/{row['method']}/{row['protocol']}/{row['benchmark']}": row[name]
            for row in rows
            for name in ("miou", "pixel_accuracy")
        }
        log_metrics(client, run_id, metrics, step=0)
        for name, content in ((RESULTS_FILE, rows), (PROTOCOLS_FILE, protocols)):
            (Path(folder) / name).write_text(json.dumps(content, indent=2))
            client.log_artifact(run_id, str(Path(folder) / name))
    return StageOutput(
        counts={f"images/{b.spec.name}": len(b.ids) for b in prepared.benchmarks},
        files={"results": RESULTS_FILE, "protocols": PROTOCOLS_FILE},
        nodes=sorted(nodes),
    )


STAGE = Stage[EvaluationInput](
    name="evaluate",
    settings=settings,
    reads="train",
    given=_given_checkpoint,
    prepare=_locate,
    body=_evaluate,
    retries=2,  # data and tracking I/O: a second attempt can succeed
)
run = STAGE.run
