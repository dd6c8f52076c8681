"""The built-in demo data: captioned training scenes and a VOC-layout benchmark from another seed.

Scene i of a seed depends only on (seed, i), so any subset can be regenerated
(or generated in parallel) and always matches.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from upath import UPath

from segclip.config import DemoDataConfig
from segclip.data.scenes import CATEGORIES, SCENES_VERSION, Scene, render_scene
from segclip.data.voc import SPLIT_DIR, mark_borders, write_voc_split
from segclip.storage import atomic_write, location

DEMO_CLASS_NAMES = ("background", *CATEGORIES)
CAPTIONS_FILE = "captions.parquet"


def demo_data_key(config: DemoDataConfig) -> dict:
    """What the generated demo data depends on: its settings and the scene generator's version."""
    return {**config.model_dump(mode="json"), "scenes_version": SCENES_VERSION}


def demo_scene(seed: int, index: int, size: int) -> Scene:
    return render_scene(np.random.default_rng([seed, index]), size)


def usable_cpus() -> int:
    """The CPUs this process may run on (a container's or taskset's share), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def write_demo_source(folder: str | Path, config: DemoDataConfig) -> Path:
    """Training scenes as PNG files plus a parquet list of (file, caption); skip if complete."""
    folder = Path(folder)
    captions = folder / CAPTIONS_FILE
    if captions.is_file():
        return captions
    (folder / "images").mkdir(parents=True, exist_ok=True)
    files = [f"images/{index:06d}.png" for index in range(config.train_images)]

    def draw(index: int) -> str:
        scene = demo_scene(config.seed, index, config.image_size)
        Image.fromarray(scene.image).save(folder / files[index])
        return scene.caption

    # Drawing and PNG encoding release the GIL for most of their time: threads use every CPU.
    with ThreadPoolExecutor(max_workers=usable_cpus()) as pool:
        texts = list(pool.map(draw, range(config.train_images)))
    with atomic_write(captions) as tmp:
        pq.write_table(pa.table({"file": files, "caption": texts}), tmp)
    return captions


def write_demo_benchmark(root: str | Path | UPath, config: DemoDataConfig) -> UPath:
    """The demo segmentation benchmark in the PASCAL VOC layout (val split); skip if complete."""
    root = location(root)
    if (root / SPLIT_DIR / "val.txt").is_file():
        return root
    size = config.image_size
    samples = (
        (
            f"demo_{index:06d}",
            (scene := demo_scene(config.benchmark_seed, index, size)).image,
            mark_borders(scene.class_map),
        )
        for index in range(config.benchmark_images)
    )
    return write_voc_split(root, samples, DEMO_CLASS_NAMES)
