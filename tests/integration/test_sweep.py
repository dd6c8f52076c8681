"""`segclip sweep` end to end on the tiny run: real Prefect (the CLI's temporary API), Ray and
MLflow, the CLI in a child process as a user starts it.

A seed sweep runs ingest and superpixels once and both trainings side by side; its MLflow run
holds the mean, std and count of the members' own results; a rerun does nothing new; adding a
grid axis trains only the configs that are new.
"""

import re
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipelines.registry import STAGE_NAMES
from segclip.config import load_config
from segclip.manifest import read_result
from segclip.tracking import SUMMARY_METRICS, tracking_client
from tests.integration.tiny_run import SEGCLIP, TINY_RUN

pytestmark = pytest.mark.slow

# One CPU per trainer: both trainings of a two-seed sweep fit side by side on 2 cores.
SETTINGS = [*TINY_RUN, "runtime.train_workers=1", "runtime.cpus_per_worker=1"]
LR_GRID = "train.lr_new=[1e-3,2e-3]"  # 1e-3 is the tiny profile's: those members reuse all
SEGCLIP_ROW = re.compile(r"\| demo \| segclip \| segclip \| \d+\.\d ± \d+\.\d \(2\) \|")


def segclip_sweep(workdir: Path, *overrides: str) -> str:
    """`segclip sweep --seeds 0,1` on the tiny run; its output, once it succeeded. The output
    goes to files, not pipes: a process the CLI leaves behind when it fails (its Prefect
    server) would hold a pipe open and keep the test waiting."""
    command = [*SEGCLIP, "sweep", "--profile", "tiny", "--seeds", "0,1"]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        done = subprocess.run(
            [*command, f"runtime.workdir={workdir}", *SETTINGS, *overrides],
            stdout=out,
            stderr=err,
            timeout=900,  # the first sweep took 9 minutes on 2 busy cores
        )
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    assert done.returncode == 0, stderr[-3000:]
    return stdout


def printed_table(stdout: str) -> str:
    """What the sweep prints at the end: its folder, its runs and the results table."""
    return stdout.split("\nsweep ", 1)[1].split("\nbrowse the runs", 1)[0]


def stage_outputs(workdir: Path) -> dict[str, set[str]]:
    """Each stage's output keys; every output folder must be finished (hold a manifest)."""
    outputs = {}
    for stage in STAGE_NAMES:
        folders = list((workdir / stage).iterdir()) if (workdir / stage).is_dir() else []
        assert all(read_result(folder) is not None for folder in folders), folders
        outputs[stage] = {folder.name for folder in folders}
    return outputs


def all_runs(workdir: Path) -> list:
    config = load_config("tiny", [f"runtime.workdir={workdir}"])
    client = tracking_client(config)
    experiment = client.get_experiment_by_name("segclip").experiment_id
    return client.search_runs([experiment], max_results=1000)


def children(runs: list, parent) -> list:
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def own_results(run) -> dict[str, float]:
    return {k: v for k, v in run.data.metrics.items() if k.startswith(SUMMARY_METRICS)}


def expected_aggregates(members: list, prefix: str = "") -> dict[str, float]:
    """The sweep run's metrics for these members, computed here from their own results."""
    results = [own_results(m) for m in members]
    assert set(results[0]) == set(results[1])
    expected = {}
    for name in results[0]:
        values = [r[name] for r in results]
        expected[f"{prefix}{name}/mean"] = statistics.fmean(values)
        expected[f"{prefix}{name}/std"] = statistics.stdev(values)
        expected[f"{prefix}{name}/count"] = 2.0
    return expected


@dataclass(frozen=True)
class SeedSweep:
    """The module's two-seed sweep: its workdir, its output and the MLflow runs it made (later
    tests add runs to the workdir)."""

    workdir: Path
    stdout: str
    runs: list


@pytest.fixture(scope="module")
def seed_sweep(tmp_path_factory) -> SeedSweep:
    workdir = tmp_path_factory.mktemp("sweep")
    stdout = segclip_sweep(workdir)
    return SeedSweep(workdir, stdout, all_runs(workdir))


def sweep_and_members(runs: list) -> tuple:
    [sweep] = [r for r in runs if r.data.tags["segclip.stage"] == "sweep"]
    return sweep, children(runs, sweep)


