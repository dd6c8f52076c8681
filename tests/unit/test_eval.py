"""Zero-shot evaluation: metric, sliding windows, class affinity, background rule, readers."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from segclip.data.voc import IGNORE_INDEX, voc_palette
from segclip.eval.datasets import BENCHMARKS, read_samples, sample_ids
from segclip.eval.metrics import ConfusionMatrix
from segclip.eval.protocol import PROTOCOLS, EvalProtocol
from segclip.eval.segment import (
    Segmenter,
    apply_background,
    center_class_affinity,
    window_starts,
)


def test_miou_matches_a_direct_computation_with_ignored_pixels():
    rng = np.random.default_rng(0)
    classes, matrix = 5, ConfusionMatrix(5)
    pairs = []
    for shape in [(20, 30), (7, 11), (16, 16)]:
        truth = rng.integers(0, classes - 1, shape)  # class 4 never in the ground truth
        truth[rng.random(shape) < 0.2] = IGNORE_INDEX
        prediction = rng.integers(0, classes, shape)
        matrix.update(prediction, truth)
        pairs.append((prediction, truth))
    ious = []
    for c in range(classes):
        inter = sum((((p == c) & (t == c)) & (t != 255)).sum() for p, t in pairs)
        union = sum((((p == c) | (t == c)) & (t != 255)).sum() for p, t in pairs)
        ious.append(inter / union if union else np.nan)
    np.testing.assert_allclose(matrix.iou(), ious)
    assert matrix.mean_iou() == pytest.approx(np.nanmean(ious))
    correct = sum(((p == t) & (t != 255)).sum() for p, t in pairs)
    assert matrix.pixel_accuracy() == pytest.approx(
        correct / sum((t != 255).sum() for _, t in pairs)
    )
    absent = ConfusionMatrix(3)
    absent.update(np.array([[0, 1]]), np.array([[0, 1]]))
    assert np.isnan(absent.iou()[2]) and absent.mean_iou() == 1.0  # class 2 absent everywhere


@pytest.mark.parametrize(
    "length, window, stride, starts",
    [
        (500, 224, 224, [0, 224, 276]),
        (301, 224, 100, [0, 77]),
        (224, 224, 224, [0]),
        (100, 224, 224, [0]),
        (449, 224, 112, [0, 112, 224, 225]),
    ],
)
def test_window_offsets_shift_the_last_window_back_inside(length, window, stride, starts):
    assert window_starts(length, window, stride) == starts


class CopyWindows(Segmenter):
    """Window 'scores' that copy the window's pixels (or its index), to check the tiling."""

    mode = "pixels"

    def _window_scores(self, crops):
        if self.mode == "pixels":
            return crops[:, :1].expand(-1, len(self.text), -1, -1)
        self.calls = getattr(self, "calls", 0) + 1
        return torch.full((len(crops), len(self.text), *crops.shape[-2:]), float(self.calls))


def test_sliding_windows_cover_every_pixel_once_per_window_and_average_overlaps(tiny_model):
    protocol = EvalProtocol(
        "test", 1, short_side=37, window=16, stride=10, templates=("{}",), prior_top_k=5
    )
    segmenter = CopyWindows(tiny_model, ["a", "b"], protocol, None, window_batch=4)
    image = np.random.default_rng(1).integers(0, 255, (37, 53, 3), dtype=np.uint8)  # odd sizes
    from segclip.data.transforms import normalize_images

    expected = normalize_images(image[None])[0, 0]
    torch.testing.assert_close(segmenter.scores(image)[0], expected, atol=1e-5, rtol=0)
    # Window index as the score, one window per batch: rows 10-15 lie in two windows.
    segmenter.mode, segmenter.window_batch = "index", 1
    segmenter.protocol = dataclasses.replace(protocol, short_side=16)
    scores = segmenter.scores(np.zeros((16, 26, 3), np.uint8)).numpy()[0]  # starts (0,) x (0, 10)
    assert scores[0, 0] == 1 and scores[0, -1] == 2 and scores[0, 12] == pytest.approx(1.5)


