"""A static file server, so local or stored files go through a real HTTP download.

It listens on 127.0.0.1 unless the downloads run on other nodes of a cluster, which need
the driver's cluster address; it serves only while its block runs."""

from __future__ import annotations

import mimetypes
import os
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from upath import UPath

from segclip.storage import location


class _StoreHandler(BaseHTTPRequestHandler):
    """GET and HEAD of the files under the server's root, which may be any fsspec URL."""

    def _file(self) -> UPath | None:
        relative = unquote(urlsplit(self.path).path).lstrip("/")
        if not relative or ".." in relative.split("/"):
            return None
        path = self.server.root / relative  # type: ignore[attr-defined]
        return path if path.is_file() else None

    def _send(self, with_body: bool) -> None:
        path = self._file()
        if path is None:
            self.send_error(404, "File not found")
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header(
            "Content-Type", mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        )
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if with_body:
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(with_body=True)

    def do_HEAD(self) -> None:
        self._send(with_body=False)

    def log_message(self, format: str, *args: object) -> None:
        """Thousands of image requests would drown the stage's own progress output."""


class _FolderServer(ThreadingHTTPServer):
    daemon_threads = True
    # img2dataset opens (download threads x processes) connections at once, 64 for the demo;
    # socketserver's backlog of 5 dropped the rest, and each retried after 1, 3 or 7 s
    request_queue_size = socket.SOMAXCONN

    def __init__(self, root: UPath, host: str) -> None:
        super().__init__((host, 0), _StoreHandler)
        self.root = root

    def handle_error(self, request: object, client_address: tuple) -> None:
        """A client that hangs up mid-transfer (img2dataset's timeouts and retries do) is
        normal here; only other errors are worth a traceback."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


@contextmanager
def serve_directory(folder: str | os.PathLike[str], *, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve `folder` (a path or URL) on a free port of `host` for the duration of the block;
    yields the base URL."""
    server = _FolderServer(location(folder), host)
    thread = threading.Thread(target=server.serve_forever, name="serve-directory", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
