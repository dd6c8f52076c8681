"""Time and memory of one SegCLIP training step (all three losses), with model FLOPs utilisation.

Each case runs in a fresh subprocess so its peak memory is its own. FLOPs are the
model's analytic count (segclip/model/flops.py: 3 x the forward's matrix products);
utilisation divides the achieved FLOP/s by the matmul peak measured here, on the
same threads and dtype.

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

import torch

import segclip  # noqa: F401  (torchvision fix before open_clip)
from segclip.config import load_config
from segclip.model import build_model
from segclip.model.flops import train_flops_per_sample
from segclip.train.speed import benchmark_step, matmul_peak_flops, synthetic_batch, timed_steps
from segclip.train.step import AUTOCAST_DTYPES

BATCH_SIZES = {"paper": 8, "tiny": 32}
DEFAULT_CASES = ("tiny:fp32", "tiny:bf16", "paper:fp32", "paper:bf16")


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(profile: str, precision: str, steps: int) -> dict:
    config = load_config(profile, ["model.pretrained=null"])  # no hub download
    model = build_model(config.model)
    batch_size = BATCH_SIZES[profile]
    batch = synthetic_batch(model, batch_size)
    step = benchmark_step(model, config, precision=precision)
    rss_before = _rss_mib()
    seconds = timed_steps(step, batch, warmup=1, steps=steps).median_s
    flops = batch_size * train_flops_per_sample(model)
    peak = matmul_peak_flops(AUTOCAST_DTYPES[precision] or torch.float32)
    return {
        "case": f"{profile}:{precision}",
        "batch": batch_size,
        "step_s": seconds,
        "samples_per_s": batch_size / seconds,
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
