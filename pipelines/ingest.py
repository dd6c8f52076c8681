"""Ingest stage: image-text pairs -> webdataset shards (`.jpg`, `.txt`, `.json`) via img2dataset.

Every source that has to fetch images (a url list, the demo scenes or a COCO folder,
both served by the driver: on 127.0.0.1, or on its cluster address when img2dataset
downloads on Ray) is cleaned into one url list and goes through the same img2dataset
download; existing shards are streamed from any fsspec URL. Both store each image by
one rule (`segclip.data.images`), so a sample looks as a browser shows its source and
every row that is not a sample has one stable reason, in the manifest and in
`failures.parquet`. A shard is finished once it has a `_stats.json`: a rerun keeps
those, so an interrupted ingest resumes where it stopped.
"""

from __future__ import annotations

import glob
import json
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from upath import UPath
from webdataset.tariterators import base_plus_ext

from pipelines.ray_runtime import connect, node_ip, ray_address
from segclip.config import ConfigError, SegCLIPConfig
from segclip.data.demo_data import demo_data_key, write_demo_source
from segclip.data.http_deadline import DEADLINE_EXCEEDED
from segclip.data.images import REJECTIONS, StoreRule
from segclip.data.serve import serve_directory
from segclip.data.shards import SHARD_DIR, shard_name
from segclip.data.url_lists import Pairs, read_pairs, write_url_list
from segclip.manifest import DataRef, ShardRef, file_ref, json_digest
from segclip.stage import Stage, StageContext, StageOutput
from segclip.storage import atomic_write, fingerprint, local_folder, location

URL_LIST = "urls.parquet"
REJECTED_LIST = "rejected.parquet"  # list rows set aside before downloading, with reasons
FAILURES_FILE = "failures.parquet"  # every requested row that is not a sample, with its reason
ROW_COLUMNS = ["key", "url", "caption", "status", "error_message", "sha256"]
REASONS = {*REJECTIONS, DEADLINE_EXCEEDED, "unreadable_shard_tail"}
HASH = "sha256"
KARPATHY_FILE = "dataset_coco.json"

# Download errors (img2dataset records the exception text) -> failure reasons; first match wins.
DOWNLOAD_ERRORS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"infinite loop|redirect"), "redirect_loop"),
    (re.compile(r"HTTP Error (\d+)"), "http_{0}"),
    (re.compile(r"Connection refused"), "connection_refused"),
    (re.compile(r"Connection reset|Remote end closed|BadStatusLine"), "connection_broken"),
    (re.compile(r"IncompleteRead"), "incomplete_body"),
    (re.compile(r"Name or service not known|getaddrinfo|nodename|No address"), "unresolved_host"),
    (re.compile(r"No route to host|Network is unreachable"), "unreachable_host"),
    (re.compile(r"CERTIFICATE|SSL|TLS"), "tls_error"),
    (re.compile(r"timed out|[Tt]imeout"), "timeout"),
    (re.compile(r"unknown url type|no host given"), "bad_url"),
    (re.compile(r"X-Robots-Tag"), "refused_by_x_robots_tag"),
)


def failure_reason(status: str, message: str | None) -> str:
    """A short, stable reason for one failed row: the image rule's own reasons pass
    through, library text is mapped, and anything unknown gets its stage's generic one."""
    if message in REASONS:
        return message
    for pattern, reason in DOWNLOAD_ERRORS:
        if message and (match := pattern.search(message)):
            return reason.format(*match.groups())
    return "download_error" if status == "failed_to_download" else "undecodable_image"


def _shard_rows(output_dir: UPath) -> pd.DataFrame:
    """Every row of every finished shard: its shard id, key, url, caption, status, reason."""
    from pipelines.img2dataset_job import done_shards

    folder = output_dir / SHARD_DIR
    tables = []
    for shard_id in sorted(done_shards(str(folder))):
        with (folder / shard_name(shard_id, ".parquet")).open("rb") as table_file:
            table = pd.read_parquet(table_file, columns=ROW_COLUMNS)
        tables.append(table.assign(shard=shard_id))
    return (
        pd.concat(tables, ignore_index=True)
        if tables
        else pd.DataFrame(columns=[*ROW_COLUMNS, "shard"])
    )


