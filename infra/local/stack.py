"""The team stack on one host, started natively: PostgreSQL, an S3-compatible store, the
MLflow server, the Prefect server and a worker, a Ray head.

The service list and the variables a client exports are declared here once; the compose
file in infra/docker/ is checked against them.

    python infra/local/stack.py up --state DIR [--host 127.0.0.1] [--bucket NAME]
    eval "$(python infra/local/stack.py env --state DIR)"
    python infra/local/stack.py status --state DIR
    python infra/local/stack.py down --state DIR

Every server binds `--host` (loopback by default) on free ports (`--fixed-ports` for the
usual ones). What `up` starts is recorded in DIR/stack.json as it starts, so `down` stops
all of it even after a start that failed half-way, and `up` calls `down` itself when a
service does not come up. The database cluster and the store are throwaway: `down`
deletes them (moto keeps objects in memory).

Tests import this file by path (infra/ is not a package): `up`, `down`, `running`.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

SERVICES = ("postgres", "s3", "mlflow", "prefect-server", "prefect-worker", "ray-head")
EXPORTED_ENV = (
    "MLFLOW_TRACKING_URI",
    "PREFECT_API_URL",
    "RAY_ADDRESS",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
)

ROOT = Path(__file__).resolve().parents[2]  # the checkout whose flows the worker runs
PYTHON = sys.executable
STATE_FILE = "stack.json"
POOL = "segclip"  # prefect.yaml's work pool
DB_USER = "segclip"
DATABASES = ("mlflow", "prefect")
REGION = "us-east-1"
FIXED_PORTS = {
    "postgres": 5432,
    "s3": 9000,
    "mlflow": 5000,
    "prefect-server": 4200,
    "ray-head": 6379,
}
RAY_PORTS = (
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)
START_TIMEOUT_S = {
    "postgres": 90,
    "s3": 60,
    "mlflow": 240,
    "prefect-server": 300,
    "prefect-worker": 180,
    "ray-head": 180,
}
COMMAND_TIMEOUT_S = 180
STOP_GRACE_S = 20.0
LEADER_GRACE_S = 45.0  # `ray start --block` stopping its processes
POLL_S = 0.5
# A loopback Ray head is a one-node cluster: without this, Ray swaps 127.0.0.1 for the
# host's outward address (where nothing listens), in the head and in every client.
RAY_LOOPBACK_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Client settings a service must not inherit from the shell that runs `up`.
FOREIGN_ENV = (*EXPORTED_ENV, "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "RAY_AUTH_MODE",
               "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", RAY_LOOPBACK_VARIABLE, "PREFECT_PROFILE",
               "PREFECT_HOME", "PREFECT_API_KEY", "PGPASSWORD")  # fmt: skip


class StackError(RuntimeError):
    """A service that did not start or stop, with what its log says."""


def say(message: str) -> None:
    print(f"stack: {message}", file=sys.stderr, flush=True)


# --- state -------------------------------------------------------------------------------


def read_state(state_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = Path(state_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _save(state: dict[str, Any]) -> None:
    """Written after every step, so `down` finds whatever a failed or killed `up` left."""
    path = Path(state["state_dir"]) / STATE_FILE
    scratch = path.with_suffix(".tmp")
    scratch.touch(mode=0o600)  # it holds the database password and the store's keys
    scratch.write_text(json.dumps(state, indent=2))
    os.replace(scratch, path)


def client_env(state: Mapping[str, Any]) -> dict[str, str]:
    """What a client of this stack exports: EXPORTED_ENV plus the region and Ray's token, for
    the services it runs."""
    host, ports = _url_host(state["host"]), state["ports"]
    running = state.get("services", SERVICES)
    env = {}
    if "mlflow" in running:
        env["MLFLOW_TRACKING_URI"] = f"http://{host}:{ports['mlflow']}"
    if "prefect-server" in running:
        env["PREFECT_API_URL"] = f"http://{host}:{ports['prefect-server']}/api"
    if "s3" in running:
        env |= {
            "AWS_ENDPOINT_URL_S3": f"http://{host}:{ports['s3']}",
            "AWS_ACCESS_KEY_ID": state["secrets"]["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": state["secrets"]["aws_secret_access_key"],
            "AWS_DEFAULT_REGION": REGION,
        }
    if "ray-head" in running:
        env["RAY_ADDRESS"] = f"{host}:{ports['ray-head']}"
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN_PATH"] = str(Path(state["state_dir"]) / "ray-auth-token")
        if _is_loopback(state["host"]):
            env[RAY_LOOPBACK_VARIABLE] = "0"
    return env


def database_url(state_dir: str | os.PathLike[str], database: str) -> str:
    """The stack's PostgreSQL database as a libpq URL (password included): for checks."""
    state = read_state(state_dir)
    if state is None:
        raise StackError(f"no stack recorded in {state_dir}")
    password = state["secrets"]["db_password"]
    host = _url_host(state["host"])
    return f"postgresql://{DB_USER}:{password}@{host}:{state['ports']['postgres']}/{database}"


