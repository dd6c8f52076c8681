"""The ingest stage with real img2dataset downloads from a server on 127.0.0.1."""

import io
import json
import socket

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from pipelines import ingest
from segclip.config import ConfigError, load_config
from segclip.data.serve import serve_directory

FAST = [
    "runtime.ingest_processes=1",
    "runtime.ingest_threads=4",
    "ingest.retries=0",
    "ingest.timeout=5",
    "ingest.image_size=32",
]


def config_for(tmp_path, *overrides):
    return load_config("tiny", [f"runtime.workdir={tmp_path / 'work'}", *FAST, *overrides])


def write_images(folder, count):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), np.uint8)).save(folder / f"{index}.png")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_shards(result):
    samples = []
    for path in result.shard_urls:
        samples += list(wds.WebDataset(path, shardshuffle=False).decode("pil"))
    return samples


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("site")
    write_images(folder, 5)
    (folder / "notes.txt").write_text("a text file, not an image")
    with serve_directory(folder) as base:
        yield base


def test_url_list_counts_each_failure_by_reason_and_keeps_going(tmp_path, served):
    urls = [served + f"{i}.png" for i in range(5)]
    urls += [served + "missing.png", f"http://127.0.0.1:{free_port()}/x.png", served + "notes.txt"]
    pd.DataFrame({"URL": urls, "TEXT": [f"caption {i}" for i in range(8)]}).to_parquet(
        tmp_path / "list.parquet"
    )
    config = config_for(
        tmp_path,
        "ingest.source=urls",
        f"ingest.path={tmp_path / 'list.parquet'}",
        "ingest.url_column=URL",
        "ingest.caption_column=TEXT",
        "ingest.samples_per_shard=3",
    )
    result = ingest.run(config)
    manifest = result.manifest
    assert manifest.failures == {"connection_refused": 1, "http_404": 1, "not_an_image": 1}
    assert manifest.counts == {"requested": 8, "samples": 5, "shards": 2}
    assert sum(shard.samples for shard in manifest.shards) == 5
    samples = read_shards(result)
    assert sorted(s["txt"] for s in samples) == [f"caption {i}" for i in range(5)]
    for sample in samples:
        assert min(sample["jpg"].size) == 32  # keep_ratio: short side = image_size
        assert sample["json"]["caption"] == sample["txt"]
    assert manifest.inputs[0].url == str((tmp_path / "list.parquet").resolve())
    found = ingest.STAGE.output_dir(config, ingest.STAGE.resolve_inputs(config, []))
    assert found == result.output_dir  # found again from the config alone
    assert ingest.run(config).skipped


def test_interrupted_ingest_resumes_and_keeps_finished_shards(tmp_path, served):
    lines = [f"{served}{i}.png\tpicture {i}" for i in range(5)]
    (tmp_path / "cc.tsv").write_text("\n".join(lines) + "\n")  # headerless, as CC12M comes
    config = config_for(
        tmp_path,
        "ingest.source=urls",
        f"ingest.path={tmp_path / 'cc.tsv'}",
        "ingest.columns=[url, caption]",
        "ingest.samples_per_shard=2",
    )
    first = ingest.run(config)
    shards = first.output_dir / "shards"
    assert first.manifest.counts == {"requested": 5, "samples": 5, "shards": 3}
    # Interrupted after two of three shards: the last shard and the manifest never got written.
    (first.output_dir / "manifest.json").unlink()
    for name in ("00002.tar", "00002.parquet", "00002_stats.json"):
        (shards / name).unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in shards.glob("0000[01]*")}
    resumed = ingest.run(config)
    assert not resumed.skipped and resumed.output_dir == first.output_dir
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("0000[01]*")} == kept
    assert (shards / "00002.tar").is_file()
    assert resumed.manifest.shards == first.manifest.shards
    assert sorted(s["txt"] for s in read_shards(resumed)) == [f"picture {i}" for i in range(5)]


def test_coco_folder_gives_one_sample_per_caption_of_the_chosen_splits(tmp_path):
    root = tmp_path / "coco"
    write_images(root / "train2014", 2)
    write_images(root / "val2014", 1)
    images = [
        {
            "filepath": "train2014",
            "filename": "0.png",
            "split": "train",
            "sentences": [{"raw": "a dog. "}, {"raw": "a brown dog"}],
        },
        {
            "filepath": "train2014",
            "filename": "1.png",
            "split": "test",
            "sentences": [{"raw": "held out"}],
        },
        {
            "filepath": "val2014",
            "filename": "0.png",
            "split": "restval",
            "sentences": [{"raw": "a cat"}],
        },
    ]
    (root / "dataset_coco.json").write_text(json.dumps({"images": images}))
    result = ingest.run(config_for(tmp_path, "ingest.source=coco", f"ingest.path={root}"))
    assert sorted(s["txt"] for s in read_shards(result)) == ["a brown dog", "a cat", "a dog."]
    assert result.manifest.failures == {}


