"""(url, caption) lists read in blocks and cleaned into the list the downloader reads.

Every list format gives the same pairs: a null caption and an empty one are the same
(no caption), quoted separators and newlines inside a csv/tsv field survive, and a list
of any length is read and written one block at a time. Rows that cannot become a
sample are set aside with their reason before anything is downloaded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from typing import BinaryIO, Literal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

ListFormat = Literal["parquet", "csv", "tsv"]
Pairs = tuple[list[str | None], list[str | None]]  # urls, captions
PAIRS_SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string())])
REJECTED_SCHEMA = pa.schema(
    [("url", pa.string()), ("caption", pa.string()), ("reason", pa.string())]
)
BATCH_ROWS = 1 << 16


def read_pairs(
    stream: BinaryIO,
    *,
    input_format: ListFormat,
    url_column: str,
    caption_column: str,
    columns: Sequence[str] | None = None,
    block_size: int = 1 << 20,
) -> Iterator[Pairs]:
    """The list's (urls, captions), one block at a time; `columns` names a list without
    a header row. Empty fields are null, quoted or not; no other text means null."""
    wanted = [url_column, caption_column]
    if input_format == "parquet":
        for batch in pq.ParquetFile(stream).iter_batches(batch_size=BATCH_ROWS, columns=wanted):
            yield batch.column(0).cast(pa.string()).to_pylist(), batch.column(1).to_pylist()
        return
    reader = pacsv.open_csv(
        stream,
        read_options=pacsv.ReadOptions(
            column_names=list(columns) if columns else None, block_size=block_size
        ),
        parse_options=pacsv.ParseOptions(
            delimiter="\t" if input_format == "tsv" else ",", newlines_in_values=True
        ),
        convert_options=pacsv.ConvertOptions(
            include_columns=wanted,
            column_types={name: pa.string() for name in wanted},
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        ),
    )
    for batch in reader:
        yield batch.column(url_column).to_pylist(), batch.column(caption_column).to_pylist()


def _rejection(url: str | None, caption: str | None, seen: set[bytes] | None) -> str | None:
    if url is None or not url.strip():
        return "missing_url"
    if caption is None or not caption.strip():
        return "missing_caption"
    if seen is not None:
        digest = hashlib.blake2b(url.encode(), digest_size=16).digest()
        if digest in seen:
            return "duplicate_url"
        seen.add(digest)
    return None


def write_url_list(
    blocks: Iterable[Pairs], url_list: BinaryIO, rejected: BinaryIO, *, dedup_urls: bool
) -> dict[str, int]:
    """Write the usable pairs to `url_list` and the others, with their reason, to
    `rejected` (both parquet); returns the count of each reason."""
    seen: set[bytes] | None = set() if dedup_urls else None
    counts: dict[str, int] = {}
    with (
        pq.ParquetWriter(url_list, PAIRS_SCHEMA) as kept_writer,
        pq.ParquetWriter(rejected, REJECTED_SCHEMA) as rejected_writer,
    ):
        for urls, captions in blocks:
            kept: dict[str, list] = {"url": [], "caption": []}
            dropped: dict[str, list] = {"url": [], "caption": [], "reason": []}
            for url, caption in zip(urls, captions, strict=True):
                reason = _rejection(url, caption, seen)
                target = kept if reason is None else dropped
                target["url"].append(url)
                target["caption"].append(caption)
                if reason is not None:
                    dropped["reason"].append(reason)
                    counts[reason] = counts.get(reason, 0) + 1
            kept_writer.write_table(pa.table(kept, schema=PAIRS_SCHEMA))
            rejected_writer.write_table(pa.table(dropped, schema=REJECTED_SCHEMA))
    return counts
