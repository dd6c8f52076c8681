"""The evaluate stage on the demo benchmark and a VOC-layout folder, with a real MLflow store."""

import csv
import shutil

import numpy as np
import pytest
import torch

from pipelines import evaluate
from segclip.config import load_config
from segclip.eval.datasets import get_benchmark, read_samples
from segclip.eval.metrics import ConfusionMatrix
from segclip.model import build_model, save_checkpoint
from segclip.tracking import RUN_ID_FILE, tracking_client


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_config):
    torch.manual_seed(0)
    return save_checkpoint(
        build_model(tiny_config.model), tmp_path_factory.mktemp("m") / "m.safetensors"
    )


def configure(tmp_path, *overrides):
    return load_config(
        "tiny",
        [
            f"runtime.workdir={tmp_path}",
            "demo.benchmark_images=6",
            "demo.image_size=64",
            "eval.overlays=2",
            *overrides,
        ],
    )


def test_demo_benchmark_results_are_written_and_tracked(tmp_path, checkpoint, capsys):
    config = configure(tmp_path, "eval.benchmarks=[demo, voc20]", f"eval.data_root={tmp_path}/data")
    # voc20 reads the same VOC layout as the demo benchmark: point it at a copy of the demo's.
    demo_folder = get_benchmark("demo").locate(config)
    shutil.copytree(demo_folder, tmp_path / "data/VOCdevkit/VOC2012")
    result = evaluate.run(config, [evaluate.checkpoint_ref(checkpoint)])
    results = evaluate.read_results(result)
    assert set(results) == {"demo", "voc20"} and results["demo"]["images"] == 6
    for name in results:
        matrix = ConfusionMatrix(1)
        matrix.matrix = np.loadtxt(
            result.output_dir / name / "confusion.csv", delimiter=",", dtype=np.int64
        )
        assert results[name]["miou"] == pytest.approx(matrix.mean_iou())
        with open(result.output_dir / name / "per_class_iou.csv") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == matrix.matrix.shape[0] == {"demo": 9, "voc20": 20}[name]
        assert len(list((result.output_dir / name / "overlays").glob("*.png"))) == 2
    printed = capsys.readouterr().out
    assert "protocol segclip v1" in printed and "| demo | 6 |" in printed
    client = tracking_client(config)
    run = client.get_run((result.output_dir / RUN_ID_FILE).read_text())
    assert run.data.metrics["miou/demo"] == pytest.approx(results["demo"]["miou"])
    assert (
        run.data.params["protocol.name"] == "segclip" and run.data.params["protocol.version"] == "1"
    )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"demo", "voc20", "results.json", "protocol.json", "manifest.json"} <= artifacts
    assert evaluate.run(config, [evaluate.checkpoint_ref(checkpoint)]).skipped


def test_a_missing_dataset_fails_before_any_model_work(tmp_path, checkpoint):
    config = configure(
        tmp_path, "eval.benchmarks=[demo, context]", f"eval.data_root={tmp_path}/none"
    )
    with pytest.raises(
        FileNotFoundError,
        match=r"benchmark 'context': expected its dataset folder at .*none/VOCdevkit/VOC2010",
    ):
        evaluate.run(config, [evaluate.checkpoint_ref(checkpoint)])
    assert not (tmp_path / "evaluate").exists()
    with pytest.raises(Exception, match=r"unknown benchmark 'vocc'"):
        evaluate.run(
            configure(tmp_path, "eval.benchmarks=[vocc]"), [evaluate.checkpoint_ref(checkpoint)]
        )


def test_ray_data_actors_give_the_same_confusion_as_the_local_loop(tmp_path, checkpoint):
    import ray

    from pipelines.ray_runtime import connect

    connect(None)
    address = ray.get_runtime_context().gcs_address
    ref = evaluate.checkpoint_ref(checkpoint)
    local_config = configure(tmp_path / "local", "eval.benchmarks=[demo]")
    local = evaluate.run(local_config, [ref])
    spread = evaluate.run(
        configure(
            tmp_path / "ray",
            "eval.benchmarks=[demo]",
            f"runtime.ray_address={address}",
            "runtime.eval_actors=2",
        ),
        [ref],
    )

    def read(result):
        return np.loadtxt(result.output_dir / "demo/confusion.csv", delimiter=",")

    spec = get_benchmark("demo")
    labelled = sum((s.label != 255).sum() for s in read_samples(spec, spec.locate(local_config)))
    assert read(spread).sum() == labelled  # every labelled pixel of every image, once
    # Same pixels per ground-truth class; predictions may differ only where float rounding
    # (one torch thread per actor vs two here) flips a near-tie of a random model.
    np.testing.assert_array_equal(read(spread).sum(1), read(local).sum(1))
    assert np.abs(read(spread) - read(local)).sum() < 0.01 * labelled
    spread_miou = evaluate.read_results(spread)["demo"]["miou"]
    assert spread_miou == pytest.approx(evaluate.read_results(local)["demo"]["miou"], abs=0.01)
    assert len(list((spread.output_dir / "demo/overlays").glob("*.png"))) == 2
