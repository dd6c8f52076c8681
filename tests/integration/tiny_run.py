"""The tiny pipeline run the integration tests share: seconds per stage on 2 CPU cores."""

import sys

SEGCLIP = [sys.executable, "-m", "flows.cli"]  # the CLI of this checkout, in a subprocess

TINY_RUN = [
    "demo.train_images=48",
    "ingest.samples_per_shard=16",
    "runtime.ingest_processes=1",
    "train.steps=3",
    "train.global_batch_size=8",
    "runtime.log_every=1",
    "demo.benchmark_images=4",
    "demo.image_size=96",
    "ingest.image_size=96",
    "eval.benchmarks=[demo]",
]


def stage_folders(stdout: str) -> dict[str, str]:
    """The `<stage> <folder>` lines `segclip run` ends with (training prints progress first),
    for a workdir on a store."""
    pairs = (line.split() for line in stdout.splitlines())
    stages = ("ingest", "superpixels", "train", "evaluate")
    return {p[0]: p[1] for p in pairs if len(p) == 2 and p[0] in stages and "://" in p[1]}
