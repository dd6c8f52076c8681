import json

import pytest

from segclip.io import atomic_path
from segclip.stage import (
    InputRef,
    Manifest,
    ShardRef,
    StageOutput,
    code_revision,
    json_digest,
    load_result,
    manifest_ref,
    package_versions,
    read_manifest,
    run_stage,
    stage_dir,
    stage_key,
    write_manifest,
)


def test_key_depends_on_config_and_inputs_only():
    config = {"method": "felzenszwalb", "scale": 224}
    upstream = [InputRef(path="/a", digest="d1")]
    key = stage_key(config, upstream)
    assert len(key) == 16
    assert (
        stage_key({"scale": 224, "method": "felzenszwalb"}, [InputRef(path="/b", digest="d1")])
        == key
    )
    assert stage_key({**config, "scale": 100}, upstream) != key
    assert stage_key(config, [InputRef(path="/a", digest="d2")]) != key
    assert json_digest({"b": 1, "a": 2}) == json_digest({"a": 2, "b": 1})


def test_manifest_round_trip_and_downstream_ref(tmp_path):
    out = stage_dir(tmp_path, "superpixels", "abc123")
    assert read_manifest(out) is None
    with pytest.raises(FileNotFoundError, match="run that stage first"):
        manifest_ref(out)
    manifest = Manifest(
        stage="superpixels",
        key="abc123",
        config={"scale": 224},
        counts={"samples": 10},
        failures={"undecodable image": 1},
        versions=package_versions(),
        code_revision=code_revision(),
    )
    ref = write_manifest(out, manifest)
    assert read_manifest(out) == manifest
    assert ref == manifest_ref(out) and ref.path == str(out)
    assert "torch" in manifest.versions and "segclip" in manifest.versions
    assert [p.name for p in out.iterdir()] == ["manifest.json"]
    write_manifest(out, manifest.model_copy(update={"counts": {"samples": 11}}))
    assert manifest_ref(out).digest != ref.digest


def test_corrupt_manifest_names_the_file_and_the_fix(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"stage": "ingest"}))
    with pytest.raises(
        ValueError, match=r"(?s)manifest.json is not a valid stage manifest .* delete it"
    ):
        read_manifest(tmp_path)


def test_atomic_path_leaves_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_run_stage_skips_finished_resumes_unfinished_and_forces(tmp_path):
    calls = []

    def body(output_dir):
        calls.append(sorted(p.name for p in output_dir.iterdir()))
        (output_dir / "part-1.tar").write_text("x")
        return StageOutput(
            counts={"samples": 3},
            shards=[
                ShardRef(path="part-1.tar", samples=3),
                ShardRef(path="/data/m.tar", samples=2),
            ],
        )

    config = {"scale": 1}
    first = run_stage("demo", tmp_path, config, [], body)
    assert not first.skipped and calls == [[]]
    assert first.output_dir == tmp_path / "demo" / stage_key(config, [])
    assert first.shard_paths == [str(first.output_dir / "part-1.tar"), "/data/m.tar"]
    assert first.manifest.counts == {"samples": 3} and first.manifest.timings["total"] >= 0

    again = run_stage("demo", tmp_path, config, [], body)
    assert again.skipped and again.manifest == first.manifest and len(calls) == 1
    assert load_result(first.output_dir).manifest == first.manifest

    # An interrupted run (no manifest) hands its folder back to the body as it was.
    (first.output_dir / "manifest.json").unlink()
    run_stage("demo", tmp_path, config, [], body)
    assert calls[-1] == ["part-1.tar"]
    run_stage("demo", tmp_path, config, [], body, force=True)
    assert calls[-1] == []
    with pytest.raises(FileNotFoundError, match="run that stage first"):
        load_result(tmp_path / "demo" / "missing")


def test_stage_folders_are_absolute_for_a_relative_workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert stage_dir("work", "ingest", "k") == tmp_path / "work" / "ingest" / "k"
    result = run_stage(
        "demo", "work", {}, [], lambda out: StageOutput(shards=[ShardRef(path="a.tar", samples=1)])
    )
    assert result.shard_paths == [
        str(tmp_path / "work" / "demo" / result.output_dir.name / "a.tar")
    ]


def test_a_stage_with_one_upstream_refuses_other_input_counts():
    from segclip.stage import single_input

    ref = InputRef(path="/a", digest="d")
    assert single_input([ref], "train", "superpixel output") == ref
    with pytest.raises(
        ValueError, match="the train stage reads one superpixel output, got 2 inputs"
    ):
        single_input([ref, ref], "train", "superpixel output")
