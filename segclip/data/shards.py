"""Superpixel shards: each ingest sample plus its lossless label map and segment count.

One function turns one input shard into one output shard, so the stage can run
it in parallel over shards (Ray) and skip shards that already have a report.
"""

from __future__ import annotations

import io
import tarfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from pydantic import BaseModel
from upath import UPath
from webdataset.tariterators import base_plus_ext

from segclip.config import DataConfig
from segclip.data.images import IMAGE_MEMBERS, ImageRejected, decode_rgb
from segclip.data.superpixels import compute_superpixels
from segclip.manifest import FailedSample
from segclip.storage import atomic_write, location

LABEL_MEMBER = "superpixels.png"  # 16-bit grayscale PNG: lossless and compact
COUNT_MEMBER = "superpixels.cls"
# One fixed member time: the same input gives the same shard bytes, and tar headers need no
# per-member pax record for a fractional time (half the training loader's tar parsing).
MEMBER_MTIME = 0
SHARD_DIGITS = 5  # shard names and the shard part of sample keys, as img2dataset writes them
SHARD_DIR = "shards"  # a stage's shards, in its folder
MAX_SEGMENTS = np.iinfo(np.uint16).max + 1


def shard_name(index: int, suffix: str = ".tar") -> str:
    """A shard's file name (or its side table's, by suffix), as img2dataset names them."""
    return f"{index:0{SHARD_DIGITS}d}{suffix}"


class ShardReport(BaseModel):
    """Written beside a finished output shard; its presence marks the shard done."""

    samples: int
    failed: list[FailedSample]
    seconds: float


def report_path(shard: str | Path | UPath) -> UPath:
    return location(shard).with_suffix(".report.json")


def encode_label_map(labels: np.ndarray) -> bytes:
    if labels.max(initial=0) >= MAX_SEGMENTS or labels.min(initial=0) < 0:
        raise ValueError(f"label ids must lie in [0, {MAX_SEGMENTS}) to fit a 16-bit PNG")
    buffer = io.BytesIO()
    Image.fromarray(labels.astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_label_map(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data))).astype(np.int32)


def image_member(sample: dict) -> str | None:
    return next((ext for ext in IMAGE_MEMBERS if ext in sample), None)


class UnusableSample(Exception):
    """A sample the stage leaves out; the message is the reason recorded in the manifest."""


def _superpixel_members(sample: dict, config: DataConfig) -> dict[str, bytes | str]:
    """The members to add to one sample."""
    extension = image_member(sample)
    if extension is None:
        raise UnusableSample("missing_image")
    try:
        image = decode_rgb(sample[extension])
    except ImageRejected as rejected:
        raise UnusableSample(rejected.reason) from None
    labels = compute_superpixels(image, config)
    segments = int(labels.max()) + 1
    if segments > MAX_SEGMENTS:
        raise UnusableSample("too_many_segments")
    return {LABEL_MEMBER: encode_label_map(labels), COUNT_MEMBER: str(segments)}


def samples_in_key_order(shard: str | Path | UPath) -> Iterator[dict]:
    """The samples of a webdataset shard (a path or URL), sorted by key.

    img2dataset writes a shard's samples in the order their downloads finish, which
    changes from run to run; reading them in key order makes every later stage, and
    so training, reproducible from the same URL list.
    """
    with location(shard).open("rb") as stream, tarfile.open(fileobj=stream) as tar:
        members: dict[str, dict[str, tarfile.TarInfo]] = defaultdict(dict)
        for member in tar.getmembers():  # headers only: the data stays where it is
            key, extension = base_plus_ext(member.name)  # how webdataset itself groups members
            if member.isfile() and key is not None:
                members[key][extension.lower()] = member
        for key in sorted(members):
            files = members[key]
            yield {"__key__": key, **{ext: tar.extractfile(m).read() for ext, m in files.items()}}


def superpixel_shard(source: str, target: str | Path | UPath, config: DataConfig) -> ShardReport:
    """Copy every member of every sample of `source`, in key order, and add its superpixel
    map and count.

    Samples that cannot be used are left out and reported with their key and reason;
    the shard and then its report are written atomically.
    """
    start = time.perf_counter()
    failed, written = [], 0
    with atomic_write(target) as tmp, wds.TarWriter(str(tmp), mtime=MEMBER_MTIME) as sink:
        for sample in samples_in_key_order(source):
            try:
                extra = _superpixel_members(sample, config)
            except UnusableSample as reason:
                failed.append(FailedSample(key=sample["__key__"], shard=source, reason=str(reason)))
                continue
            members = {k: v for k, v in sample.items() if not k.startswith("__")}
            sink.write({"__key__": sample["__key__"], **members, **extra})
            written += 1
    report = ShardReport(samples=written, failed=failed, seconds=time.perf_counter() - start)
    with atomic_write(report_path(target)) as tmp:
        tmp.write_text(report.model_dump_json())
    return report
