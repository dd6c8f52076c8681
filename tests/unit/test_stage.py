"""The stage contract: keys, manifests, atomic writes, and `Stage.run` with its MLflow run."""

import json

import pytest

from segclip.config import ConfigError, load_config
from segclip.manifest import (
    DataRef,
    Manifest,
    ShardRef,
    code_revision,
    json_digest,
    load_result,
    package_versions,
    read_result,
    stage_dir,
    stage_key,
    write_manifest,
)
from segclip.stage import Stage, StageContext, StageOutput, can_succeed_on_retry
from segclip.storage import StorageError, atomic_write, location
from segclip.tracking import RUN_ID_FILE, tracking_client


def test_key_depends_on_settings_and_input_digests_only():
    settings = {"method": "felzenszwalb", "scale": 224}
    upstream = [DataRef(url="/a", digest="d1")]
    key = stage_key(settings, upstream)
    assert len(key) == 16
    moved = [DataRef(url="s3://bucket/a", digest="d1")]  # the same data elsewhere
    assert stage_key({"scale": 224, "method": "felzenszwalb"}, moved) == key
    assert stage_key({**settings, "scale": 100}, upstream) != key
    assert stage_key(settings, [DataRef(url="/a", digest="d2")]) != key
    assert json_digest({"b": 1, "a": 2}) == json_digest({"a": 2, "b": 1})


def test_manifest_round_trip_and_downstream_ref(tmp_path):
    out = location(stage_dir(tmp_path, "superpixels", "abc123"))
    assert read_result(out) is None
    with pytest.raises(FileNotFoundError, match="run that stage first"):
        load_result(out)
    manifest = Manifest(
        stage="superpixels",
        key="abc123",
        config={"scale": 224},
        counts={"samples": 10},
        failures={"undecodable image": 1},
        files={"model": "final/model.safetensors"},
        versions=package_versions(),
        code_revision=code_revision(),
    )
    written = write_manifest(out, manifest)
    read = load_result(out)
    assert read.manifest == manifest and read.ref == written.ref and read.ref.url == str(out)
    assert read.file("model") == out / "final" / "model.safetensors"
    with pytest.raises(KeyError, match=r"has no 'results' file \(it has \['model'\]\)"):
        read.file("results")
    assert "torch" in manifest.versions and "segclip" in manifest.versions
    assert [p.name for p in out.iterdir()] == ["manifest.json"]
    write_manifest(out, manifest.model_copy(update={"counts": {"samples": 11}}))
    assert load_result(out).ref.digest != written.ref.digest


def test_corrupt_manifest_names_the_file_and_the_fix(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"stage": "ingest"}))
    with pytest.raises(
        ValueError, match=r"(?s)manifest.json is not a valid stage manifest .* delete it"
    ):
        read_result(tmp_path)


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def _toy_stage(calls: list, fail: bool = False) -> Stage:
    def body(context: StageContext[int]) -> StageOutput:
        calls.append(sorted(p.name for p in context.output_dir.iterdir()))
        if fail:
            raise RuntimeError("the body broke")
        (context.output_dir / "part-1.tar").write_text("x")
        return StageOutput(
            counts={"samples": context.prepared},
            shards=[
                ShardRef(path="part-1.tar", samples=3),
                ShardRef(path="/data/m.tar", samples=2),
            ],
        )

    return Stage[int](
        name="toy",
        settings=lambda config: {"seed": config.train.seed},
        sources=lambda config: [],
        prepare=lambda config, inputs: 3,
        body=body,
    )


def test_run_skips_finished_resumes_unfinished_forces_and_tracks(tmp_path):
    calls = []
    stage, config = _toy_stage(calls), load_config("tiny", [f"runtime.workdir={tmp_path}"])
    first = stage.run(config)
    assert not first.skipped and calls == [[RUN_ID_FILE]]
    assert first.output_dir == tmp_path / "toy" / stage_key({"seed": 0}, [])
    assert first.shard_urls == [str(first.output_dir / "part-1.tar"), "/data/m.tar"]
    assert first.manifest.counts == {"samples": 3} and first.manifest.timings["total"] >= 0
    run = tracking_client(config).get_run((first.output_dir / RUN_ID_FILE).read_text())
    assert run.info.status == "FINISHED" and run.data.metrics["count/samples"] == 3
    assert run.data.tags["segclip.stage"] == "toy"

    again = stage.run(config)
    assert again.skipped and again.manifest == first.manifest and len(calls) == 1

    # An interrupted run (no manifest) hands its folder back to the body as it was.
    (first.output_dir / "manifest.json").unlink()
    stage.run(config)
    assert calls[-1] == ["mlflow_run_id", "part-1.tar"]
    stage.run(config, force=True)
    assert calls[-1] == [RUN_ID_FILE]


def test_a_failing_body_marks_its_run_failed_and_writes_no_manifest(tmp_path):
    config = load_config("tiny", [f"runtime.workdir={tmp_path}"])
    stage = _toy_stage([], fail=True)
    with pytest.raises(RuntimeError, match="the body broke"):
        stage.run(config)
    folder = stage.output_dir(config, [])
    assert read_result(folder) is None
    run = tracking_client(config).get_run((folder / RUN_ID_FILE).read_text())
    assert run.info.status == "FAILED"


def test_stage_folders_are_absolute_for_a_relative_workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert stage_dir("work", "ingest", "k") == tmp_path / "work" / "ingest" / "k"
    result = _toy_stage([]).run(load_config("tiny", ["runtime.workdir=work"]))
    assert result.shard_urls[0] == str(
        tmp_path / "work" / "toy" / result.output_dir.name / "part-1.tar"
    )


def test_inputs_follow_the_declaration():
    config, ref = load_config("tiny"), DataRef(url="/a", digest="d")
    source = _toy_stage([])
    assert source.resolve_inputs(config, []) == []
    with pytest.raises(ValueError, match="the toy stage is a source"):
        source.resolve_inputs(config, [ref])
    reader = Stage[None](
        name="train",
        settings=lambda config: {},
        reads="superpixels",
        prepare=lambda config, inputs: None,
        body=lambda context: StageOutput(),
    )
    assert reader.resolve_inputs(config, [ref]) == [ref]
    with pytest.raises(ValueError, match="the train stage reads one superpixels output, got 2"):
        reader.resolve_inputs(config, [ref, ref])
    with pytest.raises(TypeError, match="exactly one of `reads` and `sources`"):
        Stage[None](
            name="x",
            settings=lambda config: {},
            prepare=lambda config, inputs: None,
            body=lambda context: StageOutput(),
        )


@pytest.mark.parametrize(
    ("error", "retry"),
    [
        (ConfigError("bad setting"), False),
        (FileNotFoundError("no dataset"), False),
        (ValueError("corrupt manifest"), False),
        (KeyError("model"), False),
        (ConnectionError("server down"), True),
        (StorageError("bucket unreachable"), True),
        (TimeoutError("slow"), True),
        (RuntimeError("worker crashed"), True),
    ],
)
def test_only_errors_a_retry_can_fix_are_retried(error, retry):
    assert can_succeed_on_retry(error) is retry
