"""Samples/s of the whole training stage (Ray Train, loader, DDP, MLflow) vs the bare step.

The stage trains on demo scenes through the real data stages; its rate is the
median of the per-window `samples_per_s` it logs to MLflow (start-up excluded,
reported separately). The baseline is benchmarks/train_step.py's single-process
step on a synthetic batch of the same per-worker size.

    python benchmarks/train_throughput.py                       # paper and tiny
    python benchmarks/train_throughput.py --cases tiny:1
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import segclip  # noqa: F401  (torchvision fix before open_clip)
from pipelines import ingest, superpixels, train
from segclip.config import load_config
from segclip.tracking import RUN_ID_FILE, tracking_client

WORKER_BATCH = {"paper": 8, "tiny": 32}
DEFAULT_CASES = ("tiny:1", "tiny:2", "paper:1", "paper:2")
STEP_SCRIPT = Path(__file__).with_name("train_step.py")


def bare_step(profile: str, steps: int) -> float:
    command = [
        sys.executable,
        str(STEP_SCRIPT),
        "--worker",
        f"{profile}:fp32",
        "--steps",
        str(steps),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["samples_per_s"]


def stage_rate(workdir: Path, profile: str, workers: int, steps: int) -> tuple[float, float]:
    batch = WORKER_BATCH[profile] * workers
    config = load_config(
        profile,
        [
            f"runtime.workdir={workdir}",
            "model.pretrained=null",
            "demo.train_images=256",
            "demo.image_size=224",
            "ingest.image_size=224",
            "ingest.samples_per_shard=32",
            f"train.global_batch_size={batch}",
            f"train.steps={steps}",
            f"train.seed={workers}",
            f"runtime.train_workers={workers}",
            "runtime.log_every=1",
            f"runtime.checkpoint_every={steps}",
        ],
    )
    labels = superpixels.run(config, [ingest.run(config).ref])
    start = time.perf_counter()
    result = train.run(config, [labels.ref], force=True)
    wall = time.perf_counter() - start
    run_id = (result.output_dir / RUN_ID_FILE).read_text()
    rates = [m.value for m in tracking_client(config).get_metric_history(run_id, "samples_per_s")]
    return statistics.median(rates[1:]), wall  # the first window holds loader start-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(DEFAULT_CASES), help="profile:workers")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="segclip-train-bench-") as tmp:
        for case in args.cases:
            profile, workers = case.split(":")
            stage, wall = stage_rate(Path(tmp), profile, int(workers), args.steps)
            rows.append((case, stage, bare_step(profile, 3), wall))
            print(f"done {case}", file=sys.stderr)
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"machine: {os.cpu_count()} cores; per-worker batch {WORKER_BATCH}, fp32, "
        f"{args.steps} steps"
    )
    print("\n| profile:workers | stage samples/s | bare step samples/s | overhead | stage wall s |")
    print("|---|---|---|---|---|")
    for case, stage, bare, wall in rows:
        print(
            f"| {case} | {stage:.2f} | {bare:.2f} | {100 * (1 - stage / bare):.0f}% | {wall:.0f} |"
        )


if __name__ == "__main__":
    main()