def test_existing_shards_are_streamed_checked_and_stored_by_the_download_rule(tmp_path):
    folder = tmp_path / "mirror"
    folder.mkdir()
    red = Image.new("RGB", (64, 48), "red")
    turned = Image.new("RGB", (64, 48), "blue")
    turned.paste((0, 255, 0), (0, 0, 32, 48))  # left half green, stored with EXIF "turn right"
    exif = turned.getexif()
    exif[0x0112] = 6
    jpeg = io.BytesIO()
    turned.save(jpeg, "JPEG", exif=exif, quality=95)
    with wds.TarWriter(str(folder / "a-000.tar")) as sink:
        sink.write({"__key__": "s0", "jpg": red, "txt": "red"})
        sink.write({"__key__": "s1", "jpg": red})  # no caption
        sink.write({"__key__": "s2", "txt": "no image"})
    with wds.TarWriter(str(folder / "a-001.tar")) as sink:
        sink.write({"__key__": "s3", "jpg": jpeg.getvalue(), "json": {"caption": "turned"}})
    whole = (folder / "a-000.tar").read_bytes()
    (folder / "a-002.tar").write_bytes(whole[: len(whole) // 2])  # breaks off after sample s0
    (folder / "b-000.tar").write_bytes(b"not a tar file at all" * 40)  # outside the pattern

    config = config_for(tmp_path, "ingest.source=shards", f"ingest.path={folder}/a-*.tar")
    result = ingest.run(config)
    assert [s.samples for s in result.manifest.shards] == [1, 1, 1]
    assert all(url.startswith(str(result.output_dir)) for url in result.shard_urls)
    assert result.manifest.failures == {
        "missing_caption": 1,
        "missing_image": 1,
        "unreadable_shard_tail": 1,
    }
    samples = read_shards(result)
    assert sorted(s["txt"] for s in samples) == ["red", "red", "turned"]
    stored = np.asarray(next(s["jpg"] for s in samples if s["txt"] == "turned"))
    assert stored.shape == (round(32 * 64 / 48), 32, 3)  # portrait now; short side 32
    top, bottom = stored[2, 16], stored[-3, 16]  # turned right: the green half is on top
    assert top[1] > 200 > top[2] and bottom[2] > 200 > bottom[1]
    failures = pd.read_parquet(result.output_dir / "failures.parquet")
    assert sorted(failures["url"].str.rsplit("/", n=1).str[-1]) == [
        "a-000.tar#s1", "a-000.tar#s2", "a-002.tar",
    ]  # fmt: skip
    assert ingest.run(config).output_dir == result.output_dir  # finished: not run again


def test_bad_sources_fail_before_any_download_naming_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ingest.path .*nowhere.csv does not exist"):
        ingest.run(
            config_for(tmp_path, "ingest.source=urls", f"ingest.path={tmp_path}/nowhere.csv")
        )
    pd.DataFrame({"link": ["x"], "caption": ["y"]}).to_csv(tmp_path / "l.csv", index=False)
    with pytest.raises(
        ConfigError, match=r"no column 'url' \(columns: link, caption\); set ingest.url_column"
    ):
        ingest.run(config_for(tmp_path, "ingest.source=urls", f"ingest.path={tmp_path}/l.csv"))
    (tmp_path / "l.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"set ingest\.input_format"):
        ingest.run(config_for(tmp_path, "ingest.source=urls", f"ingest.path={tmp_path}/l.json"))
    with pytest.raises(
        FileNotFoundError, match=r"needs the Karpathy split file dataset_coco\.json"
    ):
        ingest.run(config_for(tmp_path, "ingest.source=coco", f"ingest.path={tmp_path}"))
    with pytest.raises(ConfigError, match=r"needs ingest\.path"):
        config_for(tmp_path, "ingest.source=urls")
    assert not (tmp_path / "work").exists()


@pytest.mark.slow
def test_demo_source_is_served_on_loopback_and_downloaded(tmp_path):
    config = config_for(tmp_path, "demo.train_images=12", "ingest.samples_per_shard=5")
    result = ingest.run(config)
    assert result.manifest.counts == {"requested": 12, "samples": 12, "shards": 3}
    assert result.manifest.failures == {}
    urls = pd.read_parquet(result.output_dir / "source/urls.parquet")["url"]
    assert urls.str.match(r"http://127\.0\.0\.1:\d+/images/\d{6}\.png").all()
    assert len({s["txt"] for s in read_shards(result)}) > 1


def test_a_ray_address_downloads_with_img2datasets_ray_distributor(tmp_path, served):
    import ray

    from pipelines.ray_runtime import connect

    connect(None)
    address = ray.get_runtime_context().gcs_address
    pd.DataFrame(
        {"url": [served + f"{i}.png" for i in range(5)], "caption": list("abcde")}
    ).to_parquet(tmp_path / "list.parquet")
    config = config_for(
        tmp_path,
        "ingest.source=urls",
        f"ingest.path={tmp_path / 'list.parquet'}",
        "ingest.samples_per_shard=2",
        f"runtime.ray_address={address}",
    )
    result = ingest.run(config)
    assert result.manifest.counts == {"requested": 5, "samples": 5, "shards": 3}
    assert sorted(s["txt"] for s in read_shards(result)) == list("abcde")
    # The distributor is how the work runs, not what it makes: same stage key as without Ray.
    local = config.runtime.model_copy(update={"ray_address": None})
    assert ingest.run(config.model_copy(update={"runtime": local})).skipped
