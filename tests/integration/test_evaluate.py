"""The evaluate stage on the demo benchmark and a VOC-layout folder, with a real MLflow store."""

import csv
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import evaluate
from segclip.config import ConfigError, load_config
from segclip.eval.datasets import get_benchmark, read_samples
from segclip.eval.metrics import ConfusionMatrix
from segclip.manifest import file_ref
from segclip.model import build_model, save_checkpoint
from segclip.tracking import RUN_ID_FILE, tracking_client
from tests.integration.tiny_run import SEGCLIP


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


def test_every_method_protocol_and_benchmark_is_written_and_tracked(tmp_path, checkpoint):
    config = configure(
        tmp_path,
        "eval.benchmarks=[demo, voc20]",
        f"eval.data_root={tmp_path}/data",
        "eval.baselines=[all_background, random_centers]",
        "eval.methods=[segclip, maskclip]",
        "eval.protocols=[segclip, sclip336_pamr]",
    )
    # voc20 reads the same VOC layout as the demo benchmark: point it at a copy of the demo's.
    demo_folder = get_benchmark("demo").locate(config)
    shutil.copytree(demo_folder, tmp_path / "data/VOCdevkit/VOC2012")
    result = evaluate.run(config, [file_ref(checkpoint)])
    rows = {(r["method"], r["protocol"], r["benchmark"]): r for r in evaluate.read_results(result)}
    measured = {
        (method, protocol, benchmark)
        for method in ("segclip", "maskclip")
        for protocol in ("segclip", "sclip336_pamr")
        for benchmark in ("demo", "voc20")
    }
    baselines = {
        (name, protocol, benchmark)
        for protocol in ("segclip", "sclip336_pamr")
        for name, benchmark in [
            ("all_background", "demo"),  # undefined on voc20, which has no background
            ("random_centers", "demo"),
            ("random_centers", "voc20"),
        ]
    }
    assert set(rows) == measured | baselines
    assert all(rows[cell]["images"] == 6 for cell in rows)
    for cell in measured:
        folder = result.output_dir.joinpath(*cell)
        matrix = ConfusionMatrix(1)
        matrix.matrix = np.loadtxt(folder / "confusion.csv", delimiter=",", dtype=np.int64)
        assert rows[cell]["miou"] == pytest.approx(matrix.mean_iou())
        with open(folder / "per_class_iou.csv") as handle:
            per_class = list(csv.DictReader(handle))
        assert len(per_class) == matrix.matrix.shape[0] == {"demo": 9, "voc20": 20}[cell[2]]
        with Image.open(folder / "per_class_iou.png") as chart:  # a bar per class
            assert chart.format == "PNG" and chart.height > 25 * len(per_class)
        assert len(list((folder / "overlays").glob("*.png"))) == 2
    assert {rows[cell]["kind"] for cell in measured if cell[0] == "maskclip"} == {"training_free"}
    # All background, by hand: background IoU = background share of the labelled pixels, 0 for
    # every class present.
    labels = np.stack([s.label for s in read_samples(get_benchmark("demo"), demo_folder)])
    labelled, background = (labels != 255).sum(), (labels == 0).sum()
    present = len(set(np.unique(labels)) - {255})
    all_background = rows["all_background", "segclip", "demo"]
    assert all_background["pixel_accuracy"] == pytest.approx(background / labelled)
    assert all_background["miou"] == pytest.approx(background / labelled / present)
    printed = evaluate.report(result)
    assert "protocols segclip v1, sclip336_pamr v1" in printed
    for line in (
        "| demo | segclip | segclip | 6 |",
        "| demo | segclip | maskclip | 6 |",
        "| demo | sclip336_pamr | baseline: random_centers | 6 |",
    ):
        assert line in printed
    client = tracking_client(config)
    run = client.get_run((result.output_dir / RUN_ID_FILE).read_text())
    for (method, protocol, benchmark), row in rows.items():
        assert run.data.metrics[f"miou/{method}/{protocol}/{benchmark}"] == pytest.approx(
            row["miou"]
        )
    params = run.data.params
    assert params["protocol.sclip336_pamr.version"] == "1"
    assert params["protocol.sclip336_pamr.short_side"] == "336"
    assert "iterations" in params["protocol.sclip336_pamr.pamr"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"segclip", "maskclip", "results.json", "protocols.json", "manifest.json"} <= artifacts
    row = {a.path for a in client.list_artifacts(run.info.run_id, "segclip/segclip/voc20")}
    assert {
        f"segclip/segclip/voc20/{name}" for name in ("per_class_iou.csv", "per_class_iou.png")
    } <= row
    assert evaluate.run(config, [file_ref(checkpoint)]).skipped


def test_a_given_checkpoint_or_profile_is_evaluated_without_training(tmp_path, checkpoint):
    """eval.checkpoint replaces the training output; a model name (an open_clip architecture
    and weights, or a profile) gives an untrained model, on whose CLIP tower the
    training-free methods run alone."""
    given = configure(tmp_path, "eval.benchmarks=[demo]", f"eval.checkpoint={checkpoint}")
    result = evaluate.run(given)
    assert result.manifest.inputs == [file_ref(checkpoint)]
    assert (
        evaluate.run(
            configure(tmp_path, "eval.benchmarks=[demo]"), [file_ref(checkpoint)]
        ).output_dir
        == result.output_dir
    )
    floor = evaluate.run(
        configure(
            tmp_path,
            "eval.benchmarks=[demo]",
            "eval.checkpoint=open_clip:segclip-tiny",
            "eval.methods=[clearclip]",
        )
    )
    assert [(r["method"], r["kind"]) for r in evaluate.read_results(floor)] == [
        ("clearclip", "training_free")
    ]
    with pytest.raises(
        FileNotFoundError, match=r"eval.checkpoint .*nowhere.bin is neither a checkpoint"
    ):
        evaluate.run(configure(tmp_path, f"eval.checkpoint={tmp_path}/nowhere.bin"))


def test_segclip_evaluate_checkpoint_needs_no_ingest_or_training(tmp_path, checkpoint):
    command = [
        *SEGCLIP, "evaluate", "--profile", "tiny", "--checkpoint", str(checkpoint),
        f"runtime.workdir={tmp_path}", "demo.benchmark_images=6", "demo.image_size=64",
        "eval.benchmarks=[demo]", "eval.methods=[segclip, naclip]",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| demo | segclip | naclip | 6 |" in done.stdout
    assert (tmp_path / "evaluate").is_dir()
    assert not {"ingest", "superpixels", "train"} & {p.name for p in tmp_path.iterdir()}


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
        return np.loadtxt(result.output_dir / "segclip/segclip/demo/confusion.csv", delimiter=",")

    spec = get_benchmark("demo")
    labelled = sum((s.label != 255).sum() for s in read_samples(spec, spec.locate(local_config)))
    assert read(spread).sum() == labelled  # every labelled pixel of every image, once
    np.testing.assert_array_equal(read(spread), read(local))
    assert len(list((spread.output_dir / "segclip/segclip/demo/overlays").glob("*.png"))) == 2