def test_affinity_is_prior_restricted_softmax_product():
    text = torch.eye(3)
    centers = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.02, 0.01]]])
    image = torch.tensor([[0.0, 1.0, 0.5]])  # prior keeps classes 1 and 2 at top_k=2
    affinity = center_class_affinity(centers, image, text, top_k=2, scale=100.0)
    logits = 100 * torch.nn.functional.normalize(centers, dim=-1)
    p1 = logits.softmax(-1)
    p2 = torch.cat([torch.zeros(1, 2, 1), logits[..., 1:].softmax(-1)], dim=-1)
    torch.testing.assert_close(affinity, p1 * p2)
    assert (affinity[..., 0] == 0).all()  # outside the prior's top-k


def test_learned_scale_protocol_scales_the_affinity_by_the_models_logit_scale(tiny_model):
    with torch.no_grad():
        tiny_model.clip.logit_scale.fill_(np.log(7.0))
    learned = Segmenter(tiny_model, ["a", "b"], PROTOCOLS["segclip_learned_scale"], 0.5)
    fixed = Segmenter(tiny_model, ["a", "b"], PROTOCOLS["segclip"], 0.5)
    assert learned.affinity_scale == pytest.approx(7.0) and fixed.affinity_scale == 100.0


def test_background_rule_uses_min_of_threshold_and_best_score():
    scores = torch.tensor([[[0.9, 0.2, 0.3]], [[0.1, 0.5, 0.85]]])  # K=2, 1x3 image
    assert apply_background(scores, 0.8).tolist() == [[1, 0, 2]]
    assert apply_background(scores, 0.95).tolist() == [[1, 0, 0]]  # tau = max score 0.9
    weak = scores * 0.1  # nothing passes 0.8, but the best pixel still keeps its class
    assert apply_background(weak, 0.8).tolist() == [[1, 0, 0]]


def test_segmenter_labels_any_image_size(tiny_model):
    segmenter = Segmenter(tiny_model, ["red circle", "blue square"], PROTOCOLS["segclip"], 0.5)
    label = segmenter.predict(np.random.default_rng(2).integers(0, 255, (75, 131, 3), np.uint8))
    assert label.shape == (75, 131) and set(np.unique(label)) <= {0, 1, 2}


def write_png(path, array, palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array.astype(np.uint8), mode="P" if palette else "L")
    if palette:
        image.putpalette(voc_palette())
    image.save(path)


def write_jpg(path, shape):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", shape[::-1], "gray").save(path)


def test_readers_convert_each_layout_to_evaluation_ids(tmp_path):
    raw = np.array([[0, 1, 255], [15, 20, 0]])
    voc = tmp_path / "VOCdevkit/VOC2012"
    write_jpg(voc / "JPEGImages/a.jpg", (2, 3))
    write_png(voc / "SegmentationClass/a.png", raw, palette=True)
    (voc / "ImageSets/Segmentation").mkdir(parents=True)
    (voc / "ImageSets/Segmentation/val.txt").write_text("a\n")
    (sample,) = read_samples(BENCHMARKS["voc"], voc)
    assert sample.label.tolist() == raw.tolist() and sample.image.shape == (2, 3, 3)
    (sample,) = read_samples(BENCHMARKS["voc20"], voc)
    assert sample.label.tolist() == [[255, 0, 255], [14, 19, 255]]

    coco = tmp_path / "coco_stuff164k"
    write_jpg(coco / "images/val2017/000000000139.jpg", (2, 3))
    stuff = np.array([[0, 11, 12], [91, 181, 255]])  # person, unused id, bicycle... stuff, other
    write_png(coco / "annotations/val2017/000000000139.png", stuff)
    assert sample_ids(BENCHMARKS["coco_object"], coco) == ["000000000139"]
    (obj,) = read_samples(BENCHMARKS["coco_object"], coco)
    assert obj.label.tolist() == [[1, 0, 12], [0, 0, 0]]  # raw 12 is the 12th used thing id
    (st,) = read_samples(BENCHMARKS["coco_stuff"], coco)
    assert st.label.tolist() == [[0, 255, 11], [80, 170, 255]]
    from segclip.cli import main

    assert main(["convert-coco-object", str(coco)]) == 0
    exported = np.asarray(Image.open(coco / "annotations/val2017/000000000139_object.png"))
    assert exported.tolist() == obj.label.tolist()

    city = tmp_path / "cityscapes"
    write_jpg(city / "leftImg8bit/val/bonn/bonn_000001_leftImg8bit.png", (2, 2))
    write_png(
        city / "gtFine/val/bonn/bonn_000001_gtFine_labelIds.png", np.array([[7, 33], [0, 26]])
    )
    (sample,) = read_samples(BENCHMARKS["cityscapes"], city)
    assert sample.name == "bonn/bonn_000001" and sample.label.tolist() == [[0, 18], [255, 13]]

    ade = tmp_path / "ADEChallengeData2016"
    write_jpg(ade / "images/validation/ADE_val_1.jpg", (1, 3))
    write_png(ade / "annotations/validation/ADE_val_1.png", np.array([[0, 1, 150]]))
    (sample,) = read_samples(BENCHMARKS["ade20k"], ade)
    assert sample.label.tolist() == [[255, 0, 149]]


