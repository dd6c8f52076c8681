"""Typed configuration: one pydantic model per section, YAML profiles, dotted overrides.

Defaults are docs/method.md's reference recipe; a profile (`paper`, `tiny`, or a YAML
path) overrides them, and `section.field=value` strings override the profile.
Every model forbids unknown keys, so a typo fails before any work starts with
the dotted name of the offending field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from segclip.clip_architecture import describe_clip

PROFILE_DIR = Path(__file__).parent / "configs"

# Choice lists: each names the keys of one registry, and tests/unit/test_registries.py ties
# them, so a choice added to a registry without its name here (or the reverse) fails a test.
KlForm = Literal["reference", "plain"]  # segclip.losses.KL_FORMS
SuperpixelMethod = Literal["felzenszwalb", "slic"]  # segclip.data.superpixels.SUPERPIXEL_METHODS
PatchLabel = Literal["mean", "majority"]  # segclip.data.superpixels.PATCH_REDUCTIONS
Precision = Literal["fp32", "bf16", "fp16"]  # segclip.train.step.AUTOCAST_DTYPES
ProtocolName = Literal[  # segclip.eval.protocol.PROTOCOLS
    "segclip", "tcl448", "segclip_learned_scale", "sclip336", "sclip336_pamr"
]
# "segclip" (the model's centers) and segclip.eval.segment.TRAINING_FREE
MethodName = Literal["segclip", "maskclip", "sclip", "clearclip", "naclip"]
BenchmarkName = Literal[  # segclip.eval.datasets.BENCHMARKS
    "voc", "voc20", "context", "context59", "coco_object", "coco_stuff", "cityscapes", "ade20k",
    "demo",
]  # fmt: skip
BaselineName = Literal["all_background", "random_centers"]  # segclip.eval.baselines.BASELINES
IngestSource = Literal["demo", "urls", "coco", "shards"]  # pipelines.ingest.SOURCES
LateBlockContext = Literal["all_centers", "own_center"]  # SegCLIP.run_late_blocks


class ConfigError(ValueError):
    """A configuration value, key, profile or override is invalid."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class ModelConfig(_Section):
    """Architecture of the SegCLIP model (docs/method.md sections 1-3)."""

    clip_model: str = Field("ViT-B-16", description="open_clip architecture name")
    pretrained: str | None = Field(
        "openai", description="open_clip tag or local weights file; null = random init"
    )
    quick_gelu: bool = Field(True, description="QuickGELU activations (OpenAI CLIP weights)")
    num_centers: int = Field(8, ge=1, description="learnable centers G")
    group_layer: int | None = Field(
        10, ge=1, description="vision blocks before the group module; null = depth - 2"
    )
    cross_attention_blocks: int = Field(2, ge=1)
    late_block_context: LateBlockContext = Field(
        "all_centers",
        description="what a center attends to in the vision blocks after the group module: "
        "all_centers [ref]; own_center [fix] runs each center alone, so its embedding "
        "describes its own patches only",
    )
    gumbel_tau: float = Field(0.9, gt=0)
    reconstruction_keep_ratio: float = Field(
        0.25, gt=0, lt=1, description="share of the 1 + N tokens kept by the masked pass"
    )
    reconstruction_blocks: int = Field(2, ge=1)
    decoder_width: int = Field(384, ge=8)
    decoder_depth: int = Field(3, ge=1)
    decoder_heads: int = Field(8, ge=1)
    caption_tokens: int = Field(30, ge=1, le=75, description="BPE tokens kept per caption")

    @model_validator(mode="after")
    def _check_architecture(self) -> ModelConfig:
        arch = describe_clip(self.clip_model)
        if self.group_layer is not None and self.group_layer > arch.vision_layers:
            raise ValueError(
                f"group_layer={self.group_layer} is past the last vision block of "
                f"{self.clip_model} ({arch.vision_layers} blocks); use 1..{arch.vision_layers}"
            )
        if self.decoder_width % self.decoder_heads:
            raise ValueError(
                f"decoder_width={self.decoder_width} is not divisible by "
                f"decoder_heads={self.decoder_heads}"
            )
        return self