def test_a_seed_sweep_runs_the_data_stages_once_and_each_training_as_a_member(seed_sweep):
    workdir, stdout, runs = seed_sweep.workdir, seed_sweep.stdout, seed_sweep.runs
    assert {stage: len(keys) for stage, keys in stage_outputs(workdir).items()} == {
        "ingest": 1,
        "superpixels": 1,
        "train": 2,
        "evaluate": 2,
    }
    assert f"sweep {workdir}/sweeps/" in stdout and ": 2 runs over train.seed: 0, 1" in stdout
    assert SEGCLIP_ROW.search(printed_table(stdout)), stdout[-3000:]

    sweep, members = sweep_and_members(runs)
    members.sort(key=lambda r: r.data.tags["segclip.member"])
    assert [m.data.tags["segclip.member"] for m in members] == ["train.seed:0", "train.seed:1"]
    for run in [sweep, *members]:
        assert run.info.status == "FINISHED"
    first, second = ({r.data.tags["segclip.stage"]: r for r in children(runs, m)} for m in members)
    assert sorted(first) == sorted(second) == sorted(STAGE_NAMES)
    for member, stages in zip(members, (first, second), strict=True):
        assert member.data.tags["segclip.stage"] == "pipeline"
        assert member.data.tags["segclip.sweep"] == sweep.info.run_id
        assert len(children(runs, member)) == len(STAGE_NAMES)
        for stage in ("train", "evaluate"):  # each member produced its own
            assert "segclip.link" not in stages[stage].data.tags
    for stage in ("ingest", "superpixels"):  # the first member produced, the second reused
        assert "segclip.link" not in first[stage].data.tags
        link = second[stage]
        assert (
            link.info.run_name.endswith("(reused)") and link.data.tags["segclip.link"] == "reused"
        )
        assert link.data.tags["segclip.produced_by"] == first[stage].info.run_id


def test_the_sweep_run_holds_mean_std_and_count_of_the_members_results(seed_sweep):
    sweep, members = sweep_and_members(seed_sweep.runs)
    names = own_results(members[0])
    assert any(n.startswith("miou/") for n in names) and any(n.startswith("loss/") for n in names)
    assert own_results(members[0]) != own_results(members[1])  # two seeds, two results
    assert sweep.data.metrics == pytest.approx(expected_aggregates(members))


def test_the_members_trainings_ran_side_by_side(seed_sweep):
    trainings = [r for r in seed_sweep.runs if r.data.tags["segclip.stage"] == "train"]
    assert not any("segclip.link" in r.data.tags for r in trainings)
    one, other = (r.info for r in trainings)
    assert one.start_time < other.end_time and other.start_time < one.end_time


def test_a_rerun_of_the_same_sweep_does_nothing_new(seed_sweep):
    workdir = seed_sweep.workdir
    runs, outputs = len(all_runs(workdir)), stage_outputs(workdir)
    again = segclip_sweep(workdir)
    assert len(all_runs(workdir)) == runs
    assert stage_outputs(workdir) == outputs
    assert printed_table(again) == printed_table(seed_sweep.stdout)


def test_a_grid_trains_only_the_configs_that_are_new(seed_sweep):
    workdir = seed_sweep.workdir
    before, outputs = all_runs(workdir), stage_outputs(workdir)
    stdout = segclip_sweep(workdir, LR_GRID)
    after = stage_outputs(workdir)
    assert {stage: len(after[stage] - outputs[stage]) for stage in STAGE_NAMES} == {
        "ingest": 0,
        "superpixels": 0,
        "train": 2,
        "evaluate": 2,
    }
    table = printed_table(stdout)
    assert ": 4 runs over train.lr_new: 0.001, 0.002; train.seed: 0, 1" in table
    assert table.splitlines()[2].startswith("| config | benchmark | protocol | method |")
    for lr in ("0.001", "0.002"):
        assert f"| train.lr_new:{lr} | demo | segclip | segclip |" in table
    versus = table.split("train.lr_new:0.002 versus train.lr_new:0.001", 1)[1]
    assert re.search(r"\| demo \| segclip \| segclip \| [+-]\d+\.\d \| .* \| (yes|no) \|", versus)

    old = {r.info.run_id for r in before}
    runs = all_runs(workdir)
    new = [r for r in runs if r.info.run_id not in old]
    [grid] = [r for r in new if r.data.tags["segclip.stage"] == "sweep"]
    members = {r.data.tags["segclip.member"]: r for r in children(runs, grid)}
    trained = [  # the new training runs that ran (not links to earlier ones) and their members
        r.data.tags["mlflow.parentRunId"]
        for r in new
        if r.data.tags["segclip.stage"] == "train" and "segclip.link" not in r.data.tags
    ]
    assert len(trained) == 2
    assert sorted(label for label, m in members.items() if m.info.run_id in trained) == [
        "train.lr_new:0.002 train.seed:0",
        "train.lr_new:0.002 train.seed:1",
    ]
    expected = {}
    for lr in ("0.001", "0.002"):
        group = [members[f"train.lr_new:{lr} train.seed:{seed}"] for seed in (0, 1)]
        expected |= expected_aggregates(group, prefix=f"train.lr_new:{lr}/")
    assert grid.data.metrics == pytest.approx(expected)
    seeds_only, _ = sweep_and_members(seed_sweep.runs)
    reused = {f"train.lr_new:0.001/{k}": v for k, v in seeds_only.data.metrics.items()}
    assert {k: grid.data.metrics[k] for k in reused} == pytest.approx(reused)  # same members
