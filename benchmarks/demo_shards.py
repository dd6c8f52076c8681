"""The demo's superpixel shards and benchmark without Ray, img2dataset or MLflow, for a lent
GPU machine that has none of them: `demo_recipes.py` trains on what this writes.

Each sample is what the ingest and superpixel stages make of the same scene, through the
library's own `store_image` and `superpixel_shard` under the same keys, so its JPEG,
caption and superpixel members equal a `make demo`'s byte for byte (tested); only
img2dataset's JSON record lacks the download's URL. A rerun with the same settings finds
the finished folder and does nothing.

    python benchmarks/demo_shards.py                          # workdir/demo, the demo profile
    python benchmarks/demo_shards.py runtime.workdir=/tmp/w demo.train_images=96
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from functools import partial
from pathlib import Path

import webdataset as wds
from PIL import Image

import segclip  # noqa: F401  (torchvision fix before open_clip)
from segclip.config import SegCLIPConfig, load_config
from segclip.data.demo_data import demo_data_key, demo_scene, usable_cpus, write_demo_benchmark
from segclip.data.images import StoreRule, store_image
from segclip.data.shards import SHARD_DIGITS, SHARD_DIR, shard_name, superpixel_shard
from segclip.manifest import Manifest, ShardRef, json_digest, read_result, write_manifest
from segclip.storage import location


def sample_key(shard: int, position: int, samples_per_shard: int) -> str:
    """img2dataset's key of a download: the shard, then the position in as many digits as
    the shard size needs."""
    digits = math.ceil(math.log10(samples_per_shard))
    return f"{shard * 10**digits + position:0{digits + SHARD_DIGITS}d}"


def ingest_shard(config: SegCLIPConfig, shard: int, target: Path) -> None:
    """The ingest stage's shard `shard` of the demo scenes: the PNG each scene is served as,
    stored by the ingest's rule."""
    per_shard, demo = config.ingest.samples_per_shard, config.demo
    first, rule = shard * per_shard, StoreRule.for_ingest(config.ingest)
    with wds.TarWriter(str(target)) as sink:
        for position, index in enumerate(range(first, min(first + per_shard, demo.train_images))):
            scene = demo_scene(demo.seed, index, demo.image_size)
            png = io.BytesIO()
            Image.fromarray(scene.image).save(png, format="PNG")  # as write_demo_source saves it
            stored = store_image(png.getvalue(), rule)
            key = sample_key(shard, position, per_shard)
            record = {
                "caption": scene.caption,
                "key": key,
                "status": "success",
                "error_message": None,
                "width": stored.size[0],
                "height": stored.size[1],
                "original_width": stored.original_size[0],
                "original_height": stored.original_size[1],
                "sha256": hashlib.sha256(png.getvalue()).hexdigest(),
            }
            sink.write({"__key__": key, "jpg": stored.data, "txt": scene.caption, "json": record})


def build_shard(config: SegCLIPConfig, folder: Path, shard: int) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / shard_name(shard)
        ingest_shard(config, shard, source)
        target = folder / SHARD_DIR / shard_name(shard)
        return superpixel_shard(str(source), target, config.data).samples


def rebuild(config: SegCLIPConfig) -> tuple[Path, Path]:
    """The superpixel stage's folder and the benchmark folder under the config's workdir."""
    settings = {
        "demo": demo_data_key(config.demo),
        "store": asdict(StoreRule.for_ingest(config.ingest)),
        "samples_per_shard": config.ingest.samples_per_shard,
        "data": config.data.model_dump(mode="json"),
    }
    workdir = Path(config.runtime.workdir)
    key = f"rebuilt-{json_digest(settings)[:12]}"
    folder = workdir / "superpixels" / key
    benchmark = write_demo_benchmark(
        workdir / "benchmarks" / f"demo-rebuilt-{json_digest(settings['demo'])[:12]}", config.demo
    )
    if read_result(folder) is not None:
        return folder, Path(str(benchmark))
    (folder / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    shards = math.ceil(config.demo.train_images / config.ingest.samples_per_shard)
    start = time.perf_counter()
    with ProcessPoolExecutor(min(usable_cpus(), shards)) as pool:
        counts = list(pool.map(partial(build_shard, config, folder), range(shards)))
    manifest = Manifest(
        stage="superpixels",
        key=key,
        config=settings,
        counts={"samples": sum(counts), "shards": shards},
        shards=[
            ShardRef(path=f"{SHARD_DIR}/{shard_name(i)}", samples=n) for i, n in enumerate(counts)
        ],
        timings={"rebuild": time.perf_counter() - start},
    )
    write_manifest(location(folder), manifest)
    return folder, Path(str(benchmark))


def main() -> None:
    config = load_config("demo", sys.argv[1:])
    start = time.perf_counter()
    folder, benchmark = rebuild(config)
    counts = json.loads((folder / "manifest.json").read_text())["counts"]
    print(f"superpixels {folder} ({counts['samples']} samples in {counts['shards']} shards)")
    print(f"benchmark {benchmark}")
    print(f"{time.perf_counter() - start:.1f} s on {usable_cpus()} CPUs")
    print(f"command: python benchmarks/demo_shards.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
