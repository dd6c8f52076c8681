"""`segclip app`: form parsing and validation (pure functions), the page, and the server in this
process on the untrained tiny model (the browser test is tests/integration/test_app.py)."""

from __future__ import annotations

import base64
import io
import re
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from segclip import app
from segclip.app import (
    FormError,
    FormField,
    FormValues,
    decode_image,
    parse_classes,
    parse_multipart,
    parse_threshold,
    read_form,
    render_page,
    serve_app,
)
from segclip.config import ConfigError
from segclip.eval.overlay import LEGEND_ROW, SWATCH
from tests.multipart import BOUNDARY, CONTENT_TYPE, encode_form, post_form


def png_bytes(height: int = 40, width: int = 56, seed: int = 0) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (height, width, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


# --- parse_multipart ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        bytes(range(256)) * 40,
        b"\r\n\r\n" + bytes(range(256)) + b"\r\n--" + BOUNDARY.encode()[:-1] + b"\r\n",
        b"ends with a bare CR\r",
        b"ends with LF\n",
        b"",
    ],
    ids=["all-bytes", "boundary-like", "trailing-cr", "trailing-lf", "empty"],
)
def test_multipart_files_come_back_byte_for_byte(data):
    body = encode_form({"image": ("pic.png", data), "classes": "cat"})
    fields = parse_multipart(CONTENT_TYPE, body)
    assert fields["image"] == FormField(data, "pic.png")
    assert fields["classes"] == FormField(b"cat", None)


def test_multipart_reads_utf8_text_and_filenames_and_keeps_the_first_repeat():
    body = encode_form([("classes", "café, 草地"), ("image", ("été.png", b"x")), ("classes", "2")])
    fields = parse_multipart(CONTENT_TYPE, body)
    assert fields["classes"].text() == "café, 草地"
    assert fields["image"].filename == "été.png"


def test_multipart_refuses_other_encodings_and_non_utf8_text():
    with pytest.raises(FormError, match="multipart/form-data"):
        parse_multipart("application/x-www-form-urlencoded", b"classes=cat")
    with pytest.raises(FormError, match="multipart/form-data"):
        parse_multipart("multipart/form-data", b"no boundary given")
    fields = parse_multipart(CONTENT_TYPE, encode_form({"classes": ("", b"\xff\xfe")}))
    with pytest.raises(FormError, match="UTF-8"):
        fields["classes"].text()


# --- the fields --------------------------------------------------------------------------------


def test_classes_are_stripped_deduplicated_and_required():
    assert parse_classes(" red circle, sky ,, sky,grass ") == ["red circle", "sky", "grass"]
    for empty in ("", " , ,", ","):
        with pytest.raises(FormError, match=r"^No classes: type at least one class name"):
            parse_classes(empty)
    with pytest.raises(FormError, match="Too many classes"):
        parse_classes(",".join(f"c{i}" for i in range(app.MAX_CLASSES + 1)))


@pytest.mark.parametrize(("text", "value"), [("", None), ("  ", None), (" 0.5 ", 0.5), ("1", 1.0)])
def test_threshold_is_empty_or_a_number_in_0_1(text, value):
    assert parse_threshold(text) == value


@pytest.mark.parametrize("text", ["abc", "nan", "inf", "1.5", "-0.1", "0,5"])
def test_bad_thresholds_are_refused_with_their_text(text):
    with pytest.raises(FormError, match=r"^Background threshold must be a number between 0 and 1"):
        parse_threshold(text)
    with pytest.raises(FormError, match=re.escape(repr(text))):
        parse_threshold(text)


def test_images_decode_to_rgb_and_large_ones_are_shrunk():
    rgb, size = decode_image(png_bytes(40, 56))
    assert rgb.shape == (40, 56, 3) and rgb.dtype == np.uint8 and size == (56, 40)
    buffer = io.BytesIO()
    Image.new("L", (3000, 150), 128).save(buffer, format="PNG")  # grey: converted to RGB
    rgb, size = decode_image(buffer.getvalue())
    assert rgb.shape == (51, app.MAX_SIDE, 3) and size == (3000, 150)


def test_what_is_not_an_image_is_named():
    with pytest.raises(FormError, match=r"^No image: choose an image file"):
        decode_image(b"")
    with pytest.raises(FormError, match=r"^Not an image: 'notes.txt' could not be read"):
        decode_image(b"just some text", "notes.txt")
    with pytest.raises(FormError, match=r"^Not an image: the uploaded file could not be read"):
        decode_image(png_bytes()[:200])  # truncated pixel data


def test_read_form_defaults_and_checks_method_and_protocol():
    def form(**fields):
        return {
            name: FormField(v if isinstance(v, bytes) else v.encode()) for name, v in fields.items()
        }

    request = read_form({**form(classes="cat, sky"), "image": FormField(png_bytes(), "a.png")})
    assert request.classes == ["cat", "sky"] and request.background_threshold is None
    assert (request.method, request.protocol) == ("segclip", "segclip")
    assert request.image.shape == (40, 56, 3)
    learned = read_form(
        {**form(classes="cat", method="naclip"), "image": FormField(png_bytes())},
        protocol="segclip_learned_scale",
    )
    assert (learned.method, learned.protocol) == ("naclip", "segclip_learned_scale")
    with pytest.raises(FormError, match="Unknown method 'plain'"):
        read_form({**form(classes="cat", method="plain"), "image": FormField(png_bytes())})
    with pytest.raises(FormError, match="Unknown protocol 'voc'"):
        read_form({**form(classes="cat", protocol="voc"), "image": FormField(png_bytes())})
    with pytest.raises(FormError, match=r"^No image"):
        read_form(form(classes="cat"))
    with pytest.raises(FormError, match=r"^No image"):
        read_form({**form(classes="cat"), "image": FormField(b"", "")})  # no file chosen


