"""A two-host Ray cluster on this machine: Linux network namespaces joined by a bridge.

Each host is a network namespace with its own address on a private /24; the bridge's
address in this (the test's) namespace serves the S3-compatible store and the MLflow
server, which both hosts reach. Ray runs a head node in one namespace and a worker node in
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
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from tests.integration.s3_server import CREDENTIALS, aws_credentials, free_port, moto_server

RAY = str(Path(sys.executable).with_name("ray"))
MLFLOW = str(Path(sys.executable).with_name("mlflow"))
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
    gateway: str  # this namespace's address on the cluster network
    s3_endpoint: str
    tracking_uri: str
    ray_address: str
    scratch: Path

    def env(self) -> dict[str, str]:
        """What a driver on the head host needs: the cluster, the store, the tracking server."""
        return {
            **os.environ,
            **CREDENTIALS,
            "RAY_ADDRESS": self.ray_address,
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint,
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
def _mlflow_server(host: str, scratch: Path, artifacts: str, s3_endpoint: str) -> Iterator[str]:
    """An MLflow tracking server on the cluster network; artifacts proxied into the store."""
    port = free_port(host)
    log = (scratch / "mlflow.log").open("w")
    server = subprocess.Popen(
        [
            MLFLOW,
            "server",
            f"--host={host}",
            f"--port={port}",
            f"--backend-store-uri=sqlite:///{scratch / 'mlflow.db'}",
            f"--artifacts-destination={artifacts}",
            "--serve-artifacts",
            "--workers=1",
        ],
        env={**os.environ, **CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(uri + "/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start on {uri}") from None
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


@contextmanager
def netns_cluster(bucket: str) -> Iterator[Cluster]:
    """The two hosts, the store (with `bucket`), the tracking server, and Ray on both hosts."""
    import s3fs

    tag = str(os.getpid() % 100000)
    subnet = f"10.231.{os.getpid() % 250}"
    scratch = Path(tempfile.mkdtemp(prefix="sc", dir="/tmp"))  # short: Ray's socket paths
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        (scratch / "ray_token").write_text(secrets.token_hex(32))
        head, worker, gateway = stack.enter_context(_network(tag, subnet))
        s3_endpoint = stack.enter_context(moto_server(gateway))
        with aws_credentials():
            s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True).mkdir(bucket)
        tracking = stack.enter_context(
            _mlflow_server(gateway, scratch, f"s3://{bucket}/mlflow", s3_endpoint)
        )
        cluster = Cluster(
            head=head,
            worker=worker,
            gateway=gateway,
            s3_endpoint=s3_endpoint,
            tracking_uri=tracking,
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
