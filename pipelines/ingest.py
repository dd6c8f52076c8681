"""Ingest stage: image-text pairs -> webdataset shards (`.jpg`, `.txt`, `.json`) via img2dataset.

Every source that has to fetch images (a url list, the demo scenes or a COCO folder,
both served by the driver: on 127.0.0.1, or on its cluster address when img2dataset
downloads on Ray) goes through the same img2dataset download, so resizing,
encoding and failure accounting are identical. Existing shards are validated and
adopted in place. img2dataset's incremental mode keeps every shard that finished
(it has a `_stats.json`), so an interrupted ingest resumes where it stopped. Every
path may be a local path or an fsspec URL: img2dataset writes through fsspec.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

from pipelines.ray_runtime import connect, node_ip, ray_address
from segclip.config import ConfigError, SegCLIPConfig
from segclip.data.demo_data import demo_data_key, write_demo_source
from segclip.data.serve import serve_directory
from segclip.data.shards import IMAGE_EXTENSIONS
from segclip.manifest import DataRef, ShardRef, file_ref, json_digest
from segclip.stage import Stage, StageContext, StageOutput
from segclip.storage import atomic_write, fingerprint, local_folder, location

SHARD_DIR = "shards"
URL_LIST = "urls.parquet"
KARPATHY_FILE = "dataset_coco.json"

# img2dataset's error messages -> failure reasons; the first match wins.
FAILURE_REASONS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"HTTP Error (\d+)"), "http_{0}"),
    (re.compile(r"Connection refused"), "connection_refused"),
    (re.compile(r"timed out|[Tt]imeout"), "timeout"),
    (re.compile(r"Name or service not known|getaddrinfo|nodename"), "unresolved_host"),
    (re.compile(r"Image decoding error|cannot identify image"), "not_an_image"),
    (re.compile(r"hash mismatch"), "hash_mismatch"),
)


def failure_reason(status: str, message: str | None) -> str:
    """A short, stable reason for one failed img2dataset row."""
    for pattern, reason in FAILURE_REASONS:
        if message and (match := pattern.search(message)):
            return reason.format(*match.groups())
    return status


def collect_shards(output_dir: UPath) -> StageOutput:
    """Counts, failures by reason and shard list of the finished img2dataset shards."""
    failures, shards = Counter[str](), []
    for stats in sorted((output_dir / SHARD_DIR).glob("*_stats.json")):
        shard_id = stats.name.removesuffix("_stats.json")
        with (output_dir / SHARD_DIR / f"{shard_id}.parquet").open("rb") as table_file:
            table = pd.read_parquet(table_file, columns=["status", "error_message"])
        ok = table["status"] == "success"
        failures.update(failure_reason(s, m) for s, m in table[~ok].itertuples(index=False))
        if ok.any():
            shards.append(ShardRef(path=f"{SHARD_DIR}/{shard_id}.tar", samples=int(ok.sum())))
    return _summary(shards, failures)


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
    runtime = config.runtime
    if runtime.ingest_distributor == "auto":
        return "ray" if ray_address(runtime.ray_address) else "multiprocessing"
    return runtime.ingest_distributor


def _serving_host(config: SegCLIPConfig) -> str:
    """Where the driver serves local images: its cluster address when Ray downloads them."""
    if _distributor(config) != "ray":
        return "127.0.0.1"
    connect(config.runtime.ray_address)
    return node_ip()


def download(
    config: SegCLIPConfig,
    output_dir: UPath,
    *,
    url_list: str,
    input_format: str,
    url_column: str,
    caption_column: str,
) -> StageOutput:
    """Run img2dataset into `<output_dir>/shards`, keeping shards a previous run finished."""
    import img2dataset  # heavy (pandas, cv2, albumentations): only when downloading

    ingest, runtime = config.ingest, config.runtime
    distributor = _distributor(config)
    if distributor == "ray":
        connect(runtime.ray_address)
    img2dataset.download(
        url_list=url_list,
        input_format=input_format,
        url_col=url_column,
        caption_col=caption_column,
        output_format="webdataset",
        output_folder=str(output_dir / SHARD_DIR),
        image_size=ingest.image_size,
        resize_mode=ingest.resize_mode,
        encode_format="jpg",
        encode_quality=ingest.encode_quality,
        number_sample_per_shard=ingest.samples_per_shard,
        retries=ingest.retries,
        timeout=ingest.timeout,
        processes_count=runtime.ingest_processes,
        thread_count=runtime.ingest_threads,
        distributor=distributor,
        incremental_mode="incremental",
        enable_wandb=False,
    )
    return collect_shards(output_dir)


def download_pairs(
    config: SegCLIPConfig, output_dir: UPath, urls: list[str], captions: list[str]
) -> StageOutput:
    """Write (url, caption) pairs as the stage's own url list, then download it."""
    url_list = output_dir / "source" / URL_LIST
    with atomic_write(url_list) as tmp:
        pq.write_table(pa.table({"url": urls, "caption": captions}), tmp)
    return download(
        config,
        output_dir,
        url_list=str(url_list),
        input_format="parquet",
        url_column="url",
        caption_column="caption",
    )


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


