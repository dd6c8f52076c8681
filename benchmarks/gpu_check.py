"""GPU readiness in one run: bf16 training (eager, compiled, DDP on NCCL), evaluation, prediction.

Made for a GPU machine lent for minutes: every check runs in this one process, each in
its own try/except, and one table at the end gives PASS or FAIL (with the reason) per
check and the measured rates; the exit code is 1 when any check failed. Missing the
MFU goal is reported beside the MFU, not as a failure: the checks say whether the
code runs correctly on the GPU, the goal column how fast.

    make gpu-check                                  # on the GPU machine: carried wheels, then this
    python benchmarks/gpu_check.py --smoke          # anywhere: tiny model, CPU, gloo
    python benchmarks/gpu_check.py --checks eval predict

Training: the `paper` model (randomly initialised) on a synthetic batch, bf16 autocast,
the recipe's optimiser; MFU = samples/s x FLOPs per sample (segclip/model/flops.py)
/ the GPU's dense bf16 peak (spec sheet by device name, `--peak-tflops` to override).
Evaluation and prediction compare their label maps with a CPU run of the same weights
on the same images, both in IEEE fp32 (TF32 off): see MIN_AGREEMENT for why.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import platform
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel

import segclip  # noqa: F401  (torchvision fix before open_clip)
from segclip.config import load_config
from segclip.device import resolve_device
from segclip.eval.class_names import VOC
from segclip.eval.predict import predict_images
from segclip.eval.protocol import PROTOCOLS
from segclip.eval.segment import Segmenter
from segclip.eval.speed import VOC_SIZE, images_per_second, pixel_agreement, random_images
from segclip.model import build_model, load_model, save_checkpoint
from segclip.model.flops import train_flops_per_sample
from segclip.train.speed import benchmark_step, matmul_peak_flops, synthetic_batch, timed_steps
from segclip.train.step import AUTOCAST_DTYPES, DDP_OPTIONS

GOAL_MFU = 0.40  # the training step on one H100 in bf16
# Dense bf16 tensor-core peaks from NVIDIA's spec sheets, most specific name first.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
# Labels from the GPU and the CPU, both in IEEE fp32, may differ only where two centers
# or two classes tie to within rounding (different summation orders). On the CPU, the
# same weights evaluated with other window batching agree on 100.0% of pixels, while
# bf16 rounding alone flips whole centers of the randomly initialised model (60-100%
# per image; its class scores lie within 0.1 of one another), which is why the labels
# are compared in fp32. So >= 99.9% passes isolated ties and fails any real difference.
MIN_AGREEMENT = 0.999
BACKGROUND_THRESHOLD = 0.8  # as benchmarks/eval_speed.py


@dataclass(frozen=True, kw_only=True)
class Settings:
    profile: str
    device: str
    precision: str  # of the training checks
    batch: int
    warmup: int
    steps: int
    ddp_backend: str
    compile_backend: str
    eval_images: int  # timed on the device
    reference_images: int  # of those, also labelled on the CPU and predicted
    matmul_size: int
    peak_tflops: float | None = None


GPU = Settings(
    profile="paper",
    device="cuda",
    precision="bf16",
    batch=256,
    warmup=3,
    steps=10,
    ddp_backend="nccl",
    compile_backend="inductor",
    eval_images=16,
    reference_images=4,
    matmul_size=8192,
)
# The same code paths at toy size on the CPU. fp32: a CPU without AVX-512 runs bf16
# matmuls ten times slower than fp32. The dynamo-only backend traces the whole step as
# inductor would, without minutes of C++ compilation on two cores.
SMOKE = Settings(
    profile="tiny",
    device="cpu",
    precision="fp32",
    batch=4,
    warmup=1,
    steps=2,
    ddp_backend="gloo",
    compile_backend="eager",
    eval_images=2,
    reference_images=2,
    matmul_size=512,
)


class CheckFailed(Exception):
    """A check ran but its result is wrong."""


@dataclass
class Row:
    passed: bool
    check: str = ""  # set by run_check
    rate: str = "-"
    mfu: str = "-"
    goal: str = "-"
    memory: str = "-"
    detail: str = ""


@contextmanager
def ieee_fp32() -> Iterator[None]:
    """fp32 convolutions and matmuls without TF32 (cuDNN allows it by default), restored after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class Context:
    """What the checks share, built on first use so a failure lands in the check that needs it."""

    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.settings = settings
        self.workdir = workdir
        self.config = load_config(settings.profile, ["model.pretrained=null"])  # no download
        self.flops_per_sample: int | None = None  # known once a training check built the model

    @cached_property
    def device(self) -> torch.device:
        return resolve_device(self.settings.device)

    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"

    @cached_property
    def measured_peak(self) -> float:
        dtype = AUTOCAST_DTYPES[self.settings.precision] or torch.float32
        return matmul_peak_flops(dtype, device=self.device, size=self.settings.matmul_size)

    @cached_property
    def peak(self) -> tuple[float, str]:
        """FLOP/s MFU is measured against, and where the number comes from."""
        if self.settings.peak_tflops:
            return self.settings.peak_tflops * 1e12, "--peak-tflops"
        name = self.device_name()
        if self.device.type == "cuda" and self.settings.precision == "bf16":
            for key, tflops in PEAK_BF16_TFLOPS:
                if key in name:
                    return tflops * 1e12, f"{key} spec sheet, dense bf16"
        return self.measured_peak, f"measured matmul: no {self.settings.precision} spec for {name}"

    @cached_property
    def images(self) -> list[np.ndarray]:
        return random_images(self.settings.eval_images)

    @cached_property
    def checkpoint(self) -> Path:
        """The evaluated weights, saved once: the CPU, the GPU and `predict` load the same."""
        torch.manual_seed(0)
        return save_checkpoint(build_model(self.config.model), self.workdir / "model.safetensors")

    def segmenter(self, device: torch.device) -> Segmenter:
        model = load_model(self.checkpoint)
        return Segmenter(model, VOC[1:], PROTOCOLS["segclip"], BACKGROUND_THRESHOLD, device=device)

    @cached_property
    def cpu_labels(self) -> list[np.ndarray]:
        with ieee_fp32():
            segmenter = self.segmenter(torch.device("cpu"))
            return [segmenter.predict(image) for image in self.reference_images]

    @property
    def reference_images(self) -> list[np.ndarray]:
        return self.images[: self.settings.reference_images]


