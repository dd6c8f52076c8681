"""Training loader: superpixel shards -> Batch(images, caption tokens, patch superpixel ids).

Shards are streamed from wherever they are (a local folder or an object store).

Shards are split by rank (strided) and then by loader worker, so in epoch mode
every sample is read exactly once per epoch by exactly one (rank, worker). In
resampled mode each (rank, worker) draws shards with replacement from its
rank's share, an endless stream for step-based training.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from segclip.clip_architecture import describe_clip
from segclip.config import SegCLIPConfig
from segclip.data.augment import paired_random_resized_crop
from segclip.data.batch import Batch
from segclip.data.images import display_rgb, open_image
from segclip.data.shards import LABEL_MEMBER, decode_label_map, image_member
from segclip.data.superpixels import patch_superpixel_ids
from segclip.data.transforms import normalize_images
from segclip.model.segclip import CaptionTokenizer
from segclip.storage import location

# Bump when a seed's samples (order or crops) change, so no training run reuses older weights.
SAMPLE_STREAM_VERSION = 2
LOADER_START = "spawn"  # how loader processes start (training_loader says why not a fork)


def shards_for_rank(shards: Sequence[str], rank: int, world_size: int) -> list[str]:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    if len(shards) < world_size:
        raise ValueError(
            f"{len(shards)} shards cannot feed {world_size} training workers; use at most "
            f"{len(shards)} workers or re-ingest with a smaller ingest.samples_per_shard"
        )
    return list(shards[rank::world_size])


def batches_per_epoch(
    shard_samples: Sequence[int], world_size: int, num_workers: int, batch_size: int
) -> int:
    """Full batches every rank can deliver in one epoch: the step count that keeps DDP in step."""
    per_rank = []
    for rank in range(world_size):
        mine = shards_for_rank(shard_samples, rank, world_size)
        workers = max(1, num_workers)
        per_rank.append(sum(sum(mine[w::workers]) // batch_size for w in range(workers)))
    return min(per_rank)


class RankShards(IterableDataset):
    """Shard URLs for the current loader worker of one rank, in a seeded order."""

    def __init__(
        self, shards: Sequence[str], *, rank: int, world_size: int, resampled: bool, seed: int
    ) -> None:
        super().__init__()
        self.shards = shards_for_rank(shards, rank, world_size)
        self.rank, self.resampled, self.seed = rank, resampled, seed

    def __iter__(self) -> Iterator[dict[str, str]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(hash((self.seed, self.rank, worker)))
        if self.resampled:
            while True:
                yield {"url": rng.choice(self.shards)}
        mine = self.shards[worker::workers]
        for url in rng.sample(mine, len(mine)):
            yield {"url": url}


def open_shards(shards: Iterable[dict[str, str]]) -> Iterator[dict[str, Any]]:
    """Each shard URL (a path, `s3://`, ...) opened on its store and read as the tar stream
    is consumed: streamed, never copied whole first."""
    for shard in shards:
        with location(shard["url"]).open("rb") as stream:
            yield {**shard, "stream": stream}


def expand_tar_samples(streams: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Tar streams -> samples grouped by key, as webdataset's own tar reader does."""
    return group_by_keys(tar_file_expander(streams))


class ShardSamples:
    """Shard URLs -> their samples in tar order, streamed from the store.

    With `keep` > 0 the samples of the shards read so far are kept in memory until about
    `keep` are held (whole shards): resampled training draws each shard many times, and a
    kept shard is neither read again nor, since `TrainingSamples` leaves its decoding in
    the kept sample, decoded again. Reading and decoding are deterministic, so the samples,
    crops and batches are the same with or without keeping.
    """

    def __init__(self, keep: int = 0) -> None:
        self.keep = keep
        self._kept: dict[str, list[dict[str, Any]]] = {}

    def __call__(self, shards: Iterable[dict[str, str]]) -> Iterator[dict[str, Any]]:
        for shard in shards:
            kept = self._kept.get(shard["url"])
            if kept is not None:
                yield from kept
            elif sum(map(len, self._kept.values())) < self.keep:
                self._kept[shard["url"]] = kept = list(expand_tar_samples(open_shards([shard])))
                yield from kept
            else:
                yield from expand_tar_samples(open_shards([shard]))


DECODED = "__decoded__"  # the sample member TrainingSamples leaves its decoding in


