"""benchmarks/demo_shards.py, which rebuilds the demo's shards where neither Ray nor
img2dataset is (a lent GPU machine), against the ingest and superpixel stages' own."""

import json
import subprocess
import sys
from pathlib import Path

from pipelines import ingest, superpixels
from segclip.config import load_config
from segclip.data.shards import samples_in_key_order
from segclip.manifest import load_result

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "demo_shards.py"
# 40 scenes in shards of 16: keys of two position digits, a short last shard
SMALL = [
    "demo.train_images=40",
    "ingest.samples_per_shard=16",
    "runtime.ingest_processes=1",
    "demo.image_size=96",
    "ingest.image_size=96",
    "demo.benchmark_images=4",
]


def rebuild(workdir: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), f"runtime.workdir={workdir}", *SMALL],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split("\n")[0].split()[1]  # "superpixels FOLDER (...)"


def test_rebuilt_shards_equal_the_stages_and_a_rerun_keeps_them(tmp_path):
    config = load_config("demo", [f"runtime.workdir={tmp_path / 'stages'}", *SMALL])
    staged = superpixels.run(config, [ingest.run(config).ref])
    folder = rebuild(tmp_path / "rebuilt")
    rebuilt = load_result(folder)
    counts = [shard.samples for shard in rebuilt.manifest.shards]
    assert counts == [shard.samples for shard in staged.manifest.shards] == [16, 16, 8]
    for ours, theirs in zip(rebuilt.shard_urls, staged.shard_urls, strict=True):
        mine, stage = list(samples_in_key_order(ours)), list(samples_in_key_order(theirs))
        assert [s["__key__"] for s in mine] == [s["__key__"] for s in stage]
        for a, b in zip(mine, stage, strict=True):
            assert a.keys() == b.keys()
            assert all(a[name] == b[name] for name in b if name not in ("json", "__key__"))
            record = json.loads(b["json"])
            assert json.loads(a["json"]) == {k: v for k, v in record.items() if k != "url"}
    manifest = Path(folder) / "manifest.json"
    written = manifest.read_bytes()
    assert rebuild(tmp_path / "rebuilt") == folder and manifest.read_bytes() == written