def test_missing_data_names_the_path_and_how_to_get_it(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"benchmark 'voc': expected its dataset folder at .*VOC2012; to get the data: download VOCtrainval",
    ):
        sample_ids(BENCHMARKS["voc"], tmp_path / "VOC2012")
    (tmp_path / "ctx").mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"expected the split list at .*SegmentationContext/val.txt"
    ):
        sample_ids(BENCHMARKS["context"], tmp_path / "ctx")
    (tmp_path / "coco/images/val2017").mkdir(parents=True)
    write_jpg(tmp_path / "coco/images/val2017/1.jpg", (2, 2))
    with pytest.raises(
        FileNotFoundError, match=r"expected its label map at .*annotations/val2017/1.png"
    ):
        sample_ids(BENCHMARKS["coco_object"], tmp_path / "coco")


def test_random_center_baseline_gives_each_center_one_class_or_background():
    from types import SimpleNamespace

    from segclip.eval.baselines import random_center_labeller

    encoding = SimpleNamespace(center_embeddings=torch.zeros(50, 8, 4))  # all it reads
    text = torch.zeros(3, 4)  # three classes
    scores = random_center_labeller(seed=0, background=True)(encoding, text)
    assert scores.shape == (50, 8, 3)
    per_center = scores.sum(-1)
    assert set(per_center.unique().tolist()) == {0.0, 1.0}  # one class, or none (background)
    assert ((scores == 0) | (scores == 1)).all()
    # Uniform over 3 classes + background: each choice about a quarter of the 400 centers.
    counts = [int((per_center == 0).sum()), *scores.sum((0, 1)).int().tolist()]
    assert all(60 < c < 140 for c in counts), counts
    again = random_center_labeller(seed=0, background=True)(encoding, text)
    assert torch.equal(scores, again)  # seeded
    without = random_center_labeller(seed=0, background=False)(encoding, text)
    assert (without.sum(-1) == 1).all()  # no background choice where there is no background


def test_results_table_puts_methods_side_by_side_per_benchmark_and_protocol():
    from pipelines.evaluate import results_table

    def row(method, protocol, kind, miou):
        return {
            "method": method, "protocol": protocol, "benchmark": "demo", "kind": kind,
            "images": 10, "miou": miou, "pixel_accuracy": 0.75,
        }  # fmt: skip

    table = results_table(
        [
            row("segclip", "segclip", "model", 0.5),
            row("all_background", "segclip", "baseline", 0.08),
            row("maskclip", "segclip", "training_free", 0.1),
            row("naclip", "sclip336", "training_free", 0.2),
        ]
    )
    assert table.splitlines()[2:] == [
        "| demo | segclip | segclip | 10 | 50.0 | 75.0 |",
        "| demo | segclip | maskclip | 10 | 10.0 | 75.0 |",
        "| demo | segclip | baseline: all_background | 10 | 8.0 | 75.0 |",
        "| demo | sclip336 | naclip | 10 | 20.0 | 75.0 |",
    ]
