"""One way for every stage to reach Ray: a given cluster address, RAY_ADDRESS, or a local Ray."""

from __future__ import annotations

import logging
import os
import socket
import threading

import pyarrow.fs
import ray
from upath import UPath

from segclip.storage import is_local, storage_environment

PROBE_TIMEOUT_S = 5.0
# Ray Train's placement-group cleaner polls the State API once a second; that API lives in
# the dashboard, which a local Ray here (and a head started without it) runs without, so
# each poll would log a warning.
_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_placement_group_cleaner() -> None:
    """Worker setup hook: without a dashboard the cleaner's State API polls cannot succeed."""
    logging.getLogger(_CLEANER_LOGGER).setLevel(logging.ERROR)


def _check_reachable(address: str) -> None:
    """Fail in seconds with a fix, where ray.init would retry an unreachable GCS for minutes."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), PROBE_TIMEOUT_S):
            return
    except ValueError:
        problem = "it is not host:port"
    except OSError as error:
        problem = f"nothing answers there: {error}"
    raise ConnectionError(
        f"cannot reach the Ray cluster at {address!r} ({problem}); start it (`ray start "
        "--head` on the head node) or unset runtime.ray_address and RAY_ADDRESS to run on "
        "a local Ray"
    )


def ray_address(configured: str | None) -> str | None:
    """The cluster to join: the configured address, else RAY_ADDRESS; None means a local Ray."""
    return configured or os.environ.get("RAY_ADDRESS")


_CONNECTING = threading.Lock()  # a sweep's stages start side by side, from threads


def connect(address: str | None) -> None:
    """Connect this process to Ray once; later calls (from any thread) reuse the connection."""
    with _CONNECTING:
        if not ray.is_initialized():
            _init(address)


def disconnect() -> None:
    """Leave Ray: calls waiting on its tasks fail at once, and a local Ray stops."""
    with _CONNECTING:
        ray.shutdown()


def _init(address: str | None) -> None:
    target = ray_address(address)
    runtime_env = {
        "worker_process_setup_hook": quiet_placement_group_cleaner,
        # Workers reach the same object stores as this process (endpoint and credentials).
        "env_vars": storage_environment(),
    }
    if target is None:
        ray.init(include_dashboard=False, logging_level=logging.WARNING, runtime_env=runtime_env)
        return
    _check_reachable(target)
    ray.init(address=target, logging_level=logging.WARNING, runtime_env=runtime_env)


def node_id() -> str:
    """The Ray node this process runs on: stages record where their work ran."""
    return ray.get_runtime_context().get_node_id()


def node_ip() -> str:
    """This process's address on the cluster network (its node's), where other nodes reach it."""
    here = node_id()
    return next(node["NodeManagerAddress"] for node in ray.nodes() if node["NodeID"] == here)


def alive_nodes() -> int:
    return sum(1 for node in ray.nodes() if node["Alive"])


def use_reserved_cpus() -> None:
    """Torch threads = the CPUs this Ray worker reserved: no oversubscription, and the same
    float rounding whatever environment the worker was started with."""
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))


def ray_storage(folder: UPath) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """Ray Train's (storage_path, storage_filesystem) for a stage folder on any storage."""
    if is_local(folder):
        return str(folder), None
    handler = pyarrow.fs.FSSpecHandler(folder.fs)
    return folder.path, pyarrow.fs.PyFileSystem(handler)