def _read_delimited(path: UPath, input_format: str, columns: Sequence[str] | None, **kwargs):
    with path.open("rb") as stream:
        return pd.read_csv(
            stream,
            sep="\t" if input_format == "tsv" else ",",
            header=None if columns else 0,
            names=list(columns) if columns else None,
            **kwargs,
        )


def _list_columns(config: SegCLIPConfig, path: UPath, input_format: str) -> list[str]:
    if input_format == "parquet":
        with path.open("rb") as stream:
            return pq.read_schema(stream).names
    return list(_read_delimited(path, input_format, config.ingest.columns, nrows=0).columns)


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
    ingest, path, input_format = config.ingest, location(config.ingest.path), _list_format(config)
    if ingest.columns and input_format != "parquet":
        # img2dataset expects a header row: a headerless list is rewritten with named columns.
        table = _read_delimited(path, input_format, ingest.columns, dtype=str)
        return download_pairs(
            config,
            output_dir,
            table[ingest.url_column].tolist(),
            table[ingest.caption_column].fillna("").tolist(),
        )
    return download(
        config,
        output_dir,
        url_list=str(path),
        input_format=input_format,
        url_column=ingest.url_column,
        caption_column=ingest.caption_column,
    )


def _ingest_demo(config: SegCLIPConfig, output_dir: UPath) -> StageOutput:
    """The scenes are drawn into a local folder (kept beside a local stage for a resume,
    scratch for one on a store) and served from there."""
    with local_folder(output_dir / "source" / "scenes", publish=False) as scenes:
        table = pq.read_table(write_demo_source(scenes, config.demo))
        with serve_directory(scenes, host=_serving_host(config)) as base:
            urls = [base + name for name in table["file"].to_pylist()]
            return download_pairs(config, output_dir, urls, table["caption"].to_pylist())


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
        return download_pairs(config, output_dir, urls, captions)


def _shard_files(config: SegCLIPConfig) -> list[UPath]:
    folder = _require_path(config, "a folder of webdataset .tar shards")
    shards = sorted(folder.glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"no .tar shards in {folder}; point ingest.path at the shards")
    return shards


def _shards_inputs(config: SegCLIPConfig) -> list[DataRef]:
    listing = [fingerprint(shard) for shard in _shard_files(config)]
    return [DataRef(url=str(location(config.ingest.path)), digest=json_digest(listing))]


def _sample_members(shard: UPath) -> dict[str, set[str]]:
    """Extensions per sample key, read from tar headers only."""
    members: dict[str, set[str]] = {}
    try:
        with shard.open("rb") as stream, tarfile.open(fileobj=stream) as tar:
            for info in tar:
                if info.isfile() and "." in (name := Path(info.name).name):
                    key, extension = name.split(".", 1)
                    members.setdefault(str(Path(info.name).parent / key), set()).add(extension)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ValueError(
            f"{shard} is not a readable tar shard ({error}); re-download it or remove it "
            "from the folder"
        ) from None
    return members


def _adopt_shards(config: SegCLIPConfig, output_dir: UPath) -> StageOutput:
    """Validate existing shards and reference them where they are, without copying."""
    failures, shards = Counter[str](), []
    for shard in _shard_files(config):
        usable = 0
        for extensions in _sample_members(shard).values():
            if not extensions & set(IMAGE_EXTENSIONS):
                failures["missing_image"] += 1
            elif "txt" not in extensions:
                failures["missing_caption"] += 1
            else:
                usable += 1
        shards.append(ShardRef(path=str(shard), samples=usable))
    return _summary(shards, failures)


@dataclass(frozen=True)
class IngestSource:
    inputs: Callable[[SegCLIPConfig], list[DataRef]]
    ingest: Callable[[SegCLIPConfig, UPath], StageOutput]
    uses_demo: bool = False


SOURCES: dict[str, IngestSource] = {
    "demo": IngestSource(lambda config: [], _ingest_demo, uses_demo=True),
    "urls": IngestSource(_url_list_inputs, _ingest_url_list),
    "coco": IngestSource(_coco_inputs, _ingest_coco),
    "shards": IngestSource(_shards_inputs, _adopt_shards),
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
    help="download or adopt image-text pairs into webdataset shards",
    settings=settings,
    sources=lambda config: SOURCES[config.ingest.source].inputs(config),
    prepare=lambda config, inputs: None,
    body=_ingest,
    retries=2,  # downloads: a second attempt can succeed
)
run = STAGE.run
