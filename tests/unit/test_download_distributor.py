"""The download stage's own process-pool distributor: img2dataset's contract (rows in, failed
rows retried), processes kept for many shards."""

import os
from pathlib import Path

from pipelines.img2dataset_job import SHARDS_PER_PROCESS, process_pool_distributor


def flaky_shard(row: tuple[int, str]) -> tuple[bool, tuple[int, str]]:
    """A shard worker: records which process ran it; shard 2 fails on its first try."""
    index, folder = row
    attempt = Path(folder) / f"{index}.{len(list(Path(folder).glob(f'{index}.*')))}"
    attempt.write_text(str(os.getpid()))
    return not (index == 2 and attempt.suffix == ".0"), row


def test_every_shard_runs_a_failed_one_again_and_one_process_serves_many(tmp_path):
    rows = [(index, str(tmp_path)) for index in range(12)]
    process_pool_distributor(1, flaky_shard, rows, None, 1)
    attempts = sorted(p.name for p in tmp_path.iterdir())
    assert attempts == sorted([f"{i}.0" for i in range(12)] + ["2.1"])
    # 13 shard runs, one process (img2dataset's own distributor starts one per 5 shards)
    assert len({p.read_text() for p in tmp_path.iterdir()}) == 1 < 13 <= SHARDS_PER_PROCESS
