"""Prefect's temporary API started early by the CLI: the one server Prefect itself uses."""

import os
import subprocess
import sys

SCRIPT = """
import sys, threading
from flows.temporary_api import start_temporary_api

api_ready = start_temporary_api()
from prefect import flow
from prefect.client.orchestration import get_client

api_ready()
print("threads", [t.name for t in threading.enumerate()])
print("server module", "prefect.server.api.server" in sys.modules)

@flow
def api_url() -> str:
    with get_client(sync_client=True) as client:
        return str(client.api_url)

from prefect.server.api.server import SubprocessASGIServer
print("answering", SubprocessASGIServer().running)  # before any flow asked for it
print("flow", api_url())
"""


def run(script: str, env: dict[str, str]) -> tuple[dict[str, str], str]:
    """The script's `name value` lines, and its log."""
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(line.split(" ", 1) for line in done.stdout.splitlines()), done.stderr


def test_the_cli_starts_prefects_own_temporary_api_and_none_beside_a_configured_one():
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    lines, log = run(SCRIPT, env)
    # One server, started early and used by the flow, whose port the start-up line names.
    assert log.count("Starting temporary server on http://127.0.0.1:") == 1
    port = log.split("Starting temporary server on http://127.0.0.1:", 1)[1].split()[0]
    assert lines["answering"] == "True"
    assert lines["flow"].rstrip("/") == f"http://127.0.0.1:{port}/api"
    assert "Stopping temporary server" in log

    # A configured server: nothing starts, not even Prefect's server module is imported.
    configured = {**env, "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    lines, log = run(SCRIPT.split("@flow")[0], configured)
    assert "prefect-temporary-api" not in lines["threads"] and lines["server"] == "module False"
    assert "Starting temporary server" not in log
