"""A multipart/form-data body as a browser sends it, and a POST of one, for the app's tests."""

from __future__ import annotations

import urllib.error
import urllib.request

BOUNDARY = "----segclipTestBoundary7MA4YWxkTrZu0gW"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


Fields = dict[str, str | tuple[str, bytes]] | list[tuple[str, str | tuple[str, bytes]]]


def encode_form(fields: Fields) -> bytes:
    """Text fields as str; file fields as (filename, bytes). A list may repeat a name."""
    body = b""
    for name, value in fields.items() if isinstance(fields, dict) else fields:
        if isinstance(value, tuple):
            filename, data = value
            head = (
                f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                "Content-Type: application/octet-stream\r\n"
            )
        else:
            head, data = f'Content-Disposition: form-data; name="{name}"\r\n', value.encode()
        body += f"--{BOUNDARY}\r\n{head}\r\n".encode() + data + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


def post_form(url: str, fields: Fields, timeout: float = 60) -> tuple[int, str]:
    """(HTTP status, page text) of a form POST; error statuses are returned, not raised."""
    request = urllib.request.Request(
        url, data=encode_form(fields), headers={"Content-Type": CONTENT_TYPE}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode("utf-8")