def _drop_members(shard: UPath, keys: set[str]) -> None:
    """Rewrite a shard without the samples of `keys`; a shard without them is left as is."""
    with shard.open("rb") as stream, tarfile.open(fileobj=stream) as tar:
        members = tar.getmembers()
        if not any(base_plus_ext(m.name)[0] in keys for m in members):
            return
        with atomic_write(shard) as scratch, tarfile.open(scratch, "w") as out:
            for member in members:
                if base_plus_ext(member.name)[0] not in keys:
                    out.addfile(member, tar.extractfile(member))


def collect_shards(output_dir: UPath, *, dedup_content: bool) -> StageOutput:
    """Counts, failures by reason and shard list of the finished shards; every row that
    did not become a sample is written to failures.parquet with its reason. With content
    de-duplication, a sample whose source bytes an earlier key already had is removed."""
    rows = _shard_rows(output_dir).sort_values("key", kind="stable")
    ok = rows["status"] == "success"
    rows["reason"] = [
        None if success else failure_reason(status, message)
        for success, status, message in zip(ok, rows["status"], rows["error_message"], strict=True)
    ]
    if dedup_content:
        repeated = ok & rows[HASH].notna() & rows[HASH].duplicated()
        rows.loc[repeated, "reason"] = "duplicate_content"
        for shard_id, keys in rows[repeated].groupby("shard")["key"]:
            _drop_members(output_dir / SHARD_DIR / shard_name(shard_id), set(keys))
    failed = rows[rows["reason"].notna()][["url", "caption", "reason"]]
    rejected_file = output_dir / "source" / REJECTED_LIST
    if rejected_file.exists():
        with rejected_file.open("rb") as stream:
            failed = pd.concat([pd.read_parquet(stream), failed], ignore_index=True)
    with atomic_write(output_dir / FAILURES_FILE) as scratch:
        failed.reset_index(drop=True).to_parquet(scratch, index=False)
    samples = rows[rows["reason"].isna()].groupby("shard").size()
    shards = [
        ShardRef(path=f"{SHARD_DIR}/{shard_name(shard_id)}", samples=int(count))
        for shard_id, count in samples.items()
    ]
    return _summary(shards, Counter(failed["reason"]))


def _summary(shards: list[ShardRef], failures: Counter[str]) -> StageOutput:
    samples = sum(shard.samples for shard in shards)
    return StageOutput(
        counts={
            "requested": samples + failures.total(),
            "samples": samples,
            "shards": len(shards),
        },
        failures=dict(sorted(failures.items())),
        shards=shards,
    )


def _distributor(config: SegCLIPConfig) -> str:
    """img2dataset's distributor for the shard jobs; Ray is joined when it is Ray's."""
    runtime = config.runtime
    distributor = runtime.ingest_distributor
    if distributor == "auto":
        distributor = "ray" if ray_address(runtime.ray_address) else "multiprocessing"
    if distributor == "ray":
        connect(runtime.ray_address)
    return distributor


def _serving_host(config: SegCLIPConfig) -> str:
    """Where the driver serves local images: its cluster address when Ray downloads them."""
    return node_ip() if _distributor(config) == "ray" else "127.0.0.1"


def _download(config: SegCLIPConfig, output_dir: UPath, pairs: Iterable[Pairs]) -> StageOutput:
    """Clean the pairs into the stage's own url list (rewritten each run: served URLs carry
    this run's port), then download it; shards a previous run finished are kept."""
    from pipelines.img2dataset_job import download_list  # img2dataset is heavy: only here

    ingest, runtime = config.ingest, config.runtime
    with (
        atomic_write(output_dir / "source" / URL_LIST) as url_list,
        atomic_write(output_dir / "source" / REJECTED_LIST) as rejected,
    ):
        write_url_list(pairs, url_list, rejected, dedup_urls="url" in ingest.dedup)
    download_list(
        str(output_dir / "source" / URL_LIST),
        str(output_dir / SHARD_DIR),
        rule=StoreRule.for_ingest(ingest),
        samples_per_shard=ingest.samples_per_shard,
        threads=runtime.ingest_threads,
        timeout=ingest.timeout,
        deadline=ingest.download_deadline,
        retries=ingest.retries,
        distributor=_distributor(config),
        processes=runtime.ingest_processes,
    )
    return collect_shards(output_dir, dedup_content="content" in ingest.dedup)