class DecodedSample(NamedTuple):
    image: Image.Image  # 8-bit RGB
    labels: np.ndarray  # (H, W) superpixel ids
    tokens: torch.Tensor  # (L,) caption token ids


class TrainingSamples:
    """Decode, paired crop, patch ids and caption tokens for each shard sample of a stream."""

    def __init__(self, config: SegCLIPConfig, *, seed: int) -> None:
        architecture = describe_clip(config.model.clip_model)
        self.image_size, self.patch_size = architecture.image_size, architecture.patch_size
        self.model_config, self.data, self.seed = config.model, config.data, seed

    @cached_property
    def tokenizer(self) -> CaptionTokenizer:
        """Built in the worker process on first use rather than pickled into it."""
        return CaptionTokenizer(self.model_config)

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        # Crop boxes from a generator of this stream's seed and loader worker, new each pass
        # as the shard order and the shuffle are, never from torch's global RNG.
        info = get_worker_info()
        crops = torch.Generator().manual_seed(hash((self.seed, info.id if info else 0)))
        for sample in samples:
            yield self.prepare(sample, crops)

    def decode(self, sample: dict[str, Any]) -> DecodedSample:
        # decoded as the superpixel stage decoded it, so the label map lines up
        return DecodedSample(
            display_rgb(open_image(sample[image_member(sample)])),
            decode_label_map(sample[LABEL_MEMBER]),
            self.tokenizer(sample["txt"].decode())[0],
        )

    def prepare(self, sample: dict[str, Any], crops: torch.Generator) -> dict[str, Any]:
        if DECODED not in sample:  # left in the sample for when ShardSamples keeps it
            sample[DECODED] = self.decode(sample)
        decoded: DecodedSample = sample[DECODED]
        crop, labels = paired_random_resized_crop(
            decoded.image,
            decoded.labels,
            self.image_size,
            scale=self.data.crop_scale,
            ratio=self.data.crop_ratio,
            generator=crops,
        )
        return {
            "__key__": sample["__key__"],
            "image": np.asarray(crop),
            "tokens": decoded.tokens,
            "superpixels": patch_superpixel_ids(labels, self.patch_size, self.data.patch_label),
        }


def collate(samples: list[dict[str, Any]]) -> Batch:
    return Batch(
        images=normalize_images(np.stack([s["image"] for s in samples])),
        tokens=torch.stack([s["tokens"] for s in samples]),
        superpixels=torch.stack([s["superpixels"] for s in samples]),
    )


def training_samples(
    shards: Sequence[str],
    config: SegCLIPConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    resampled: bool = True,
    epoch: int = 0,
    stream: int = 0,
) -> wds.DataPipeline:
    """Per-sample stream of one rank; `epoch` reseeds shard order, crops and shuffling, and
    so does `stream` k > 0, the samples of start k of a best-of-starts run (train/starts.py)."""
    seed = hash((config.train.seed, epoch, stream) if stream else (config.train.seed, epoch))
    rank_seed = hash((seed, rank))
    return wds.DataPipeline(
        RankShards(shards, rank=rank, world_size=world_size, resampled=resampled, seed=seed),
        ShardSamples(config.runtime.loader_keep_samples),
        wds.shuffle(config.data.shuffle_buffer, seed=rank_seed),
        TrainingSamples(config, seed=rank_seed),
    )


def training_loader(
    shards: Sequence[str],
    config: SegCLIPConfig,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    resampled: bool = True,
    epoch: int = 0,
    stream: int = 0,
) -> wds.WebLoader:
    """Batches for one rank; in epoch mode stop after `batches_per_epoch(...)` steps.

    Loader processes start from a fresh interpreter, not a fork: a Ray Train worker runs
    many threads, and a fork can copy a lock one of them holds, leaving the loader process
    hung before its first batch and the step waiting on it forever (seen in the sweep test).
    """
    samples = training_samples(
        shards,
        config,
        rank=rank,
        world_size=world_size,
        resampled=resampled,
        epoch=epoch,
        stream=stream,
    )
    pipeline = samples.compose(wds.batched(batch_size, collation_fn=collate, partial=False))
    return wds.WebLoader(
        pipeline,
        batch_size=None,
        num_workers=num_workers,
        multiprocessing_context=LOADER_START if num_workers else None,
    )