def _is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# --- processes ---------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name (state first), or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rsplit(")", 1)[1].split()


def _started(pid: int) -> str | None:
    """The process's start time in clock ticks: with the pid, it names one process for good."""
    fields = _stat(pid)
    return fields[19] if fields else None


def _alive(pid: int, started: str) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
    fields = _stat(pid)
    return fields is not None and fields[19] == started and fields[0] != "Z"


def _family(pid: int, started: str) -> dict[int, str]:
    """A recorded process (while the pid is still it), everything below it, and what is left
    in its process group, by pid -> start ticks. Linux reuses no pid while a group of that id
    lives, so a pid that now names another process leaves nothing of ours behind."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            table[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[19])  # ppid, pgrp
    if pid in table and table[pid][2] != started:
        return {}
    found = {p for p, (_, group, _) in table.items() if group == pid} | ({pid} & set(table))
    while True:
        more = {p for p, (parent, _, _) in table.items() if parent in found} - found
        if not more:
            return {p: table[p][2] for p in found}
        found |= more


def _signal(family: Mapping[int, str], signum: int) -> None:
    for pid, started in family.items():
        if _alive(pid, started):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)


def _wait_gone(family: Mapping[int, str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(pid, started) for pid, started in family.items()):
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True


def _stop_tree(record: Mapping[str, Any], *, leader_first: bool = False) -> None:
    """Stop a recorded process, everything below it and what is left of its process group:
    SIGTERM, then SIGKILL. `leader_first` gives the recorded process the chance to stop its
    children in its own order before they are signalled themselves."""
    pid, started = record["pid"], record["started"]
    family = _family(pid, started)
    if leader_first:
        _signal({pid: started}, signal.SIGTERM)
        _wait_gone({pid: started}, LEADER_GRACE_S)
    _signal(family, signal.SIGTERM)
    if not _wait_gone(family, STOP_GRACE_S):
        _signal(family, signal.SIGKILL)
        _wait_gone(family, STOP_GRACE_S)


def _log_tail(path: str | os.PathLike[str], lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _spawn(
    state: dict[str, Any], name: str, command: list[str], env: Mapping[str, str]
) -> subprocess.Popen:
    """Start a service in its own session (Ctrl-C in the shell that ran `up` leaves it be),
    its output in its log, and record it before anything else can fail."""
    log = Path(state["state_dir"]) / "logs" / f"{name}.log"
    with log.open("ab") as stream:
        process = subprocess.Popen(
            command,
            env=dict(env),
            cwd=state["state_dir"],
            stdin=subprocess.DEVNULL,
            stdout=stream,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    started = _started(process.pid)
    state["processes"][name] = {"pid": process.pid, "started": started, "log": str(log)}
    _save(state)
    return process


def _wait_until(
    name: str,
    ready: Callable[[], bool],
    *,
    timeout: float,
    log: str | os.PathLike[str],
    process: subprocess.Popen | None = None,
) -> None:
    """Poll `ready` until it holds; fail with the log's tail if the process ends or time's up."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process is not None and process.poll() is not None:
            raise StackError(
                f"{name} exited ({process.returncode}) before answering; its log "
                f"{log} ends:\n{_log_tail(log)}"
            )
        if time.monotonic() > deadline:
            raise StackError(
                f"{name} did not answer within {timeout:.0f}s; its log {log} ends:\n"
                f"{_log_tail(log)}"
            )
        time.sleep(POLL_S)