class LossConfig(_Section):
    """Loss weights and variants (docs/method.md section 3)."""

    contrastive_weight: float = Field(1.0, ge=0)
    superpixel_kl_weight: float = Field(1.0, ge=0)
    reconstruction_weight: float = Field(1.0, ge=0)
    kl_form: KlForm = "reference"
    # Not in the method: single centers must rank the words their caption names first
    # (segclip/caption_words.py). Off by default; a weight needs a vocabulary.
    caption_word_weight: float = Field(0.0, ge=0)
    caption_words: tuple[str, ...] = ()
    caption_word_template: str = "a photo of a {}."

    @model_validator(mode="after")
    def _check_caption_words(self) -> LossConfig:
        if self.caption_word_weight and not self.caption_words:
            raise ValueError(
                "loss.caption_word_weight is set but loss.caption_words is empty: list the "
                "words the captions name objects with, or set the weight to 0"
            )
        if "{}" not in self.caption_word_template:
            raise ValueError(
                f"loss.caption_word_template {self.caption_word_template!r} has no {{}} "
                "for the word"
            )
        return self


class DataConfig(_Section):
    """Superpixels and training augmentation (docs/method.md section 4)."""

    superpixel_method: SuperpixelMethod = "felzenszwalb"
    felzenszwalb_scale: float = Field(224.0, gt=0)
    felzenszwalb_sigma: float = Field(0.9, ge=0)
    felzenszwalb_min_size: int = Field(224, ge=1)
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    patch_label: PatchLabel = "mean"
    shuffle_buffer: int = Field(1000, ge=1, description="samples mixed across shards in training")

    @model_validator(mode="after")
    def _check_ranges(self) -> DataConfig:
        for name in ("crop_scale", "crop_ratio"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(
                    f"{name} must be (low, high) with 0 < low <= high, got {low, high}"
                )
        return self


class TrainConfig(_Section):
    """Optimisation recipe (docs/method.md section 5)."""

    global_batch_size: int = Field(768, ge=1)
    epochs: int = Field(10, ge=1)
    lr_new: float = Field(4e-3, gt=0, description="group module, reconstruction, late blocks")
    lr_pretrained: float = Field(4e-6, ge=0, description="early vision blocks, text tower")
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    grad_clip_norm: float = Field(1.0, gt=0)
    warmup_fraction: float = Field(0.15, ge=0, lt=1)
    precision: Precision = "fp32"
    steps: int | None = Field(
        None, ge=1, description="optimiser steps; null = epochs x (samples // global batch)"
    )
    seed: int = 0
    start_trials: int = Field(
        1,
        ge=1,
        description="starts (initial weights, noise, samples) each trained start_trial_steps; "
        "the lowest loss goes on (segclip/train/starts.py). 1: the plain run",
    )
    start_trial_steps: int = Field(100, ge=2, description="steps each start is tried for")

    def trials_problem(self, total_steps: int) -> str | None:
        """What is wrong with trying several starts in a run of `total_steps`, if anything."""
        if self.start_trials > 1 and self.start_trial_steps >= total_steps:
            return (
                f"train.start_trial_steps={self.start_trial_steps} leaves nothing of the run's "
                f"{total_steps} steps after its {self.start_trials} trial starts; lower it or "
                "set train.start_trials=1"
            )
        return None

    @model_validator(mode="after")
    def _check_trials(self) -> TrainConfig:
        """A run of fixed length fails at once; one counted in epochs when its data is known."""
        if self.steps is not None and (problem := self.trials_problem(self.steps)):
            raise ValueError(problem)
        return self


class EvalConfig(_Section):
    """Zero-shot segmentation benchmarks (docs/method.md 6); the protocol fixes the method."""

    methods: tuple[MethodName, ...] = Field(
        ("segclip",),
        min_length=1,
        description="what segments: segclip (the evaluated model's centers) and the "
        "training-free methods maskclip, sclip, clearclip, naclip (on a CLIP tower)",
    )
    protocols: tuple[ProtocolName, ...] = Field(
        ("segclip",),
        min_length=1,
        description="named, versioned protocols, each measured: "
        + ", ".join(get_args(ProtocolName)),
    )
    checkpoint: str | None = Field(
        None,
        description="evaluate this instead of the training stage's output: a checkpoint (path or "
        "fsspec URL, ours or the released .bin) or a model name, open_clip:ARCH[:WEIGHTS] or a "
        "profile (an untrained model around that CLIP: the training-free methods' floor)",
    )
    floor_model: str | None = Field(
        None,
        description="checkpoint or model name whose CLIP tower the training-free methods use "
        "(e.g. open_clip:ViT-B-16:openai); null = the evaluated model's own",
    )
    benchmarks: tuple[BenchmarkName, ...] = ("voc", "context", "coco_object")
    data_root: str = Field("data", description="folder holding each benchmark's dataset")
    precision: Literal["fp32", "bf16"] = "fp32"
    window_batch: int = Field(16, ge=1, description="sliding windows encoded per forward pass")
    overlays: int = Field(4, ge=0, description="overlay images logged per benchmark")
    baselines: tuple[BaselineName, ...] = Field(
        (),
        description="trivial baselines evaluated beside the model: all_background (every "
        "pixel background), random_centers (the model's grouping, random class per center)",
    )


class DemoDataConfig(_Section):
    """The built-in procedural dataset: training scenes and a benchmark drawn from another seed."""

    train_images: int = Field(2000, ge=1)
    benchmark_images: int = Field(200, ge=1)
    image_size: int = Field(224, ge=32, description="side of the square generated scenes")
    seed: int = 0
    benchmark_seed: int = 1

    @model_validator(mode="after")
    def _check_seeds(self) -> DemoDataConfig:
        if self.seed == self.benchmark_seed:
            raise ValueError(
                f"seed and benchmark_seed are both {self.seed}: the benchmark must not repeat "
                "the training scenes; choose different seeds"
            )
        return self


class IngestConfig(_Section):
    """Where the image-text pairs come from and how they are stored (ingest stage)."""

    source: IngestSource = Field(
        "demo",
        description="demo scenes served on 127.0.0.1, a url+caption list, a COCO-2014 "
        "captions folder, or existing webdataset shards",
    )
    path: str | None = Field(
        None, description="url list file, COCO folder or shard folder (not used by `demo`)"
    )
    input_format: Literal["auto", "parquet", "csv", "tsv"] = "auto"
    columns: tuple[str, ...] | None = Field(
        None,
        description="names for a csv/tsv list without a header row, in file order "
        "(CC3M: [caption, url]; CC12M: [url, caption]); null = the first row is the header",
    )
    url_column: str = "url"
    caption_column: str = "caption"
    coco_splits: tuple[str, ...] = Field(
        ("train", "restval"), description="Karpathy splits to ingest from a COCO folder"
    )
    image_size: int = Field(224, ge=16, description="short side of the stored images")
    resize_mode: Literal["keep_ratio", "center_crop", "border", "no"] = "keep_ratio"
    encode_quality: int = Field(95, ge=1, le=100)
    samples_per_shard: int = Field(10000, ge=1)
    min_image_size: int = Field(
        32, ge=1, description="source images with a shorter side below this are left out"
    )
    max_image_pixels: int = Field(
        80_000_000,
        ge=1,
        le=89_478_485,  # Pillow refuses larger images as decompression bombs
        description="source images with more pixels are left out, before decoding",
    )
    max_aspect_ratio: float = Field(
        10.0,
        ge=1.0,
        description="source images whose longer side exceeds the shorter by more are left "
        "out; with keep_ratio this also bounds the stored longer side",
    )
    dedup: tuple[Literal["url", "content"], ...] = Field(
        (),
        description="drop repeated urls (before downloading) and repeated image bytes "
        "(after), keeping the first; each counted",
    )
    retries: int = Field(2, ge=0)
    timeout: int = Field(10, ge=1, description="seconds each network read may wait")
    download_deadline: int = Field(
        60, ge=1, description="seconds a whole download may take (a trickled body stops)"
    )

    @model_validator(mode="after")
    def _check_path(self) -> IngestConfig:
        if self.source != "demo" and not self.path:
            raise ValueError(
                f"source={self.source!r} needs ingest.path (the url list, COCO folder or "
                "shard folder to read)"
            )
        return self


class RuntimeConfig(_Section):
    """Where and how wide stages run.

    Most of it changes no output and stays out of the stage keys. The exceptions are in the
    training key (`TRAIN_KEY_RUNTIME`): the worker count and loader workers decide which
    samples each rank sees in which order, and `max_worker_batch` the contrastive
    negatives of each micro-batch. Known reproducibility limits, not keyed: `device` /
    `use_gpu` and `cpus_per_worker` (kernels and thread counts round differently).
    """

    workdir: str = Field(
        "workdir", description="root of every stage's output folder: a path or an fsspec URL"
    )
    s3_endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint for s3:// URLs (MinIO, Ceph, moto); null = "
        "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL or AWS itself. Credentials come from the "
        "standard AWS variables or files",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$",
        description="evaluation and predict device: auto = cuda when available, else cpu",
    )
    ray_address: str | None = Field(
        None, description="Ray cluster address; null = RAY_ADDRESS or a local Ray"
    )
    tracking_uri: str | None = Field(
        None, description="MLflow store; null = MLFLOW_TRACKING_URI or <workdir>/mlflow.db"
    )
    train_workers: int = Field(2, ge=1, description="Ray Train workers (DDP ranks)")
    use_gpu: bool = Field(
        False, description="one GPU per training worker (NCCL) and per evaluation actor"
    )
    cpus_per_worker: int | None = Field(
        None, ge=1, description="CPUs (and torch threads) per training worker; null = share all"
    )
    loader_workers: int = Field(1, ge=0, description="data loader processes per training worker")
    loader_keep_samples: int = Field(
        0,
        ge=0,
        description="samples each loader keeps in memory, decoded, so a shard drawn again is "
        "not read and decoded again (the same batches); 0 = stream every time. About 0.2 MB "
        "per 160 px sample: for a dataset that fits, as the demo's",
    )
    max_worker_batch: int | None = Field(
        None, ge=1, description="largest batch one worker holds at once; more is accumulated"
    )
    log_every: int = Field(10, ge=1, description="steps between metric logs")
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(3, ge=0, description="worker crashes Ray Train recovers from")
    inject_failure_at_step: int | None = Field(
        None, ge=1, description="testing fault tolerance: rank 0 crashes once at this step"
    )
    eval_actors: int = Field(
        2, ge=1, description="model copies evaluating in parallel on a Ray cluster or GPUs"
    )
    ingest_processes: int = Field(2, ge=1)
    ingest_threads: int = Field(32, ge=1)
    ingest_distributor: Literal["auto", "multiprocessing", "ray"] = Field(
        "auto", description="img2dataset's distributor; auto = ray when a Ray address is set"
    )


