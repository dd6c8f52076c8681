"""`segclip app`: a local web page that segments an uploaded image with any vocabulary.

The standard library only: `http.server` serves one HTML page with a multipart form,
the `email` package parses the upload, and the overlay comes back inline as a PNG
data URL. The model is loaded once; each request builds a `Predictor` for its
vocabulary, protocol and method, the same per-image path as `segclip predict`.

Bad input (no image, a file that is not an image, no classes, a bad threshold) gets
its message on the page with HTTP 400; a failure inside the model gets HTTP 500 with
a one-line message (the traceback goes to the server's log). The server keeps serving.
"""

from __future__ import annotations

import base64
import email.policy
import html
import io
import math
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from email.parser import BytesParser
from email.utils import collapse_rfc2231_value
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from segclip.config import ConfigError
from segclip.device import resolve_device
from segclip.eval.predict import Prediction, Predictor
from segclip.eval.protocol import PROTOCOLS
from segclip.eval.segment import METHODS
from segclip.model import SegCLIP, load_model

MAX_UPLOAD_BYTES = 32 * 2**20  # the whole form
MAX_PIXELS = 64_000_000  # refused before decoding
MAX_SIDE = 1024  # larger images are shrunk to this long side before segmenting
MAX_CLASSES = 100
MAX_CLASS_CHARS = 100

# Field names of the form.
IMAGE, CLASSES, THRESHOLD, METHOD, PROTOCOL = (
    "image",
    "classes",
    "background_threshold",
    "method",
    "protocol",
)


class FormError(ValueError):
    """Input the page reports to the user; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class FormField:
    value: bytes
    filename: str | None = None  # set for file inputs, "" when no file was chosen

    def text(self) -> str:
        try:
            return self.value.decode("utf-8")
        except UnicodeDecodeError:
            raise FormError("The form must be sent as UTF-8 text.") from None


def parse_multipart(content_type: str, body: bytes) -> dict[str, FormField]:
    """A multipart/form-data body -> its fields by name (the first of repeated names)."""
    if not content_type.lower().startswith("multipart/form-data") or "boundary=" not in (
        content_type.lower()
    ):
        raise FormError("The form must be sent as multipart/form-data.")
    header = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = BytesParser(policy=email.policy.HTTP).parsebytes(header + body)
    if not message.is_multipart():
        raise FormError("The form body could not be read as multipart/form-data.")
    fields: dict[str, FormField] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        name = collapse_rfc2231_value(name) if name else ""
        if not name or name in fields:
            continue
        payload = part.get_payload(decode=True)  # None for a nested multipart: no field
        fields[name] = FormField(payload or b"", part.get_filename())
    return fields


def parse_classes(text: str) -> list[str]:
    """Comma-separated class names -> the distinct non-empty names, in order."""
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise FormError("No classes: type at least one class name, e.g. cat, grass, sky.")
    if len(names) > MAX_CLASSES:
        raise FormError(f"Too many classes ({len(names)}): at most {MAX_CLASSES}.")
    long = [name for name in names if len(name) > MAX_CLASS_CHARS]
    if long:
        raise FormError(f"Class names have at most {MAX_CLASS_CHARS} characters: {long[0][:40]}…")
    return names


def parse_threshold(text: str) -> float | None:
    """Empty -> None (every pixel gets a class); else a number in [0, 1]."""
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise FormError(
            f"Background threshold must be a number between 0 and 1, or empty (got {text!r})."
        )
    return value


def decode_image(data: bytes, filename: str | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Uploaded bytes -> (RGB uint8 (H, W, 3) at most MAX_SIDE on its long side, the uploaded
    (width, height)). EXIF orientation is applied, as a photo viewer shows the picture."""
    if not data:
        raise FormError("No image: choose an image file to upload.")
    unreadable = FormError(
        f"Not an image: {repr(filename) if filename else 'the uploaded file'} could not be "
        "read as an image (PNG, JPEG, WebP, ...)."
    )
    too_large = f"The image is too large (at most {MAX_PIXELS // 1_000_000} megapixels)."
    try:
        opened = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise FormError(too_large) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise unreadable from None
    with opened:
        if opened.width * opened.height > MAX_PIXELS:
            raise FormError(too_large)
        try:
            image = ImageOps.exif_transpose(opened).convert("RGB")
        except Image.DecompressionBombError:
            raise FormError(too_large) from None
        except (OSError, SyntaxError, ValueError):  # truncated or corrupt pixel data
            raise unreadable from None
    uploaded = image.size
    if max(image.size) > MAX_SIDE:
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BICUBIC)
    return np.asarray(image), uploaded


@dataclass(frozen=True)
class SegmentRequest:
    """A validated form: what to segment, with which vocabulary and how."""

    image: np.ndarray
    uploaded_size: tuple[int, int]
    classes: list[str]
    background_threshold: float | None
    method: str
    protocol: str


def form_text(fields: Mapping[str, FormField], name: str, default: str = "") -> str:
    field = fields.get(name)
    return field.text() if field is not None else default