Waiter = Callable[[], None]


def _ready() -> None:
    """The waiter of a service that was ready when its starter returned."""


def _waiter(
    state: Mapping[str, Any], name: str, process: subprocess.Popen, ready: Callable[[], bool]
) -> Waiter:
    """Wait for a spawned service later, so that services with no order start together."""
    log = state["processes"][name]["log"]
    return lambda: _wait_until(name, ready, timeout=START_TIMEOUT_S[name], log=log, process=process)


def _http_ok(url: str, *, data: bytes | None = None) -> bytes | None:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.read() if response.status == 200 else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _run(command: list[str], *, env: Mapping[str, str] | None, log: Path, **options: Any) -> None:
    """A one-off command, its output appended to `log`; fails with that output."""
    with log.open("ab") as stream:
        stream.write(f"$ {shlex.join(command)}\n".encode())
        stream.flush()
        done = subprocess.run(
            command,
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            stdout=stream,
            stderr=subprocess.STDOUT,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
            **options,
        )
    if done.returncode != 0:
        raise StackError(f"{shlex.join(command)} failed ({done.returncode}):\n{_log_tail(log)}")


def _free_port(host: str, taken: set[int]) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with socket.socket(family) as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}


def _storage_env(state: Mapping[str, Any]) -> dict[str, str]:
    env = client_env(state)
    if "AWS_ENDPOINT_URL_S3" not in env:
        return {}  # a part of the stack without the store
    names = ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    return {
        **{name: env[name] for name in names},
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata probe for credentials
    }


def _checkout_path() -> str:
    """PYTHONPATH for processes that import this checkout's packages (flows, Ray workers)."""
    existing = os.environ.get("PYTHONPATH")
    return f"{ROOT}{os.pathsep}{existing}" if existing else str(ROOT)


# --- services ----------------------------------------------------------------------------


