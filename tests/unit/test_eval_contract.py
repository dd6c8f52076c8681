"""Evaluation and prediction against hand computations: confusion-matrix orientation (in memory
and in confusion.csv), the background threshold of `predict`, the learned-scale affinity on the
scores path, and the CLIP normalisation constants."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from segclip.data.transforms import normalize_images
from segclip.eval.metrics import ConfusionMatrix
from segclip.eval.predict import predict_images
from segclip.eval.protocol import PROTOCOLS
from segclip.eval.scoring import BenchmarkResult
from segclip.eval.segment import Segmenter, center_class_affinity
from segclip.model import VisionMode, save_checkpoint

# --- 12. confusion matrix: rows ground truth, columns prediction ----------------------------

TARGET = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
PREDICTION = np.array([[0, 1, 1, 2], [2, 0, 0, 2]])
# (truth, prediction) pairs: (0,0) (0,1) (1,1) (1,2) (2,2) (2,0) (1,2); 255 ignored.
HAND_MATRIX = np.array(
    [
        [1, 1, 0],  # truth 0: once right, once called 1
        [0, 1, 2],  # truth 1: once right, twice called 2
        [1, 0, 1],  # truth 2: once called 0, once right
    ]
)


def test_confusion_matrix_rows_are_ground_truth_and_columns_predictions():
    matrix = ConfusionMatrix(3)
    matrix.update(PREDICTION, TARGET)
    np.testing.assert_array_equal(matrix.matrix, HAND_MATRIX)
    # IoU of class 1: intersection 1, union = truth 3 + predicted 2 - 1 = 4.
    np.testing.assert_allclose(matrix.iou(), [1 / 3, 1 / 4, 1 / 4])


def test_confusion_csv_is_written_ground_truth_by_prediction(tmp_path):
    matrix = ConfusionMatrix(3)
    matrix.update(PREDICTION, TARGET)
    folder = BenchmarkResult("demo", 1, matrix).write(tmp_path, ("a", "b", "c"))
    written = np.loadtxt(folder / "confusion.csv", delimiter=",", dtype=np.int64)
    np.testing.assert_array_equal(written, HAND_MATRIX)
    rows = (folder / "per_class_iou.csv").read_text().splitlines()
    assert rows == ["class,iou", "a,0.333333", "b,0.250000", "c,0.250000"]


# --- 13. predict applies the background threshold -------------------------------------------

CLASSES = ["red circle", "blue square", "sky", "grass"]


def test_predict_labels_background_below_min_of_threshold_and_best_score(tiny_model, tmp_path):
    checkpoint = save_checkpoint(tiny_model, tmp_path / "model.safetensors")
    rgb = np.random.default_rng(0).integers(0, 255, (48, 48, 3), np.uint8)  # one window
    image = tmp_path / "scene.png"  # lossless: predict reads back these exact pixels
    Image.fromarray(rgb).save(image)

    segmenter = Segmenter(tiny_model, CLASSES, PROTOCOLS["segclip"], None)
    best, label = (t.numpy() for t in segmenter.scores(rgb).max(dim=0))

    def predicted(threshold):
        out = tmp_path / f"out_{threshold}"
        ((label_png, _),) = predict_images(
            checkpoint, CLASSES, [image], out, background_threshold=threshold
        )
        return np.asarray(Image.open(label_png))

    # No threshold: class k is label k, no shift for a background label.
    np.testing.assert_array_equal(predicted(None), label)

    # A threshold between two neighbouring best scores near the median: tau = threshold.
    values = np.unique(best)
    middle = len(values) // 2
    threshold = float(values[middle - 1] + values[middle]) / 2
    expected = np.where(best < threshold, 0, label + 1)
    assert 0.2 < (expected == 0).mean() < 0.8  # both background and classes appear
    np.testing.assert_array_equal(predicted(threshold), expected)

    # Above every score: tau = the image's best score, so only its best pixels keep a class.
    above = predicted(2.0)
    clearly_below = best < best.max() - 1e-6
    top = best == best.max()
    assert clearly_below.mean() > 0.5 and top.any()
    assert (above[clearly_below] == 0).all()
    np.testing.assert_array_equal(above[top], label[top] + 1)


# --- 14. learned-scale protocol: the model's logit scale on the scores path ------------------


def _hand_window_scores(model, rgb, text, top_k, scale):
    """One 224 x 224 window (no resize): each pixel takes the affinity row of its argmax center."""
    crop = normalize_images(rgb[None])
    with torch.no_grad():
        encoding = model.encode_image(crop, VisionMode.INFER)
    affinity = center_class_affinity(
        encoding.center_embeddings, encoding.embedding, text, top_k=top_k, scale=scale
    )[0]  # (G, K)
    groups = affinity.shape[0]
    soft = encoding.soft_assign.reshape(1, groups, *encoding.grid)
    centers = F.interpolate(soft, rgb.shape[:2], mode="bilinear", align_corners=False)[0]
    return affinity.T[:, centers.argmax(dim=0)]  # (K, H, W)


def test_learned_scale_protocol_scores_with_the_models_logit_scale(tiny_model):
    with torch.no_grad():
        tiny_model.clip.logit_scale.fill_(math.log(7.0))
    classes = [*CLASSES, "tree", "road", "car"]  # more classes than the prior keeps (5)
    protocol = PROTOCOLS["segclip_learned_scale"]
    segmenter = Segmenter(tiny_model, classes, protocol, None)
    rgb = np.random.default_rng(4).integers(0, 255, (224, 224, 3), np.uint8)
    scores = segmenter.scores(rgb)

    learned = _hand_window_scores(tiny_model, rgb, segmenter.text, protocol.prior_top_k, 7.0)
    fixed = _hand_window_scores(tiny_model, rgb, segmenter.text, protocol.prior_top_k, 100.0)
    assert (learned - fixed).abs().max() > 0.05  # the scale matters for this model
    torch.testing.assert_close(scores, learned, rtol=1e-4, atol=1e-5)


# --- 15. CLIP normalisation -----------------------------------------------------------------


def test_normalize_images_uses_the_openai_clip_mean_and_std():
    mean = (0.48145466, 0.4578275, 0.40821073)
    std = (0.26862954, 0.26130258, 0.27577711)
    values = (10, 128, 250)
    image = np.empty((1, 3, 5, 3), np.uint8)
    image[...] = values
    out = normalize_images(image)
    assert out.shape == (1, 3, 3, 5) and out.dtype == torch.float32
    for c in range(3):
        expected = (values[c] / 255 - mean[c]) / std[c]
        torch.testing.assert_close(out[0, c], torch.full((3, 5), expected), rtol=0, atol=1e-6)
    assert (image == values).all()  # normalised in a copy, the input left as it was
    with pytest.raises(TypeError, match="uint8 RGB, not float32"):
        normalize_images(image.astype(np.float32))
