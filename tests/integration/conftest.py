"""Integration tests run stages in the test process, and a stage joins (or starts) Ray."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(autouse=True, scope="module")
def leave_ray_with_the_module():
    """Stop the local Ray a module's stages started, even on failure: later tests (and the
    unit tests, which fork and spawn processes) never run beside a leftover cluster."""
    yield
    if "ray" in sys.modules:
        from pipelines.ray_runtime import disconnect

        disconnect()
