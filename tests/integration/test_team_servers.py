"""The team servers on one host, as infra/local/stack.py starts them: MLflow and Prefect on
PostgreSQL, artifacts and workdirs on an S3-compatible store, a Prefect worker and a Ray
head, every one real and on 127.0.0.1. One stack serves the whole module.

A tiny pipeline run from the CLI logs to MLflow over HTTP (runs, params, metrics, artifacts
stored in the bucket, rows in PostgreSQL); the demo deployment from prefect.yaml runs on
the stack's worker and tags its MLflow runs with its flow-run id; a failing stage fails its
flow run with the stage's own message.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipelines.registry import STAGE_NAMES
from tests.infra_stack import load_stack
from tests.integration.tiny_run import SEGCLIP, TINY_RUN, stage_folders

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[2]
BUCKET = "segclip-team"
WORKDIR = f"s3://{BUCKET}/work"
# The CLI run and the deployment share one configuration, so the deployment reuses what
# the CLI made (forcing evaluation onto the worker's Ray) and the suite stays short.
RUN = [f"runtime.workdir={WORKDIR}", *TINY_RUN]
RUN_TIMEOUT_S = 900
CLI_TIMEOUT_S = 300
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


stack = load_stack()


@dataclass(frozen=True)
class Team:
    state: Path
    env: dict[str, str]  # what `stack.py env` exports
    scratch: Path  # the clients' PREFECT_HOME and cache, outside the checkout

    def client_env(self) -> dict[str, str]:
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        return {
            **os.environ,
            **self.env,
            "PYTHONPATH": path,
            "PREFECT_HOME": str(self.scratch / "prefect-home"),
            "PREFECT_CLI_PROMPT": "false",
            "XDG_CACHE_HOME": str(self.scratch / "cache"),
        }

    def log_tail(self, service: str) -> str:
        return (self.state / "logs" / f"{service}.log").read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory):
    try:
        stack.postgres_bin()
    except stack.StackError as error:
        pytest.skip(str(error))
    state = tmp_path_factory.mktemp("team-stack")
    with stack.running(state, bucket=BUCKET) as env:
        yield Team(state=state, env=env, scratch=tmp_path_factory.mktemp("team-clients"))


def run(
    team: Team, command: list[str], *, cwd: Path, timeout: float
) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=cwd, env=team.client_env(), capture_output=True, text=True, timeout=timeout
    )


def segclip(team: Team, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return run(team, [*SEGCLIP, *args], cwd=cwd, timeout=RUN_TIMEOUT_S)


def prefect(team: Team, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "prefect", "--no-prompt", *args]
    return run(team, command, cwd=ROOT, timeout=CLI_TIMEOUT_S)


def api(team: Team, path: str) -> dict:
    with urllib.request.urlopen(f"{team.env['PREFECT_API_URL']}{path}", timeout=30) as answer:
        return json.loads(answer.read())


def mlflow_client(team: Team):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=team.env["MLFLOW_TRACKING_URI"])


def pipeline_runs(client, filter_string: str) -> tuple:
    """The one parent run the filter names, and its children by stage."""
    experiment = client.get_experiment_by_name("segclip").experiment_id
    parents = client.search_runs(
        [experiment], filter_string=f"tags.`segclip.stage` = 'pipeline' and {filter_string}"
    )
    assert len(parents) == 1, [p.info.run_name for p in parents]
    children = client.search_runs(
        [experiment],
        filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    by_stage = {child.data.tags["segclip.stage"]: child for child in children}
    assert len(by_stage) == len(children)
    return parents[0], by_stage


RAY_DRIVERS = """
import json, ray
from ray._private import state  # the job table without the dashboard the head runs without
ray.init(logging_level="ERROR")
print("DRIVERS " + json.dumps([job["Entrypoint"] for job in state.jobs()]))
"""


def ray_drivers(team: Team) -> list[str]:
    """The command lines of every driver that has joined the stack's Ray head."""
    done = run(team, [sys.executable, "-c", RAY_DRIVERS], cwd=team.scratch, timeout=CLI_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.split("DRIVERS ", 1)[1])