def postgres_bin() -> Path:
    """PostgreSQL's server programs: SEGCLIP_PG_BIN, Debian's newest, or the PATH."""
    configured = os.environ.get("SEGCLIP_PG_BIN")
    candidates = [Path(configured)] if configured else []
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True
    )
    if found := shutil.which("initdb"):
        candidates.append(Path(found).parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise StackError("PostgreSQL's initdb and pg_ctl were not found: set SEGCLIP_PG_BIN")


def _as_db_owner(command: list[str], user: str | None) -> list[str]:
    return ["runuser", "-u", user, "--", *command] if user else command


def _start_postgres(state: dict[str, Any]) -> Waiter:
    """A throwaway cluster owned by an unprivileged user (initdb refuses root), TCP only."""
    pg, host, port = state["pg"], state["host"], state["ports"]["postgres"]
    binaries, user = Path(pg["bin"]), pg["user"]
    # In /tmp, not the state folder: the owner must reach it (a pytest tmp dir is 0700).
    folder = Path(tempfile.mkdtemp(prefix="segclip-pg-"))
    pg["dir"] = str(folder)
    _save(state)
    password_file = folder / "password"
    password_file.write_text(state["secrets"]["db_password"] + "\n")
    if user:
        owner = pwd.getpwnam(user)
        for path in (folder, password_file):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    log = Path(state["state_dir"]) / "logs" / "postgres-setup.log"
    data = folder / "data"
    initdb = [str(binaries / "initdb"), "-D", str(data), "-U", DB_USER, "-E", "UTF8",
              "--locale=C", "--auth=scram-sha-256", f"--pwfile={password_file}"]  # fmt: skip
    _run(_as_db_owner(initdb, user), env=None, log=log, cwd=folder)
    password_file.unlink()
    with (data / "postgresql.conf").open("a") as conf:
        conf.write(f"\nlisten_addresses = '{host}'\nport = {port}\nunix_socket_directories = ''\n")
    if not _is_loopback(host):  # the servers, on this host, connect to it there
        prefix = ipaddress.ip_network(host).prefixlen
        with (data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all {DB_USER} {host}/{prefix} scram-sha-256\n")
    server_log = folder / "postgres.log"
    start = [str(binaries / "pg_ctl"), "-D", str(data), "-l", str(server_log), "-w",
             "-t", str(START_TIMEOUT_S["postgres"]), "start"]  # fmt: skip
    try:
        _run(_as_db_owner(start, user), env=None, log=log, cwd=folder, start_new_session=True)
    except StackError as error:
        raise StackError(f"{error}\nthe server log ends:\n{_log_tail(server_log)}") from None
    pid = int((data / "postmaster.pid").read_text().split()[0])
    state["processes"]["postgres"] = {"pid": pid, "started": _started(pid), "log": str(server_log)}
    _save(state)
    env = {**_base_env(), "PGPASSWORD": state["secrets"]["db_password"]}
    ready = [str(binaries / "pg_isready"), "-h", host, "-p", str(port), "-U", DB_USER, "-q"]
    _wait_until(
        "postgres",
        lambda: subprocess.run(ready, env=env, check=False, timeout=10).returncode == 0,
        timeout=START_TIMEOUT_S["postgres"],
        log=server_log,
    )
    for database in DATABASES:
        createdb = [str(binaries / "createdb"), "-h", host, "-p", str(port), "-U", DB_USER]
        _run([*createdb, database], env=env, log=log)
    return _ready


def _start_s3(state: dict[str, Any]) -> Waiter:
    """moto in server mode, and the bucket the MLflow artifacts and workdirs go to."""
    host, port = state["host"], state["ports"]["s3"]
    command = [PYTHON, "-m", "moto.server", "-H", host, "-p", str(port)]
    process = _spawn(state, "s3", command, {**_base_env(), **_storage_env(state)})
    endpoint = client_env(state)["AWS_ENDPOINT_URL_S3"]
    _wait_until(
        "s3",
        lambda: _http_ok(f"{endpoint}/moto-api/") is not None,
        timeout=START_TIMEOUT_S["s3"],
        log=state["processes"]["s3"]["log"],
        process=process,
    )
    import boto3  # in the project's environment; here only, so `env` and `down` need none

    secrets_ = state["secrets"]
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=secrets_["aws_access_key_id"],
        aws_secret_access_key=secrets_["aws_secret_access_key"],
    ).create_bucket(Bucket=state["bucket"])
    return _ready


def _start_mlflow(state: dict[str, Any]) -> Waiter:
    """MLflow on PostgreSQL, serving artifacts itself from s3://BUCKET/mlflow: clients need
    only the tracking URI. The database password travels in the environment, not argv."""
    host, ports = state["host"], state["ports"]
    url_host, port = _url_host(host), ports["mlflow"]
    storage = _storage_env(state)
    env = {
        **_base_env(),
        **storage,
        "MLFLOW_S3_ENDPOINT_URL": storage["AWS_ENDPOINT_URL_S3"],
        "PGPASSWORD": state["secrets"]["db_password"],
    }
    allowed = ",".join(dict.fromkeys([f"{url_host}:{port}", f"localhost:{port}"]))
    command = [
        PYTHON, "-m", "mlflow", "server",
        "--backend-store-uri", f"postgresql://{DB_USER}@{url_host}:{ports['postgres']}/mlflow",
        "--artifacts-destination", f"s3://{state['bucket']}/mlflow",
        "--serve-artifacts",
        "--host", host,
        "--port", str(port),
        "--workers", "1",
        "--allowed-hosts", allowed,
    ]  # fmt: skip
    process = _spawn(state, "mlflow", command, env)
    uri = client_env(state)["MLFLOW_TRACKING_URI"]
    return _waiter(state, "mlflow", process, lambda: _http_ok(f"{uri}/health") is not None)


def _prefect_env(state: Mapping[str, Any], home: str) -> dict[str, str]:
    """A Prefect client of this stack: its own PREFECT_HOME, so ~/.prefect is never touched."""
    folder = Path(state["state_dir"]) / home
    folder.mkdir(exist_ok=True)
    return {
        **_base_env(),
        "PREFECT_HOME": str(folder),
        "PREFECT_API_URL": client_env(state)["PREFECT_API_URL"],
        "PREFECT_CLI_PROMPT": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


def _start_prefect_server(state: dict[str, Any]) -> Waiter:
    """The Prefect API and UI on PostgreSQL."""
    host, ports = state["host"], state["ports"]
    password = state["secrets"]["db_password"]
    database = f"{DB_USER}:{password}@{_url_host(host)}:{ports['postgres']}/prefect"
    env = {
        **_prefect_env(state, "prefect-server-home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{database}",
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(ports["prefect-server"]),
    }
    env.pop("PREFECT_API_URL")
    command = [PYTHON, "-m", "prefect", "server", "start", "--host", host,
               "--port", str(ports["prefect-server"])]  # fmt: skip
    process = _spawn(state, "prefect-server", command, env)
    api = client_env(state)["PREFECT_API_URL"]
    return _waiter(state, "prefect-server", process, lambda: _http_ok(f"{api}/health") is not None)


def _worker_online(api: str) -> bool:
    answer = _http_ok(f"{api}/work_pools/{POOL}/workers/filter", data=b"{}")
    return answer is not None and any(w.get("status") == "ONLINE" for w in json.loads(answer))


def _start_prefect_worker(state: dict[str, Any]) -> Waiter:
    """A process worker, which creates the work pool prefect.yaml names; its flow runs see
    the whole stack: flow-run subprocesses get the worker's environment (tracking URI, store,
    Ray) and import this checkout."""
    env = {
        **_prefect_env(state, "prefect-worker-home"),
        **client_env(state),
        **_storage_env(state),
        "PYTHONPATH": _checkout_path(),
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # pick up a new run in seconds, not 10
    }
    command = [PYTHON, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process",
               "--name", f"segclip-{state['host']}"]  # fmt: skip
    process = _spawn(state, "prefect-worker", command, env)
    api = client_env(state)["PREFECT_API_URL"]
    return _waiter(state, "prefect-worker", process, lambda: _worker_online(api))


def _ray_env(state: Mapping[str, Any]) -> dict[str, str]:
    client = client_env(state)
    names = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", RAY_LOOPBACK_VARIABLE)
    return {name: client[name] for name in names if name in client}


def _ray_node_up(state: Mapping[str, Any]) -> bool:
    """The head's raylet has registered: before that a driver cannot join."""
    status = [
        str(Path(PYTHON).parent / "ray"),
        "status",
        "--address",
        client_env(state)["RAY_ADDRESS"],
    ]
    env = {**_base_env(), **_ray_env(state)}
    try:
        done = subprocess.run(status, env=env, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return False
    active = done.stdout.partition("Active:")[2].partition("Pending:")[0]
    return done.returncode == 0 and "node_" in active


def _start_ray_head(state: dict[str, Any]) -> Waiter:
    """`ray start --head --block`: the blocking form stays our child, so stopping it stops its
    processes, and never `ray stop`, which stops every Ray on the machine. Token auth with
    the stack's own token; every port chosen here, so two heads on one host do not clash."""
    host, ports = state["host"], state["ports"]
    token = Path(state["state_dir"]) / "ray-auth-token"
    token.touch(mode=0o600)
    token.write_text(state["secrets"]["ray_token"])
    # Short: Ray's unix sockets live under it (107 characters at most).
    state["ray_temp"] = tempfile.mkdtemp(prefix="scray-", dir="/tmp")
    _save(state)
    env = {
        **_base_env(),
        **_storage_env(state),
        **_ray_env(state),
        "PYTHONPATH": _checkout_path(),
        # Ray's own clients inside the workers (e.g. Ray Train's placement-group cleaner)
        # would otherwise guess the cluster, and fail where a host runs more than one Ray.
        "RAY_ADDRESS": client_env(state)["RAY_ADDRESS"],
        # On SIGTERM Ray drains the node for up to 30 s, for its work to move elsewhere; a
        # head that is the whole cluster has nowhere to move it to.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
    command = [
        str(Path(PYTHON).parent / "ray"), "start", "--head", "--block",
        "--node-ip-address", host,
        "--port", str(ports["ray-head"]),
        "--temp-dir", state["ray_temp"],
        "--include-dashboard=false",
        "--disable-usage-stats",
        *(arg for name in RAY_PORTS for arg in (f"--{name}", str(ports[f"ray-{name}"]))),
    ]  # fmt: skip
    process = _spawn(state, "ray-head", command, env)
    return _waiter(state, "ray-head", process, lambda: _ray_node_up(state))


STARTERS: dict[str, Callable[[dict[str, Any]], Waiter]] = {
    "postgres": _start_postgres,
    "s3": _start_s3,
    "mlflow": _start_mlflow,
    "prefect-server": _start_prefect_server,
    "prefect-worker": _start_prefect_worker,
    "ray-head": _start_ray_head,
}
assert tuple(STARTERS) == SERVICES
# Started together where nothing orders them: the servers' migrations overlap.
PHASES = (("postgres",), ("s3",), ("mlflow", "prefect-server", "ray-head"), ("prefect-worker",))
assert sorted(name for phase in PHASES for name in phase) == sorted(SERVICES)
NEEDS = {"mlflow": ("postgres", "s3"), "prefect-server": ("postgres",),
         "prefect-worker": ("prefect-server",)}  # fmt: skip


def _check_services(services: Sequence[str]) -> None:
    """A part of the stack (a test's tracking server, say) must bring what it runs on."""
    unknown = sorted(set(services) - set(SERVICES))
    if unknown:
        raise StackError(f"unknown services {unknown}: choose from {', '.join(SERVICES)}")
    for name in services:
        missing = [need for need in NEEDS.get(name, ()) if need not in services]
        if missing:
            raise StackError(f"{name} needs {', '.join(missing)}: add it to the services")


def _where(state: Mapping[str, Any], name: str) -> str:
    env, ports = client_env(state), state["ports"]
    where = {  # env has the variables of the running services only
        "postgres": f"{_url_host(state['host'])}:{ports['postgres']} (databases "
        f"{', '.join(DATABASES)})",
        "s3": f"{env.get('AWS_ENDPOINT_URL_S3')} (bucket {state['bucket']})",
        "mlflow": env.get("MLFLOW_TRACKING_URI"),
        "prefect-server": env.get("PREFECT_API_URL"),
        "prefect-worker": f"pool {POOL}, flows from {ROOT}",
        "ray-head": env.get("RAY_ADDRESS"),
    }
    return str(where[name])


# --- up / down ---------------------------------------------------------------------------


def up(
    state_dir: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    bucket: str = "segclip",
    fixed_ports: bool = False,
    services: Sequence[str] = SERVICES,
    log: Callable[[str], None] = say,
) -> dict[str, str]:
    """Start the services (all by default), a phase's services answering before the next
    phase starts; returns the client env. On any failure (Ctrl-C included) it stops what it
    started."""
    _check_services(services)
    folder = Path(state_dir).resolve()
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    previous = read_state(folder)
    if previous and any(_running(previous).values()):
        raise StackError(f"a stack is running from {folder}: stop it first (down)")
    if previous:
        down(folder, log=log)  # whatever a killed `up` or `down` left behind
    taken: set[int] = set()
    ports = {name: _free_port(host, taken) for name in FIXED_PORTS}
    if fixed_ports:
        ports.update(FIXED_PORTS)
    ports |= {f"ray-{name}": _free_port(host, taken) for name in RAY_PORTS}
    state: dict[str, Any] = {
        "state_dir": str(folder),
        "host": host,
        "bucket": bucket,
        "services": [name for name in SERVICES if name in services],
        "ports": ports,
        "secrets": {
            "db_password": secrets.token_urlsafe(24),
            "aws_access_key_id": f"segclip{secrets.token_hex(6)}",
            "aws_secret_access_key": secrets.token_urlsafe(30),
            "ray_token": secrets.token_hex(32),
        },
        "pg": {"bin": str(postgres_bin()), "user": _db_owner(), "dir": None},
        "ray_temp": None,
        "processes": {},
    }
    _save(state)
    try:
        for phase in PHASES:
            phase = tuple(name for name in phase if name in services)
            if not phase:
                continue
            began = time.monotonic()
            log(f"starting {', '.join(phase)} ...")
            for name, wait in [(name, STARTERS[name](state)) for name in phase]:
                wait()
                log(f"{name} ready: {_where(state, name)} ({time.monotonic() - began:.1f}s)")
    except BaseException:
        log("start failed: stopping what was started")
        try:
            down(folder, log=log)
        except StackError as error:  # the start's own error is the one to raise
            log(f"stopping failed too: {error}")
        raise
    return client_env(state)


def _db_owner() -> str | None:
    """initdb and postgres refuse to run as root: as root, they run as `nobody`."""
    return os.environ.get("SEGCLIP_PG_USER", "nobody") if os.geteuid() == 0 else None


def _running(state: Mapping[str, Any]) -> dict[str, bool]:
    return {
        name: _alive(record["pid"], record["started"])
        for name, record in state["processes"].items()
    }


def _stop_postgres(state: Mapping[str, Any]) -> None:
    pg = state["pg"]
    data = Path(pg["dir"]) / "data" if pg["dir"] else None
    if data and (data / "postmaster.pid").is_file():
        stop = [str(Path(pg["bin"]) / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t",
                str(int(STOP_GRACE_S * 3)), "stop"]  # fmt: skip
        log = Path(state["state_dir"]) / "logs" / "postgres-setup.log"
        with contextlib.suppress(StackError, subprocess.TimeoutExpired):
            _run(_as_db_owner(stop, pg["user"]), env=None, log=log, cwd="/")
    if record := state["processes"].get("postgres"):
        _stop_tree(record)


def _stop_ray(state: Mapping[str, Any]) -> None:
    """`ray start --block` stops its processes in order on SIGTERM (in seconds; signalled all
    at once, the GCS lingers half a minute). Afterwards, any process still naming this
    head's temp folder (unique to it) is ended by its pid."""
    if record := state["processes"].get("ray-head"):
        _stop_tree(record, leader_first=True)
    if temp := state.get("ray_temp"):
        stray = _naming(temp)
        _signal(stray, signal.SIGKILL)
        _wait_gone(stray, STOP_GRACE_S)


def _naming(text: str) -> dict[int, str]:
    """Processes whose command line contains `text` (a folder unique to this stack)."""
    found = {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found[int(entry.name)] = _started(int(entry.name)) or ""
    return found


def processes(state_dir: str | os.PathLike[str]) -> dict[str, set[int]]:
    """The live processes of each service, children included: for checks on what they do."""
    state = read_state(state_dir) or {"processes": {}}
    found = {}
    for name, record in state["processes"].items():
        if _alive(record["pid"], record["started"]):
            found[name] = set(_family(record["pid"], record["started"]))
            if name == "ray-head" and state.get("ray_temp"):
                found[name] |= set(_naming(state["ray_temp"]))
    return found


def down(state_dir: str | os.PathLike[str], *, log: Callable[[str], None] = say) -> None:
    """Stop everything `up` recorded, last started first, then delete the throwaway data.
    Safe to call twice, or after an `up` that failed or was killed half-way."""
    folder = Path(state_dir).resolve()
    state = read_state(folder)
    if state is None:
        log(f"nothing recorded in {folder}")
        return
    problems = []
    for name in reversed(SERVICES):
        if name not in state["processes"] and not (name == "postgres" and state["pg"]["dir"]):
            continue
        began = time.monotonic()
        try:
            if name == "postgres":
                _stop_postgres(state)
            elif name == "ray-head":
                _stop_ray(state)
            else:
                _stop_tree(state["processes"][name])
        except Exception as error:  # keep stopping the others
            problems.append(f"{name}: {error}")
        log(f"stopped {name} ({time.monotonic() - began:.1f}s)")
    if not state["processes"].get("ray-head") and state.get("ray_temp"):
        _stop_ray(state)  # a head that failed before it was recorded
    left = [name for name, alive in _running(state).items() if alive]
    problems += [f"{name} is still running" for name in left]
    if pg_dir := state["pg"]["dir"]:
        with contextlib.suppress(OSError):
            shutil.copyfile(Path(pg_dir) / "postgres.log", folder / "logs" / "postgres.log")
        if "postgres" not in left:
            shutil.rmtree(pg_dir, ignore_errors=True)
            state["pg"]["dir"] = None
    if (temp := state.get("ray_temp")) and "ray-head" not in left:
        shutil.rmtree(temp, ignore_errors=True)
        state["ray_temp"] = None
    state["processes"] = {name: state["processes"][name] for name in left}
    _save(state)
    if problems:
        raise StackError("; ".join(problems))
    log("stopped")


@contextlib.contextmanager
def running(state_dir: str | os.PathLike[str], **options: Any) -> Iterator[dict[str, str]]:
    """`up` for the block's duration (yields the client env); `down` however it ends."""
    try:
        yield up(state_dir, **options)
    finally:
        down(state_dir, log=options.get("log", say))


# --- command line ------------------------------------------------------------------------


def _exports(state: Mapping[str, Any]) -> str:
    lines = [f"export {name}={shlex.quote(value)}" for name, value in client_env(state).items()]
    lines.append(f"# workdir on the stack's store: runtime.workdir=s3://{state['bucket']}/work")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (
        ("up", "start every service (returns once all answer)"),
        ("env", "print `export NAME=value` lines for a client of the running stack"),
        ("status", "which recorded services are running"),
        ("down", "stop every service and delete the throwaway data"),
    ):
        command = commands.add_parser(name, help=help_)
        command.add_argument("--state", required=True, type=Path, help="the stack's state folder")
        if name == "up":
            command.add_argument("--host", default="127.0.0.1", help="address every server binds")
            command.add_argument("--bucket", default="segclip", help="bucket on the S3 store")
            command.add_argument(
                "--services",
                default=",".join(SERVICES),
                help="comma-separated part of the stack to start (default: all of it)",
            )
            command.add_argument(
                "--fixed-ports",
                action="store_true",
                help=f"the usual ports ({', '.join(f'{k} {v}' for k, v in FIXED_PORTS.items())})"
                " instead of free ones",
            )
    args = parser.parse_args(argv)
    if args.command == "up":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed `up` cleans up
        up(
            args.state,
            host=args.host,
            bucket=args.bucket,
            fixed_ports=args.fixed_ports,
            services=args.services.split(","),
        )
        print(_exports(read_state(args.state)))
        say(f"stop with: {shlex.join([PYTHON, __file__, 'down', '--state', str(args.state)])}")
        return 0
    state = read_state(args.state)
    if args.command == "down":
        down(args.state)
        return 0
    if state is None:
        say(f"no stack recorded in {args.state}")
        return 1
    if args.command == "env":
        print(_exports(state))
        return 0
    for name, alive in _running(state).items():
        print(f"{name:15s} {'running' if alive else 'stopped'}  {_where(state, name)}")
    return 0 if all(_running(state).values()) and state["processes"] else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StackError as error:
        say(str(error))
        sys.exit(1)
