"""Where stage outputs live: a local folder or any fsspec URL (`s3://`, `gs://`, `memory://`).

Every stage reads and writes through `UPath`s made by `location`, so the same code
serves a laptop folder and an object store that every node of a cluster can reach.
Writes are complete or absent: `atomic_write` hands out a local scratch file and
publishes it in one step (a rename on a local disk, one upload to a store), so a
reader, or a resumed stage, never sees half a file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec
from upath import UPath

LOCAL_PROTOCOLS = ("", "file", "local")
S3_ENDPOINT_VARIABLE = "AWS_ENDPOINT_URL_S3"  # read by botocore, hence s3fs, boto3 and MLflow

# Stage outputs are written by other processes (Ray workers, img2dataset): a cached listing
# would hide them (s3fs answers `exists` from the listing of the parent folder).
for _protocol in ("s3", "gcs", "gs"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)


def location(url: str | os.PathLike[str]) -> UPath:
    """A local path (made absolute: Ray workers do not share this process's cwd) or a URL."""
    path = url if isinstance(url, UPath) else UPath(url)
    if path.protocol in LOCAL_PROTOCOLS:
        return UPath(Path(path.path).resolve())
    return path


def is_local(path: UPath) -> bool:
    return path.protocol in LOCAL_PROTOCOLS


def ensure_folder(path: UPath) -> UPath:
    """Create a local folder; object stores have no folders, so there it is a no-op."""
    if is_local(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def use_s3_endpoint(endpoint_url: str | None) -> None:
    """Point every S3 client of this process (and the Ray workers it starts) at `endpoint_url`.

    One setting serves fsspec, pyarrow, boto3 and MLflow because each reads botocore's
    standard variable; None keeps whatever the environment says.
    """
    if endpoint_url:
        os.environ[S3_ENDPOINT_VARIABLE] = endpoint_url


def storage_environment() -> dict[str, str]:
    """The variables a worker process needs to reach the same stores as this one."""
    names = (S3_ENDPOINT_VARIABLE, "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
             "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
             "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS")  # fmt: skip
    return {name: os.environ[name] for name in names if name in os.environ}


class StorageError(ConnectionError):
    """A storage URL that cannot be used: no such bucket, no credentials, no endpoint."""


PROBE_TIMEOUT_S = 3.0
_S3_PROTOCOLS = ("s3", "s3a")


def _probe_filesystem(root: UPath) -> fsspec.AbstractFileSystem:
    """A private client that gives up in seconds, where the shared one would retry for minutes
    (botocore's and s3fs's retry loops on an endpoint that does not answer)."""
    if root.protocol not in _S3_PROTOCOLS:
        return root.fs
    fs = fsspec.filesystem(
        "s3",
        skip_instance_cache=True,
        config_kwargs={
            "connect_timeout": PROBE_TIMEOUT_S,
            "read_timeout": PROBE_TIMEOUT_S,
            "retries": {"total_max_attempts": 1},
        },
    )
    fs.retries = 1
    return fs


def _storage_problem(error: Exception) -> str:
    names = {type(error).__name__, *(type(e).__name__ for e in (error.__cause__,) if e)}
    if names & {"NoCredentialsError", "PartialCredentialsError"}:
        return "no credentials were found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"}:
        return (
            f"the endpoint does not answer: check runtime.s3_endpoint_url or "
            f"{S3_ENDPOINT_VARIABLE} ({os.environ.get(S3_ENDPOINT_VARIABLE, 'not set')})"
        )
    if isinstance(error, FileNotFoundError):
        return "the bucket does not exist: create it or fix the URL"
    if isinstance(error, PermissionError):
        return "access was denied: check the credentials and the bucket's policy"
    return "check the URL, the credentials and the endpoint"


def check_writable(root: UPath) -> None:
    """Write and delete a probe under `root`, failing in seconds with the URL and the fix."""
    if is_local(root):
        root.mkdir(parents=True, exist_ok=True)
        return
    fs = _probe_filesystem(root)
    probe = f"{root.path.rstrip('/')}/.segclip-write-probe"
    try:
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except Exception as error:  # each store raises its own types; they are sorted above
        raise StorageError(
            f"cannot write to {root}: {_storage_problem(error)} ({type(error).__name__}: {error})"
        ) from None


@contextmanager
def atomic_write(target: UPath) -> Iterator[Path]:
    """Yield a local scratch path; on success it becomes `target` in one step."""
    target = location(target)
    if is_local(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(target.parent) / f".{target.name}.tmp-{os.getpid()}"
    else:
        folder = tempfile.mkdtemp(prefix="segclip-")
        scratch = Path(folder) / target.name
    try:
        yield scratch
        if is_local(target):
            os.replace(scratch, target)
        else:
            target.fs.put_file(str(scratch), target.path)
    finally:
        scratch.unlink(missing_ok=True)
        if not is_local(target):
            shutil.rmtree(scratch.parent, ignore_errors=True)


def write_text(target: UPath, text: str) -> None:
    with atomic_write(target) as scratch:
        scratch.write_text(text)


def fingerprint(path: UPath) -> dict[str, object]:
    """Size and modification stamp of a file, cheap to read on any store."""
    info = path.fs.info(path.path)
    stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag")
    return {"name": path.name, "size": info.get("size"), "modified": str(stamp)}


def remove_tree(path: UPath) -> None:
    """Delete a folder and everything under it, if it exists."""
    if is_local(path):
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        with contextlib.suppress(FileNotFoundError):  # emptied meanwhile: a store has no folders
            path.fs.rm(path.path, recursive=True)


def publish_folder(source: Path, target: UPath) -> None:
    """Copy a local folder's files under `target`, each written atomically."""
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        with atomic_write(target.joinpath(*file.relative_to(source).parts)) as scratch:
            shutil.copyfile(file, scratch)


@contextmanager
def local_folder(target: UPath, *, publish: bool = True) -> Iterator[Path]:
    """A local folder for files that belong under `target`: `target` itself on a local disk,
    else a scratch folder, published there on success when `publish`, removed in any case."""
    target = location(target)
    if is_local(target):
        target.mkdir(parents=True, exist_ok=True)
        yield Path(target)
        return
    scratch = Path(tempfile.mkdtemp(prefix="segclip-"))
    try:
        yield scratch
        if publish:
            publish_folder(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def local_copy(source: UPath) -> Iterator[Path]:
    """A local path holding `source` (a file or a folder) for libraries that need one;
    a local source is used in place, a remote one is downloaded and removed afterwards."""
    source = location(source)
    if is_local(source):
        yield Path(source)
        return
    scratch = Path(tempfile.mkdtemp(prefix="segclip-"))
    try:
        copy = scratch / source.name
        source.fs.get(source.path, str(copy), recursive=source.is_dir())
        yield copy
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
