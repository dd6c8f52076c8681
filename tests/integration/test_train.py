"""The training stage on a real local Ray (2 gloo workers) with a real MLflow SQLite store."""

import pytest
from PIL import Image

from pipelines import ingest, superpixels, train
from segclip.config import load_config
from segclip.model import load_checkpoint
from segclip.tracking import RUN_ID_FILE, metric_histories, tracking_client
from tests.weights import same_weights

pytestmark = pytest.mark.slow

BASE = [
    "demo.train_images=96",
    "ingest.samples_per_shard=24",
    "runtime.ingest_processes=1",
    "train.global_batch_size=16",
    "runtime.train_workers=2",
    "runtime.log_every=2",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("work")


def configure(workdir, *overrides):
    return load_config("tiny", [*BASE, f"runtime.workdir={workdir}", *overrides])


@pytest.fixture(scope="module")
def labels(workdir):
    config = configure(workdir)
    return superpixels.run(config, [ingest.run(config).ref]).ref


def history(config, result, metric="loss/total"):
    client = tracking_client(config)
    run_id = (result.output_dir / RUN_ID_FILE).read_text()
    return client, run_id, client.get_metric_history(run_id, metric)


def test_a_short_run_learns_and_is_tracked_in_mlflow(workdir, labels, capfd):
    # The one Ray Train run with a loader process per rank (the tiny profile loads in each).
    config = configure(
        workdir, "train.steps=16", "runtime.checkpoint_every=8", "runtime.loader_workers=1"
    )
    result = train.run(config, [labels])
    assert result.manifest.counts == {"steps": 16, "world_size": 2, "global_batch": 16}
    model = load_checkpoint(result.file("model"))
    assert model.config == config.model
    client, run_id, losses = history(config, result)
    assert [m.step for m in losses] == list(range(2, 17, 2))
    values = [m.value for m in losses]
    assert sum(values[-2:]) < sum(values[:2])  # the loss goes down
    for term in ("contrastive", "superpixel_kl", "reconstruction"):
        assert len(client.get_metric_history(run_id, f"loss/{term}")) == 8
    run = client.get_run(run_id)
    assert (
        run.data.params["train.lr_new"] == "0.001" and run.data.params["plan.worker_batch"] == "8"
    )
    assert run.data.tags["segclip.stage_key"] == result.output_dir.name
    assert run.data.tags["segclip.input_digest.0"] == labels.digest
    assert (
        0 <= run.data.metrics["data_wait_fraction"] <= 1 and run.data.metrics["samples_per_s"] > 0
    )
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert artifacts == {"model.safetensors", "manifest.json", "loss_curves.png"}
    with Image.open(client.download_artifacts(run_id, "loss_curves.png", str(workdir))) as chart:
        assert chart.format == "PNG" and chart.height > 4 * 200  # a panel per loss term
    assert run.info.status == "FINISHED"
    assert train.run(config, [labels]).skipped
    # A local Ray has no dashboard: the cleaner's once-a-second State API warning is silenced.
    assert "Failed to query Ray Train Controller" not in "".join(capfd.readouterr())


def test_a_crashed_worker_resumes_from_the_last_checkpoint(workdir, labels):
    config = configure(
        workdir,
        "train.steps=8",
        "runtime.checkpoint_every=3",
        "runtime.inject_failure_at_step=5",
        "train.seed=1",
    )
    result = train.run(config, [labels])
    assert (result.output_dir / ".injected_failure").is_file()
    assert result.manifest.counts["steps"] == 8
    # Logged 2 and 4, crashed at 5, restarted from the step-3 checkpoint: 4 is logged again.
    assert [m.step for m in history(config, result)[2]] == [2, 4, 4, 6, 8]


def test_a_finished_run_extended_with_more_steps_continues_from_its_final_state(workdir, labels):
    short = train.run(configure(workdir, "train.steps=6", "train.seed=2"), [labels])
    longer_config = configure(workdir, "train.steps=10", "train.seed=2")
    longer = train.run(longer_config, [labels])
    assert longer.output_dir != short.output_dir
    client, run_id, losses = history(longer_config, longer)
    assert [m.step for m in losses] == [8, 10]  # steps 1-6 came from the shorter run
    assert client.get_run(run_id).data.tags["segclip.extends"] == str(short.output_dir)


def test_one_seed_trains_the_same_weights_twice_and_another_seed_others(workdir, labels, tmp_path):
    def trained(folder, seed):
        """Final weights and logged losses of a fresh run (a finished one would be reused)."""
        config = configure(folder, "train.steps=4", f"train.seed={seed}")
        result = train.run(config, [labels])
        assert not result.skipped
        client, run_id, _ = history(config, result)
        weights = load_checkpoint(result.file("model")).state_dict()
        return weights, metric_histories(client, run_id, "loss/")

    weights, losses = trained(workdir, seed=3)
    again_weights, again_losses = trained(tmp_path, seed=3)  # own stage folder, same labels
    assert same_weights(again_weights, weights)
    assert again_losses == losses and len(losses) == 4  # total and three terms, steps 2 and 4
    other_weights, _ = trained(workdir, seed=4)
    assert not same_weights(other_weights, weights)


def test_the_best_of_two_starts_goes_on_and_both_are_logged(workdir, labels, tmp_path):
    seeded = ("train.steps=6", "train.seed=6")
    plain = train.run(configure(tmp_path, *seeded), [labels])
    config = configure(workdir, *seeded, "train.start_trials=2", "train.start_trial_steps=2")
    best = train.run(config, [labels])
    client, run_id, losses = history(config, best)
    assert [m.step for m in losses] == [2, 4, 6]  # the kept start's trial steps included
    metrics = client.get_run(run_id).data.metrics
    tried = [metrics["start/0/loss"], metrics["start/1/loss"]]
    chosen = int(metrics["start/chosen"])
    assert chosen == tried.index(min(tried)) and tried[0] != tried[1]
    # Start 0 is the plain run's: where it won, the run is the plain run bit for bit.
    weights = load_checkpoint(best.file("model")).state_dict()
    assert same_weights(weights, load_checkpoint(plain.file("model")).state_dict()) == (chosen == 0)
    _, _, plain_losses = history(configure(tmp_path, *seeded), plain)
    assert ([m.value for m in losses] == [m.value for m in plain_losses]) == (chosen == 0)
