"""infra/local/stack.py's choice of services, without starting any: what a part of the
stack must include, and what its clients are told to export."""

from __future__ import annotations

import re

import pytest

from tests.infra_stack import load_stack

stack = load_stack()


def state(services: tuple[str, ...]) -> dict:
    return {
        "state_dir": "/tmp/stack",
        "host": "10.1.2.3",
        "services": list(services),
        "ports": {"mlflow": 5000, "prefect-server": 4200, "ray-head": 6379, "s3": 9000},
        "secrets": {"aws_access_key_id": "id", "aws_secret_access_key": "secret"},
    }


@pytest.mark.parametrize(
    ("services", "message"),
    [
        (("mlflow",), "mlflow needs postgres, s3: add it to the services"),
        (("postgres", "prefect-worker"), "prefect-worker needs prefect-server"),
        (("postgres", "minio"), "unknown services ['minio']: choose from postgres, s3"),
    ],
)
def test_a_part_of_the_stack_must_bring_what_it_runs_on(tmp_path, services, message):
    with pytest.raises(stack.StackError, match=re.escape(message)):
        stack.up(tmp_path, services=services)
    assert not list(tmp_path.iterdir())  # refused before anything was recorded or started


def test_clients_export_only_what_runs():
    servers = stack.client_env(state(("postgres", "s3", "mlflow")))
    assert servers == {
        "MLFLOW_TRACKING_URI": "http://10.1.2.3:5000",
        "AWS_ENDPOINT_URL_S3": "http://10.1.2.3:9000",
        "AWS_ACCESS_KEY_ID": "id",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    everything = stack.client_env(state(stack.SERVICES))
    assert set(stack.EXPORTED_ENV) <= set(everything)
    assert everything["RAY_ADDRESS"] == "10.1.2.3:6379"
    assert everything["RAY_AUTH_MODE"] == "token"
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in everything  # only for a loopback head
