"""benchmarks/gpu_check.py in its CPU smoke mode, and the demo screen's data, importing only
what the GPU machine has."""

import importlib.util
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from segclip.data.voc import SPLIT_DIR

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
CHECKS = ("train_eager", "ddp", "eval", "predict", "train_compiled")
# The GPU machine's image (plus whatever these require); everything else travels as a wheel.
GPU_IMAGE = (
    "torch", "torchvision", "timm", "numpy", "pillow", "safetensors", "pyyaml",
    "scikit-image", "pyarrow", "fsspec", "huggingface-hub", "opencv-python-headless",
)  # fmt: skip


def with_requirements(names: list[str]) -> set[str]:
    """Installed distributions `names` need, themselves included (extras left out)."""
    found, queue = set(), [canonicalize_name(n) for n in names]
    while queue:
        name = queue.pop()
        if name in found:
            continue
        found.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                queue.append(canonicalize_name(requirement.name))
    return found


def carried_wheels() -> list[str]:
    lines = (ROOT / "benchmarks" / "gpu_wheels.txt").read_text().splitlines()
    return [
        line.split("#")[0].split("==")[0].strip() for line in lines if line.split("#")[0].strip()
    ]


@pytest.fixture(scope="module")
def gpu_machine(tmp_path_factory) -> Path:
    """A folder holding only the GPU machine's packages and the carried wheels' (links to the
    installed ones): with `python -S` and this on the path, nothing else can be imported."""
    site = tmp_path_factory.mktemp("gpu_machine_site")
    for name in with_requirements([*GPU_IMAGE, *carried_wheels()]):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:  # not installed here (e.g. an optional extra)
            continue
        base = Path(dist.locate_file(""))
        for top in {file.parts[0] for file in dist.files or [] if file.parts[0] != ".."}:
            if not (site / top).exists() and (base / top).exists():
                (site / top).symlink_to(base / top)
    return site


def run_on(site: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-S", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{site}"},
        timeout=600,
    )


def rows(stdout: str) -> dict[str, list[str]]:
    """Table rows by check name: [result, rate, MFU, goal, peak GiB, detail]."""
    cells = [line.strip("| ").split(" | ") for line in stdout.splitlines() if line.startswith("| ")]
    return {row[0]: row[1:] for row in cells if row[0] in CHECKS}


@pytest.mark.slow
def test_smoke_run_passes_every_check_with_only_the_gpu_machines_packages(gpu_machine):
    done = run_on(gpu_machine, str(SCRIPT), "--smoke")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    table = rows(done.stdout)
    assert list(table) == list(CHECKS)
    assert all(row[0] == "PASS" for row in table.values()), done.stdout
    assert "labels 100.00% equal to the CPU's" in table["eval"][-1]
    assert "result: all 5 checks passed" in done.stdout


def test_an_impossible_option_fails_the_run_and_names_the_check(gpu_machine):
    done = run_on(gpu_machine, str(SCRIPT), "--smoke", "--checks", "ddp", "--ddp-backend", "nccl")
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]
    assert rows(done.stdout)["ddp"][0] == "FAIL"
    assert "NCCL" in rows(done.stdout)["ddp"][-1]  # the reason: this torch has no NCCL
    assert "result: FAILED: ddp" in done.stdout


def test_a_failing_check_is_reported_and_the_next_one_still_runs(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # dataclasses look it up
    spec.loader.exec_module(gpu_check)

    def broken(ctx):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")

    def working(ctx):
        return gpu_check.Row(passed=True, rate="1.0 images/s", detail="fine")

    monkeypatch.setattr(gpu_check, "CHECKS", {"first": broken, "second": working})
    assert gpu_check.main(["--smoke"]) == 1
    out = capsys.readouterr().out
    assert (
        "| first | FAIL | - | - | - | - | RuntimeError: CUDA error: an illegal memory access was encountered |"
        in out
    )
    assert "| second | PASS | 1.0 images/s | - | - | - | fine |" in out
    assert "result: FAILED: first in" in out


def test_the_simulated_gpu_machine_lacks_what_the_image_lacks(gpu_machine):
    done = run_on(gpu_machine, "-c", "import ray")
    assert "No module named 'ray'" in done.stderr
    # nor numba (too large to carry): the superpixels fall back to scikit-image's, same labels
    probe = (
        "import segclip.data.superpixels as s; print(s.felzenszwalb_implementation().__module__)"
    )
    done = run_on(gpu_machine, "-c", probe)
    assert done.stdout.strip() == "skimage.segmentation._felzenszwalb", done.stderr[-2000:]


def test_the_demo_shards_build_with_only_the_gpu_machines_packages(gpu_machine, tmp_path):
    small = ["demo.train_images=10", "ingest.samples_per_shard=4", "demo.image_size=64"]
    settings = [f"runtime.workdir={tmp_path}", *small, "ingest.image_size=64"]
    done = run_on(gpu_machine, "benchmarks/demo_shards.py", *settings, "demo.benchmark_images=2")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    folder = next((tmp_path / "superpixels").iterdir())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [shard["samples"] for shard in manifest["shards"]] == [4, 4, 2]
    assert f"superpixels {folder} (10 samples in 3 shards)" in done.stdout
    benchmark = next((tmp_path / "benchmarks").iterdir())
    assert (benchmark / SPLIT_DIR / "val.txt").read_text().split() == ["demo_000000", "demo_000001"]
