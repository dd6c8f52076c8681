"""The compiled Felzenszwalb segmentation against scikit-image's and against hand computations."""

import numpy as np
import pytest
from skimage import segmentation

from segclip.data.felzenszwalb import edge_costs, felzenszwalb
from segclip.data.scenes import render_scene


def reference(image: np.ndarray, **parameters) -> np.ndarray:
    return segmentation.felzenszwalb(image, channel_axis=-1, **parameters)


@pytest.mark.parametrize(
    ("size", "parameters"),
    [
        (160, {"scale": 128, "sigma": 0.9, "min_size": 64}),  # the demo's
        (96, {"scale": 100, "sigma": 0.5, "min_size": 20}),
        (64, {"scale": 1, "sigma": 0.0, "min_size": 1}),  # no smoothing: many equal costs
    ],
)
def test_scenes_get_scikit_images_labels(size: int, parameters: dict) -> None:
    for seed in range(12):
        image = render_scene(np.random.default_rng(seed), size).image
        assert np.array_equal(felzenszwalb(image, **parameters), reference(image, **parameters))


@pytest.mark.parametrize(
    "shape", [(97, 131, 3), (33, 20, 3), (1, 40, 3), (40, 1, 3), (2, 30, 3), (1, 1, 3), (30, 25)]
)
@pytest.mark.parametrize(
    "parameters",
    [{"scale": 50, "sigma": 0.5, "min_size": 20}, {"scale": 300, "sigma": 0, "min_size": 1}],
)
def test_noise_thin_and_grey_images_get_scikit_images_labels(
    shape: tuple[int, ...], parameters: dict
) -> None:
    rng = np.random.default_rng(sum(shape))
    for image in (rng.integers(0, 256, shape, dtype=np.uint8), rng.random(shape)):
        labels = felzenszwalb(image, **parameters)
        assert np.array_equal(labels, reference(image, **parameters))
        if parameters["min_size"] == 1 and labels.size > 1:
            assert labels.max() >= 3  # unsmoothed noise splits: the edge layout is exercised


def test_two_flat_halves_are_two_segments_numbered_in_raster_order() -> None:
    image = np.zeros((4, 6, 3), np.uint8)
    image[:, :3] = 200  # the left half bright: its first pixel comes first
    # the edge between the halves costs sqrt(3) * 200 / 255 = 1.36, more than a half's
    # threshold k / |C| = (1 / 255) / 12
    labels = felzenszwalb(image, scale=1, sigma=0, min_size=1)
    assert labels.tolist() == [[0, 0, 0, 1, 1, 1]] * 4
    # k = 10000 / 255 gives a threshold of 3.27: the halves merge
    assert (felzenszwalb(image, scale=10_000, sigma=0, min_size=1) == 0).all()


def test_segments_under_min_size_join_a_neighbour() -> None:
    image = np.zeros((4, 6, 3), np.uint8)
    image[2, 4] = 200  # one bright pixel: a segment of its own
    alone = felzenszwalb(image, scale=1, sigma=0, min_size=1)
    assert alone.max() == 1 and alone[2, 4] == 1 and (np.delete(alone.ravel(), 16) == 0).all()
    assert (felzenszwalb(image, scale=1, sigma=0, min_size=2) == 0).all()


def test_edge_costs_are_rgb_distances_right_down_then_diagonals() -> None:
    image = np.arange(2 * 3 * 3, dtype=np.float64).reshape(2, 3, 3) ** 1.5
    costs = edge_costs(image)

    def distance(a: tuple[int, int], b: tuple[int, int]) -> float:
        return float(np.sqrt(((image[a] - image[b]) ** 2).sum()))

    right = [distance((y, x + 1), (y, x)) for y in range(2) for x in range(2)]
    down = [distance((1, x), (0, x)) for x in range(3)]
    down_right = [distance((1, x + 1), (0, x)) for x in range(2)]
    up_right = [distance((1, x), (0, x + 1)) for x in range(2)]
    assert np.array_equal(costs, right + down + down_right + up_right)  # bit for bit
