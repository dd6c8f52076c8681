"""The ingest stage's edge-case kit: images and HTTP behaviours that real url lists hold.

Every case is a (url, caption) row and what the ingest stage must make of it: a failure
reason, or a stored image described by its size after the keep_ratio resize to
`IMAGE_SIZE` and a few probe points of known colour. Images are built in memory from
flat-coloured quadrants (each case its own colours, so no two cases share pixels or bytes
unless a case means to), which makes a wrong orientation, channel order, alpha or bit depth
show in the probes. `serve_kit` serves them, and the misbehaving endpoints, on 127.0.0.1.
"""

from __future__ import annotations

import csv
import io
import socket
import struct
import sys
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

HOST = "127.0.0.1"
# The ingest settings the expectations hold for (the test passes them as overrides).
IMAGE_SIZE = 48
MIN_IMAGE_SIZE = 8
MAX_IMAGE_PIXELS = 80_000_000
MAX_ASPECT_RATIO = 10
TOLERANCE = 10  # per channel, after the stage's JPEG re-encode; probes sit in flat regions
UNRESOLVED_URL = "http://segclip-edge-kit.invalid/img/unresolved.jpg"
WIDTH, HEIGHT = 96, 64  # most images: landscape, so a rotation shows in the stored size

Rgb = tuple[int, int, int]
Quad = tuple[Rgb, Rgb, Rgb, Rgb]  # top-left, top-right, bottom-left, bottom-right


@dataclass(frozen=True)
class Probe:
    """The colour at (x, y), fractions of the stored width and height."""

    x: float
    y: float
    rgb: Rgb
    tolerance: int = TOLERANCE


@dataclass(frozen=True)
class Stored:
    """A successful case: the stored image's size and colours."""

    width: int
    height: int
    probes: tuple[Probe, ...]


@dataclass(frozen=True)
class Case:
    """One list row. `path_or_url` is a path on the kit server ("/img/a.png") as built, and
    the absolute URL in `Kit.cases`; `expected` is a failure reason or a `Stored`."""

    name: str
    path_or_url: str
    caption: str | None
    expected: str | Stored

    @property
    def reason(self) -> str | None:
        return self.expected if isinstance(self.expected, str) else None


@dataclass(frozen=True)
class Resource:
    body: bytes
    content_type: str


# --- images -----------------------------------------------------------------------------------

PALETTE: tuple[Rgb, ...] = (
    (210, 40, 40),
    (40, 180, 60),
    (50, 70, 210),
    (230, 210, 50),
    (200, 50, 190),
    (40, 190, 200),
    (240, 140, 30),
    (70, 40, 110),
)
GREYS = (30, 100, 170, 240)


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


def quad_colours(name: str) -> Quad:
    """Four well-separated colours, jittered by the case name so every case has its own."""
    rng = _rng(name)
    picks = rng.permutation(len(PALETTE))[:4]
    jitter = rng.integers(-15, 16, (4, 3))
    return tuple(
        tuple(int(c) for c in np.array(PALETTE[p]) + j) for p, j in zip(picks, jitter, strict=True)
    )  # type: ignore[return-value]


def quad_greys(name: str) -> tuple[int, int, int, int]:
    rng = _rng(name)
    levels = np.array(GREYS)[rng.permutation(4)] + rng.integers(-12, 13, 4)
    return tuple(int(v) for v in levels)  # type: ignore[return-value]


