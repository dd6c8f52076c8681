"""Time and memory of one SegCLIP training step (all three losses), with model FLOPs utilisation.

Each case runs in a fresh subprocess so its peak memory is its own. FLOPs are
counted by torch's FlopCounterMode over one full step (forward + backward);
utilisation divides the achieved FLOP/s by the matmul peak measured here, on
the same threads and dtype.

    python benchmarks/train_step.py                      # all cases
    python benchmarks/train_step.py --cases tiny:fp32    # one case
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import segclip  # noqa: F401  (torchvision fix before open_clip)
from segclip.config import load_config
from segclip.model import CaptionTokenizer, build_model
from segclip.train import Batch, TrainStep, build_optimizer, build_scheduler
from segclip.train.step import AUTOCAST_DTYPES

BATCH_SIZES = {"paper": 8, "tiny": 32}
DEFAULT_CASES = ("tiny:fp32", "tiny:bf16", "paper:fp32", "paper:bf16")


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak_flops(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """Best sustained FLOP/s of a square matmul: the machine's practical ceiling."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def synthetic_batch(profile: str, batch_size: int) -> tuple:
    config = load_config(profile, ["model.pretrained=null"])  # no hub download
    model = build_model(config.model)
    size = model.grid[0] * model.patch_size
    generator = torch.Generator().manual_seed(0)
    tokens = CaptionTokenizer(config.model)(
        ["a red square to the left of a blue circle"] * batch_size
    )
    batch = Batch(
        images=torch.randn(batch_size, 3, size, size, generator=generator),
        tokens=tokens,
        superpixels=torch.randint(
            0, 12, (batch_size, model.grid[0] * model.grid[1]), generator=generator
        ),
    )
    return config, model, batch


def run_case(profile: str, precision: str, steps: int) -> dict:
    config, model, batch = synthetic_batch(profile, BATCH_SIZES[profile])
    train_config = config.train.model_copy(update={"precision": precision})
    optimizer = build_optimizer(model, train_config)
    step = TrainStep(
        model,
        optimizer,
        build_scheduler(optimizer, train_config, 1000),
        loss_config=config.loss,
        train_config=train_config,
    )
    rss_before = _rss_mib()
    with FlopCounterMode(display=False) as counter:
        step(batch)  # also the warm-up step
    flops = counter.get_total_flops()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    peak = matmul_peak_flops(AUTOCAST_DTYPES[precision] or torch.float32)
    return {
        "case": f"{profile}:{precision}",
        "batch": BATCH_SIZES[profile],
        "step_s": seconds,
        "samples_per_s": BATCH_SIZES[profile] / seconds,
        "step_gflop": flops / 1e9,
        "achieved_gflops": flops / seconds / 1e9,
        "matmul_peak_gflops": peak / 1e9,
        "mfu": flops / seconds / peak,
        "peak_rss_mib": _peak_rss_mib(),
        "step_mem_mib": _peak_rss_mib() - rss_before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(DEFAULT_CASES), help="profile:precision")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (median)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        profile, precision = args.worker.split(":")
        print(json.dumps(run_case(profile, precision, args.steps)))
        return
    rows = []
    for case in args.cases:
        out = subprocess.run(
            [sys.executable, __file__, "--worker", case, "--steps", str(args.steps)],
            capture_output=True,
            text=True,
        )
        if out.returncode:
            sys.exit(f"case {case} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"done {case}", file=sys.stderr)
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"machine: {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    header = (
        "case",
        "batch",
        "step s",
        "samples/s",
        "GFLOP/step",
        "GFLOP/s",
        "matmul peak",
        "MFU",
        "peak RSS MiB",
        "step mem MiB",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(
            f"| {r['case']} | {r['batch']} | {r['step_s']:.3f} | {r['samples_per_s']:.1f} | "
            f"{r['step_gflop']:.1f} | {r['achieved_gflops']:.1f} | {r['matmul_peak_gflops']:.1f} | "
            f"{100 * r['mfu']:.0f}% | {r['peak_rss_mib']:.0f} | {r['step_mem_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
