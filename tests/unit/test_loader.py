"""The webdataset training loader on superpixel shards written by the stage's shard function."""

import io
import shutil
import tarfile
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from segclip.config import load_config
from segclip.data.demo_data import demo_scene
from segclip.data.loader import (
    ShardSamples,
    batches_per_epoch,
    shards_for_rank,
    training_loader,
    training_samples,
)
from segclip.data.shards import superpixel_shard

SHARD_SIZES = (3, 5, 2, 4, 6)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_config):
    folder = tmp_path_factory.mktemp("spx")
    paths, index = [], 0
    for shard, size in enumerate(SHARD_SIZES):
        source = folder / f"in-{shard}.tar"
        with wds.TarWriter(str(source)) as sink:
            for _ in range(size):
                scene = demo_scene(9, index, 96 + 8 * (index % 3))  # not the model's input size
                buffer = io.BytesIO()
                Image.fromarray(scene.image).save(buffer, format="JPEG")
                sink.write(
                    {"__key__": f"k{index:03d}", "jpg": buffer.getvalue(), "txt": scene.caption}
                )
                index += 1
        superpixel_shard(str(source), folder / f"{shard:05d}.tar", tiny_config.data)
        paths.append(str(folder / f"{shard:05d}.tar"))
    return paths


def keys_read(shards, config, rank, world_size, num_workers):
    pipeline = training_samples(shards, config, rank=rank, world_size=world_size, resampled=False)
    loader = wds.WebLoader(
        pipeline.compose(wds.map(lambda s: s["__key__"])), batch_size=None, num_workers=num_workers
    )
    return list(loader)


def test_ranks_and_workers_split_shards_without_overlap_or_loss(shards):
    config = load_config("tiny", ["data.shuffle_buffer=4"])
    every = [f"k{i:03d}" for i in range(sum(SHARD_SIZES))]
    for world_size, num_workers in [(1, 0), (2, 2), (3, 1)]:
        read = Counter()
        for rank in range(world_size):
            read.update(keys_read(shards, config, rank, world_size, num_workers))
        assert sorted(read) == every and set(read.values()) == {1}, (world_size, num_workers)
    assert shards_for_rank(shards, 1, 2) == [shards[1], shards[3]]
    with pytest.raises(ValueError, match="5 shards cannot feed 6 training workers; use at most 5"):
        shards_for_rank(shards, 0, 6)


def test_batches_carry_model_inputs_of_the_right_shapes(shards, tiny_config):
    loader = training_loader(shards, tiny_config, batch_size=4, num_workers=0, resampled=False)
    batches = list(loader)
    assert len(batches) == sum(SHARD_SIZES) // 4  # one rank, one worker: partial batch dropped
    batch = batches[0]
    assert batch.images.shape == (4, 3, 128, 128) and batch.images.dtype == torch.float32
    assert -2.0 < batch.images.mean() < 2.0  # CLIP-normalised, not 0..255
    assert batch.tokens.shape == (4, 32) and batch.tokens.dtype == torch.long
    assert (batch.tokens[:, 0] == batch.tokens[0, 0]).all()  # start-of-text token first
    assert batch.superpixels.shape == (4, 64) and batch.superpixels.min() >= 0


def test_batches_per_epoch_is_what_every_rank_delivers(shards, tiny_config):
    # world 2, 2 workers, batch 2: rank 0 holds shards (3, 2, 6) -> workers (3 + 6, 2) -> 4 + 1
    # batches; rank 1 holds (5, 4) -> workers (5, 4) -> 2 + 2. Every rank can do 4 steps.
    delivered = [
        len(
            list(
                training_loader(
                    shards,
                    tiny_config,
                    batch_size=2,
                    rank=rank,
                    world_size=2,
                    num_workers=2,
                    resampled=False,
                )
            )
        )
        for rank in range(2)
    ]
    assert delivered == [5, 4]
    assert batches_per_epoch(SHARD_SIZES, 2, 2, 2) == min(delivered) == 4


def test_resampled_mode_streams_past_the_data_and_ranks_differ(shards):
    small_buffer = load_config("tiny", ["data.shuffle_buffer=2"])

    def first_keys(rank):
        samples = training_samples(shards, small_buffer, rank=rank, world_size=2, resampled=True)
        return [s["__key__"] for s in islice(iter(samples), 40)]

    rank0, rank1 = first_keys(0), first_keys(1)
    assert len(rank0) == 40 > sum(SHARD_SIZES[0::2])  # endless: more samples than rank 0 holds
    assert {int(k[1:]) for k in rank0}.isdisjoint({int(k[1:]) for k in rank1})
    assert first_keys(0) == rank0  # seeded


def seeded(seed):
    return load_config("tiny", [f"train.seed={seed}", "data.shuffle_buffer=4"])


def crops_read(shards, config):
    """(key, cropped image) of one epoch of one rank, in the order the stream gives them."""
    return [(s["__key__"], s["image"]) for s in training_samples(shards, config, resampled=False)]


def test_a_seed_gives_one_sample_order_and_crops_another_seed_others(shards):
    # Each stream starts where torch's global RNG was left by the one before: only the
    # seed may decide the stream.
    first, again = crops_read(shards, seeded(0)), crops_read(shards, seeded(0))
    assert [k for k, _ in again] == [k for k, _ in first]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(first, again, strict=True))

    other = crops_read(shards, seeded(1))
    assert [k for k, _ in other] != [k for k, _ in first]
    crop_of = dict(first)
    assert not any(np.array_equal(image, crop_of[key]) for key, image in other)


