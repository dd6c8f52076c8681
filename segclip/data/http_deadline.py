"""A whole-download time limit for `urllib.request.urlopen`.

urllib's `timeout` bounds each socket operation, so a server that trickles a body one
byte at a time never times out. The opener installed here reads bodies in pieces and
stops a download once it has run longer than its deadline; a download may overrun the
deadline by at most one per-read timeout.
"""

from __future__ import annotations

import http.client
import time
import urllib.request

DEADLINE_EXCEEDED = "download_time_exceeded"
_PIECE = 1 << 16
_installed: float | None = None  # the deadline this process installed


class DownloadDeadlineExceeded(TimeoutError):
    def __init__(self) -> None:
        super().__init__(DEADLINE_EXCEEDED)


class _DeadlineResponse:
    """An urlopen response whose `read()` enforces the deadline and the Content-Length."""

    def __init__(self, response: http.client.HTTPResponse, deadline: float) -> None:
        self._response = response
        self._deadline = deadline

    def read(self, amount: int | None = None) -> bytes:
        pieces, wanted = [], amount if amount is not None and amount >= 0 else None
        while wanted is None or wanted > 0:
            if time.monotonic() > self._deadline:
                raise DownloadDeadlineExceeded()
            piece = self._response.read1(_PIECE if wanted is None else min(_PIECE, wanted))
            if not piece:
                break
            pieces.append(piece)
            wanted = None if wanted is None else wanted - len(piece)
        body = b"".join(pieces)
        missing = self._response.length
        if amount is None and missing:  # the server closed before sending Content-Length bytes
            raise http.client.IncompleteRead(body, missing)
        return body

    def __getattr__(self, name: str):
        return getattr(self._response, name)

    def __enter__(self) -> _DeadlineResponse:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._response.close()


class DeadlineOpener:
    """urllib's default opener, with the deadline applied from the start of each request."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._opener = urllib.request.build_opener()

    def open(self, url, data=None, timeout=None):  # urlopen always passes all three
        deadline = time.monotonic() + self.seconds
        return _DeadlineResponse(self._opener.open(url, data, timeout), deadline)


def install_download_deadline(seconds: float) -> None:
    """Make every `urlopen` of this process stop downloads that run past `seconds`."""
    global _installed
    if _installed != seconds:
        urllib.request.install_opener(DeadlineOpener(seconds))
        _installed = seconds