def test_the_page_escapes_what_the_user_typed():
    values = FormValues(classes='<script>alert("x")</script>', background_threshold='"><b>')
    page = render_page(values, model_name="m <1>", error="Bad <input>")
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert '"><b>' not in page and "Bad &lt;input&gt;" in page and "m &lt;1&gt;" in page


# --- the server in this process ----------------------------------------------------------------


@pytest.fixture
def served(tiny_model):
    with serve_app(tiny_model, port=0, device="cpu") as server:
        yield server


def error_of(page: str) -> str | None:
    found = re.search(r'<p id="error" role="alert">(.*?)</p>', page)
    return found and found.group(1)


def test_the_server_segments_an_upload_and_shows_overlay_legend_classes_and_method(served):
    with urllib.request.urlopen(served.url, timeout=30) as response:
        form = response.read().decode()
    assert response.status == 200 and 'enctype="multipart/form-data"' in form
    assert all(f'<option value="{m}"' in form for m in ("segclip", "maskclip", "naclip"))

    fields = {"image": ("a.png", png_bytes()), "classes": "cat, sky", "method": "clearclip"}
    status, page = post_form(served.url + "segment", {**fields, "background_threshold": "0.3"})
    assert status == 200, error_of(page)
    assert error_of(page) is None
    assert '<b id="method">clearclip</b>' in page and '<span id="classes">cat, sky</span>' in page
    png = re.search(r'id="overlay" src="data:image/png;base64,([^"]+)"', page).group(1)
    overlay = Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB")
    assert overlay.width == 2 * 56  # image | prediction, legend below
    # The page's legend has the rows the overlay's legend draws: same count, same colours.
    shown = re.findall(r'<li data-label="\d+"><span class="swatch" style="background: #(\w{6})">'
                       r"</span>([^<]+)</li>", page)  # fmt: skip
    assert shown and {name for _, name in shown} <= {"background", "cat", "sky"}
    assert overlay.height == 40 + LEGEND_ROW * len(shown) + 4
    for row, (colour, _) in enumerate(shown):
        swatch = overlay.getpixel((4 + SWATCH // 2, 40 + 2 + row * LEGEND_ROW + SWATCH // 2))
        assert bytes(swatch).hex() == colour
    assert 'value="cat, sky"' in page  # the form keeps what was typed


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"classes": "cat"}, "No image: choose an image file to upload."),
        ({"image": ("", b""), "classes": "cat"}, "No image: choose an image file to upload."),
        ({"image": ("t.txt", b"hello"), "classes": "cat"}, "Not an image: &#x27;t.txt&#x27;"),
        ({"image": ("a.png", png_bytes()), "classes": " , "}, "No classes: type at least one"),
        (
            {"image": ("a.png", png_bytes()), "classes": "cat", "background_threshold": "high"},
            "Background threshold must be a number between 0 and 1",
        ),
    ],
    ids=["no-image-field", "no-file-chosen", "not-an-image", "no-classes", "bad-threshold"],
)
def test_bad_input_is_a_400_page_with_the_message_and_the_server_keeps_serving(
    served, fields, message
):
    status, page = post_form(served.url + "segment", fields)
    assert status == 400
    assert error_of(page).startswith(message)
    assert "Traceback" not in page and "<form" in page
    with urllib.request.urlopen(served.url, timeout=30) as response:
        assert response.status == 200


def test_oversized_uploads_unknown_paths_and_model_failures_get_a_message(served, monkeypatch):
    monkeypatch.setattr(app, "MAX_UPLOAD_BYTES", 1000)
    status, page = post_form(served.url + "segment", {"image": ("a.png", png_bytes())})
    assert status == 413 and "The upload is too large" in error_of(page)
    monkeypatch.undo()

    for method in ("GET", "POST"):
        request = urllib.request.Request(
            served.url + "nope", data=b"" if method == "POST" else None
        )
        with pytest.raises(urllib.error.HTTPError) as answered:
            urllib.request.urlopen(request, timeout=30)
        assert answered.value.code == 404

    def broken(self, rgb):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(app.Predictor, "__call__", broken)
    status, page = post_form(
        served.url + "segment", {"image": ("a.png", png_bytes()), "classes": "cat"}
    )
    assert status == 500 and error_of(page) == "Segmentation failed (RuntimeError: out of memory)."
    assert "Traceback" not in page
    monkeypatch.undo()
    status, page = post_form(
        served.url + "segment", {"image": ("a.png", png_bytes()), "classes": "cat"}
    )
    assert status == 200 and 'id="overlay"' in page


def test_serve_app_refuses_a_taken_port_and_an_unknown_protocol(served, tiny_model):
    port = served.server_address[1]
    taken = pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}")
    with taken, serve_app(tiny_model, port=port, device="cpu"):
        pass
    with (
        pytest.raises(ConfigError, match="unknown protocol 'voc'"),
        serve_app(tiny_model, protocol="voc"),
    ):
        pass
