"""PAMR (segclip.eval.pamr) against a hand computation and its invariants."""

import math

import numpy as np
import pytest
import torch

from segclip.eval.pamr import PamrSettings, pamr

# A 3x4 image whose three channels differ, and a two-class score map, for dilation 1.
IMAGE = np.array(
    [
        [[0.0, 0.0, 1.0, 1.0], [0.0, 0.2, 1.0, 0.9], [0.1, 0.0, 0.8, 1.0]],  # channel 0
        [[0.5, 0.4, 0.0, 0.1], [0.5, 0.5, 0.1, 0.0], [0.3, 0.5, 0.0, 0.2]],  # channel 1
        [[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],  # channel 2
    ]
)
MASKS = np.array(
    [
        [[0.9, 0.8, 0.2, 0.1], [0.7, 0.6, 0.3, 0.0], [0.5, 0.4, 0.1, 0.2]],
        [[0.1, 0.2, 0.8, 0.9], [0.3, 0.4, 0.7, 1.0], [0.5, 0.6, 0.9, 0.8]],
    ]
)


def _by_hand(image: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """One PAMR iteration, dilation 1, written out pixel by pixel."""
    channels, height, width = image.shape
    out = np.zeros_like(masks)
    for y in range(height):
        for x in range(width):
            # The 8 neighbours of the 3x3 kernel (no centre), clamped to the image.
            neighbours = [
                (min(max(y + dy, 0), height - 1), min(max(x + dx, 0), width - 1))
                for dy in (-1, 0, 1)
                for dx in (-1, 0, 1)
                if (dy, dx) != (0, 0)
            ]
            # Per channel: the standard deviation over those neighbours (np.std divides by 8).
            sigma = [np.std([image[c, ny, nx] for ny, nx in neighbours]) for c in range(channels)]
            kappa = []
            for ny, nx in neighbours:
                total = 0.0
                for c in range(channels):
                    total += -abs(image[c, y, x] - image[c, ny, nx]) / (sigma[c] + 1e-8)
                kappa.append(total / channels)
            weights = [math.exp(k) for k in kappa]
            weights = [w / sum(weights) for w in weights]
            for k in range(masks.shape[0]):
                out[k, y, x] = sum(
                    w * masks[k, ny, nx] for w, (ny, nx) in zip(weights, neighbours, strict=True)
                )
    return out


def test_one_iteration_matches_a_hand_computation():
    image = torch.tensor(IMAGE, dtype=torch.float32)[None]
    masks = torch.tensor(MASKS, dtype=torch.float32)[None]
    got = pamr(image, masks, iterations=1, dilations=(1,))
    np.testing.assert_allclose(got[0].numpy(), _by_hand(IMAGE, MASKS), atol=1e-5)


def test_two_iterations_apply_the_same_step_twice():
    image = torch.tensor(IMAGE, dtype=torch.float32)[None]
    masks = torch.tensor(MASKS, dtype=torch.float32)[None]
    got = pamr(image, masks, iterations=2, dilations=(1,))
    np.testing.assert_allclose(got[0].numpy(), _by_hand(IMAGE, _by_hand(IMAGE, MASKS)), atol=1e-5)


def test_constant_masks_stay_constant():
    image = torch.rand(1, 3, 20, 30, generator=torch.Generator().manual_seed(0))
    masks = torch.full((1, 4, 20, 30), 0.3)
    torch.testing.assert_close(pamr(image, masks), masks)


def test_on_a_constant_image_every_neighbour_weighs_the_same():
    image = torch.full((1, 3, 3, 3), 0.7)
    masks = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)  # [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    out = pamr(image, masks, iterations=1, dilations=(1,))
    # Centre: the mean of the other eight values, (45 - 5) / 8.
    assert out[0, 0, 1, 1].item() == pytest.approx(5.0)
    # Corner (0, 0): neighbours clamped to (0,0) x3, (0,1) x2, (1,0) x2, (1,1) x1.
    assert out[0, 0, 0, 0].item() == pytest.approx((3 * 1 + 2 * 2 + 2 * 4 + 5) / 8)  # 2.5


def test_output_is_a_convex_combination():
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 24, 40, generator=generator)
    masks = torch.randn(1, 5, 24, 40, generator=generator).softmax(dim=1)
    out = pamr(image, masks, dilations=(1, 2, 4, 8))
    torch.testing.assert_close(out.sum(dim=1), torch.ones(1, 24, 40), atol=1e-5, rtol=0)
    low = masks.amin(dim=(2, 3), keepdim=True)
    high = masks.amax(dim=(2, 3), keepdim=True)
    assert bool((out >= low - 1e-6).all()) and bool((out <= high + 1e-6).all())
    assert not torch.allclose(out, masks)  # it did move


