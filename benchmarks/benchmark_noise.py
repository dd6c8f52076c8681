"""How much of the demo's seed spread is the 100-scene benchmark's sampling, not the model.

Issue 18 asks why the demo's mIoU swings with the seed. A benchmark of 100 scenes measures
each model with an error of its own; if that error were large, a larger benchmark would
steady the demo without touching training. Each checkpoint (`demo_recipes.py --keep`, or
`make demo`'s `train/*/final/model.safetensors`) is scored under the
`segclip_learned_scale` protocol at the demo's threshold on the demo benchmark and on
`--scenes` fresh scenes of another seed. The two scores' correlation over the checkpoints
says whether they rank the models alike; the spread of their difference bounds the
benchmark's own error: with the error's variance falling as 1/scenes, the 100-scene
benchmark's share is sd(difference) / sqrt(1 + 100 / scenes).

    python benchmarks/benchmark_noise.py /tmp/keep/*.safetensors --scenes 1000
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import tempfile
from dataclasses import dataclass

from demo_recipes import demo_inputs, threshold_matrices

import segclip  # noqa: F401  (torchvision fix before open_clip)
from segclip.config import load_config
from segclip.sweep import spread

SCENE_SEED_OFFSET = 100  # fresh scenes: past the demo's training, benchmark and held-out seeds


@dataclass(frozen=True)
class Agreement:
    """How two benchmarks' scores of the same models agree."""

    correlation: float  # Pearson's r over the models
    difference_std: float  # sample standard deviation of (benchmark - fresh)
    benchmark_error: float  # the benchmark's own sampling error implied by it


def agreement(
    benchmark: list[float], fresh: list[float], *, scenes: int, fresh_scenes: int
) -> Agreement:
    """Correlation and sampling error from paired scores (at least three models)."""
    if len(benchmark) != len(fresh) or len(benchmark) < 3:
        raise ValueError(f"need three or more paired scores, got {len(benchmark)} and {len(fresh)}")
    difference = spread([a - b for a, b in zip(benchmark, fresh, strict=True)]).std
    return Agreement(
        correlation=statistics.correlation(benchmark, fresh),
        difference_std=difference,
        benchmark_error=difference / math.sqrt(1 + scenes / fresh_scenes),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="SegCLIP .safetensors checkpoints")
    parser.add_argument("--scenes", type=int, default=1000, help="fresh scenes to score on")
    args = parser.parse_args()
    if args.scenes < 1:
        parser.error(f"--scenes {args.scenes}: score on at least one fresh scene (1000 is usual)")

    from segclip.data.demo_data import write_demo_benchmark
    from segclip.eval.protocol import PROTOCOLS
    from segclip.model import load_checkpoint

    demo = load_config("demo").demo
    protocol = PROTOCOLS["segclip_learned_scale"]
    threshold = protocol.background_thresholds["demo"]
    _, benchmark = demo_inputs()
    settings = demo.model_copy(
        update={
            "benchmark_seed": max(demo.seed, demo.benchmark_seed) + SCENE_SEED_OFFSET,
            "benchmark_images": args.scenes,
        }
    )
    scores: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        fresh = str(write_demo_benchmark(folder, settings))
        print("| checkpoint | demo benchmark mIoU | fresh scenes mIoU |\n|---|---|---|")
        for path in args.checkpoints:
            model = load_checkpoint(path).eval()
            pair = tuple(
                100 * threshold_matrices(model, protocol, scenes, "cpu")[threshold].mean_iou()
                for scenes in (benchmark, fresh)
            )
            scores[path] = pair
            print(f"| {path} | {pair[0]:.1f} | {pair[1]:.1f} |", flush=True)
    if len(scores) >= 3:
        found = agreement(
            [a for a, _ in scores.values()],
            [b for _, b in scores.values()],
            scenes=demo.benchmark_images,
            fresh_scenes=args.scenes,
        )
        error = found.benchmark_error
        print(
            f"\ncorrelation {found.correlation:.3f}; sd of the difference "
            f"{found.difference_std:.1f}; the {demo.benchmark_images}-scene benchmark's own "
            f"error about {error:.1f} mIoU"
        )
    else:
        print("\n(three or more checkpoints give the correlation and the benchmark's error)")
    print(f"\ncommand: python benchmarks/benchmark_noise.py {shlex.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
