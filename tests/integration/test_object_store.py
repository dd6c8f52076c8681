"""The tiny pipeline with its workdir on an S3-compatible store (moto, started here on 127.0.0.1):
every stage output, checkpoint and MLflow artifact lands in the bucket, nothing in the local
working directory, and a bad bucket, endpoint or credentials fail before any work."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import s3fs

from segclip.config import load_config
from segclip.manifest import load_result
from segclip.storage import StorageError, check_writable, location
from tests.integration.s3_server import CREDENTIALS, free_port, moto_server
from tests.integration.tiny_run import SEGCLIP, TINY_RUN, stage_folders

pytestmark = pytest.mark.slow

BUCKET = "segclip-test"
RUN = [*TINY_RUN, "runtime.checkpoint_every=2"]


@pytest.fixture(scope="module")
def endpoint():
    with moto_server() as url, pytest.MonkeyPatch.context() as patch:
        for name, value in CREDENTIALS.items():
            patch.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()  # no client of an earlier server
        s3fs.S3FileSystem(endpoint_url=url).mkdir(BUCKET)
        try:
            yield url
        finally:
            s3fs.S3FileSystem.clear_instance_cache()


def segclip(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SEGCLIP, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def scratch_folders() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("segclip-*")}


def test_the_pipeline_runs_with_its_workdir_on_the_store(endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)  # for this test's own reads
    cwd, cache = tmp_path / "cwd", tmp_path / "cache"
    cwd.mkdir()
    env = {**os.environ, **CREDENTIALS, "XDG_CACHE_HOME": str(cache)}
    env.pop("AWS_ENDPOINT_URL_S3")  # the runs get the endpoint from runtime.s3_endpoint_url
    workdir = f"s3://{BUCKET}/work"
    settings = [f"runtime.workdir={workdir}", f"runtime.s3_endpoint_url={endpoint}", *RUN]
    scratch_before = scratch_folders()

    first = segclip(cwd, env, "run", "--profile", "tiny", *settings)
    assert first.returncode == 0, first.stderr[-3000:]
    folders = stage_folders(first.stdout)
    assert list(folders) == ["ingest", "superpixels", "train", "evaluate"]
    assert all(folder.startswith(f"{workdir}/{stage}/") for stage, folder in folders.items())
    assert "| demo | segclip | segclip | 4 |" in first.stdout

    config = load_config("tiny", settings)
    results = {stage: load_result(folder) for stage, folder in folders.items()}
    store = s3fs.S3FileSystem(endpoint_url=endpoint)
    keys = store.find(f"{BUCKET}/work")
    assert any(k.endswith(".tar") and "/ingest/" in k for k in keys)
    assert any(k.endswith(".tar") and "/superpixels/" in k for k in keys)
    assert str(results["train"].file("model")).endswith("final/model.safetensors")
    assert results["train"].file("model").is_file()
    assert any("/train/" in k and "/ray/checkpoint_" in k and k.endswith("state.pt") for k in keys)
    (row,) = json.loads(results["evaluate"].file("results").read_text())
    assert (row["benchmark"], row["method"], row["images"]) == ("demo", "segclip", 4)
    artifacts = [k for k in keys if "/mlartifacts/" in k]
    assert any(k.endswith("model.safetensors") for k in artifacts)
    assert any(k.endswith("results.json") for k in artifacts)
    # The default MLflow store of a workdir on a store is a local file in the cache folder.
    assert list(cache.glob("segclip/mlflow/*/mlflow.db"))

    status = segclip(cwd, env, "status", "--profile", "tiny", *settings)
    lines = status.stdout.splitlines()
    assert status.returncode == 0 and len(lines) == 4, status.stderr[-2000:]
    assert all(" finished " in line for line in lines), lines

    created = {stage: r.manifest.created_at for stage, r in results.items()}
    again = segclip(cwd, env, "run", "--profile", "tiny", *settings)
    assert again.returncode == 0, again.stderr[-3000:]
    assert stage_folders(again.stdout) == folders
    assert {s: load_result(f).manifest.created_at for s, f in folders.items()} == created

    # One stage made again on the store (`segclip run --force` is test_flows'): the same key,
    # a new manifest, so the training after it has a new key and is not run yet.
    forced = segclip(cwd, env, "superpixels", "--profile", "tiny", *settings, "--force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert forced.stdout.split()[-1] == folders["superpixels"]
    assert load_result(folders["ingest"]).manifest.created_at == created["ingest"]
    assert load_result(folders["superpixels"]).manifest.created_at != created["superpixels"]
    status = segclip(cwd, env, "status", "--profile", "tiny", *settings).stdout.splitlines()
    train_line = status[2].split()
    assert train_line[:3] == ["train", "not", "run"], status
    assert train_line[3].startswith(f"{workdir}/train/") and train_line[3] != folders["train"]

    assert not list(cwd.iterdir())  # nothing in the local working directory
    assert scratch_folders() <= scratch_before  # every scratch copy was removed
    assert config.runtime.workdir == workdir


def test_a_wrong_bucket_fails_before_any_work_naming_the_url_and_the_fix(endpoint, monkeypatch):
    from pipelines import ingest

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    config = load_config("tiny", ["runtime.workdir=s3://no-such-bucket/work", *RUN])
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/work: the bucket does not"):
        ingest.run(config)


def test_an_unreachable_endpoint_fails_in_seconds(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    start = time.monotonic()
    with pytest.raises(StorageError, match=r"the endpoint does not answer: check runtime"):
        check_writable(location(f"s3://{BUCKET}/work"))
    assert time.monotonic() - start < 15


def test_missing_credentials_are_named(endpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    with pytest.raises(StorageError, match=r"no credentials were found: set AWS_ACCESS_KEY_ID"):
        check_writable(location(f"s3://{BUCKET}/work"))


def test_shards_on_the_store_are_streamed_in_and_stored_by_the_download_rule(
    endpoint, tmp_path, monkeypatch
):
    """ingest.source=shards on an s3:// pattern: every sample read from the bucket, checked
    and stored as a download would be (a 16-bit PNG scaled, not clipped to white)."""
    import cv2
    import numpy as np
    import webdataset as wds

    from pipelines import ingest

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    grey16 = cv2.imencode(".png", np.full((48, 64), 30000, np.uint16))[1].tobytes()
    store = s3fs.S3FileSystem(endpoint_url=endpoint)
    for index in range(2):
        local = tmp_path / f"train-{index:03d}.tar"
        with wds.TarWriter(str(local)) as sink:
            sink.write({"__key__": f"a{index}", "png": grey16, "txt": f"grey {index}"})
            sink.write({"__key__": f"b{index}", "jpg": b"<html>gone</html>", "txt": "html"})
        store.put_file(str(local), f"{BUCKET}/mirror/train-{index:03d}.tar")
    store.put_file(str(local), f"{BUCKET}/mirror/other.tar")  # outside the pattern

    config = load_config(
        "tiny",
        [
            f"runtime.workdir={tmp_path / 'work'}",
            f"runtime.s3_endpoint_url={endpoint}",
            "runtime.ingest_processes=1",
            "ingest.source=shards",
            f"ingest.path=s3://{BUCKET}/mirror/train-*.tar",
            "ingest.image_size=32",
        ],
    )
    result = ingest.run(config)
    assert result.manifest.counts == {"requested": 4, "samples": 2, "shards": 2}
    assert result.manifest.failures == {"not_an_image": 2}
    for index, url in enumerate(result.shard_urls):
        (sample,) = wds.WebDataset(url, shardshuffle=False).decode("pil")
        assert sample["txt"] == f"grey {index}"
        assert sample["jpg"].size == (round(64 * 32 / 48), 32)
        assert np.abs(np.asarray(sample["jpg"], int) - round(30000 / 257)).max() <= 2
        assert sample["json"]["url"] == f"s3://{BUCKET}/mirror/train-{index:03d}.tar#a{index}"