def _two_regions(image_value_right: float) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.zeros(1, 3, 8, 128)
    image[..., 64:] = image_value_right
    masks = torch.zeros(1, 1, 8, 128)
    masks[..., :64] = 1.0
    return image, masks


def test_an_image_edge_stops_scores_from_crossing_it():
    image, masks = _two_regions(1.0)
    out = pamr(image, masks)[0, 0]  # paper settings: 10 iterations, dilations up to 24
    assert out[:, 96:].max().item() < 0.05  # right region, 32+ pixels past the edge
    assert out[:, :32].min().item() > 0.95  # left region, 32+ pixels before the edge
    # Without the edge (constant image) the same mask spreads far past column 64.
    flat, _ = _two_regions(0.0)
    spread = pamr(flat, masks)[0, 0]
    assert spread[:, 72:96].mean().item() > 3 * out[:, 72:96].mean().item()
    assert spread[:, 96].min().item() > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shape_and_dtype_are_kept(dtype):
    generator = torch.Generator().manual_seed(2)
    image = torch.rand(2, 3, 10, 13, generator=generator)
    masks = torch.rand(2, 4, 10, 13, generator=generator).to(dtype)
    out = pamr(image, masks, iterations=3)
    assert out.shape == masks.shape and out.dtype == dtype and out.device == masks.device


def test_a_batch_equals_single_calls():
    generator = torch.Generator().manual_seed(3)
    image = torch.rand(2, 3, 16, 20, generator=generator)
    masks = torch.rand(2, 3, 16, 20, generator=generator)
    batched = pamr(image, masks)
    for b in range(2):
        torch.testing.assert_close(batched[b : b + 1], pamr(image[b : b + 1], masks[b : b + 1]))
    # One image shared by a batch of masks.
    shared = pamr(image[:1], masks)
    for b in range(2):
        torch.testing.assert_close(shared[b : b + 1], pamr(image[:1], masks[b : b + 1]))


def test_zero_iterations_return_the_masks_and_no_grad_is_recorded():
    image = torch.rand(1, 3, 6, 6)
    masks = torch.rand(1, 2, 6, 6, requires_grad=True)
    assert torch.equal(pamr(image, masks, iterations=0), masks.detach())
    assert not pamr(image, masks, iterations=2).requires_grad


def test_settings_hold_the_paper_values_and_unpack_into_pamr():
    settings = PamrSettings()
    assert settings.as_dict() == {"iterations": 10, "dilations": (1, 2, 4, 8, 12, 24)}
    image, masks = torch.rand(1, 3, 8, 8), torch.rand(1, 2, 8, 8)
    torch.testing.assert_close(pamr(image, masks, **settings.as_dict()), pamr(image, masks))
    with pytest.raises(AttributeError):
        settings.iterations = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [{"iterations": -1}, {"dilations": ()}, {"dilations": (0, 1)}, {"dilations": (1, 1)}],
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        PamrSettings(**kwargs)
    with pytest.raises(ValueError):
        pamr(torch.rand(1, 3, 4, 4), torch.rand(1, 2, 4, 4), **kwargs)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError):
        pamr(torch.rand(1, 3, 4, 4), torch.rand(1, 2, 4, 5))
    with pytest.raises(ValueError):
        pamr(torch.rand(3, 3, 4, 4), torch.rand(2, 2, 4, 4))
