"""A static file server on 127.0.0.1, so local files go through a real HTTP download path."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Thousands of image requests would drown the stage's own progress output."""


class _LoopbackServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: tuple) -> None:
        """A client that hangs up mid-transfer (img2dataset's timeouts and retries do) is
        normal here; only other errors are worth a traceback."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


@contextmanager
def serve_directory(folder: str | Path) -> Iterator[str]:
    """Serve `folder` on a free loopback port for the duration of the block; yields the base URL."""
    handler = partial(_QuietHandler, directory=str(folder))
    server = _LoopbackServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="serve-directory", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
