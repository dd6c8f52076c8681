"""One way for every stage to reach Ray: a given cluster address, RAY_ADDRESS, or a local Ray."""

from __future__ import annotations

import logging
import os

import ray


def connect(address: str | None) -> None:
    """Connect this process to Ray once; later calls reuse the connection."""
    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS")
    if target is None:
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
        return
    try:
        ray.init(address=target, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError) as error:
        raise ConnectionError(
            f"cannot reach the Ray cluster at {target!r} ({error}); start it "
            "(`ray start --head` on the head node) or unset runtime.ray_address and "
            "RAY_ADDRESS to run on a local Ray"
        ) from None
