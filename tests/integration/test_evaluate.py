"""The evaluate stage on the demo benchmark and a VOC-layout folder, with a real MLflow store."""

import csv
import shutil

import numpy as np
import pytest
import torch

from pipelines import evaluate
from segclip.config import ConfigError, load_config
from segclip.eval.datasets import get_benchmark, read_samples
from segclip.eval.metrics import ConfusionMatrix
from segclip.manifest import file_ref
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


def test_demo_benchmark_results_are_written_and_tracked(tmp_path, checkpoint):
    config = configure(
        tmp_path,
        "eval.benchmarks=[demo, voc20]",
        f"eval.data_root={tmp_path}/data",
        "eval.baselines=[all_background, random_centers]",
    )
    # voc20 reads the same VOC layout as the demo benchmark: point it at a copy of the demo's.
    demo_folder = get_benchmark("demo").locate(config)
    shutil.copytree(demo_folder, tmp_path / "data/VOCdevkit/VOC2012")
    result = evaluate.run(config, [file_ref(checkpoint)])
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
    # All background, by hand: background IoU = background share of the labelled pixels, 0 for
    # every class present; and it is undefined on voc20, which has no background.
    labels = np.stack([s.label for s in read_samples(get_benchmark("demo"), demo_folder)])
    labelled, background = (labels != 255).sum(), (labels == 0).sum()
    present = len(set(np.unique(labels)) - {255})
    baselines = results["demo"]["baselines"]
    assert baselines["all_background"]["pixel_accuracy"] == pytest.approx(background / labelled)
    assert baselines["all_background"]["miou"] == pytest.approx(background / labelled / present)
    assert set(results["voc20"]["baselines"]) == {"random_centers"}
    assert 0 <= baselines["random_centers"]["miou"] <= 1
    printed = evaluate.report(result)
    assert "protocol segclip v1" in printed and "| demo | model | 6 |" in printed
    assert "| demo | baseline: random_centers | 6 |" in printed
    client = tracking_client(config)
    run = client.get_run((result.output_dir / RUN_ID_FILE).read_text())
    assert run.data.metrics["miou/demo"] == pytest.approx(results["demo"]["miou"])
    assert run.data.metrics["baseline/all_background/miou/demo"] == pytest.approx(
        baselines["all_background"]["miou"]
    )
    assert (
        run.data.params["protocol.name"] == "segclip" and run.data.params["protocol.version"] == "1"
    )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"demo", "voc20", "results.json", "protocol.json", "manifest.json"} <= artifacts
    assert evaluate.run(config, [file_ref(checkpoint)]).skipped


def test_a_missing_dataset_fails_before_any_model_work(tmp_path, checkpoint):
    config = configure(
        tmp_path, "eval.benchmarks=[demo, context]", f"eval.data_root={tmp_path}/none"
    )
    with pytest.raises(
        FileNotFoundError,
        match=r"benchmark 'context': expected its dataset folder at .*none/VOCdevkit/VOC2010",
    ):
        evaluate.run(config, [file_ref(checkpoint)])
    assert not (tmp_path / "evaluate").exists()
    with pytest.raises(ConfigError, match=r"eval\.benchmarks\.0: Input should be 'voc'"):
        configure(tmp_path, "eval.benchmarks=[vocc]")


def test_ray_data_actors_give_the_same_confusion_as_the_local_loop(tmp_path, checkpoint):
    import ray

    from pipelines.ray_runtime import connect

    connect(None)
    address = ray.get_runtime_context().gcs_address
    ref = file_ref(checkpoint)
    local_config = configure(tmp_path / "local", "eval.benchmarks=[demo]")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each actor: same float rounding, so the same labels
    try:
        local = evaluate.run(local_config, [ref])
    finally:
        torch.set_num_threads(threads)
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
    np.testing.assert_array_equal(read(spread), read(local))
    assert len(list((spread.output_dir / "demo/overlays").glob("*.png"))) == 2