def read_form(fields: Mapping[str, FormField], *, protocol: str = "segclip") -> SegmentRequest:
    """Validate parsed fields (FormError with the user's message when one is wrong).
    Text fields are checked first, so a form with several mistakes names the cheapest."""
    classes = parse_classes(form_text(fields, CLASSES))
    threshold = parse_threshold(form_text(fields, THRESHOLD))
    method = form_text(fields, METHOD).strip() or "segclip"
    if method not in METHODS:
        raise FormError(f"Unknown method {method!r}: choose one of {', '.join(METHODS)}.")
    protocol = form_text(fields, PROTOCOL).strip() or protocol
    if protocol not in PROTOCOLS:
        raise FormError(f"Unknown protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}.")
    upload = fields.get(IMAGE)
    if upload is None or not upload.value:
        raise FormError("No image: choose an image file to upload.")
    image, uploaded = decode_image(upload.value, upload.filename)
    return SegmentRequest(image, uploaded, classes, threshold, method, protocol)


# --- the page -------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; padding: 0 1em; }
form { display: grid; grid-template-columns: 14em 1fr; gap: .6em 1em; max-width: 44em; }
label { font-weight: 600; } input[type=text] { width: 100%; }
.hint { color: #555; font-size: .9em; grid-column: 2; margin-top: -.4em; }
#error { background: #fde8e8; border: 1px solid #c33; padding: .6em 1em; }
#overlay { display: block; max-width: 100%; border: 1px solid #ccc; margin: .6em 0; }
#legend { list-style: none; padding: 0; } #legend li { margin: .2em 0; }
.swatch { display: inline-block; width: 1em; height: 1em; margin-right: .5em;
          vertical-align: middle; border: 1px solid #333; }
"""


@dataclass(frozen=True)
class FormValues:
    """What the form shows: the last submission's text fields, or the defaults."""

    classes: str = ""
    background_threshold: str = ""
    method: str = "segclip"
    protocol: str = "segclip"

    @classmethod
    def from_fields(cls, fields: Mapping[str, FormField], protocol: str) -> FormValues:
        def text(name: str, default: str) -> str:
            try:
                return form_text(fields, name, default)
            except FormError:
                return default

        return cls(
            text(CLASSES, ""),
            text(THRESHOLD, ""),
            text(METHOD, "segclip"),
            text(PROTOCOL, protocol),
        )


@dataclass(frozen=True)
class Result:
    prediction: Prediction
    request: SegmentRequest
    seconds: float


def _options(choices: Sequence[str], selected: str) -> str:
    return "".join(
        f'<option value="{html.escape(c)}"{" selected" if c == selected else ""}>'
        f"{html.escape(c)}</option>"
        for c in choices
    )


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _result_html(result: Result) -> str:
    request, prediction = result.request, result.prediction
    overlay = prediction.overlay
    height, width = request.image.shape[:2]
    size = f"{width} x {height}"
    if request.uploaded_size != (width, height):
        size += f" (uploaded {request.uploaded_size[0]} x {request.uploaded_size[1]})"
    threshold = request.background_threshold
    rows = "".join(
        f'<li data-label="{entry.label}"><span class="swatch" '
        f'style="background: #{bytes(entry.colour).hex()}"></span>{html.escape(entry.name)}</li>'
        for entry in prediction.legend
    )
    return f"""
<section id="result">
  <h2>Result</h2>
  <p>Method <b id="method">{html.escape(request.method)}</b>, protocol
     <b id="protocol">{html.escape(request.protocol)}</b>, background threshold
     <b id="threshold">{"none" if threshold is None else threshold}</b>;
     classes: <span id="classes">{html.escape(", ".join(request.classes))}</span>.
     Image {size}, segmented in {result.seconds:.2f} s.</p>
  <img id="overlay" src="{png_data_url(overlay)}" width="{overlay.width}"
       height="{overlay.height}" alt="the image and its prediction, legend below">
  <h3>Legend (labels present)</h3>
  <ul id="legend">{rows}</ul>
</section>"""


def render_page(
    values: FormValues,
    *,
    model_name: str,
    error: str | None = None,
    result: Result | None = None,
) -> str:
    """The whole page: the form (filled with `values`), then the error or the result."""
    notice = f'<p id="error" role="alert">{html.escape(error)}</p>' if error else ""
    shown = _result_html(result) if result is not None else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>SegCLIP app</title>
<style>{_STYLE}</style></head>
<body>
<h1>SegCLIP: open-vocabulary segmentation</h1>
<p>Model: <code id="model">{html.escape(model_name)}</code></p>
<form method="post" action="/segment" enctype="multipart/form-data" accept-charset="utf-8">
  <label for="image">Image</label>
  <input type="file" id="image" name="{IMAGE}" accept="image/*">
  <label for="classes-input">Classes</label>
  <input type="text" id="classes-input" name="{CLASSES}" value="{html.escape(values.classes)}"
         placeholder="cat, grass, sky">
  <span class="hint">comma-separated</span>
  <label for="threshold-input">Background threshold</label>
  <input type="text" id="threshold-input" name="{THRESHOLD}"
         value="{html.escape(values.background_threshold)}" placeholder="e.g. 0.5">
  <span class="hint">optional, 0 to 1: pixels whose best class score is below it are
  background; empty: every pixel gets a class</span>
  <label for="method-input">Method</label>
  <select id="method-input" name="{METHOD}">{_options(METHODS, values.method)}</select>
  <span class="hint">segclip: the model's centers; the others are training-free methods on
  its CLIP tower</span>
  <label for="protocol-input">Protocol</label>
  <select id="protocol-input" name="{PROTOCOL}">{_options(list(PROTOCOLS), values.protocol)}
  </select>
  <span></span><button type="submit" id="submit">Segment</button>
</form>
{notice}{shown}
</body></html>
"""


# --- the server -----------------------------------------------------------------------------


class AppServer(ThreadingHTTPServer):
    """Serves the page for one loaded model; predictions run one at a time."""

    daemon_threads = True

    def __init__(
        self,
        model: SegCLIP,
        address: tuple[str, int],
        *,
        device: str = "auto",
        protocol: str = "segclip",
        model_name: str = "",
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ConfigError(f"unknown protocol {protocol!r}; choose one of {list(PROTOCOLS)}")
        self.device = str(resolve_device(device))
        self.model = model.eval().to(self.device)
        self.protocol = protocol
        self.model_name = f"{model_name or 'model'} on {self.device}"
        self._predicting = threading.Lock()
        try:
            super().__init__(address, _Handler)
        except OSError as error:
            raise ConfigError(
                f"cannot listen on {address[0]}:{address[1]}: {error.strerror or error}"
            ) from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}/"

    def segment(self, request: SegmentRequest) -> Result:
        with self._predicting:  # one model: one request at a time, in memory and on the cores
            start = time.perf_counter()
            predictor = Predictor(
                self.model,
                request.classes,
                background_threshold=request.background_threshold,
                protocol=request.protocol,
                method=request.method,
                device=self.device,
            )
            prediction = predictor(request.image)
            return Result(prediction, request, time.perf_counter() - start)


class _Handler(BaseHTTPRequestHandler):
    server: AppServer
    timeout = 120  # seconds a client may stall while sending

    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/":
            self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found: try /\n")
            return
        self._page(HTTPStatus.OK, FormValues(protocol=self.server.protocol))

    def do_POST(self) -> None:
        if self.path.split("?")[0] != "/segment":
            self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found: POST /segment\n")
            return
        fields: dict[str, FormField] = {}
        try:
            fields = parse_multipart(self.headers.get("Content-Type", ""), self._read_body())
            request = read_form(fields, protocol=self.server.protocol)
        except FormError as error:
            values = FormValues.from_fields(fields, self.server.protocol)
            self._page(error.status, values, error=str(error))
            return
        values = FormValues.from_fields(fields, self.server.protocol)
        try:
            result = self.server.segment(request)
        except Exception as error:  # the page says what failed; the log has the traceback
            traceback.print_exc(file=sys.stderr)
            message = f"Segmentation failed ({type(error).__name__}: {error})."
            self._page(HTTPStatus.INTERNAL_SERVER_ERROR, values, error=message)
            return
        self._page(HTTPStatus.OK, values, result=result)

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length", "").strip()
        if not length.isdigit():
            raise FormError("The request has no valid Content-Length.", HTTPStatus.LENGTH_REQUIRED)
        size = int(length)
        if size > MAX_UPLOAD_BYTES:
            # Read what was sent (up to a bound) so that the browser gets to show the message.
            left = min(size, 8 * MAX_UPLOAD_BYTES)
            while left > 0 and (chunk := self.rfile.read(min(left, 2**20))):
                left -= len(chunk)
            raise FormError(
                f"The upload is too large ({size / 2**20:.1f} MiB; "
                f"at most {MAX_UPLOAD_BYTES // 2**20} MiB).",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )
        return self.rfile.read(size)

    def _page(self, status: HTTPStatus, values: FormValues, **shown) -> None:
        page = render_page(values, model_name=self.server.model_name, **shown)
        self._send(status, "text/html; charset=utf-8", page.encode("utf-8"))

    def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def serve_app(
    checkpoint: str | Path | SegCLIP,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    device: str = "auto",
    protocol: str = "segclip",
) -> Iterator[AppServer]:
    """Load the model once (a checkpoint path or URL, a profile name, or a SegCLIP) and serve
    the page on host:port (0: a free port; see `.url`) from a background thread until exit."""
    if protocol not in PROTOCOLS:  # before the model loads
        raise ConfigError(f"unknown protocol {protocol!r}; choose one of {list(PROTOCOLS)}")
    resolve_device(device)
    if isinstance(checkpoint, SegCLIP):
        model, name = checkpoint, "model"
    else:
        model, name = load_model(checkpoint), str(checkpoint)
    server = AppServer(model, (host, port), device=device, protocol=protocol, model_name=name)
    thread = threading.Thread(target=server.serve_forever, name="segclip-app", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