def test_a_start_stream_is_its_own_and_stream_0_is_the_plain_one(shards):
    def read(stream):
        samples = training_samples(shards, seeded(0), resampled=False, stream=stream)
        return [(s["__key__"], s["image"]) for s in samples]

    plain, first = crops_read(shards, seeded(0)), read(1)
    assert [k for k, _ in read(0)] == [k for k, _ in plain]
    assert [k for k, _ in read(1)] == [k for k, _ in first] != [k for k, _ in plain]
    crop_of = dict(plain)
    assert not any(np.array_equal(image, crop_of[key]) for key, image in first)


def same_batches(a: list, b: list) -> bool:
    return all(
        torch.equal(x.images, y.images)
        and torch.equal(x.tokens, y.tokens)
        and torch.equal(x.superpixels, y.superpixels)
        for x, y in zip(a, b, strict=True)
    )


def test_loader_workers_give_a_seed_the_same_batches_twice_another_seed_others(shards):
    def batches(seed):
        return list(
            training_loader(shards, seeded(seed), batch_size=2, num_workers=2, resampled=False)
        )

    assert keys_read(shards, seeded(0), 0, 1, 2) == keys_read(shards, seeded(0), 0, 1, 2)
    # loader processes start fresh: a fork of a Ray Train worker's threads can hang them
    [torch_loader] = training_loader(shards, seeded(0), batch_size=2, num_workers=2).pipeline
    assert torch_loader.multiprocessing_context.get_start_method() == "spawn"
    first = batches(0)
    assert same_batches(batches(0), first)
    assert not any(torch.equal(x.images, y.images) for x, y in zip(batches(1), first, strict=True))


def test_loading_in_each_rank_gives_the_batches_of_one_loader_process(shards):
    """The demo loads in each rank (runtime.loader_workers 0) with the batches, and so the
    model, of one loader process per rank."""

    def batches(workers):
        loader = training_loader(
            shards, seeded(0), batch_size=2, num_workers=workers, resampled=False
        )
        return list(loader)

    inline = batches(0)
    assert len(inline) > 1 and same_batches(inline, batches(1))


def test_kept_samples_give_the_batches_of_streamed_ones(shards):
    def batches(keep):
        config = load_config(
            "tiny", ["data.shuffle_buffer=4", f"runtime.loader_keep_samples={keep}"]
        )
        return list(islice(training_loader(shards, config, batch_size=4, num_workers=0), 15))

    streamed = batches(0)  # 60 samples: each of the 20 drawn about three times
    assert same_batches(batches(100), streamed) and same_batches(batches(6), streamed)


def test_shard_samples_keeps_whole_shards_up_to_about_its_bound(shards, tmp_path):
    copies = [shutil.copy(shard, tmp_path) for shard in shards[:3]]  # 3, 5 and 2 samples
    read = ShardSamples(keep=6)  # 3 kept, then 3 + 5 = 8 kept: the third is past the bound
    first = [s["__key__"] for s in read({"url": url} for url in copies)]
    for copy in copies:
        Path(copy).unlink()
    assert [s["__key__"] for s in read({"url": url} for url in copies[:2])] == first[:8]
    with pytest.raises(FileNotFoundError):
        list(read([{"url": copies[2]}]))


def test_superpixel_shards_hold_their_samples_in_key_order(tmp_path, tiny_config):
    """img2dataset writes samples as downloads finish; the stage fixes one order, and the
    same input gives the same bytes."""
    source = tmp_path / "in.tar"
    order = ["00000002", "00000000", "00000003", "00000001"]
    with wds.TarWriter(str(source)) as sink:
        for index, key in enumerate(order):
            buffer = io.BytesIO()
            Image.fromarray(demo_scene(3, index, 64).image).save(buffer, format="PNG")
            sink.write({"__key__": key, "png": buffer.getvalue(), "txt": f"caption {key}"})
    report = superpixel_shard(str(source), tmp_path / "out.tar", tiny_config.data)
    written = list(wds.WebDataset(str(tmp_path / "out.tar"), shardshuffle=False))
    assert report.samples == 4
    superpixel_shard(str(source), tmp_path / "again.tar", tiny_config.data)
    assert (tmp_path / "again.tar").read_bytes() == (tmp_path / "out.tar").read_bytes()
    with tarfile.open(tmp_path / "out.tar") as tar:
        assert not any(member.pax_headers for member in tar.getmembers())
    assert [s["__key__"] for s in written] == sorted(order)
    assert [s["txt"].decode() for s in written] == [f"caption {k}" for k in sorted(order)]
    assert all({"png", "superpixels.png", "superpixels.cls"} <= set(s) for s in written)


def test_superpixel_shards_leave_out_unusable_samples_with_their_reason(tmp_path, tiny_config):
    """Shards damaged after ingest (or written by other tools) lose only the bad samples."""
    source = tmp_path / "in.tar"
    buffer = io.BytesIO()
    Image.fromarray(demo_scene(3, 0, 64).image).save(buffer, format="JPEG")
    whole = buffer.getvalue()
    with wds.TarWriter(str(source)) as sink:
        sink.write({"__key__": "good", "jpg": whole, "txt": "kept"})
        sink.write({"__key__": "cut", "jpg": whole[: len(whole) // 2], "txt": "cut"})
        sink.write({"__key__": "html", "jpg": b"<html></html>", "txt": "html"})
        sink.write({"__key__": "bare", "txt": "no image"})
    report = superpixel_shard(str(source), tmp_path / "out.tar", tiny_config.data)
    assert report.samples == 1
    assert sorted((f.key, f.reason) for f in report.failed) == [
        ("bare", "missing_image"),
        ("cut", "truncated_image"),
        ("html", "not_an_image"),
    ]
