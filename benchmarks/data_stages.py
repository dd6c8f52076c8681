"""Throughput of the data stages against their bare baselines, on demo scenes served on 127.0.0.1.

- ingest: our stage vs the bare `img2dataset` CLI on the same loopback url list;
- superpixels: our Ray Data stage vs a single-process loop of the same shard function;
- loader: the training loop fed by the loader, the share of time spent waiting on data.

    python benchmarks/data_stages.py                   # 1000 images, tiny and paper loaders
    python benchmarks/data_stages.py --images 200 --loader-profiles tiny
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

import segclip  # noqa: F401  (torchvision fix before open_clip)
from segclip.config import DemoDataConfig, load_config
from segclip.data.demo_data import usable_cpus, write_demo_source
from segclip.data.loader import training_loader
from segclip.data.serve import serve_directory
from segclip.data.shards import shard_name, superpixel_shard
from segclip.manifest import load_result
from segclip.model import build_model
from segclip.train import build_train_step

IMAGE_SIZE = 224
STAGE_SCRIPT = """
import sys, segclip
from pipelines import {stage}
from segclip.config import load_config
from segclip.manifest import DataRef
config = load_config("paper", sys.argv[2:])
inputs = [DataRef.model_validate_json(sys.argv[1])] if sys.argv[1] != "-" else []
print({stage}.run(config, inputs).output_dir)
"""
LOADER_BATCH = {"tiny": 32, "paper": 8}


def timed(command: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{shlex.join(command[:3])} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, done.stdout.strip().splitlines()[-1]


def stage_command(stage: str, upstream: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-c", STAGE_SCRIPT.format(stage=stage), upstream, *overrides]


def bench_ingest(root: Path, url_list: Path, images: int, args: argparse.Namespace) -> dict:
    common = {
        "processes_count": args.processes,
        "thread_count": args.threads,
        "number_sample_per_shard": args.shard_size,
    }
    bare = [
        str(Path(sys.executable).with_name("img2dataset")),  # the CLI installed beside python
        f"--url_list={url_list}",
        "--input_format=parquet",
        "--url_col=url",
        "--caption_col=caption",
        "--output_format=webdataset",
        f"--image_size={IMAGE_SIZE}",
        "--resize_mode=keep_ratio",
        "--encode_format=jpg",
        "--encode_quality=95",
        "--retries=2",
        "--timeout=10",
        "--enable_wandb=False",
        *(f"--{key}={value}" for key, value in common.items()),
    ]
    ours = [
        "ingest.source=urls",
        f"ingest.path={url_list}",
        f"ingest.image_size={IMAGE_SIZE}",
        f"ingest.samples_per_shard={args.shard_size}",
        f"runtime.ingest_processes={args.processes}",
        f"runtime.ingest_threads={args.threads}",
    ]
    bare_s, stage_s = [], []
    for repeat in range(args.repeats):
        bare_s.append(timed([*bare, f"--output_folder={root / f'bare{repeat}'}"])[0])
        seconds, output = timed(
            stage_command("ingest", "-", [*ours, f"runtime.workdir={root / f'ours{repeat}'}"])
        )
        stage_s.append(seconds)
    return {"bare_s": min(bare_s), "stage_s": min(stage_s), "images": images, "output": output}


def bench_superpixels(root: Path, ingest_dir: str, args: argparse.Namespace) -> dict:
    upstream = load_result(ingest_dir)
    config = load_config("paper")
    start = time.perf_counter()
    for index, shard in enumerate(upstream.shard_urls):
        superpixel_shard(shard, root / "single" / shard_name(index), config.data)
    single_s = time.perf_counter() - start
    overrides = [f"runtime.workdir={root / 'spx'}"]
    stage_s, output = timed(stage_command("superpixels", upstream.ref.model_dump_json(), overrides))
    return {
        "single_s": single_s,
        "stage_s": stage_s,
        "stage_total_s": load_result(output).manifest.timings["total"],
        "images": upstream.manifest.counts["samples"],
        "output": output,
    }


def bench_loader(profile: str, shards: list[str], steps: int, workers: int) -> dict:
    config = load_config(profile, ["model.pretrained=null"])
    torch.manual_seed(0)
    step = build_train_step(build_model(config.model), config, total_steps=1000)
    loader = iter(training_loader(shards, config, LOADER_BATCH[profile], num_workers=workers))
    step(next(loader))  # warm-up: worker start-up and first allocations
    waiting = computing = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        batch = next(loader)
        fetched = time.perf_counter()
        step(batch)
        waiting += fetched - start
        computing += time.perf_counter() - fetched
    return {
        "profile": profile,
        "batch": LOADER_BATCH[profile],
        "step_s": computing / steps,
        "wait_s": waiting / steps,
        "wait_fraction": waiting / (waiting + computing),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--processes", type=int, default=usable_cpus())
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="ingest runs per side (best)")
    parser.add_argument("--loader-profiles", nargs="*", default=["tiny", "paper"])
    parser.add_argument("--loader-steps", type=int, default=8)
    parser.add_argument("--loader-workers", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="segclip-bench-") as tmp:
        root = Path(tmp)
        source = root / "source"
        captions = pq.read_table(
            write_demo_source(
                source, DemoDataConfig(train_images=args.images, image_size=IMAGE_SIZE)
            )
        )
        with serve_directory(source) as base:
            url_list = root / "urls.parquet"
            urls = [base + name for name in captions["file"].to_pylist()]
            pq.write_table(pa.table({"url": urls, "caption": captions["caption"]}), url_list)
            ingest = bench_ingest(root, url_list, args.images, args)
        print("ingest done", file=sys.stderr)
        spx = bench_superpixels(root, ingest["output"], args)
        print("superpixels done", file=sys.stderr)
        shards = load_result(spx["output"]).shard_urls
        loaders = [
            bench_loader(profile, shards, args.loader_steps, args.loader_workers)
            for profile in args.loader_profiles
        ]

    cores = os.cpu_count()
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"machine: {cores} cores; {args.images} demo images of {IMAGE_SIZE}px, "
        f"shards of {args.shard_size}"
    )
    print("\n| stage | ours images/s | baseline images/s | ratio | target |")
    print("|---|---|---|---|---|")
    ours, bare = ingest["images"] / ingest["stage_s"], ingest["images"] / ingest["bare_s"]
    print(
        f"| ingest (vs bare img2dataset CLI) | {ours:.1f} | {bare:.1f} | {ours / bare:.2f} | "
        ">= 0.90 |"
    )
    ours, single = spx["images"] / spx["stage_s"], spx["images"] / spx["single_s"]
    print(
        f"| superpixels (vs 1-process loop) | {ours:.1f} | {single:.1f} | {ours / single:.2f} | "
        f">= {0.85 * cores:.2f} (0.85 x {cores} cores) |"
    )
    print(
        f"\nsuperpixel stage: {spx['stage_s']:.1f} s wall including Ray start-up, "
        f"{spx['stage_total_s']:.1f} s inside the stage"
    )
    print("\n| loader + training step | batch | step s | wait s/step | waiting | target |")
    print("|---|---|---|---|---|---|")
    for row in loaders:
        print(
            f"| {row['profile']} ({args.loader_workers} loader worker) | {row['batch']} | "
            f"{row['step_s']:.3f} | {row['wait_s']:.3f} | {100 * row['wait_fraction']:.1f}% | "
            "< 5% |"
        )


if __name__ == "__main__":
    main()
