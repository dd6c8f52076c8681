"""The evaluate stage on the demo benchmark and a VOC-layout folder, with a real MLflow store."""

import csv
import shutil

import numpy as np
import pytest
import torch

from pipelines import evaluate
from segclip.config import load_config
from segclip.eval.datasets import get_benchmark
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


def test_demo_benchmark_results_are_written_and_tracked(tmp_path, checkpoint):
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
    assert "| demo | 6 |" in evaluate.results_table(results)
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
