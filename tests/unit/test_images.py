"""The image rule against hand computations: what is displayed, what is stored, what is refused."""

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from segclip.data.images import (
    REJECTIONS,
    ImageRejected,
    SizePolicy,
    StoreRule,
    decode_rgb,
    store_image,
)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def stored_array(data: bytes, rule: StoreRule) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(store_image(data, rule).data)))


def test_sixteen_bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 257, 30000, 65535]], np.uint16)
    data = cv2.imencode(".png", values)[1].tobytes()
    assert Image.open(io.BytesIO(data)).convert("L").getpixel((2, 0)) == 255  # Pillow clips
    assert decode_rgb(data)[0, :, 0].tolist() == [0, 1, round(30000 / 257), 255]


def test_transparency_is_composited_on_white():
    rgba = np.array([[[255, 0, 0, 255], [255, 0, 0, 128], [0, 0, 255, 0]]], np.uint8)
    shown = decode_rgb(encoded(Image.fromarray(rgba, "RGBA"), "PNG"))
    half = round(128 / 255 * 255 + (1 - 128 / 255) * 255), round((1 - 128 / 255) * 255)
    assert shown[0, 0].tolist() == [255, 0, 0]
    assert abs(shown[0, 1, 0] - half[0]) <= 1 and abs(shown[0, 1, 1] - half[1]) <= 1
    assert shown[0, 2].tolist() == [255, 255, 255]


def test_animation_shows_its_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert decode_rgb(data)[4, 4].tolist() == [255, 0, 0]


@pytest.mark.parametrize("orientation,corner", [(1, (0, 0)), (3, (1, 1)), (6, (1, 0)), (8, (0, 1))])
def test_exif_orientation_is_applied_before_resizing(orientation, corner):
    """A red top-left quadrant on a 96x64 image; where it is shown, and the shown size."""
    array = np.zeros((64, 96, 3), np.uint8)
    array[:32, :48] = (255, 0, 0)
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = orientation
    result = store_image(encoded(image, "JPEG", exif=exif, quality=95), StoreRule(image_size=32))
    swapped = orientation in (6, 8)
    assert result.original_size == ((64, 96) if swapped else (96, 64))
    assert result.size == ((32, 48) if swapped else (48, 32))
    shown = np.asarray(Image.open(io.BytesIO(result.data)))
    row = 4 if corner[1] == 0 else shown.shape[0] - 5
    column = 4 if corner[0] == 0 else shown.shape[1] - 5
    assert shown[row, column, 0] > 200 > shown[row, column, 1]


@pytest.mark.parametrize(
    "mode,size",
    [("keep_ratio", (60, 40)), ("center_crop", (40, 40)), ("border", (40, 40)), ("no", (150, 100))],
)
def test_each_resize_mode_gives_its_stored_size(mode, size):
    data = encoded(Image.new("RGB", (150, 100), "green"), "PNG")
    result = store_image(data, StoreRule(image_size=40, resize_mode=mode))
    assert result.size == size and result.original_size == (150, 100)
    if mode == "border":  # padded on white above and below the 40x27 image
        shown = stored_array(data, StoreRule(image_size=40, resize_mode=mode))
        assert shown[0, 20].tolist() == [255, 255, 255] and shown[20, 20, 1] > 100


def test_a_large_jpeg_decoded_at_a_reduced_scale_still_covers_the_target():
    data = encoded(Image.new("RGB", (2000, 1500), (10, 120, 200)), "JPEG", quality=90)
    result = store_image(data, StoreRule(image_size=224))
    assert result.size == (299, 224) and result.original_size == (2000, 1500)
    assert (
        np.abs(stored_array(data, StoreRule(image_size=224))[100, 100] - (10, 120, 200)).max() < 6
    )


@pytest.mark.parametrize(
    "size,reason",
    [
        ((4, 40), "image_too_small"),
        ((400, 30), "extreme_aspect_ratio"),
        ((300, 300), "image_too_large"),
    ],
)
def test_the_size_policy_refuses_from_the_header(size, reason):
    policy = SizePolicy(min_side=8, max_pixels=80_000, max_aspect_ratio=10)
    with pytest.raises(ImageRejected) as refused:
        store_image(encoded(Image.new("RGB", size), "PNG"), StoreRule(image_size=16, policy=policy))
    assert refused.value.reason == reason


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty_body"),
        (b"<!doctype html><html><body>moved</body></html>", "not_an_image"),
        (b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>', "not_an_image"),
        (encoded(Image.new("RGB", (64, 64), "red"), "PNG")[:-40], "truncated_image"),
    ],
)
def test_files_that_are_no_image_get_a_stable_reason(data, reason):
    with pytest.raises(ImageRejected) as refused:
        decode_rgb(data)
    assert refused.value.reason == reason and reason in REJECTIONS