def _list_format(config: SegCLIPConfig) -> str:
    if config.ingest.input_format != "auto":
        return config.ingest.input_format
    suffix = Path(config.ingest.path).suffix.lstrip(".").lower()
    if suffix not in ("parquet", "csv", "tsv"):
        raise ConfigError(
            f"cannot tell the format of {config.ingest.path} from its suffix; "
            "set ingest.input_format to parquet, csv or tsv"
        )
    return suffix


def _list_pairs(config: SegCLIPConfig) -> Iterator[Pairs]:
    ingest = config.ingest
    with location(ingest.path).open("rb") as stream:
        yield from read_pairs(
            stream,
            input_format=_list_format(config),
            url_column=ingest.url_column,
            caption_column=ingest.caption_column,
            columns=ingest.columns,
        )


def _list_columns(config: SegCLIPConfig, path: UPath, input_format: str) -> list[str]:
    if input_format == "parquet":
        with path.open("rb") as stream:
            return pq.read_schema(stream).names
    if config.ingest.columns:
        return list(config.ingest.columns)
    with path.open("rb") as stream:
        return pacsv.open_csv(
            stream,
            parse_options=pacsv.ParseOptions(delimiter="\t" if input_format == "tsv" else ","),
        ).schema.names


def _require_path(config: SegCLIPConfig, expected: str) -> UPath:
    path = location(config.ingest.path)
    if not path.exists():
        raise FileNotFoundError(
            f"ingest.path {path} does not exist; it should be {expected} "
            f"for ingest.source={config.ingest.source}"
        )
    return path


# --- sources ---------------------------------------------------------------------------------


def _url_list_inputs(config: SegCLIPConfig) -> list[DataRef]:
    path = _require_path(config, "a url+caption list (parquet, csv or tsv)")
    columns = _list_columns(config, path, _list_format(config))
    for field in ("url_column", "caption_column"):
        if getattr(config.ingest, field) not in columns:
            raise ConfigError(
                f"{path} has no column {getattr(config.ingest, field)!r} "
                f"(columns: {', '.join(columns)}); set ingest.{field}"
            )
    return [file_ref(path)]


def _ingest_url_list(config: SegCLIPConfig, output_dir: UPath) -> StageOutput:
    return _download(config, output_dir, _list_pairs(config))


def _ingest_demo(config: SegCLIPConfig, output_dir: UPath) -> StageOutput:
    """The scenes are drawn into a local folder (kept beside a local stage for a resume,
    scratch for one on a store) and served from there."""
    with local_folder(output_dir / "source" / "scenes", publish=False) as scenes:
        table = pq.read_table(write_demo_source(scenes, config.demo))
        with serve_directory(scenes, host=_serving_host(config)) as base:
            urls = [base + name for name in table["file"].to_pylist()]
            return _download(config, output_dir, [(urls, table["caption"].to_pylist())])


def _coco_inputs(config: SegCLIPConfig) -> list[DataRef]:
    root = _require_path(config, "a COCO-2014 folder")
    split_file = root / KARPATHY_FILE
    if not split_file.is_file():
        raise FileNotFoundError(
            f"{split_file} not found: a COCO captions folder needs the Karpathy split file "
            f"{KARPATHY_FILE} beside the train2014/ and val2014/ image folders"
        )
    return [file_ref(split_file)]