def listening(pids: set[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket these processes listen on, read from /proc."""
    inodes = set()
    for pid in pids:
        try:
            links = [os.readlink(f) for f in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        inodes |= {link[8:-1] for link in links if link.startswith("socket:[")}
    found = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # LISTEN
                address, port = local.split(":")
                assert len(address) == width
                found.add((decode_address(address), int(port, 16)))
    return found


def decode_address(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    words = [raw[i : i + 4][::-1] for i in range(0, len(raw), 4)]  # each word little-endian
    data = b"".join(words)
    if len(data) == 4:
        return ".".join(str(b) for b in data)
    if data[:12] == b"\0" * 10 + b"\xff\xff":  # IPv4-mapped
        return ".".join(str(b) for b in data[12:])
    return ":".join(data[i : i + 2].hex() for i in range(0, 16, 2))


def test_every_server_listens_on_loopback_only_and_refuses_strangers(team):
    services = stack.processes(team.state)
    assert sorted(services) == sorted(stack.SERVICES)
    sockets = listening(set().union(*services.values()))
    assert {address for address, _ in sockets} == {"127.0.0.1"}, sockets
    ports = {port for _, port in sockets}
    state = stack.read_state(team.state)
    for name in ("postgres", "s3", "mlflow", "prefect-server", "ray-head"):
        assert state["ports"][name] in ports, name

    # MLflow answers only to the Host names it serves (DNS-rebinding protection): with the
    # stack's --allowed-hosts, not even to a private address, which MLflow's default allows.
    search = f"{team.env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search?max_results=1"
    port = state["ports"]["mlflow"]
    for host, allowed in (("localhost", True), ("mlflow.example.com", False), ("10.0.0.5", False)):
        request = urllib.request.Request(search, headers={"Host": f"{host}:{port}"})
        try:
            status = urllib.request.urlopen(request, timeout=30).status
        except urllib.error.HTTPError as error:
            status = error.code
        assert (status == 200) == allowed, (host, status)

    # The Ray head wants the stack's token.
    ray = [str(Path(sys.executable).with_name("ray")), "health-check", "--address"]
    check = [*ray, team.env["RAY_ADDRESS"]]
    assert run(team, check, cwd=team.scratch, timeout=120).returncode == 0
    no_token = {**team.client_env(), "RAY_AUTH_MODE": "disabled"}
    refused_ray = subprocess.run(check, env=no_token, capture_output=True, text=True, timeout=120)
    assert refused_ray.returncode != 0
    assert "Authentication" in refused_ray.stderr + refused_ray.stdout


def test_a_pipeline_run_logs_to_the_team_mlflow_server_over_http(team, tmp_path):
    import psycopg
    import s3fs

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    done = segclip(team, cwd, "run", "--profile", "demo", *RUN)
    assert done.returncode == 0, done.stderr[-4000:]
    folders = stage_folders(done.stdout)
    assert list(folders) == list(STAGE_NAMES)
    assert not list(cwd.iterdir())  # nothing local: outputs on the store, runs on the server
    assert not (team.scratch / "cache" / "segclip" / "mlflow").exists()  # no local MLflow store

    client = mlflow_client(team)
    parent, children = pipeline_runs(client, f"params.`runtime.workdir` = '{WORKDIR}'")
    assert parent.info.status == "FINISHED"
    assert list(children) == list(STAGE_NAMES)
    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    for stage, child in children.items():
        assert child.info.status == "FINISHED"
        assert child.data.tags["prefect.flow_run_id"] == flow_run_id
        assert parent.data.tags[f"segclip.run.{stage}"] == child.info.run_id
        assert child.data.tags["segclip.stage_key"] == Path(folders[stage]).name
    # The CLI ran its flow against the team's Prefect server (PREFECT_API_URL), its stages
    # on the team's Ray head (RAY_ADDRESS).
    assert api(team, f"/flow_runs/{flow_run_id}")["state"]["type"] == "COMPLETED"
    assert any(" run --profile demo " in driver for driver in ray_drivers(team))

    assert parent.data.params["train.steps"] == "3"
    assert parent.data.params["runtime.workdir"] == WORKDIR
    losses = client.get_metric_history(children["train"].info.run_id, "loss/total")
    assert sorted(m.step for m in losses) == [1, 2, 3]
    assert all(m.value > 0 for m in losses)
    miou = children["evaluate"].data.metrics["miou/segclip/segclip_learned_scale/demo"]
    assert 0 <= miou <= 1 and parent.data.metrics["miou/segclip/segclip_learned_scale/demo"] == miou

    # Artifacts go through the server (clients hold no store credentials for them) ...
    ingest = children["ingest"].info
    assert ingest.artifact_uri == (
        f"mlflow-artifacts:/{ingest.experiment_id}/{ingest.run_id}/artifacts"
    )
    served = (
        f"{team.env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow-artifacts/artifacts/"
        f"{ingest.experiment_id}/{ingest.run_id}/artifacts/manifest.json"
    )
    with urllib.request.urlopen(served, timeout=30) as answer:
        manifest = answer.read()
    assert json.loads(manifest)["stage"] == "ingest"
    downloaded = client.download_artifacts(ingest.run_id, "manifest.json", str(tmp_path))
    assert Path(downloaded).read_bytes() == manifest
    # ... and are stored in the bucket under the server's --artifacts-destination.
    store = s3fs.S3FileSystem(
        endpoint_url=team.env["AWS_ENDPOINT_URL_S3"],
        key=team.env["AWS_ACCESS_KEY_ID"],
        secret=team.env["AWS_SECRET_ACCESS_KEY"],
        skip_instance_cache=True,
    )
    key = f"{BUCKET}/mlflow/{ingest.experiment_id}/{ingest.run_id}/artifacts/manifest.json"
    assert store.cat_file(key) == manifest
    assert store.cat_file(f"{folders['ingest'].removeprefix('s3://')}/manifest.json") == manifest

    # The runs are rows in the server's PostgreSQL database.
    with psycopg.connect(stack.database_url(team.state, "mlflow")) as db:
        rows = dict(
            db.execute(
                "select run_uuid, status from runs where experiment_id = %s",
                (int(ingest.experiment_id),),
            ).fetchall()
        )
    assert rows[parent.info.run_id] == "FINISHED"
    assert all(rows[child.info.run_id] == "FINISHED" for child in children.values())


@pytest.fixture(scope="module")
def deployed(team):
    """prefect.yaml's deployments, made from the checkout with `prefect deploy --all`."""
    done = prefect(team, "deploy", "--all")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    deployments = {f"{d['name']}" for d in json_post(team, "/deployments/filter")}
    assert {"demo", "paper", *STAGE_NAMES} <= deployments
    assert api(team, "/work_pools/segclip")["type"] == "process"
    return team


def json_post(team: Team, path: str) -> list[dict]:
    request = urllib.request.Request(
        f"{team.env['PREFECT_API_URL']}{path}",
        data=b"{}",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def start_deployment(team: Team, name: str, **parameters: object) -> str:
    """`prefect deployment run NAME --param key=JSON ...`; returns the flow run's id."""
    params = [
        arg
        for key, value in parameters.items()
        for arg in ("--param", f"{key}={json.dumps(value)}")
    ]
    done = prefect(team, "deployment", "run", name, *params)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return re.search(r"UUID: ([0-9a-f-]{36})", done.stdout).group(1)


def wait_for(team: Team, flow_run_id: str, *, timeout: float = RUN_TIMEOUT_S) -> dict:
    """Poll the Prefect API until the flow run ends; its final state."""
    deadline = time.monotonic() + timeout
    while (state := api(team, f"/flow_runs/{flow_run_id}")["state"])["type"] not in TERMINAL:
        assert time.monotonic() < deadline, f"{state}\n{team.log_tail('prefect-worker')}"
        time.sleep(2)
    return state


def test_the_demo_deployment_runs_on_the_team_worker_and_tags_its_mlflow_runs(deployed):
    team = deployed
    flow_run_id = start_deployment(team, "segclip-pipeline/demo", overrides=RUN, force=["evaluate"])
    state = wait_for(team, flow_run_id)
    assert state["type"] == "COMPLETED", f"{state}\n{team.log_tail('prefect-worker')}"
    flow_run = api(team, f"/flow_runs/{flow_run_id}")
    assert flow_run["parameters"]["profile"] == "demo"  # the deployment's own parameter

    client = mlflow_client(team)
    parent, children = pipeline_runs(client, f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow"] == "segclip-pipeline"
    assert list(children) == list(STAGE_NAMES)
    assert all(c.data.tags["prefect.flow_run_id"] == flow_run_id for c in children.values())
    evaluated = children["evaluate"]  # forced: evaluated again, by the worker's flow run
    assert "segclip.link" not in evaluated.data.tags
    assert (
        evaluated.info.status == "FINISHED"
        and "miou/segclip/segclip_learned_scale/demo" in evaluated.data.metrics
    )
    # ... on the stack's Ray head: the flow-run process joined it as a driver.
    assert any("prefect" in driver and "engine" in driver for driver in ray_drivers(team))


def test_a_failing_stage_fails_its_flow_run_with_the_stage_error(deployed):
    import psycopg

    team = deployed
    broken = [*RUN, "eval.benchmarks=[voc]", "eval.data_root=/nowhere"]
    missing = start_deployment(team, "segclip-pipeline/demo", overrides=broken)
    nothing = [f"runtime.workdir=s3://{BUCKET}/nothing-here", *TINY_RUN]
    alone = start_deployment(team, "segclip-stage/train", overrides=nothing)

    state = wait_for(team, missing)
    assert state["type"] == "FAILED", f"{state}\n{team.log_tail('prefect-worker')}"
    assert "VOCdevkit/VOC2012" in state["message"]
    state = wait_for(team, alone)
    assert state["type"] == "FAILED", f"{state}\n{team.log_tail('prefect-worker')}"
    assert "superpixels needs the ingest output" in state["message"]
    assert f"s3://{BUCKET}/nothing-here/ingest/" in state["message"]

    parent, children = pipeline_runs(
        mlflow_client(team), f"tags.`prefect.flow_run_id` = '{missing}'"
    )
    assert parent.info.status == "FAILED"
    assert list(children) == ["ingest", "superpixels", "train"]  # evaluation never began
    with psycopg.connect(stack.database_url(team.state, "prefect")) as db:
        states = dict(
            db.execute(
                "select id::text, state_type::text from flow_run where id::text in (%s, %s)",
                (missing, alone),
            ).fetchall()
        )
    assert states == {missing: "FAILED", alone: "FAILED"}
