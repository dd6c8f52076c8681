"""A two-host Ray cluster on this machine: Linux network namespaces joined by a bridge.

Each host is a network namespace with its own address on a private /24; on the bridge's
address in this (the test's) namespace, infra/local/stack.py runs the S3-compatible store
and the MLflow server (on PostgreSQL), which both hosts reach. Ray runs a head node in one namespace and a worker node in
the other, each with one CPU, so a two-worker job has to use both. Everything is torn down
on exit, whatever happened: the processes of each namespace, the namespaces, the bridge.
Needs root (as in CI) and iproute2.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from tests.infra_stack import load_stack

RAY = str(Path(sys.executable).with_name("ray"))
SERVERS = ("postgres", "s3", "mlflow")  # the part of the team stack the cluster uses
START_TIMEOUT_S = 90
# Fast failure detection: a killed node is declared dead in seconds, not a minute.
RAY_HEAD_ENV = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def namespace_pids(namespace: str) -> list[int]:
    listed = subprocess.run(
        ["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=30
    )
    return [int(pid) for pid in listed.stdout.split()]


def kill_namespace_processes(namespace: str) -> None:
    """SIGKILL every process in the namespace: what a host losing power looks like."""
    for _ in range(5):  # processes may fork while they are being killed
        pids = namespace_pids(namespace)
        if not pids:
            return
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str


@dataclass
class Cluster:
    head: Host
    worker: Host
    servers: dict[str, str]  # the stack's client env: the store and the tracking server
    ray_address: str
    scratch: Path

    @property
    def tracking_uri(self) -> str:
        return self.servers["MLFLOW_TRACKING_URI"]

    def env(self) -> dict[str, str]:
        """What a driver on the head host needs: the cluster, the store, the tracking server."""
        return {
            **os.environ,
            **self.servers,
            "RAY_ADDRESS": self.ray_address,
            "RAY_USAGE_STATS_ENABLED": "0",
            # Every node and driver of the cluster presents the cluster's token.
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.scratch / "ray_token"),
            # The hosts share one hostname, which resolves to loopback: torch.distributed
            # takes its address from the cluster interface instead (as on multi-NIC hosts).
            "GLOO_SOCKET_IFNAME": "eth0",
        }

    def run_on(
        self, host: Host, command: list[str], *, timeout: float, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", host.namespace, *command],
            env=env or self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def popen_on(self, host: Host, command: list[str]) -> subprocess.Popen[str]:
        """A long command on a host, its output merged and readable line by line."""
        return subprocess.Popen(
            ["ip", "netns", "exec", host.namespace, *command],
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )

    def start_worker_node(self) -> None:
        started = self.run_on(
            self.worker,
            [
                RAY,
                "start",
                f"--address={self.ray_address}",
                f"--node-ip-address={self.worker.address}",
                "--num-cpus=1",
                "--object-store-memory=200000000",
                f"--temp-dir={self.scratch / 'w'}",
                "--disable-usage-stats",
            ],
            timeout=START_TIMEOUT_S,
        )
        if started.returncode != 0:
            raise RuntimeError(f"ray worker node did not start:\n{started.stderr[-3000:]}")
        self.wait_for_nodes(2)

    def kill_worker_node(self) -> None:
        kill_namespace_processes(self.worker.namespace)

    def wait_for_nodes(self, count: int) -> None:
        script = (
            "import ray, time, sys\n"
            "ray.init(address=sys.argv[1], logging_level='ERROR')\n"
            f"deadline = time.monotonic() + {START_TIMEOUT_S}\n"
            f"while sum(n['Alive'] for n in ray.nodes()) < {count}:\n"
            "    assert time.monotonic() < deadline, ray.nodes()\n"
            "    time.sleep(0.5)\n"
        )
        probed = self.run_on(
            self.head,
            [sys.executable, "-c", script, self.ray_address],
            timeout=START_TIMEOUT_S + 30,
        )
        if probed.returncode != 0:
            raise RuntimeError(f"the cluster did not reach {count} nodes:\n{probed.stderr[-3000:]}")


def _progress(message: str) -> None:
    """The stack's progress lines: pytest shows the output of a failing test anyway."""
    print(f"servers: {message}")


def _add_host(bridge: str, host: Host, veth: str) -> None:
    _ip("netns", "add", host.namespace)
    _ip("-n", host.namespace, "link", "set", "lo", "up")
    _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", host.namespace)
    _ip("link", "set", veth, "master", bridge, "up")
    _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
    _ip("-n", host.namespace, "link", "set", "eth0", "up")


@contextmanager
def _network(tag: str, subnet: str) -> Iterator[tuple[Host, Host, str]]:
    bridge = f"scbr{tag}"
    head, worker = Host(f"sc{tag}-head", f"{subnet}.1"), Host(f"sc{tag}-worker", f"{subnet}.2")
    gateway = f"{subnet}.254"
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{gateway}/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        _add_host(bridge, head, f"sch{tag}")
        _add_host(bridge, worker, f"scw{tag}")
        yield head, worker, gateway
    finally:
        for host in (worker, head):
            kill_namespace_processes(host.namespace)
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


@contextmanager
def netns_cluster(bucket: str) -> Iterator[Cluster]:
    """The two hosts, the store (with `bucket`), the tracking server, and Ray on both hosts."""
    tag = str(os.getpid() % 100000)
    subnet = f"10.231.{os.getpid() % 250}"
    scratch = Path(tempfile.mkdtemp(prefix="sc", dir="/tmp"))  # short: Ray's socket paths
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        (scratch / "ray_token").write_text(secrets.token_hex(32))
        head, worker, gateway = stack.enter_context(_network(tag, subnet))
        servers = stack.enter_context(
            load_stack().running(
                scratch / "servers", host=gateway, bucket=bucket, services=SERVERS, log=_progress
            )
        )
        cluster = Cluster(
            head=head,
            worker=worker,
            servers=servers,
            ray_address=f"{head.address}:6379",
            scratch=scratch,
        )
        started = cluster.run_on(
            head,
            [
                RAY,
                "start",
                "--head",
                f"--node-ip-address={head.address}",
                "--port=6379",
                "--num-cpus=1",
                "--object-store-memory=200000000",
                "--include-dashboard=false",
                f"--temp-dir={scratch / 'h'}",
                "--disable-usage-stats",
            ],
            timeout=START_TIMEOUT_S,
            env={**cluster.env(), **RAY_HEAD_ENV},
        )
        if started.returncode != 0:
            raise RuntimeError(f"ray head did not start:\n{started.stderr[-3000:]}")
        cluster.start_worker_node()
        yield cluster
    left = _leftovers(tag, scratch)
    if left:
        raise RuntimeError(f"the cluster left behind: {left}")


def _leftovers(tag: str, scratch: Path) -> list[str]:
    """What a torn-down cluster must not leave: namespaces, the bridge, processes, files."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    left = [line.split()[0] for line in listed.splitlines() if line.startswith(f"sc{tag}-")]
    left += [f"scbr{tag}"] if f"scbr{tag}:" in links else []
    for entry in Path("/proc").iterdir():  # Ray's processes name their temp folder
        with suppress(OSError):
            named = str(scratch).encode() in (entry / "cmdline").read_bytes()
            if entry.name.isdigit() and named and int(entry.name) != os.getpid():
                left.append(f"process {entry.name}")
    return left + ([str(scratch)] if scratch.exists() else [])