def quad_array(quad: Sequence, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """An array with four flat quadrants; quad holds scalars or per-channel tuples."""
    sample = np.asarray(quad[0])
    array = np.zeros((height, width, *sample.shape), np.asarray(quad).dtype)
    half_w, half_h = width // 2, height // 2
    array[:half_h, :half_w] = quad[0]
    array[:half_h, half_w:] = quad[1]
    array[half_h:, :half_w] = quad[2]
    array[half_h:, half_w:] = quad[3]
    return array


def stored_size(width: int, height: int) -> tuple[int, int]:
    """keep_ratio: the shorter side becomes IMAGE_SIZE (up or down), the aspect is kept."""
    short = min(width, height)
    scaled = (width * IMAGE_SIZE, height * IMAGE_SIZE)
    assert all(side % short == 0 for side in scaled), "kit sizes scale to whole pixels"
    return scaled[0] // short, scaled[1] // short


def stored_quad(quad: Sequence[Rgb], width: int = WIDTH, height: int = HEIGHT) -> Stored:
    probes = tuple(
        Probe(x, y, tuple(int(c) for c in colour))  # type: ignore[arg-type]
        for (x, y), colour in zip(
            ((0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)), quad, strict=True
        )
    )
    return Stored(*stored_size(width, height), probes)


def on_white(rgb: Sequence[int], alpha: int) -> Rgb:
    """A pixel of opacity alpha/255 composited on white."""
    a = alpha / 255
    return tuple(round(a * c + (1 - a) * 255) for c in rgb)  # type: ignore[return-value]


def grey(level: int) -> Rgb:
    return (level, level, level)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def cv2_encode(array: np.ndarray, suffix: str) -> bytes:
    """cv2 writes what Pillow cannot: 16-bit RGB PNG and TIFF (array in RGB order here)."""
    if array.ndim == 3:
        array = np.ascontiguousarray(array[..., ::-1])
    ok, data = cv2.imencode(suffix, array)
    assert ok, suffix
    return data.tobytes()


def to_16bit(levels: np.ndarray) -> np.ndarray:
    """8-bit levels as 16-bit values v with round(v / 257) == level, 90 off the exact
    multiple; clipping v to 8 bits instead gives 255 (or 90 for black)."""
    wide = levels.astype(np.int32) * 257 + np.where(levels > 127, -90, 90)
    return wide.astype(np.uint16)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height (8-bit grey) with a tiny IDAT: its size can
    be read from the header, its pixels would need width*height bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 4)  # four rows of the image, no more
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def noise(name: str, width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    return Image.fromarray(_rng(name).integers(0, 256, (height, width, 3), np.uint8))


def rgb_quad(name: str) -> tuple[Image.Image, Stored]:
    quad = quad_colours(name)
    return Image.fromarray(quad_array(np.array(quad, np.uint8))), stored_quad(quad)


def jpeg_quad(name: str, **options: object) -> tuple[bytes, Stored]:
    image, stored = rgb_quad(name)
    return encode(image, "JPEG", quality=95, **options), stored


def png_quad(name: str) -> tuple[bytes, Stored]:
    image, stored = rgb_quad(name)
    return encode(image, "PNG"), stored


# Pillow's transpose that undoes each EXIF orientation: the raw pixels are the displayed
# image put through it (orientations 2, 3, 4, 5 and 7 are their own inverse).
EXIF_RAW_FROM_DISPLAYED = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def jpeg_exif(name: str, orientation: int) -> tuple[bytes, Stored]:
    """A JPEG that shows as the 96x64 quadrant image once its EXIF orientation is applied."""
    shown, stored = rgb_quad(name)
    exif = Image.Exif()
    exif[0x0112] = orientation
    raw = shown.transpose(EXIF_RAW_FROM_DISPLAYED[orientation])
    return encode(raw, "JPEG", quality=95, exif=exif), stored


def png16_grey(name: str, fmt: str = "PNG") -> tuple[bytes, Stored]:
    levels = quad_greys(name)
    image = Image.fromarray(to_16bit(quad_array(np.array(levels, np.uint8))))  # mode I;16
    return encode(image, fmt), stored_quad([grey(v) for v in levels])


def rgb16(name: str, suffix: str) -> tuple[bytes, Stored]:
    quad = quad_colours(name)
    return cv2_encode(to_16bit(quad_array(np.array(quad, np.uint8))), suffix), stored_quad(quad)


def png_rgba(name: str) -> tuple[bytes, Stored]:
    """Opaque, half, quarter and fully transparent quadrants; the transparent one is black
    underneath, so dropping alpha instead of compositing shows as black, not white."""
    quad = list(quad_colours(name))
    quad[3] = (0, 0, 0)
    alphas = (255, 128, 64, 0)
    rgba = [(*colour, alpha) for colour, alpha in zip(quad, alphas, strict=True)]
    image = Image.fromarray(quad_array(np.array(rgba, np.uint8)), "RGBA")
    shown = [on_white(c, a) for c, a in zip(quad, alphas, strict=True)]
    return encode(image, "PNG"), stored_quad(shown)


def png_la(name: str) -> tuple[bytes, Stored]:
    levels = list(quad_greys(name))
    levels[2] = 0
    alphas = (255, 150, 0, 90)
    la = [(level, alpha) for level, alpha in zip(levels, alphas, strict=True)]
    image = Image.fromarray(quad_array(np.array(la, np.uint8)), "LA")
    shown = [on_white(grey(v), a) for v, a in zip(levels, alphas, strict=True)]
    return encode(image, "PNG"), stored_quad(shown)


def palette_image(quad: Quad) -> Image.Image:
    image = Image.fromarray(quad_array(np.arange(4, dtype=np.uint8)), "P")
    image.putpalette([c for colour in quad for c in colour])
    return image


def png_palette(name: str) -> tuple[bytes, Stored]:
    quad = quad_colours(name)
    return encode(palette_image(quad), "PNG"), stored_quad(quad)


def png_palette_trns(name: str) -> tuple[bytes, Stored]:
    """tRNS alphas per palette entry: opaque, fully transparent (black under), half, opaque."""
    quad = list(quad_colours(name))
    quad[1] = (0, 0, 0)
    alphas = (255, 0, 128, 255)
    image = palette_image(tuple(quad))  # type: ignore[arg-type]
    shown = [on_white(c, a) for c, a in zip(quad, alphas, strict=True)]
    return encode(image, "PNG", transparency=bytes(alphas)), stored_quad(shown)


def jpeg_grey(name: str) -> tuple[bytes, Stored]:
    levels = quad_greys(name)
    image = Image.fromarray(quad_array(np.array(levels, np.uint8)), "L")
    return encode(image, "JPEG", quality=95), stored_quad([grey(v) for v in levels])


def png_1bit(name: str) -> tuple[bytes, Stored]:
    levels = (255, 0, 0, 255)
    image = Image.fromarray(quad_array(np.array(levels, np.uint8)), "L").convert("1")
    return encode(image, "PNG"), stored_quad([grey(v) for v in levels])


def jpeg_cmyk(name: str) -> tuple[bytes, Stored]:
    """Shown colours are Pillow's own CMYK -> RGB conversion of the inks."""
    inks = ((0, 200, 190, 20), (180, 0, 160, 10), (200, 150, 0, 0), (0, 0, 0, 150))
    image = Image.fromarray(quad_array(np.array(inks, np.uint8)), "CMYK")
    shown = [Image.new("CMYK", (1, 1), ink).convert("RGB").getpixel((0, 0)) for ink in inks]
    return encode(image, "JPEG", quality=95), stored_quad(shown)  # type: ignore[arg-type]


def gif_animated(name: str) -> tuple[bytes, Stored]:
    """Two frames; the second has the quadrants in another order, so only the first matches."""
    quad = quad_colours(name)
    first = palette_image(quad)
    second = palette_image((quad[3], quad[2], quad[1], quad[0]))
    data = encode(first, "GIF", save_all=True, append_images=[second], duration=200, loop=0)
    return data, stored_quad(quad)


def gif_transparent(name: str) -> tuple[bytes, Stored]:
    quad = list(quad_colours(name))
    quad[2] = (0, 0, 0)
    shown = list(quad)
    shown[2] = (255, 255, 255)  # palette index 2 is the transparent one
    image = palette_image(tuple(quad))  # type: ignore[arg-type]
    return encode(image, "GIF", transparency=2), stored_quad(shown)


def webp_animated(name: str) -> tuple[bytes, Stored]:
    quad = quad_colours(name)
    first = Image.fromarray(quad_array(np.array(quad, np.uint8)))
    second = Image.fromarray(quad_array(np.array(quad[::-1], np.uint8)))
    data = encode(
        first, "WEBP", save_all=True, append_images=[second], duration=200, loop=0, lossless=True
    )
    return data, stored_quad(quad)


def pillow_quad(name: str, fmt: str, **options: object) -> tuple[bytes, Stored]:
    image, stored = rgb_quad(name)
    return encode(image, fmt, **options), stored


def png_sized(name: str, width: int, height: int) -> tuple[bytes, Stored]:
    quad = quad_colours(name)
    image = Image.fromarray(quad_array(np.array(quad, np.uint8), width, height))
    return encode(image, "PNG"), stored_quad(quad, width, height)


def truncated(data: bytes) -> bytes:
    return data[: len(data) * 6 // 10]


# --- the cases --------------------------------------------------------------------------------

SUCCESS_IMAGES: dict[str, tuple[str, Callable[[str], tuple[bytes, Stored]]]] = {
    # name: (file suffix, builder)
    "jpeg_baseline": ("jpg", jpeg_quad),
    "jpeg_progressive": ("jpg", lambda n: jpeg_quad(n, progressive=True)),
    **{f"jpeg_exif_{o}": ("jpg", lambda n, o=o: jpeg_exif(n, o)) for o in range(2, 9)},
    "png_16bit_grey": ("png", png16_grey),
    "png_16bit_rgb": ("png", lambda n: rgb16(n, ".png")),
    "tiff_16bit_grey": ("tif", lambda n: png16_grey(n, "TIFF")),
    "tiff_16bit_rgb": ("tif", lambda n: rgb16(n, ".tiff")),
    "png_rgba_partial_alpha": ("png", png_rgba),
    "png_la": ("png", png_la),
    "png_palette": ("png", png_palette),
    "png_palette_trns": ("png", png_palette_trns),
    "jpeg_grey": ("jpg", jpeg_grey),
    "png_1bit": ("png", png_1bit),
    "jpeg_cmyk": ("jpg", jpeg_cmyk),
    "gif_animated": ("gif", gif_animated),
    "gif_transparent_index": ("gif", gif_transparent),
    "webp_animated": ("webp", webp_animated),
    "webp_still": ("webp", lambda n: pillow_quad(n, "WEBP", quality=95)),
    "bmp": ("bmp", lambda n: pillow_quad(n, "BMP")),
    "tiff_rgb": ("tif", lambda n: pillow_quad(n, "TIFF", compression="tiff_lzw")),
    "ppm": ("ppm", lambda n: pillow_quad(n, "PPM")),
    "tga_rle": ("tga", lambda n: pillow_quad(n, "TGA", compression="tga_rle")),
    "ico": ("ico", lambda n: pillow_quad(n, "ICO", sizes=[(WIDTH, HEIGHT)], bitmap_format="bmp")),
    "png_portrait": ("png", lambda n: png_sized(n, HEIGHT, WIDTH)),
    "png_small_upscaled": ("png", lambda n: png_sized(n, 30, 20)),
}

HOSTILE_CAPTIONS = {
    "caption_control": "tab\there, newline\nthere, crlf\r\nand a lone cr\rend",
    "caption_csv_hostile": 'she said "hi", then ""twice"", a,b,,c; \'single\' and a backslash \\',
    "caption_unicode": "Café naïve façade — 東京の夜景 · مرحبا · e\u0301 · 👩\u200d👩\u200d👧 🏳️\u200d🌈",
    "caption_long": ("a long caption, é 🙂 " * 300)[:5000],
    "caption_padded": "  padded with spaces and a tab at both ends\t ",
}
MISSING_CAPTIONS: dict[str, str | None] = {
    "caption_null": None,
    "caption_empty": "",
    "caption_whitespace": " \t\n ",
}
CONTENT_TYPES = {
    "jpg": "image/jpeg",
    "png": "image/png",
    "gif": "image/gif",
    "webp": "image/webp",
    "bmp": "image/bmp",
    "tif": "image/tiff",
    "ppm": "image/x-portable-pixmap",
    "tga": "image/x-tga",
    "ico": "image/vnd.microsoft.icon",
}
HTML = b"<!doctype html><html><head><title>Not found</title></head><body>gone</body></html>"
SVG = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="96" height="64">'
    b'<rect width="96" height="64" fill="red"/></svg>'
)


@cache
def _site() -> tuple[tuple[Case, ...], dict[str, Resource]]:
    """The cases (paths on the kit server) and what the server holds, built once."""
    cases: list[Case] = []
    files: dict[str, Resource] = {}

    def add(file: str, body: bytes, content_type: str | None = None) -> str:
        assert file not in files, file
        suffix = file.rsplit(".", 1)[-1]
        files[file] = Resource(body, content_type or CONTENT_TYPES.get(suffix, "text/plain"))
        return file

    def case(name: str, path: str, expected: str | Stored, caption: str | None = None) -> None:
        cases.append(Case(name, path, caption or f"a picture: {name}", expected))

    for name, (suffix, build) in SUCCESS_IMAGES.items():
        body, stored = build(name)
        case(name, "/img/" + add(f"{name}.{suffix}", body), stored)
    body, stored = png_quad("png_served_as_octet_stream")
    path = "/img/" + add("octet_stream.png", body, "application/octet-stream")
    case("png_served_as_octet_stream", path, stored)

    # The size policy, the broken files and what is no image at all.
    tiny = encode(Image.new("RGB", (1, 1), "red"), "PNG")
    case("tiny_1x1", "/img/" + add("tiny.png", tiny), "image_too_small")
    wide = Image.fromarray(quad_array(np.array(quad_colours("wide"), np.uint8), 1000, 10))
    path = "/img/" + add("wide.png", encode(wide, "PNG"))
    case("extreme_aspect_100_to_1", path, "extreme_aspect_ratio")
    # Over ingest.max_image_pixels: far past Pillow's own bomb limit, and just past ours.
    for width, height in ((30000, 30000), (9000, 9000)):
        path = "/img/" + add(f"header_{width}x{height}.png", png_header_only(width, height))
        case(f"png_header_{width}x{height}", path, "image_too_large")
    body = truncated(encode(noise("jpeg_truncated"), "JPEG", quality=95))
    case("jpeg_truncated", "/img/" + add("truncated.jpg", body), "truncated_image")
    body = truncated(encode(noise("png_truncated"), "PNG"))
    case("png_truncated", "/img/" + add("truncated.png", body), "truncated_image")
    case("html_page", "/img/" + add("page.html", HTML, "text/html; charset=utf-8"), "not_an_image")
    case("svg", "/img/" + add("drawing.svg", SVG, "image/svg+xml"), "not_an_image")
    junk = _rng("random_bytes").integers(0, 256, 4096, np.uint8).tobytes()
    case("random_bytes", "/img/" + add("random.jpg", b"\x01junk" + junk), "not_an_image")

    # HTTP behaviours: each serves an image of its own, so only the behaviour can fail it.
    def behaviour(name: str, route: str, expected: str | Stored | None = None) -> None:
        body, stored = jpeg_quad(name)
        case(name, route.format(add(f"{name}.jpg", body)), expected or stored)

    case("empty_body", "/empty/empty.jpg", "empty_body")
    for code in (404, 403, 500):
        case(f"http_{code}", f"/status/{code}/missing.jpg", f"http_{code}")
    behaviour("redirect_301", "/redirect/301/1/{}")
    behaviour("redirect_302_three_hops", "/redirect/302/3/{}")
    case("redirect_loop", "/loop/circle/a", "redirect_loop")
    behaviour("slow_headers", "/slow/{}", "timeout")
    behaviour("trickled_body", "/trickle/{}", "download_time_exceeded")
    behaviour("short_body", "/short/{}", "incomplete_body")
    case("connection_refused", "refused:/img/refused.jpg", "connection_refused")
    case("unresolved_host", UNRESOLVED_URL, "unresolved_host")

    # Captions: stored byte for byte, or the row is refused before any download.
    for name, caption in HOSTILE_CAPTIONS.items():
        body, stored = jpeg_quad(name)
        case(name, "/img/" + add(f"{name}.jpg", body), stored, caption)
    for name, caption in MISSING_CAPTIONS.items():
        body, _ = jpeg_quad(name)
        cases.append(Case(name, "/img/" + add(f"{name}.jpg", body), caption, "missing_caption"))

    # Duplicates: the later row in list order is the one dropped.
    body, stored = jpeg_quad("duplicate_url")
    path = "/img/" + add("duplicate_url.jpg", body)
    case("duplicate_url_first", path, stored, "the first of one url twice")
    case("duplicate_url_second", path, "duplicate_url", "the second of one url twice")
    body, stored = png_quad("duplicate_content")
    case("duplicate_content_first", "/img/" + add("same_a.png", body), stored)
    case("duplicate_content_second", "/img/" + add("same_b.png", body), "duplicate_content")

    assert len({c.name for c in cases}) == len(cases)
    return tuple(cases), files


def build_cases(base: str, refused_base: str) -> list[Case]:
    """The cases with absolute URLs: `base` is the kit server, `refused_base` a closed port."""

    def absolute(path: str) -> str:
        if path.startswith("refused:"):
            return refused_base + path.removeprefix("refused:")
        return path if "://" in path else base + path

    return [replace(c, path_or_url=absolute(c.path_or_url)) for c in _site()[0]]


def case_names() -> list[str]:
    """Every case's name, without serving anything (for test parametrisation)."""
    return [c.name for c in _site()[0]]


# --- the server -------------------------------------------------------------------------------


class _KitServer(ThreadingHTTPServer):
    daemon_threads = True
    # A full accept queue drops SYNs, which the client resends after a second: a spurious
    # timeout at ingest.timeout=1 when many download threads connect at once.
    request_queue_size = 128

    def __init__(self, files: dict[str, Resource], timeout: float, deadline: float) -> None:
        super().__init__((HOST, 0), _KitHandler)
        self.files = files
        self.stopping = threading.Event()
        self.slow_s = timeout + 1.5  # well past the per-read timeout
        self.trickle_gap_s = min(0.3, timeout / 3)  # well within it
        self.trickle_s = 2 * deadline  # well past the download deadline

    def handle_error(self, request: object, client_address: tuple) -> None:
        """Clients hang up on the slow and trickled answers by design; other errors show."""
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            super().handle_error(request, client_address)


class _KitHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # a client that stops reading cannot hold a handler for longer
    server: _KitServer

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the test output is about the ingest stage."""

    def do_GET(self) -> None:
        # A client giving up is expected for the slow and trickled answers.
        with suppress(BrokenPipeError, ConnectionResetError, TimeoutError):
            self._route(urlsplit(self.path).path.strip("/").split("/"))
        self.close_connection = True

    def _headers(self, status: int, content_type: str, length: int, *extra: tuple) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("Connection", "close")
        for key, value in extra:
            self.send_header(key, value)
        self.end_headers()

    def _reply(self, status: int, body: bytes, content_type: str, *extra: tuple) -> None:
        self._headers(status, content_type, len(body), *extra)
        self.wfile.write(body)

    def _file(self, file: str) -> Resource | None:
        resource = self.server.files.get(file)
        if resource is None:
            self._reply(404, b"no such file", "text/plain")
        return resource

    def _route(self, parts: list[str]) -> None:
        stopping = self.server.stopping
        match parts:
            case ["img", file]:
                if found := self._file(file):
                    self._reply(200, found.body, found.content_type)
            case ["status", code, _]:
                self._reply(int(code), HTML, "text/html")
            case ["empty", _]:
                self._reply(200, b"", "image/jpeg")
            case ["redirect", code, hops, file]:
                left = int(hops) - 1
                target = f"/redirect/{code}/{left}/{file}" if left else f"/img/{file}"
                if not left:  # the last hop names the server, the others are relative
                    target = f"http://{HOST}:{self.server.server_port}{target}"
                self._reply(int(code), b"", "text/plain", ("Location", target))
            case ["loop", name, side]:
                other = "b" if side == "a" else "a"
                self._reply(302, b"", "text/plain", ("Location", f"/loop/{name}/{other}"))
            case ["slow", file]:
                if not stopping.wait(self.server.slow_s) and (found := self._file(file)):
                    self._reply(200, found.body, found.content_type)
            case ["trickle", file]:
                if found := self._file(file):
                    self._trickle(found, stopping)
            case ["short", file]:
                if found := self._file(file):
                    self._headers(200, found.content_type, len(found.body))
                    self.wfile.write(found.body[: len(found.body) // 2])  # then close
            case _:
                self._reply(404, b"no such route", "text/plain")

    def _trickle(self, found: Resource, stopping: threading.Event) -> None:
        """The whole body, one small chunk per gap, each gap well under the read timeout."""
        chunks = max(1, round(self.server.trickle_s / self.server.trickle_gap_s))
        size = -(-len(found.body) // chunks)
        self._headers(200, found.content_type, len(found.body))
        for start in range(0, len(found.body), size):
            if stopping.wait(self.server.trickle_gap_s):
                return
            self.wfile.write(found.body[start : start + size])


@dataclass(frozen=True)
class Kit:
    base: str  # http://127.0.0.1:<port>, no trailing slash
    cases: list[Case]
    files: dict[str, Resource]

    def case(self, name: str) -> Case:
        return next(c for c in self.cases if c.name == name)


@contextmanager
def serve_kit(*, timeout: float, deadline: float) -> Iterator[Kit]:
    """Serve the kit on 127.0.0.1 for the block. `timeout` and `deadline` are the ingest
    settings under test: the slow answer waits past the first, the trickle outlasts the
    second. A port held bound but never listening makes the refused connection."""
    files = _site()[1]
    server = _KitServer(files, timeout, deadline)
    refused = socket.socket()
    refused.bind((HOST, 0))  # bound, not listening: connections are refused, no one reuses it
    thread = threading.Thread(target=server.serve_forever, name="edge-kit", daemon=True)
    thread.start()
    try:
        base = f"http://{HOST}:{server.server_port}"
        refused_base = f"http://{HOST}:{refused.getsockname()[1]}"
        yield Kit(base, build_cases(base, refused_base), files)
    finally:
        server.stopping.set()  # ends every slow and trickling answer at its next wait
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        refused.close()


# --- url lists --------------------------------------------------------------------------------


def write_list(cases: Sequence[Case], path: str | Path) -> Path:
    """The cases' (url, caption) rows in list order, as parquet (a null caption is a real
    null) or csv (header `url,caption`; a null caption is an empty unquoted field, an empty
    one `""`, every other caption quoted)."""
    path = Path(path)
    urls = [c.path_or_url for c in cases]
    captions = [c.caption for c in cases]
    if path.suffix == ".parquet":
        table = pa.table({"url": pa.array(urls, pa.string()), "caption": captions})
        pq.write_table(table, path)
    elif path.suffix == ".csv":
        lines = ["url,caption"]
        for url, caption in zip(urls, captions, strict=True):
            quoted = "" if caption is None else '"' + caption.replace('"', '""') + '"'
            lines.append(f"{_csv_field(url)},{quoted}")
        path.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    else:
        raise ValueError(f"write_list writes .parquet or .csv, not {path.name}")
    return path


def _csv_field(value: str) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow([value])
    return buffer.getvalue()
