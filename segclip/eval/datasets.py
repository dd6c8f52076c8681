"""Benchmark readers for the standard folder layouts, with their class lists and label rules.

Each benchmark is a `BenchmarkSpec` in BENCHMARKS: where its files are under
`eval.data_root`, how a label file becomes evaluation ids (0..K-1, 255 ignored),
and how to obtain the data, which the missing-folder error repeats.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm
from upath import UPath

from segclip.config import SegCLIPConfig
from segclip.data.demo_data import DEMO_CLASS_NAMES, demo_data_key, write_demo_benchmark
from segclip.data.voc import IGNORE_INDEX
from segclip.eval import class_names as names
from segclip.manifest import json_digest
from segclip.storage import atomic_write, location


@dataclass(frozen=True)
class Sample:
    name: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    label: np.ndarray  # (H, W) evaluation ids, IGNORE_INDEX ignored


def _identity(label: np.ndarray) -> np.ndarray:
    return label


def _drop_background(label: np.ndarray) -> np.ndarray:
    """0 (background) is ignored and classes shift down by one: VOC20, Context59, ADE20K."""
    shifted = label.astype(np.int64) - 1
    return np.where((label == 0) | (label == IGNORE_INDEX), IGNORE_INDEX, shifted).astype(np.uint8)


def _lookup(pairs: dict[int, int], default: int) -> Callable[[np.ndarray], np.ndarray]:
    table = np.full(256, default, dtype=np.uint8)
    for raw, value in pairs.items():
        table[raw] = value
    return lambda label: table[label]


# COCO-Stuff-164k stuffthingmaps: things 0..90 (80 used), stuff 91..181, 255 unlabeled.
coco_stuff_ids = _lookup(
    {raw: i for i, raw in enumerate(names.COCO_THING_IDS)}
    | {91 + j: 80 + j for j in range(len(names.COCO_STUFF))},
    IGNORE_INDEX,
)
# docs/method.md 6: thing ids map to 1..80; everything else, 255 included, is background.
coco_object_ids = _lookup({raw: 1 + i for i, raw in enumerate(names.COCO_THING_IDS)}, 0)
cityscapes_train_ids = _lookup({raw: i for i, raw in enumerate(names.CITYSCAPES_IDS)}, IGNORE_INDEX)


def _demo_benchmark(root: UPath, config: SegCLIPConfig) -> UPath:
    """One folder per demo configuration, so a changed seed or size never reuses old files."""
    digest = json_digest(demo_data_key(config.demo))[:12]
    return write_demo_benchmark(root / f"demo-{digest}", config.demo)


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    folder: str  # under eval.data_root
    class_names: tuple[str, ...]  # one per evaluation id
    background: bool  # id 0 is background: decided by threshold, never queried as text
    images: str  # image path pattern with {id}
    labels: str  # label path pattern with {id}
    split: str | None  # file listing the ids; None = every image matching `images`
    convert: Callable[[np.ndarray], np.ndarray]
    obtain: str  # where the data comes from, for the missing-data error
    generate: Callable[[UPath, SegCLIPConfig], UPath] | None = None  # built-in data: write it

    def locate(self, config: SegCLIPConfig) -> UPath:
        """The dataset folder (a path or URL): generated under the workdir for built-in data,
        else under eval.data_root."""
        if self.generate is not None:
            return self.generate(location(config.runtime.workdir) / "benchmarks", config)
        return location(config.eval.data_root) / self.folder

    @property
    def text_classes(self) -> tuple[str, ...]:
        """The classes queried with text prompts (background excluded)."""
        return self.class_names[1:] if self.background else self.class_names


VOC_HINT = "download VOCtrainval_11-May-2012.tar and unpack it into <data_root>"
CONTEXT_HINT = (
    "unpack VOC2010 into <data_root>/VOCdevkit and convert the 59/60-class Context labels into "
    "SegmentationClassContext/ (mmsegmentation's pascal_context.py does this)"
)
COCO_HINT = (
    "unpack val2017.zip to coco_stuff164k/images/val2017 and stuffthingmaps_trainval2017.zip's "
    "val2017 to coco_stuff164k/annotations/val2017"
)

BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec("voc", "VOCdevkit/VOC2012", names.VOC, True, "JPEGImages/{id}.jpg",
                      "SegmentationClass/{id}.png", "ImageSets/Segmentation/val.txt",
                      _identity, VOC_HINT),
        BenchmarkSpec("voc20", "VOCdevkit/VOC2012", names.VOC[1:], False, "JPEGImages/{id}.jpg",
                      "SegmentationClass/{id}.png", "ImageSets/Segmentation/val.txt",
                      _drop_background, VOC_HINT),
        BenchmarkSpec("context", "VOCdevkit/VOC2010", ("background", *names.CONTEXT59), True,
                      "JPEGImages/{id}.jpg", "SegmentationClassContext/{id}.png",
                      "ImageSets/SegmentationContext/val.txt", _identity, CONTEXT_HINT),
        BenchmarkSpec("context59", "VOCdevkit/VOC2010", names.CONTEXT59, False,
                      "JPEGImages/{id}.jpg", "SegmentationClassContext/{id}.png",
                      "ImageSets/SegmentationContext/val.txt", _drop_background, CONTEXT_HINT),
        BenchmarkSpec("coco_object", "coco_stuff164k", ("background", *names.COCO_THINGS), True,
                      "images/val2017/{id}.jpg", "annotations/val2017/{id}.png", None,
                      coco_object_ids, COCO_HINT),
        BenchmarkSpec("coco_stuff", "coco_stuff164k", (*names.COCO_THINGS, *names.COCO_STUFF),
                      False, "images/val2017/{id}.jpg", "annotations/val2017/{id}.png", None,
                      coco_stuff_ids, COCO_HINT),
        BenchmarkSpec("cityscapes", "cityscapes", names.CITYSCAPES, False,
                      "leftImg8bit/val/{id}_leftImg8bit.png", "gtFine/val/{id}_gtFine_labelIds.png",
                      None, cityscapes_train_ids,
                      "unpack leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip into "
                      "<data_root>/cityscapes"),
        BenchmarkSpec("ade20k", "ADEChallengeData2016", names.ADE20K, False,
                      "images/validation/{id}.jpg", "annotations/validation/{id}.png", None,
                      _drop_background, "unpack ADEChallengeData2016.zip into <data_root>"),
        BenchmarkSpec("demo", "demo", DEMO_CLASS_NAMES, True, "JPEGImages/{id}.jpg",
                      "SegmentationClass/{id}.png", "ImageSets/Segmentation/val.txt",
                      _identity, "generated from the `demo` config section",
                      generate=_demo_benchmark),
    )
}  # fmt: skip


def get_benchmark(name: str) -> BenchmarkSpec:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}") from None


def sample_ids(spec: BenchmarkSpec, folder: UPath) -> list[str]:
    """The split's ids, after checking the folder holds what the spec expects."""

    def missing(path: UPath, what: str) -> FileNotFoundError:
        return FileNotFoundError(
            f"benchmark {spec.name!r}: expected {what} at {path}; to get the data: {spec.obtain}"
        )

    if not folder.is_dir():
        raise missing(folder, "its dataset folder")
    if spec.split is not None:
        split = folder / spec.split
        if not split.is_file():
            raise missing(split, "the split list")
        ids = split.read_text().split()
    else:
        prefix, suffix = spec.images.split("{id}")
        images = folder / prefix
        ids = sorted(
            "/".join(path.parts[len(images.parts) :])[: -len(suffix) or None]
            for path in images.rglob(f"*{suffix}")
        )
    if not ids:
        raise missing(folder / spec.images.split("{id}")[0], "the images")
    for pattern, what in ((spec.images, "the first image"), (spec.labels, "its label map")):
        if not (folder / pattern.format(id=ids[0])).is_file():
            raise missing(folder / pattern.format(id=ids[0]), what)
    return ids


