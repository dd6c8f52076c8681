"""Images as a browser shows them, decoded the same way wherever they come from.

A downloaded file, a member of an adopted shard and a training sample all go through
`display_rgb`, so what is stored and trained on is what a person opening the URL sees:
EXIF orientation applied, the first frame of an animation, an embedded colour profile
converted to sRGB, high bit depths scaled (not clipped) to 8 bits, transparency
composited on white, every other mode converted to RGB. A file that cannot become such
an image is rejected with one stable reason a user can act on.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from segclip.config import IngestConfig

# Shard member names of images, in order of preference when a sample has several.
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
BACKGROUND = (255, 255, 255)  # what transparent pixels are composited on
ResizeMode = Literal["keep_ratio", "center_crop", "border", "no"]
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_WITH_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")
_SRGB = ImageCms.createProfile("sRGB")
_ORIENTATION = 0x0112  # EXIF tag
_TRANSPOSING = (5, 6, 7, 8)  # orientations that swap width and height


# Every reason a file is not stored, as `ImageRejected.reason` gives it.
REJECTIONS = (
    "empty_body",
    "not_an_image",
    "truncated_image",
    "undecodable_image",
    "image_too_small",
    "image_too_large",
    "extreme_aspect_ratio",
    "missing_image",
    "missing_caption",
)


class ImageRejected(ValueError):
    """A file that does not become a stored image; `reason` is a stable identifier."""

    def __init__(self, reason: str) -> None:
        assert reason in REJECTIONS, reason
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SizePolicy:
    """Which source sizes are worth storing; checked from the header, before decoding."""

    min_side: int = 1
    max_pixels: int = Image.MAX_IMAGE_PIXELS
    max_aspect_ratio: float = float("inf")

    def check(self, width: int, height: int) -> None:
        if min(width, height) < self.min_side:
            raise ImageRejected("image_too_small")
        if width * height > self.max_pixels:
            raise ImageRejected("image_too_large")
        if max(width, height) / min(width, height) > self.max_aspect_ratio:
            raise ImageRejected("extreme_aspect_ratio")


@dataclass(frozen=True)
class StoreRule:
    """How a source image becomes a stored one: size policy, resize rule, JPEG quality."""

    image_size: int
    resize_mode: ResizeMode = "keep_ratio"
    quality: int = 95
    policy: SizePolicy = SizePolicy()

    @classmethod
    def for_ingest(cls, ingest: IngestConfig) -> StoreRule:
        """The ingest stage's rule, which every stored image of a run follows."""
        return cls(
            image_size=ingest.image_size,
            resize_mode=ingest.resize_mode,
            quality=ingest.encode_quality,
            policy=SizePolicy(
                min_side=ingest.min_image_size,
                max_pixels=ingest.max_image_pixels,
                max_aspect_ratio=ingest.max_aspect_ratio,
            ),
        )


@dataclass(frozen=True)
class StoredImage:
    data: bytes  # JPEG
    size: tuple[int, int]  # stored (width, height)
    original_size: tuple[int, int]  # as displayed, before resizing


def open_image(data: bytes, policy: SizePolicy = SizePolicy()) -> Image.Image:
    """The image in `data`, header read and size checked, pixels not yet decoded."""
    if not data:
        raise ImageRejected("empty_body")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ImageRejected("image_too_large") from None
    except (UnidentifiedImageError, SyntaxError, ValueError):
        raise ImageRejected("not_an_image") from None
    except (OSError, EOFError):
        raise ImageRejected("truncated_image") from None
    policy.check(*image.size)
    return image


def _load(image: Image.Image) -> None:
    try:
        image.seek(0)  # an animation shows its first frame
        image.load()
    except (OSError, EOFError, SyntaxError, ValueError) as error:
        truncated = isinstance(error, EOFError) or "runcated" in str(error)
        raise ImageRejected("truncated_image" if truncated else "undecodable_image") from None


@lru_cache(maxsize=32)
def _to_srgb(profile: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """A cached transform from an embedded profile to sRGB; None when the profile is
    unusable (browsers then show the raw values too)."""
    output = "RGBA" if mode == "RGBA" else "RGB"
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        return ImageCms.buildTransform(source, _SRGB, mode, output)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


def _colour_managed(image: Image.Image) -> Image.Image:
    profile = image.info.get("icc_profile")
    if not profile or image.mode not in ("RGB", "RGBA", "CMYK"):
        return image
    transform = _to_srgb(profile, image.mode)
    return image if transform is None else ImageCms.applyTransform(image, transform)


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit grey (and 32-bit integer or float grey holding 16-bit or unit values) scaled
    to 0..255; Pillow's own convert clips them, which turns most of an image white."""
    values = np.asarray(image)
    unit_floats = image.mode == "F" and values.max(initial=0) <= 1.0
    scale = 255.0 if unit_floats else 1.0 if image.mode == "F" else 1 / 257
    return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), "L")


def _opaque(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def display_rgb(image: Image.Image) -> Image.Image:
    """The 8-bit RGB image a browser displays for `image` (opened, not yet loaded)."""
    _load(image)
    image = ImageOps.exif_transpose(image)
    image = _colour_managed(image)
    if image.mode in _SIXTEEN_BIT or image.mode == "F":
        image = _eight_bit(image)
    if image.mode in _WITH_ALPHA or "transparency" in image.info:
        return _opaque(image)
    try:
        return image.convert("RGB")
    except ValueError:
        raise ImageRejected("undecodable_image") from None


def decode_rgb(data: bytes) -> np.ndarray:
    """An image file as an HxWx3 uint8 array, as displayed; raises ImageRejected."""
    return np.asarray(display_rgb(open_image(data)))


def _scaled_size(size: tuple[int, int], rule: StoreRule) -> tuple[int, int]:
    width, height = size
    if rule.resize_mode == "no":
        return size
    side = max(size) if rule.resize_mode == "border" else min(size)
    scale = rule.image_size / side
    return max(1, round(width * scale)), max(1, round(height * scale))


def _fitted(image: Image.Image, rule: StoreRule) -> Image.Image:
    target = _scaled_size(image.size, rule)
    if target != image.size:
        image = image.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    if rule.resize_mode == "center_crop":
        left = (image.width - rule.image_size) // 2
        top = (image.height - rule.image_size) // 2
        image = image.crop((left, top, left + rule.image_size, top + rule.image_size))
    elif rule.resize_mode == "border":
        canvas = Image.new("RGB", (rule.image_size, rule.image_size), BACKGROUND)
        canvas.paste(
            image, ((rule.image_size - image.width) // 2, (rule.image_size - image.height) // 2)
        )
        image = canvas
    return image


def store_image(data: bytes, rule: StoreRule) -> StoredImage:
    """The stored JPEG for a source file: checked, displayed as a browser would, resized."""
    image = open_image(data, rule.policy)
    width, height = image.size
    if image.format == "JPEG":  # decode at the smallest DCT scale that still covers the target
        image.draft(None, _scaled_size(image.size, rule))
    fitted = _fitted(display_rgb(image), rule)
    if image.getexif().get(_ORIENTATION, 1) in _TRANSPOSING:
        width, height = height, width
    buffer = io.BytesIO()
    fitted.save(buffer, format="JPEG", quality=rule.quality)
    return StoredImage(data=buffer.getvalue(), size=fitted.size, original_size=(width, height))
