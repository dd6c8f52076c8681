"""img2dataset's shard machinery, with the project's image rule and download deadline.

`img2dataset.download` builds its own resizer, which stores some images wrongly (a
16-bit PNG comes out white, EXIF orientation is ignored) and reports raw library text.
Its parts take the resizer as an argument, so this module assembles them with
`segclip.data.images.store_image` in its place and a downloader that installs the
whole-download deadline in each download process. The same parts (sample writer,
per-shard stats, distributors, progress logger) also convert existing webdataset
shards, so both ways in write the same shard layout: `<id>.tar` with `jpg`/`txt`/`json`
members, `<id>.parquet` with every row's status, `<id>_stats.json` once the shard is done.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import get_context

import fsspec
import pyarrow as pa
from img2dataset.distributor import ray_distributor, retrier
from img2dataset.downloader import Downloader, compute_key
from img2dataset.logger import CappedCounter, LoggerProcess, write_stats
from img2dataset.reader import Reader
from img2dataset.writer import WebDatasetSampleWriter
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext

from segclip.data.http_deadline import install_download_deadline
from segclip.data.images import (
    IMAGE_MEMBERS,
    ImageRejected,
    StoredImage,
    StoreRule,
    store_image,
)
from segclip.data.shards import SHARD_DIGITS
from segclip.storage import location, remove_tree

HASH = "sha256"
# Shards one download process handles before a fresh one replaces it (img2dataset: 5). A new
# process imports img2dataset (albumentations, OpenCV, pyarrow), about 6 s of a 2-core
# machine's CPU: the demo's 24 shards on 2 processes started 6 of them instead of 2.
SHARDS_PER_PROCESS = 50


def process_pool_distributor(
    processes: int, worker: Callable, rows: Iterable, _subjob_size: object, max_shard_retry: int
) -> None:
    """img2dataset's multiprocessing distributor (spawned processes, failed shards retried),
    with processes that last `SHARDS_PER_PROCESS` shards."""
    with get_context("spawn").Pool(processes, maxtasksperchild=SHARDS_PER_PROCESS) as pool:

        def run(shards: Iterable) -> list:
            done = tqdm(pool.imap_unordered(worker, shards))
            return [row for finished, row in done if not finished]

        retrier(run, run(rows), max_shard_retry)


DISTRIBUTORS: dict[str, Callable[..., None]] = {
    "multiprocessing": process_pool_distributor,
    "ray": ray_distributor,
}


class StoreResizer:
    """img2dataset's resizer interface over `store_image`; errors are stable reasons."""

    def __init__(self, rule: StoreRule) -> None:
        self.rule = rule

    def __call__(self, img_stream: io.BytesIO, blurring_bbox_list: object = None) -> tuple:
        try:
            stored = store_image(img_stream.read(), self.rule)
        except ImageRejected as rejected:
            return None, None, None, None, None, rejected.reason
        return stored.data, *stored.size, *stored.original_size, None


class DeadlineDownloader(Downloader):
    """img2dataset's downloader, with the whole-download deadline in its process."""

    def __init__(self, *, deadline: float, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.deadline = deadline

    def __call__(self, row: tuple[int, str]) -> tuple[bool, tuple[int, str]]:
        install_download_deadline(self.deadline)
        return super().__call__(row)


def done_shards(shard_folder: str) -> set[int]:
    """Ids of the shards that finished (they have a stats file): a rerun skips them."""
    fs, path = fsspec.core.url_to_fs(shard_folder)
    return {int(name.rsplit("/", 1)[-1].split("_")[0]) for name in fs.glob(f"{path}/*_stats.json")}


def run_job(
    worker: Callable, rows: Iterable, *, shard_folder: str, distributor: str, processes: int
) -> None:
    """Run `worker` over shard rows with img2dataset's distributor and progress logger."""
    location(shard_folder).mkdir(parents=True, exist_ok=True)
    progress = LoggerProcess(shard_folder, False, "img2dataset", {})
    progress.done_shards = done_shards(shard_folder)
    progress.start()
    try:
        DISTRIBUTORS[distributor](processes, worker, rows, None, 1)
    finally:
        progress.join()


def download_list(
    url_list: str,
    shard_folder: str,
    *,
    rule: StoreRule,
    samples_per_shard: int,
    threads: int,
    timeout: int,
    deadline: float,
    retries: int,
    distributor: str,
    processes: int,
) -> None:
    """Download a parquet list of `url`, `caption` into shards; finished shards are kept."""
    tmp = f"{shard_folder}/_tmp"
    location(tmp).mkdir(parents=True, exist_ok=True)
    reader = Reader(
        url_list, "parquet", "url", "caption", None, None, None,
        samples_per_shard, done_shards(shard_folder), tmp,
    )  # fmt: skip
    downloader = DeadlineDownloader(
        deadline=deadline,
        sample_writer_class=WebDatasetSampleWriter,
        resizer=StoreResizer(rule),
        thread_count=threads,
        save_caption=True,
        extract_exif=False,
        output_folder=shard_folder,
        column_list=reader.column_list,
        timeout=timeout,
        number_sample_per_shard=samples_per_shard,
        oom_shard_count=SHARD_DIGITS,
        compute_hash=HASH,
        verify_hash_type=None,
        encode_format="jpg",
        retries=retries,
        user_agent_token=None,
        disallowed_header_directives={"noai", "noimageai", "noindex", "noimageindex"},
    )
    run_job(downloader, reader, shard_folder=shard_folder, distributor=distributor,
            processes=processes)  # fmt: skip
    remove_tree(location(tmp))  # on a store the downloaders already removed every piece


# --- existing shards -------------------------------------------------------------------------

CONVERTED_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("caption", pa.string()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        (HASH, pa.string()),
    ]
)