def _ingest_coco(config: SegCLIPConfig, output_dir: UPath) -> StageOutput:
    """Each caption of each image in the chosen Karpathy splits becomes its own sample; the
    folder (local or on a store) is served for img2dataset to download."""
    root = location(config.ingest.path)
    images = json.loads((root / KARPATHY_FILE).read_text())["images"]
    chosen = [image for image in images if image["split"] in config.ingest.coco_splits]
    if not chosen:
        raise ConfigError(
            f"no images of splits {list(config.ingest.coco_splits)} in {KARPATHY_FILE}; "
            "set ingest.coco_splits (Karpathy splits: train, restval, val, test)"
        )
    first = root / chosen[0]["filepath"] / chosen[0]["filename"]
    if not first.is_file():
        raise FileNotFoundError(
            f"{first} listed in {KARPATHY_FILE} is missing: unpack train2014.zip and "
            f"val2014.zip into {root}"
        )
    with serve_directory(root, host=_serving_host(config)) as base:
        urls, captions = [], []
        for image in chosen:
            url = f"{base}{image['filepath']}/{image['filename']}"
            for sentence in image["sentences"]:
                urls.append(url)
                captions.append(sentence["raw"].strip())
        return _download(config, output_dir, [(urls, captions)])


def _shard_files(config: SegCLIPConfig) -> list[UPath]:
    """The shards a folder holds (`*.tar`), or those a folder/pattern names (`cc3m-*.tar`)."""
    path = location(config.ingest.path)
    if glob.has_magic(path.name):
        shards = sorted(path.parent.glob(path.name))
    else:
        shards = sorted(_require_path(config, "a folder of webdataset .tar shards").glob("*.tar"))
    if not shards:
        raise FileNotFoundError(
            f"no .tar shards at {path}; point ingest.path at a folder of shards or at a "
            "pattern such as hf://datasets/OWNER/NAME/train-*.tar"
        )
    return shards


def _shards_inputs(config: SegCLIPConfig) -> list[DataRef]:
    listing = [fingerprint(shard) for shard in _shard_files(config)]
    return [DataRef(url=str(location(config.ingest.path)), digest=json_digest(listing))]


def _convert_shards(config: SegCLIPConfig, output_dir: UPath) -> StageOutput:
    """Read each existing shard as a stream and store its samples by the same rule as a
    download (one output shard per input shard; finished ones are kept on a rerun)."""
    from pipelines.img2dataset_job import ShardConverter, done_shards, run_job

    ingest, folder = config.ingest, str(output_dir / SHARD_DIR)
    finished = done_shards(folder)
    rows = [(i, str(s)) for i, s in enumerate(_shard_files(config)) if i not in finished]
    converter = ShardConverter(
        rule=StoreRule.for_ingest(ingest),
        shard_folder=folder,
        samples_per_shard=ingest.samples_per_shard,
    )
    run_job(
        converter,
        rows,
        shard_folder=folder,
        distributor=_distributor(config),
        processes=config.runtime.ingest_processes,
    )
    return collect_shards(output_dir, dedup_content="content" in ingest.dedup)


@dataclass(frozen=True)
class IngestSource:
    inputs: Callable[[SegCLIPConfig], list[DataRef]]
    ingest: Callable[[SegCLIPConfig, UPath], StageOutput]
    uses_demo: bool = False


SOURCES: dict[str, IngestSource] = {
    "demo": IngestSource(lambda config: [], _ingest_demo, uses_demo=True),
    "urls": IngestSource(_url_list_inputs, _ingest_url_list),
    "coco": IngestSource(_coco_inputs, _ingest_coco),
    "shards": IngestSource(_shards_inputs, _convert_shards),
}


def settings(config: SegCLIPConfig) -> dict:
    """The settings the ingest output depends on (the stage key digests these)."""
    keyed = {"ingest": config.ingest.model_dump(mode="json")}
    if SOURCES[config.ingest.source].uses_demo:
        keyed["demo"] = demo_data_key(config.demo)
    return keyed


def _ingest(context: StageContext[None]) -> StageOutput:
    return SOURCES[context.config.ingest.source].ingest(context.config, context.output_dir)


STAGE = Stage[None](
    name="ingest",
    settings=settings,
    sources=lambda config: SOURCES[config.ingest.source].inputs(config),
    prepare=lambda config, inputs: None,
    body=_ingest,
    retries=2,  # downloads: a second attempt can succeed
)
run = STAGE.run
