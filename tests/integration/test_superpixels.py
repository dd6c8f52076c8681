"""The superpixel stage as a Ray Data job on a real local Ray (and joined by address)."""

import io
import subprocess
import sys

import numpy as np
import pytest
import ray
import webdataset as wds
from PIL import Image
from skimage.segmentation import felzenszwalb

from pipelines import ingest, superpixels
from pipelines.ray_runtime import connect
from segclip.config import load_config
from segclip.data.demo_data import demo_scene
from segclip.data.shards import COUNT_MEMBER, LABEL_MEMBER, decode_label_map


def jpeg_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """Three input shards of demo scenes; shard 1 holds a corrupt and a truncated image,
    which ingest leaves out."""
    folder = tmp_path_factory.mktemp("mirror")
    for shard in range(3):
        with wds.TarWriter(str(folder / f"in-{shard}.tar")) as sink:
            for index in range(4):
                scene = demo_scene(5, 4 * shard + index, 64)
                sink.write(
                    {
                        "__key__": f"{shard}{index:03d}",
                        "jpg": jpeg_bytes(scene.image),
                        "txt": scene.caption,
                        "json": {"id": 4 * shard + index},
                    }
                )
            if shard == 1:
                sink.write({"__key__": "broken", "jpg": b"\xff\xd8 not really a jpeg", "txt": "x"})
                whole = jpeg_bytes(demo_scene(5, 99, 64).image)
                sink.write({"__key__": "cut", "jpg": whole[: len(whole) // 2], "txt": "y"})
    return folder


@pytest.fixture(scope="module")
def local_ray():
    connect(None)
    yield ray.get_runtime_context().gcs_address


def configs(tmp_path, mirror, *overrides):
    return load_config(
        "tiny",
        [
            f"runtime.workdir={tmp_path}",
            "ingest.source=shards",
            f"ingest.path={mirror}",
            "data.felzenszwalb_scale=50",
            "data.felzenszwalb_min_size=20",
            *overrides,
        ],
    )


def read(path):
    return {s["__key__"]: s for s in wds.WebDataset(path, shardshuffle=False)}


def test_label_maps_equal_scikit_image_and_every_member_is_kept(tmp_path, mirror, local_ray):
    config = configs(tmp_path, mirror)
    source = ingest.run(config)
    result = superpixels.run(config, [source.ref])
    manifest = result.manifest
    assert source.manifest.failures == {"not_an_image": 1, "truncated_image": 1}
    assert manifest.counts == {"samples": 12, "shards": 3, "shards_run": 3}
    assert manifest.failures == {} and manifest.failed_samples == []
    assert [s.samples for s in manifest.shards] == [4, 4, 4]
    for before_path, after_path in zip(source.shard_urls, result.shard_urls, strict=True):
        before, after = read(before_path), read(after_path)
        assert set(after) == set(before)
        for key, sample in after.items():
            for member in ("jpg", "txt", "json"):
                assert sample[member] == before[key][member]
            image = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
            expected = felzenszwalb(image, scale=50, sigma=0.9, min_size=20)
            labels = decode_label_map(sample[LABEL_MEMBER])
            assert np.array_equal(labels, expected)
            assert int(sample[COUNT_MEMBER]) == expected.max() + 1


def test_rerun_skips_finished_shards_and_config_changes_get_a_new_folder(
    tmp_path, mirror, local_ray
):
    config = configs(tmp_path, mirror)
    upstream = [ingest.run(config).ref]
    first = superpixels.run(config, upstream)
    assert superpixels.STAGE.output_dir(config, upstream) == first.output_dir
    assert superpixels.run(config, upstream).skipped
    # Interrupted after two shards: the third shard's report and the manifest are missing.
    (first.output_dir / "manifest.json").unlink()
    (first.output_dir / "shards/00002.report.json").unlink()
    kept = [(first.output_dir / f"shards/0000{i}.tar").stat().st_mtime_ns for i in (0, 1)]
    resumed = superpixels.run(config, upstream)
    assert resumed.manifest.counts["shards_run"] == 1
    assert resumed.manifest.shards == first.manifest.shards
    assert [(first.output_dir / f"shards/0000{i}.tar").stat().st_mtime_ns for i in (0, 1)] == kept
    # Crop settings act at training time: same key. The superpixel scale does not.
    assert superpixels.run(
        configs(tmp_path, mirror, "data.crop_scale=[0.3, 1.0]"), upstream
    ).skipped
    changed = superpixels.run(configs(tmp_path, mirror, "data.felzenszwalb_scale=80"), upstream)
    assert not changed.skipped and changed.output_dir != first.output_dir


def test_runs_against_a_ray_cluster_address(tmp_path, mirror, local_ray):
    config = configs(tmp_path, mirror)
    upstream = ingest.run(config).ref
    script = (
        "import segclip, sys\n"
        "from pipelines import superpixels\n"
        "from segclip.config import load_config\n"
        "from segclip.manifest import DataRef\n"
        "config = load_config('tiny', sys.argv[2:])\n"
        "result = superpixels.run(config, [DataRef.model_validate_json(sys.argv[1])])\n"
        "import ray; print(ray.get_runtime_context().gcs_address, result.manifest.counts['samples'])\n"
    )
    overrides = [
        f"runtime.workdir={tmp_path}",
        "ingest.source=shards",
        f"ingest.path={mirror}",
        "data.felzenszwalb_scale=50",
        "data.felzenszwalb_min_size=20",
        f"runtime.ray_address={local_ray}",
    ]
    done = subprocess.run(
        [sys.executable, "-c", script, upstream.model_dump_json(), *overrides],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == [local_ray, "12"]
    assert superpixels.run(config, [upstream]).skipped  # the same stage key as in this process
