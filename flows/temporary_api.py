"""Prefect's temporary local API for a command run without a Prefect server, started early.

Prefect starts that server (a uvicorn process) on a flow's first API call, after the
command has imported the pipeline's stages, and waits for it: on 2 cores the command
sat about 6 s doing nothing. Started from a thread as the command begins, the server's
process boots on the other core while this one imports. The server is Prefect's own,
the one `get_client` would start (the same instance: Prefect keeps one per process), and
is stopped by Prefect at exit as before. Its module is imported here, before the thread
starts, so that the two threads never import modules side by side.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable


def start_temporary_api() -> Callable[[], None]:
    """Begin starting the temporary API unless a Prefect server is configured; call the
    returned function before the first flow: it waits for the server (and raises its error)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return lambda: None
    from prefect.logging.configuration import setup_logging
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer

    setup_logging()  # as importing prefect's flows would: its "Starting temporary server" line
    failure: list[BaseException] = []

    def start() -> None:
        try:
            SubprocessASGIServer().start()
            # Prefect stops the server at exit; logging's exit flush then waited its 5 s timeout
            # on the log worker sending to the stopped server. Drained first instead (exit
            # handlers run last registered first).
            atexit.register(APILogWorker.drain_all)
        except BaseException as error:  # handed to the waiting thread
            failure.append(error)

    starting = threading.Thread(target=start, name="prefect-temporary-api", daemon=True)
    starting.start()

    def wait() -> None:
        starting.join()
        if failure:
            raise failure[0]

    return wait