def _memory(ctx: Context) -> str:
    if ctx.device.type != "cuda":
        return "-"
    return f"{torch.cuda.max_memory_allocated(ctx.device) / 2**30:.1f}"


def _train(ctx: Context, *, compiled: bool = False, ddp: bool = False) -> Row:
    """Training steps on a synthetic batch: rate, MFU against the peak, memory."""
    s = ctx.settings
    torch.manual_seed(0)
    model = build_model(ctx.config.model).to(ctx.device)
    ctx.flops_per_sample = train_flops_per_sample(model)
    if compiled:
        model.compile(backend=s.compile_backend)
    step = benchmark_step(
        model,
        ctx.config,
        precision=s.precision,
        device_type=ctx.device.type,
        wrap=partial(DistributedDataParallel, **DDP_OPTIONS) if ddp else None,
    )
    times = timed_steps(
        step, synthetic_batch(model, s.batch).to(ctx.device), warmup=s.warmup, steps=s.steps
    )
    loss = times.losses.total.item()
    if not np.isfinite(loss):
        raise CheckFailed(f"loss is {loss} after {s.warmup + s.steps} steps")
    samples_per_s = s.batch / times.median_s
    mfu = samples_per_s * ctx.flops_per_sample / ctx.peak[0]
    return Row(
        passed=True,
        rate=f"{samples_per_s:,.4g} samples/s",
        mfu=f"{100 * mfu:.1f}%",
        goal=f">= {100 * GOAL_MFU:.0f}%: {'met' if mfu >= GOAL_MFU else 'missed'}",
        memory=_memory(ctx),
        detail=(
            f"batch {s.batch}, median of {s.steps} steps {1000 * times.median_s:.0f} ms, "
            f"first step {times.first_s:.1f} s, loss {loss:.3f}"
        ),
    )


