"""Stage outputs on storage: keyed folders, atomic manifests and the digests stages key on.

A stage writes under `<workdir>/<stage>/<key>/` and finishes by writing
`manifest.json` there. The key digests the settings the stage's output depends on
and its inputs' digests, so an identical rerun finds a finished manifest while any
setting or upstream change gets a fresh folder.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from upath import UPath

from segclip.storage import location, write_text

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


class DataRef(BaseModel):
    """Data a stage reads or wrote (a stage output folder, a url list, a checkpoint), pinned
    by a digest of its content: the digest, not the location, goes into stage keys."""

    url: str
    digest: str


class ShardRef(BaseModel):
    """One output shard: relative to the stage folder, or a URL when adopted in place."""

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
    inputs: list[DataRef] = Field(default_factory=list)
    counts: dict[str, int] = Field(default_factory=dict)
    failures: dict[str, int] = Field(default_factory=dict, description="failed samples by reason")
    failed_samples: list[FailedSample] = Field(default_factory=list)
    shards: list[ShardRef] = Field(default_factory=list)
    files: dict[str, str] = Field(
        default_factory=dict, description="named outputs later stages read, relative paths"
    )
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per phase")
    nodes: list[str] = Field(
        default_factory=list, description="the cluster nodes that did this run's work (Ray ids)"
    )
    versions: dict[str, str] = Field(default_factory=dict)
    code_revision: str = "unknown"
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())


def json_digest(value: Any) -> str:
    """sha256 of canonical JSON: the same data gives the same digest in any process."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: str | Path | UPath) -> str:
    digest = hashlib.sha256()
    with location(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_ref(path: str | Path | UPath) -> DataRef:
    """A user-given input file (url list, checkpoint) pinned by its content."""
    path = location(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return DataRef(url=str(path), digest=file_digest(path))


def stage_key(settings: dict[str, Any], inputs: list[DataRef]) -> str:
    """Digest of the stage's settings and the ordered input digests."""
    return json_digest({"config": settings, "inputs": [i.digest for i in inputs]})[:KEY_LENGTH]


def stage_dir(workdir: str | Path | UPath, stage: str, key: str) -> UPath:
    return location(workdir) / stage / key


@dataclass(frozen=True)
class StageResult:
    """A finished stage output: its folder, its manifest and the manifest's digest."""

    output_dir: UPath
    manifest: Manifest
    digest: str
    skipped: bool = False

    @property
    def ref(self) -> DataRef:
        """What a downstream stage reads and keys on."""
        return DataRef(url=str(self.output_dir), digest=self.digest)

    @property
    def shard_urls(self) -> list[str]:
        """Shard locations: relative paths resolved in the stage folder, adopted ones (absolute
        paths, URLs) kept."""
        return [
            path if "://" in path else str(self.output_dir.joinpath(path))
            for path in (shard.path for shard in self.manifest.shards)
        ]

    def file(self, name: str) -> UPath:
        """A named output (e.g. the trained model) of the stage."""
        try:
            return self.output_dir / self.manifest.files[name]
        except KeyError:
            raise KeyError(
                f"the {self.manifest.stage} output at {self.output_dir} has no {name!r} file "
                f"(it has {sorted(self.manifest.files)})"
            ) from None


def read_result(output_dir: str | Path | UPath) -> StageResult | None:
    """The finished stage output in a folder, or None while the stage has not finished."""
    output_dir = location(output_dir)
    path = output_dir / MANIFEST_NAME
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):  # not (yet) a finished stage folder
        return None
    try:
        manifest = Manifest.model_validate_json(data)
    except ValueError as error:
        raise ValueError(
            f"{path} is not a valid stage manifest ({error}); delete it to rerun the stage"
        ) from None
    return StageResult(output_dir, manifest, hashlib.sha256(data).hexdigest(), skipped=True)


def load_result(output_dir: str | Path | UPath) -> StageResult:
    """A finished stage's output, for the stage that reads it."""
    result = read_result(output_dir)
    if result is None:
        raise FileNotFoundError(
            f"no finished stage output at {output_dir} (missing {MANIFEST_NAME}); "
            "run that stage first"
        )
    return result


def write_manifest(output_dir: UPath, manifest: Manifest) -> StageResult:
    """Atomically write the manifest: from now on the stage counts as finished."""
    text = manifest.model_dump_json(indent=2)
    write_text(output_dir / MANIFEST_NAME, text)
    return StageResult(output_dir, manifest, hashlib.sha256(text.encode()).hexdigest())


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
