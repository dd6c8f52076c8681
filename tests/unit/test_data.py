import numpy as np
import pytest
import torch
from skimage.segmentation import felzenszwalb

from segclip.config import DataConfig
from segclip.data.scenes import CAPTION_FRAMES, CATEGORIES, COLOURS, render_scene
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


def test_captions_use_every_frame_including_the_zero_shot_prompts():
    def frame_of(caption: str) -> str:  # the most specific frame that fits
        fits = [f for f in CAPTION_FRAMES if caption.startswith(f.split("{}")[0])]
        fits = [f for f in fits if caption.endswith(f.split("{}")[1])]
        return max(fits, key=len)

    captions = [render_scene(np.random.default_rng(seed), 32).caption for seed in range(200)]
    assert {frame_of(c) for c in captions} == set(CAPTION_FRAMES)
    # the benchmark's prompt "a photo of a {}." reads like a caption of one object
    assert any(c.startswith("a photo of a ") and " and " not in c for c in captions)


def test_captions_name_the_colour_in_about_half_the_mentions():
    words = " ".join(render_scene(np.random.default_rng(s), 32).caption for s in range(300)).split()
    shapes = [i for i, w in enumerate(words) if w.strip(".,") in CATEGORIES]
    coloured = sum(words[i - 1] in COLOURS for i in shapes)
    assert len(shapes) > 400 and 0.4 < coloured / len(shapes) < 0.6


def test_paired_crop_keeps_image_and_labels_aligned():
    from PIL import Image

    from segclip.data.augment import paired_random_resized_crop

    # A 4x4 checkerboard of 40 px blocks: block k has label k and a colour made from k.
    labels = np.kron(np.arange(16, dtype=np.int32).reshape(4, 4), np.ones((40, 40), dtype=np.int32))
    palette = np.stack(
        [np.arange(16) * 15, 255 - np.arange(16) * 15, (np.arange(16) * 97) % 256], 1
    )
    image = Image.fromarray(palette[labels].astype(np.uint8))
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        crop, crop_labels = paired_random_resized_crop(
            image, labels, 64, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3), generator=generator
        )
        pixels = np.asarray(crop).astype(int)
        assert crop.size == (64, 64) and crop_labels.shape == (64, 64)
        lab = crop_labels.numpy()
        # Away from block borders (where bicubic blends colours) colour and label agree.
        inner = np.ones_like(lab, dtype=bool)
        for dy in (-2, -1, 0, 1, 2):
            for dx in (-2, -1, 0, 1, 2):
                inner[2:-2, 2:-2] &= lab[2:-2, 2:-2] == lab[2 + dy : 62 + dy, 2 + dx : 62 + dx]
        inner[:2], inner[-2:], inner[:, :2], inner[:, -2:] = False, False, False, False
        assert inner.sum() > 500
        assert np.abs(pixels[inner] - palette[lab[inner]]).max() <= 3


def test_paired_crop_boxes_come_from_the_generator_alone():
    """The boxes of a generator seed are pinned (a change needs a new SAMPLE_STREAM_VERSION),
    and the caller's global RNG is left where it was."""
    from PIL import Image

    from segclip.data.augment import paired_random_resized_crop

    labels = np.arange(50 * 60, dtype=np.int32).reshape(50, 60)  # a pixel's label is its index
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(11)
    before = torch.get_rng_state()
    corners = []
    for _ in range(3):
        _, crop_labels = paired_random_resized_crop(
            Image.new("RGB", (60, 50)),
            labels,
            8,
            scale=(0.3, 1.0),
            ratio=(3 / 4, 4 / 3),
            generator=generator,
        )
        corners.append((int(crop_labels[0, 0]), int(crop_labels[-1, -1])))
    assert corners == [(673, 2629), (847, 2675), (250, 2808)]
    assert torch.equal(torch.get_rng_state(), before)


def test_paired_crop_rejects_a_label_map_of_another_size():
    from PIL import Image

    from segclip.data.augment import paired_random_resized_crop

    with pytest.raises(
        ValueError, match=r"label map \(10, 10\) does not match the image \(20, 20\)"
    ):
        paired_random_resized_crop(
            Image.new("RGB", (20, 20)),
            np.zeros((10, 10)),
            8,
            scale=(0.5, 1),
            ratio=(1, 1),
            generator=torch.Generator(),
        )


def test_label_maps_round_trip_losslessly_through_16_bit_png():
    from segclip.data.shards import decode_label_map, encode_label_map

    labels = np.arange(70 * 90, dtype=np.int32).reshape(70, 90) * 10  # ids up to 62990
    restored = decode_label_map(encode_label_map(labels))
    assert restored.dtype == np.int32 and np.array_equal(restored, labels)
    with pytest.raises(ValueError, match=r"must lie in \[0, 65536\)"):
        encode_label_map(np.array([[0, 65536]]))