# The runtime settings that change trained weights, so the training stage's key holds them.
TRAIN_KEY_RUNTIME = ("train_workers", "loader_workers", "max_worker_batch")


class SegCLIPConfig(_Section):
    """The whole resolved configuration of a run."""

    profile: str = "paper"
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    demo: DemoDataConfig = Field(default_factory=DemoDataConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def _read_profile(profile: str | Path) -> dict[str, Any]:
    path = Path(profile)
    if path.suffix not in (".yaml", ".yml"):
        path = PROFILE_DIR / f"{profile}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"unknown profile {str(profile)!r}: choose one of {available_profiles()} "
                "or pass the path of a YAML file"
            )
    elif not path.is_file():
        raise ConfigError(f"profile file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"profile {path} must hold a mapping of sections, not {type(data).__name__}"
        )
    profile = data.pop("profile", path.stem)
    base = data.pop("base", None)
    if base is not None:  # a profile may start from another and change some fields
        data = _merge(_read_profile(base), data)
    data["profile"] = profile
    return data


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (`4`, `true`, `[1, 2]`)."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} must look like section.field=value")
    *parents, leaf = key.strip().split(".")
    node = tree
    for name in parents:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {name!r} is a value, not a section")
        node = child
    node[leaf] = yaml.safe_load(raw)


def _format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "<root>"
        given = f" (got {item['input']!r})" if item["type"] != "missing" else ""
        if item["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown field{given}; check the spelling or remove it")
        else:
            lines.append(f"{where}: {item['msg']}{given}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def build_config(tree: Mapping[str, Any]) -> SegCLIPConfig:
    """Validate a nested dict into a config, with errors that name each bad field."""
    try:
        return SegCLIPConfig.model_validate(dict(tree))
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error)) from None


def load_config(profile: str | Path = "paper", overrides: Sequence[str] = ()) -> SegCLIPConfig:
    """Resolve a profile name or YAML path plus dotted overrides into a validated config."""
    tree = _read_profile(profile)
    for override in overrides:
        apply_override(tree, override)
    return build_config(tree)


def config_to_yaml(config: SegCLIPConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