def check_train_eager(ctx: Context) -> Row:
    return _train(ctx)


def check_train_compiled(ctx: Context) -> Row:
    row = _train(ctx, compiled=True)
    row.detail += f" (compiled, backend {ctx.settings.compile_backend})"
    return row


def check_ddp(ctx: Context) -> Row:
    """The eager step inside DistributedDataParallel, one rank, this process."""
    backend = ctx.settings.ddp_backend
    store = dist.FileStore(str(ctx.workdir / "ddp_store"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)
    try:
        row = _train(ctx, ddp=True)
    finally:
        dist.destroy_process_group()
    row.detail += f" ({backend}, world size 1)"
    return row


def _agreement(labels: list[np.ndarray], ctx: Context) -> str:
    agreement = pixel_agreement(labels, ctx.cpu_labels)
    summary = (
        f"labels {100 * agreement:.2f}% equal to the CPU's on {len(labels)} images "
        f"(need >= {100 * MIN_AGREEMENT:.1f}%)"
    )
    if agreement < MIN_AGREEMENT:
        raise CheckFailed(summary)
    return summary


def check_eval(ctx: Context) -> Row:
    """Sliding-window segmentation of VOC-sized images on the device, fp32."""
    ctx.cpu_labels  # noqa: B018  (before the device run: its time is not the device's)
    with ieee_fp32():
        rate, labels = images_per_second(ctx.segmenter(ctx.device).predict, ctx.images)
    agreement = _agreement(labels[: ctx.settings.reference_images], ctx)
    return Row(
        passed=True,
        rate=f"{rate:.3g} images/s",
        memory=_memory(ctx),
        detail=f"{len(ctx.images)} images of {VOC_SIZE[1]}x{VOC_SIZE[0]}, fp32; {agreement}",
    )


def check_predict(ctx: Context) -> Row:
    """`predict_images` from the saved checkpoint: label and overlay PNGs."""
    inputs = ctx.workdir / "predict_inputs"
    inputs.mkdir(exist_ok=True)
    paths = []
    for index, image in enumerate(ctx.reference_images):
        paths.append(inputs / f"image{index}.png")
        Image.fromarray(image).save(paths[-1])
    ctx.cpu_labels  # noqa: B018  (before the timed run)
    start = time.perf_counter()
    with ieee_fp32():
        written = list(
            predict_images(
                ctx.checkpoint,
                VOC[1:],
                paths,
                ctx.workdir / "predict_outputs",
                background_threshold=BACKGROUND_THRESHOLD,
                device=ctx.settings.device,
            )
        )
    seconds = time.perf_counter() - start
    labels = [np.asarray(Image.open(label)) for label, _ in written]
    missing = [str(overlay) for _, overlay in written if not overlay.is_file()]
    if missing:
        raise CheckFailed(f"no overlay written: {missing}")
    return Row(
        passed=True,
        rate=f"{len(paths) / seconds:.3g} images/s",
        memory=_memory(ctx),
        detail=f"checkpoint load included; {len(written)} label + overlay PNGs; "
        + _agreement(labels, ctx),
    )


# Run (and table) order: the slow compilation last, so every other row is in by then.
CHECKS: dict[str, Callable[[Context], Row]] = {
    "train_eager": check_train_eager,
    "ddp": check_ddp,
    "eval": check_eval,
    "predict": check_predict,
    "train_compiled": check_train_compiled,
}


def run_check(name: str, check: Callable[[Context], Row], ctx: Context) -> Row:
    """One check, its failure caught and summarised; the traceback goes to stderr."""
    start = time.perf_counter()
    try:
        if ctx.device.type == "cuda":  # resolved first: a missing GPU fails the check at once
            torch.cuda.init()  # the allocator's statistics exist only once CUDA is initialised
            torch.cuda.reset_peak_memory_stats(ctx.device)
        row = check(ctx)
    except Exception as error:
        traceback.print_exc()
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        row = Row(passed=False, detail=f"{type(error).__name__}: {reason}"[:300])
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    row.check = name
    status = "PASS" if row.passed else "FAIL"
    print(f"{name}: {status} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return row


def header(ctx: Context) -> list[str]:
    """What ran where; each line that needs the device says why it is missing instead."""
    s = ctx.settings
    lines = [
        f"command: {shlex.join([sys.executable, *sys.argv])}",
        f"torch {torch.__version__}, python {platform.python_version()}",
    ]
    try:
        lines.append(f"device: {ctx.device_name()}")
        if ctx.flops_per_sample is not None:  # a training check ran
            peak, source = ctx.peak
            lines += [
                f"model: {s.profile}, random init; training {s.precision}, batch {s.batch}, "
                f"{ctx.flops_per_sample / 1e9:.4g} GFLOP per sample (3 x forward)",
                f"peak: {peak / 1e12:.4g} TFLOP/s ({source}); measured {s.precision} matmul "
                f"{s.matmul_size}^3: {ctx.measured_peak / 1e12:.4g} TFLOP/s",
                f"goal: MFU >= {100 * GOAL_MFU:.0f}% = "
                f"{GOAL_MFU * peak / ctx.flops_per_sample:,.4g} samples/s at this peak",
            ]
    except Exception as error:  # the checks that needed it have failed and said why
        lines.append(f"device unavailable: {type(error).__name__}: {error}")
    return lines


def table(rows: list[Row]) -> list[str]:
    columns = ("check", "result", "rate", "MFU", "goal", "peak GiB", "detail")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        status = "PASS" if r.passed else "FAIL"
        lines.append(
            f"| {r.check} | {status} | {r.rate} | {r.mfu} | {r.goal} | {r.memory} | {r.detail} |"
        )
    return lines


def parse_settings(argv: list[str] | None) -> tuple[Settings, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, gloo")
    parser.add_argument("--checks", nargs="+", choices=list(CHECKS), default=list(CHECKS))
    parser.add_argument("--batch", type=int, help="training batch per step")
    parser.add_argument("--steps", type=int, help="timed training steps (median)")
    parser.add_argument("--ddp-backend", help="process group backend: nccl (GPU), gloo")
    parser.add_argument("--compile-backend", help="torch.compile backend: inductor, eager")
    parser.add_argument("--peak-tflops", type=float, help="bf16 peak MFU divides by")
    args = parser.parse_args(argv)
    overrides = {
        key: value
        for key in ("batch", "steps", "ddp_backend", "compile_backend", "peak_tflops")
        if (value := getattr(args, key)) is not None
    }
    settings = dataclasses.replace(SMOKE if args.smoke else GPU, **overrides)
    return settings, [name for name in CHECKS if name in args.checks]


def main(argv: list[str] | None = None) -> int:
    settings, names = parse_settings(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="segclip-gpu-check-") as tmp:
        ctx = Context(settings, Path(tmp))
        rows = [run_check(name, CHECKS[name], ctx) for name in names]
        lines = header(ctx)
    failed = [r.check for r in rows if not r.passed]
    verdict = f"FAILED: {', '.join(failed)}" if failed else f"all {len(rows)} checks passed"
    seconds = time.perf_counter() - start
    print("\n".join([*lines, "", *table(rows), "", f"result: {verdict} in {seconds:.0f} s"]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
