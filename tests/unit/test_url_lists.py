"""Url lists: every format gives the same pairs, read block by block, cleaned before download."""

import csv
import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from segclip.data.url_lists import read_pairs, write_url_list

HOSTILE = [
    'a "quoted" caption, with a comma',
    "a caption with a\ttab",
    "a caption over\ntwo lines",
    "ünïcödé and emoji 🐈",
    "x" * 5000,
]


def pairs_of(data: bytes, input_format: str, **options) -> tuple[list, list]:
    urls, captions = [], []
    for block_urls, block_captions in read_pairs(
        io.BytesIO(data), input_format=input_format, url_column="url", caption_column="caption",
        **options,
    ):  # fmt: skip
        urls += block_urls
        captions += block_captions
    return urls, captions


def delimited(rows: list[tuple[str, str | None]], delimiter: str, header: bool = True) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, delimiter=delimiter, lineterminator="\n")
    if header:
        writer.writerow(["url", "caption"])
    for url, caption in rows:
        writer.writerow([url, caption])  # csv writes None as an empty field
    return text.getvalue().encode()


@pytest.mark.parametrize("delimiter,input_format", [(",", "csv"), ("\t", "tsv")])
def test_quoted_separators_and_newlines_survive_across_many_read_blocks(delimiter, input_format):
    rows = [(f"http://h/{i}.jpg", HOSTILE[i % len(HOSTILE)]) for i in range(3000)]
    data = delimited(rows, delimiter)
    assert len(data) > 50 * 16384  # many blocks of the 16 KiB read size below
    urls, captions = pairs_of(data, input_format, block_size=16384)
    assert list(zip(urls, captions, strict=True)) == rows


def test_headerless_list_takes_the_given_column_names():
    data = delimited([("a caption", "http://h/1.jpg")], "\t", header=False)
    pairs = pairs_of(data, "tsv", columns=("caption", "url"))
    assert pairs == (["http://h/1.jpg"], ["a caption"])


def test_null_and_empty_captions_are_the_same_in_every_format():
    csv_data = b'url,caption\nhttp://h/1.jpg,\nhttp://h/2.jpg,""\nhttp://h/3.jpg,NA\n'
    table = pa.table({"url": ["http://h/1.jpg", "http://h/2.jpg"], "caption": [None, ""]})
    parquet = io.BytesIO()
    pq.write_table(table, parquet)
    for pairs in (pairs_of(csv_data, "csv"), pairs_of(parquet.getvalue(), "parquet")):
        kept, rejected = io.BytesIO(), io.BytesIO()
        counts = write_url_list([pairs], kept, rejected, dedup_urls=False)
        assert counts == {"missing_caption": 2}
        assert pq.read_table(rejected)["url"].to_pylist()[:2] == [
            "http://h/1.jpg",
            "http://h/2.jpg",
        ]
    assert pairs_of(csv_data, "csv")[1][2] == "NA"  # text that merely looks like a null stays


def test_cleaning_sets_rows_aside_with_reasons_and_keeps_first_urls():
    blocks = [
        (["http://h/1.jpg", None, "http://h/2.jpg"], ["one", "no url", "   "]),
        (["http://h/1.jpg", "http://h/3.jpg"], ["one again", "three"]),
    ]
    for dedup, expected in [
        (True, ["http://h/1.jpg", "http://h/3.jpg"]),
        (False, ["http://h/1.jpg", "http://h/1.jpg", "http://h/3.jpg"]),
    ]:
        kept, rejected = io.BytesIO(), io.BytesIO()
        counts = write_url_list(blocks, kept, rejected, dedup_urls=dedup)
        assert pq.read_table(kept)["url"].to_pylist() == expected
        reasons = pq.read_table(rejected)["reason"].to_pylist()
        assert counts == {reason: reasons.count(reason) for reason in reasons}
        assert sorted(reasons) == sorted(
            ["missing_url", "missing_caption"] + (["duplicate_url"] if dedup else [])
        )
