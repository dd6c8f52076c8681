import numpy as np
import pytest
import torch
from skimage.segmentation import felzenszwalb

from segclip.config import DataConfig
from segclip.data.scenes import CATEGORIES, render_scene
from segclip.data.superpixels import compute_superpixels, patch_superpixel_ids


def test_patch_ids_by_truncated_mean_and_by_majority():
    labels = torch.tensor(
        [
            [0, 0, 5, 5],
            [0, 1, 6, 6],
            [2, 2, 3, 9],
            [2, 4, 9, 3],
        ]
    )
    # patches: [0,0,0,1], [5,5,6,6], [2,2,2,4], [3,9,9,3]
    assert patch_superpixel_ids(labels, 2, "mean").tolist() == [0, 5, 2, 6]
    assert patch_superpixel_ids(labels, 2, "majority").tolist() == [0, 5, 2, 3]  # ties: smallest
    batch = torch.stack([labels, labels.T])
    assert patch_superpixel_ids(batch, 2, "majority").shape == (2, 4)
    with pytest.raises(ValueError, match="not a whole number of 3px patches"):
        patch_superpixel_ids(labels, 3, "mean")


def test_superpixels_equal_scikit_image_with_the_configured_parameters():
    scene = render_scene(np.random.default_rng(0), 96)
    config = DataConfig(felzenszwalb_scale=100, felzenszwalb_sigma=0.5, felzenszwalb_min_size=20)
    expected = felzenszwalb(scene.image, scale=100, sigma=0.5, min_size=20)
    labels = compute_superpixels(scene.image, config)
    assert labels.dtype == np.int32
    assert np.array_equal(labels, expected)


def test_scenes_are_deterministic_and_captions_name_their_objects():
    first = render_scene(np.random.default_rng(7), 64)
    again = render_scene(np.random.default_rng(7), 64)
    assert np.array_equal(first.image, again.image) and first.caption == again.caption
    present = {CATEGORIES[k - 1] for k in np.unique(first.class_map) if k}
    assert present and all(name in first.caption for name in present)