def _read_image(path: UPath) -> np.ndarray:
    """Pixels as stored: palette PNGs read as indices, grayscale as values."""
    with path.open("rb") as stream, Image.open(stream) as image:
        return np.asarray(image)


def read_sample(spec: BenchmarkSpec, folder: UPath, sample_id: str) -> Sample:
    image_path = folder / spec.images.format(id=sample_id)
    with image_path.open("rb") as stream, Image.open(stream) as image:
        rgb = np.asarray(image.convert("RGB"))
    raw = _read_image(folder / spec.labels.format(id=sample_id))
    return Sample(sample_id, rgb, spec.convert(raw))


def read_samples(spec: BenchmarkSpec, folder: UPath, limit: int | None = None) -> Iterator[Sample]:
    for sample_id in sample_ids(spec, folder)[:limit]:
        yield read_sample(spec, folder, sample_id)


def export_coco_object(folder: str | Path) -> int:
    """Write `{id}_object.png` (COCO-Object ids 0..80) beside each COCO-Stuff-164k val map.

    The `coco_object` reader converts on the fly; this export is for tools that
    expect the converted files. Returns the number of maps written.
    """
    spec = BENCHMARKS["coco_object"]
    folder = location(folder)
    ids = sample_ids(spec, folder)
    for sample_id in tqdm(ids, desc="coco-object maps", unit="map"):
        source = folder / spec.labels.format(id=sample_id)
        converted = spec.convert(_read_image(source))
        with atomic_write(source.with_name(f"{sample_id}_object.png")) as scratch:
            Image.fromarray(converted).save(scratch, format="PNG")
    return len(ids)
