"""Prefect flows: orchestration of the stages in `pipelines/`, nothing else.

Defaults for running with no Prefect server configured: a temporary local API
per process (given time to start on a cold machine), no analytics calls.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
