"""The whole-download deadline, against a real server on 127.0.0.1."""

import http.client
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from segclip.data.http_deadline import DEADLINE_EXCEEDED, DeadlineOpener, DownloadDeadlineExceeded

BODY = bytes(range(256)) * 40


class Behaviours(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        if self.path == "/whole":
            self.wfile.write(BODY)
        elif self.path == "/short":  # closes after a tenth of what it announced
            self.wfile.write(BODY[: len(BODY) // 10])
        elif self.path == "/trickle":  # a piece every 0.1 s: each read well within its timeout
            for start in range(0, len(BODY), 64):
                try:
                    self.wfile.write(BODY[start : start + 64])
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.1)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Behaviours)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_whole_body_arrives_and_a_trickled_one_stops_at_the_deadline():
    opener = DeadlineOpener(seconds=1.0)
    with server() as base:
        with opener.open(f"{base}/whole", None, 5) as response:
            assert response.read() == BODY and response.status == 200
        start = time.monotonic()
        with (
            pytest.raises(DownloadDeadlineExceeded) as error,
            opener.open(f"{base}/trickle", None, 5) as r,
        ):
            r.read()
        assert str(error.value) == DEADLINE_EXCEEDED
        assert 1.0 < time.monotonic() - start < 1.0 + 0.5  # overrun: at most one piece's wait
        with pytest.raises(http.client.IncompleteRead), opener.open(f"{base}/short", None, 5) as r:
            r.read()
