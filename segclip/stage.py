"""The stage contract of ARCHITECTURE.md: keyed output folders and atomic manifests.

A stage writes under `<workdir>/<stage>/<key>/` and finishes by writing
`manifest.json` there. The key digests the stage's resolved config and its
inputs' manifest digests, so an identical rerun finds a finished manifest and
skips, while any config or upstream change gets a fresh folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from segclip.io import atomic_path

MANIFEST_NAME = "manifest.json"
KEY_LENGTH = 16
TRACKED_PACKAGES = (
    "segclip",
    "torch",
    "open_clip_torch",
    "ray",
    "img2dataset",
    "webdataset",
    "scikit-image",
    "mlflow",
    "prefect",
)


class InputRef(BaseModel):
    """An upstream stage output this stage read, pinned by its manifest digest."""

    path: str
    digest: str


class ShardRef(BaseModel):
    """One output shard: relative to the stage folder, or absolute when adopted in place."""

    path: str
    samples: int


class FailedSample(BaseModel):
    key: str
    shard: str
    reason: str


class Manifest(BaseModel):
    """What a finished stage produced and everything needed to reproduce it."""

    stage: str
    key: str
    config: dict[str, Any]
    inputs: list[InputRef] = Field(default_factory=list)
    counts: dict[str, int] = Field(default_factory=dict)
    failures: dict[str, int] = Field(default_factory=dict, description="failed samples by reason")
    failed_samples: list[FailedSample] = Field(default_factory=list)
    shards: list[ShardRef] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per phase")
    versions: dict[str, str] = Field(default_factory=dict)
    code_revision: str = "unknown"
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())


def json_digest(value: Any) -> str:
    """sha256 of canonical JSON: the same data gives the same digest in any process."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def stage_key(config: Mapping[str, Any], inputs: Sequence[InputRef]) -> str:
    """Digest of the resolved stage config and the ordered input digests."""
    return json_digest({"config": config, "inputs": [i.digest for i in inputs]})[:KEY_LENGTH]


def stage_dir(workdir: str | Path, stage: str, key: str) -> Path:
    """Absolute, because Ray workers (and later readers) do not share this process's cwd."""
    return Path(workdir).resolve() / stage / key


def keyed_dir(
    workdir: str | Path, stage: str, config: Mapping[str, Any], inputs: Sequence[InputRef]
) -> Path:
    """Where the stage writes for this config and these inputs, finished or not."""
    return stage_dir(workdir, stage, stage_key(config, inputs))


def read_manifest(output_dir: str | Path) -> Manifest | None:
    """The finished stage's manifest, or None while the stage has not finished."""
    path = Path(output_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return Manifest.model_validate_json(path.read_text())
    except ValueError as error:
        raise ValueError(
            f"{path} is not a valid stage manifest ({error}); delete it to rerun the stage"
        ) from None


def write_manifest(output_dir: str | Path, manifest: Manifest) -> InputRef:
    """Atomically write the manifest; the returned ref is what downstream stages key on."""
    path = Path(output_dir) / MANIFEST_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(manifest.model_dump_json(indent=2))
    return manifest_ref(output_dir)


def manifest_ref(output_dir: str | Path) -> InputRef:
    """Ref to a finished stage's output, for the stage that reads it."""
    path = Path(output_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no finished stage output at {output_dir} (missing {MANIFEST_NAME}); "
            "run that stage first"
        )
    return InputRef(path=str(Path(output_dir)), digest=file_digest(path))


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def code_revision() -> str:
    """Git commit of the code that ran, with `-dirty` for uncommitted changes; else `unknown`."""
    here = Path(__file__).parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=here, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        revision = git("rev-parse", "HEAD")
        return revision + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class StageOutput:
    """What a stage body reports; `run_stage` adds the bookkeeping and writes the manifest."""

    counts: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    failed_samples: list[FailedSample] = field(default_factory=list)
    shards: list[ShardRef] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StageResult:
    output_dir: Path
    manifest: Manifest
    skipped: bool

    @property
    def ref(self) -> InputRef:
        return manifest_ref(self.output_dir)

    @property
    def shard_paths(self) -> list[str]:
        return [str(self.output_dir / shard.path) for shard in self.manifest.shards]


def single_input(inputs: Sequence[InputRef], stage: str, expected: str) -> InputRef:
    """The one upstream output a stage reads."""
    if len(inputs) != 1:
        raise ValueError(f"the {stage} stage reads one {expected}, got {len(inputs)} inputs")
    return inputs[0]


def load_result(output_dir: str | Path) -> StageResult:
    """A finished stage's result from its folder, for a stage run on its own later."""
    manifest_ref(output_dir)  # raises "run that stage first" when it has not finished
    return StageResult(Path(output_dir).resolve(), read_manifest(output_dir), skipped=True)


def run_stage(
    stage: str,
    workdir: str | Path,
    config: Mapping[str, Any],
    inputs: Sequence[InputRef],
    body: Callable[[Path], StageOutput],
    force: bool = False,
) -> StageResult:
    """Run `body` in the stage's keyed folder unless a finished manifest is already there.

    An unfinished folder is handed to `body` as it is, so the body resumes from
    whatever it completed before; `force` deletes the folder and starts over.
    """
    output_dir = keyed_dir(workdir, stage, config, inputs)
    if force and output_dir.exists():
        shutil.rmtree(output_dir)
    manifest = read_manifest(output_dir)
    if manifest is not None:
        return StageResult(output_dir, manifest, skipped=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    output = body(output_dir)
    manifest = Manifest(
        stage=stage,
        key=output_dir.name,
        config=dict(config),
        inputs=list(inputs),
        counts=output.counts,
        failures=output.failures,
        failed_samples=output.failed_samples,
        shards=output.shards,
        timings={**output.timings, "total": time.perf_counter() - start},
        versions=package_versions(),
        code_revision=code_revision(),
    )
    write_manifest(output_dir, manifest)
    return StageResult(output_dir, manifest, skipped=False)