def _stream_samples(source: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, members) of a webdataset shard read front to back as a stream; a sample's
    members are consecutive in the tar, as webdataset writes and reads them. A shard that
    breaks off yields what it read of the last sample, then raises."""
    key, members = None, {}
    try:
        with (
            location(source).open("rb") as stream,
            tarfile.open(fileobj=stream, mode="r|*") as tar,
        ):
            for info in tar:
                name_key, extension = base_plus_ext(info.name)
                if not info.isfile() or name_key is None:
                    continue
                if name_key != key and members:
                    yield key, members
                    members = {}
                key = name_key
                members[extension.lower()] = tar.extractfile(info).read()
    finally:
        if members:
            yield key, members


def _caption(members: dict[str, bytes]) -> str | None:
    try:
        if "txt" in members:
            return members["txt"].decode("utf-8")
        if "json" in members:
            caption = json.loads(members["json"]).get("caption")
            return caption if isinstance(caption, str) else None
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return None


def _stored_sample(members: dict[str, bytes], rule: StoreRule) -> tuple[str, StoredImage, str]:
    """(caption, stored image, source image hash) of one adopted sample; raises ImageRejected."""
    image = next((members[ext] for ext in IMAGE_MEMBERS if ext in members), None)
    if image is None:
        raise ImageRejected("missing_image")
    caption = _caption(members)
    if caption is None or not caption.strip():
        raise ImageRejected("missing_caption")
    return caption, store_image(image, rule), hashlib.sha256(image).hexdigest()


class ShardConverter:
    """One existing shard (any fsspec URL), read as a stream, to one stored shard; each
    sample is checked and stored by the same rule as a download, unusable ones recorded
    with their reason; a shard that breaks off mid-way keeps the samples before the break."""

    def __init__(self, *, rule: StoreRule, shard_folder: str, samples_per_shard: int) -> None:
        self.rule = rule
        self.shard_folder = shard_folder
        self.oom_samples = math.ceil(math.log10(max(samples_per_shard, 10)))

    def __call__(self, row: tuple[int, str]) -> tuple[bool, tuple[int, str]]:
        shard_id, source = row
        start, status = time.time(), CappedCounter()
        writer = WebDatasetSampleWriter(
            shard_id, self.shard_folder, True, SHARD_DIGITS, CONVERTED_SCHEMA, "jpg"
        )
        count = successes = 0
        try:
            for position, (source_key, members) in enumerate(_stream_samples(source)):
                key = compute_key(position, shard_id, self.oom_samples, SHARD_DIGITS)
                count += 1
                successes += self._write(writer, key, f"{source}#{source_key}", members, status)
        except (tarfile.TarError, OSError, EOFError):
            count += 1
            status.increment("unreadable_shard_tail")
            writer.write(None, "", None, _meta(source, None, "", "unreadable_shard_tail"))
        writer.close()
        write_stats(
            self.shard_folder, shard_id, count, successes, 0, count - successes,
            start, time.time(), status, SHARD_DIGITS,
        )  # fmt: skip
        return True, row

    def _write(self, writer, key: str, url: str, members: dict, status: CappedCounter) -> int:
        try:
            caption, stored, digest = _stored_sample(members, self.rule)
        except ImageRejected as rejected:
            status.increment(rejected.reason)
            writer.write(None, key, None, _meta(url, _caption(members), key, rejected.reason))
            return 0
        status.increment("success")
        meta = _meta(url, caption, key, None)
        meta.update(
            dict(zip(("width", "height"), stored.size, strict=True)),
            original_width=stored.original_size[0],
            original_height=stored.original_size[1],
        )
        meta[HASH] = digest
        writer.write(stored.data, key, caption, meta)
        return 1


def _meta(url: str, caption: str | None, key: str, reason: str | None) -> dict:
    return {
        "url": url,
        "caption": caption,
        "key": key,
        "status": "failed_to_resize" if reason else "success",
        "error_message": reason,
        "width": None,
        "height": None,
        "original_width": None,
        "original_height": None,
        HASH: None,
    }
