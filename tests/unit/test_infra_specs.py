"""infra/: the deployment specs install what pyproject.toml and the Makefile pin, run the
team stack of infra/local/stack.py, and are valid for the tools that read them (the
Compose spec, KubeRay's CRDs, Ray's cluster launcher), checked offline against schemas
vendored in tests/unit/data/ or shipped with the installed ray.

Each check is a function that returns the problems it finds in parsed files, so every
rule is also run on a deliberately broken copy to show that it can fail.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet

from segclip.cli import add_config_arguments
from segclip.config import ConfigError, load_config
from tests.infra_stack import load_stack

ROOT = Path(__file__).parents[2]
INFRA = ROOT / "infra"
DATA = Path(__file__).parent / "data"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
COMPOSE = INFRA / "docker" / "compose.yaml"
COMPOSE_ENV_EXAMPLE = INFRA / "docker" / "env.example"
RAYCLUSTER = INFRA / "k8s" / "raycluster.yaml"
RAYJOB = INFRA / "k8s" / "rayjob.yaml"
ENDPOINTS = INFRA / "k8s" / "endpoints.yaml"
LAUNCHER = INFRA / "ray" / "cluster.yaml"
LAUNCHER_ENV_EXAMPLE = INFRA / "ray" / "cluster.env.example"

# Services compose may add beyond stack.py's SERVICES, only behind a compose profile (so a
# plain `docker compose up` starts exactly SERVICES): the GPU Ray worker.
OPTIONAL_COMPOSE_SERVICES = {"ray-worker"}
# A compose service is a client, and must export every EXPORTED_ENV variable, when its
# command runs project code against the stack: a Ray node or the Prefect worker.
CLIENT_COMMAND = re.compile(r"\bray start\b|\bprefect worker\b")
# KubeRay sets RAY_ADDRESS in every Ray container (ray-operator/controllers/ray/common/
# pod.go: the head service's address, unless the container sets its own): the manifests
# must leave it to KubeRay and set the other EXPORTED_ENV variables.
KUBERAY_SETS = {"RAY_ADDRESS"}
CREDENTIALS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN", re.IGNORECASE)
# Ray token authentication, explicit in every spec: Ray 2.59+ turns it on for a head by
# itself when a token file exists (~/.ray/auth_token, which a local ray.init() writes),
# and then shuts out every node and driver started without the token. So every Ray node
# (a compose service that runs `ray start`, every `ray start` of the launcher) and every
# driver gets RAY_AUTH_MODE=token and the one token of the cluster.
RAY_START = re.compile(r"\bray start\b")
RAY_AUTH_ENV = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}


# ----------------------------------------------------------------------------- sources


def _read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@cache
def stack_constants() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """SERVICES and EXPORTED_ENV of infra/local/stack.py (infra/ is not a package)."""
    module = load_stack()
    return tuple(module.SERVICES), tuple(module.EXPORTED_ENV)


@cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def exact_pins(requirements: list[str]) -> dict[str, str]:
    """name -> version of every `name==version` requirement."""
    pins = {}
    for line in requirements:
        requirement = Requirement(line)
        specs = list(requirement.specifier)
        if len(specs) == 1 and specs[0].operator == "==":
            pins[requirement.name.lower()] = specs[0].version
    return pins


@cache
def project_pins() -> dict[str, str]:
    return exact_pins(pyproject()["project"]["dependencies"])


@dataclass
class PipInstall:
    """One `pip install` command: its requirements (paths kept as written) and options."""

    requirements: list[str] = field(default_factory=list)
    options: dict[str, str | bool] = field(default_factory=dict)

    def pins(self) -> dict[str, str]:
        return exact_pins([r for r in self.requirements if not _is_path(r)])

    def names(self) -> set[str]:
        names = set()
        for item in self.requirements:
            if not _is_path(item):
                names.add(Requirement(item).name.lower())
        return names


_OPTIONS_WITH_VALUE = {"--index-url", "-i", "--extra-index-url", "-r", "-c", "--target", "-t"}


def _is_path(item: str) -> bool:
    if item.startswith((".", "/", "~", "$")):
        return True
    try:
        Requirement(item)
    except InvalidRequirement:
        return True
    return False


def pip_installs(shell: str) -> list[PipInstall]:
    """The `pip install` commands of a shell snippet, in order."""
    lexer = shlex.shlex(shell, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    installs, command = [], []
    for token in [*tokens, ";"]:
        if token not in {"&&", "||", ";", "|", "&", "(", ")"}:
            command.append(token)
            continue
        for i, word in enumerate(command[:-1]):
            if word.rsplit("/", 1)[-1] in {"pip", "pip3"} and command[i + 1] == "install":
                installs.append(_parse_install(command[i + 2 :]))
                break
        command = []
    return installs


def _parse_install(args: list[str]) -> PipInstall:
    install, pending = PipInstall(), None
    for arg in args:
        if pending:
            install.options[pending] = arg
            pending = None
        elif arg in {"-e", "--editable"}:
            continue  # the next argument is a requirement
        elif arg in _OPTIONS_WITH_VALUE:
            pending = arg
        elif arg.startswith("-"):
            name, _, value = arg.partition("=")
            install.options[name] = value or True
        else:
            install.requirements.append(arg)
    return install


@cache
def makefile() -> tuple[str, list[PipInstall]]:
    """The Makefile's Python (e.g. "3.11") and the pip installs of its setup recipe."""
    text = (ROOT / "Makefile").read_text()
    python = re.search(r"^PYTHON\s*\?=\s*python(\d+\.\d+)\s*$", text, re.MULTILINE)
    assert python, "the Makefile no longer sets PYTHON ?= python3.X"
    lines = [line for line in text.splitlines() if re.match(r"\s*[^#\s].*\bpip install\b", line)]
    return python.group(1), [install for line in lines for install in pip_installs(line)]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\s*\n", " ", "\n".join(lines))
    instructions = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile_python(text: str) -> str:
    (image,) = [args for keyword, args in dockerfile_instructions(text) if keyword == "FROM"]
    match = re.fullmatch(r"python:(\d+\.\d+)[\w.\-]*", image.split()[0])
    assert match, f"the Dockerfile's base image {image!r} is not a python:X.Y image"
    return match.group(1)


def dockerfile_installs(text: str) -> list[PipInstall]:
    return [
        install
        for keyword, args in dockerfile_instructions(text)
        if keyword == "RUN"
        for install in pip_installs(args)
    ]


def image_tag(dockerfile: str) -> str:
    """The tag every deployment uses: project version, Python, torch pin and CUDA build
    (the last part of the PyTorch wheel index the Dockerfile installs torch from)."""
    (torch_step,) = [i for i in dockerfile_installs(dockerfile) if "torch" in i.pins()]
    cuda = str(torch_step.options.get("--index-url", "")).rstrip("/").rsplit("/", 1)[-1]
    assert re.fullmatch(r"cu\d+", cuda), f"torch is not installed from a CUDA index ({cuda!r})"
    version = pyproject()["project"]["version"]
    return f"{version}-py{dockerfile_python(dockerfile)}-torch{torch_step.pins()['torch']}-{cuda}"


# ------------------------------------------------------------------------ install steps


def install_problems(where: str, installs: list[PipInstall], project: str) -> list[str]:
    """The Makefile's recipe: torch (and torchvision) at pyproject's pins first, then
    img2dataset at the Makefile's pin with --no-deps, then the project itself."""
    pins = project_pins()
    _, make_installs = makefile()
    make_pins = {k: v for i in make_installs for k, v in i.pins().items()}
    problems = []

    def first(name: str) -> int | None:
        return next((n for n, i in enumerate(installs) if name in i.names()), None)

    expected = {
        "torch": (pins["torch"], "pyproject.toml"),
        "torchvision": (pins["torchvision"], "pyproject.toml"),
        "img2dataset": (make_pins["img2dataset"], "the Makefile"),
    }
    for name, (version, source) in expected.items():
        step = first(name)
        if step is None:
            problems.append(f"{where}: installs no {name} (expected {name}=={version})")
            continue
        found = installs[step].pins().get(name)
        if found != version:
            problems.append(f"{where}: {name}=={found}, but {source} pins {name}=={version}")
    img2dataset = first("img2dataset")
    if img2dataset is not None and "--no-deps" not in installs[img2dataset].options:
        problems.append(f"{where}: img2dataset is installed without --no-deps (Makefile)")
    own = [n for n, i in enumerate(installs) if project in i.requirements]
    if not own:
        problems.append(f"{where}: never installs the project ({project})")
    else:
        for name in ("torch", "img2dataset"):
            step = first(name)
            if step is not None and step > own[0]:
                problems.append(f"{where}: {name} is installed after the project")
    return problems


def dockerfile_problems(text: str) -> list[str]:
    python, _ = makefile()
    problems = install_problems("Dockerfile", dockerfile_installs(text), ".")
    found = dockerfile_python(text)
    if found != python:
        problems.append(f"Dockerfile: Python {found}, but the Makefile uses python{python}")
    if not SpecifierSet(pyproject()["project"]["requires-python"]).contains(f"{found}.0"):
        problems.append(f"Dockerfile: Python {found} is outside pyproject's requires-python")
    instructions = dockerfile_instructions(text)
    users = [args for keyword, args in instructions if keyword == "USER"]
    if not users or users[-1].split(":")[0] in {"root", "0"}:
        problems.append(f"Dockerfile: the image runs as root (last USER: {users[-1:]})")
    for keyword, args in instructions:
        if keyword in {"ENV", "ARG"} and SECRET_NAME.search(args):
            problems.append(f"Dockerfile: {keyword} {args} bakes a secret into the image")
    return problems


def test_makefile_and_pyproject_pin_the_same_torch():
    _, installs = makefile()
    make_pins = {k: v for i in installs for k, v in i.pins().items()}
    assert make_pins["torch"] == project_pins()["torch"], (
        f"Makefile installs torch=={make_pins['torch']}, "
        f"pyproject.toml pins torch=={project_pins()['torch']}"
    )
    assert "--no-deps" in next(i for i in installs if "img2dataset" in i.names()).options


def test_the_dockerfile_installs_the_projects_pins_as_the_makefile_does():
    problems = dockerfile_problems(DOCKERFILE.read_text())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("old", "new", "named"),
    [
        ("torch==2.13.0 ", "torch==2.12.1 ", ["torch==2.12.1", "torch==2.13.0"]),
        ("torchvision==0.28.0", "torchvision==0.27.0", ["0.27.0", "0.28.0"]),
        ("--no-deps img2dataset==1.47.0", "img2dataset==1.46.0", ["1.46.0", "1.47.0"]),
        ("FROM python:3.11-", "FROM python:3.12-", ["3.12", "python3.11"]),
        ("USER 1000:1000", "USER root", ["root"]),
    ],
)
def test_a_dockerfile_that_drifts_from_the_pins_fails_naming_both_values(old, new, named):
    text = DOCKERFILE.read_text()
    assert old in text
    problems = "\n".join(dockerfile_problems(text.replace(old, new, 1)))
    for value in named:
        assert value in problems, problems


def test_a_dockerfile_that_installs_torch_after_the_project_fails():
    text = DOCKERFILE.read_text()
    torch_step = re.search(r"RUN pip install --index-url \S+ \\\n\s*torch==.*\n", text)
    assert torch_step, "the torch step is no longer one RUN line plus one continuation"
    moved = text.replace(torch_step.group(0), "") + torch_step.group(0)
    problems = dockerfile_problems(moved)
    assert "Dockerfile: torch is installed after the project" in problems, problems


# ----------------------------------------------------------------------------- compose


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _command(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else str(command)


def _listen_port(service: dict[str, Any]) -> int | None:
    """The port a server service listens on: its command's --port, else its first
    published container port."""
    match = re.search(r"--port[= ](\d+)", _command(service))
    if match:
        return int(match.group(1))
    for port in service.get("ports", []):
        if isinstance(port, dict):
            return int(port["target"])
        return int(str(port).rsplit(":", 1)[-1].split("/")[0])
    return None


def _published_host_ips(service: dict[str, Any]) -> list[tuple[str, str]]:
    bound = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            bound.append((str(port), str(port.get("host_ip", ""))))
        else:
            parts = str(port).split(":")
            bound.append((str(port), parts[0] if len(parts) == 3 else ""))
    return bound


def compose_problems(doc: dict[str, Any]) -> list[str]:
    services_expected, exported = stack_constants()
    schema = json.loads((DATA / "compose" / "compose-spec.json").read_text())
    problems = [
        f"compose.yaml: {'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(doc)
    ]
    services = doc.get("services", {})
    default = {name for name, s in services.items() if not s.get("profiles")}
    optional = set(services) - default
    if default != set(services_expected):
        problems.append(
            f"compose.yaml starts {sorted(default)} by default, but infra/local/stack.py's "
            f"SERVICES are {sorted(services_expected)}"
        )
    if not optional <= OPTIONAL_COMPOSE_SERVICES:
        problems.append(
            f"compose.yaml: unexpected opt-in services {sorted(optional - OPTIONAL_COMPOSE_SERVICES)}"
        )

    targets = {  # variable -> (service, port, path) its value must point at
        "MLFLOW_TRACKING_URI": ("mlflow", "http", ""),
        "PREFECT_API_URL": ("prefect-server", "http", "/api"),
        "AWS_ENDPOINT_URL_S3": ("s3", "http", ""),
        "RAY_ADDRESS": ("ray-head", None, None),
    }
    clients = {name for name, s in services.items() if CLIENT_COMMAND.search(_command(s))}
    for required in ("prefect-worker", "ray-head"):
        if required not in clients:
            problems.append(f"compose.yaml: {required} does not run a Ray node or a worker")
    for name in sorted(clients):
        env = _environment(services[name])
        for variable in exported:
            if variable not in env:
                problems.append(f"compose.yaml: client service {name} does not set {variable}")
        for variable, (target, scheme, path) in targets.items():
            if variable not in env or target not in services:
                continue
            port = _listen_port(services[target])
            if scheme is None:
                expected = f"{target}:{port}"
                if env[variable] != expected:
                    problems.append(
                        f"compose.yaml: {name} {variable}={env[variable]}, expected {expected}"
                    )
                continue
            url = urlsplit(env[variable])
            if (url.scheme, url.hostname, url.port, url.path) != (scheme, target, port, path):
                problems.append(
                    f"compose.yaml: {name} {variable}={env[variable]} does not point at "
                    f"{scheme}://{target}:{port}{path}"
                )
        s3_env = _environment(services.get("s3", {}))
        for variable, server_side in (
            ("AWS_ACCESS_KEY_ID", "MINIO_ROOT_USER"),
            ("AWS_SECRET_ACCESS_KEY", "MINIO_ROOT_PASSWORD"),
        ):
            if env.get(variable) != s3_env.get(server_side):
                problems.append(
                    f"compose.yaml: {name} {variable}={env.get(variable)!r} is not the store's "
                    f"{server_side}={s3_env.get(server_side)!r}"
                )

    for name in sorted(n for n, s in services.items() if RAY_START.search(_command(s))):
        env = _environment(services[name])
        if env.get("RAY_AUTH_MODE") != "token":
            problems.append(
                f"compose.yaml: Ray node {name} has RAY_AUTH_MODE={env.get('RAY_AUTH_MODE')!r}, "
                "not token"
            )
        if not re.fullmatch(r"\$\{RAY_AUTH_TOKEN:\?[^}]*\}", env.get("RAY_AUTH_TOKEN", "")):
            problems.append(
                f"compose.yaml: Ray node {name} does not take RAY_AUTH_TOKEN from the .env's "
                f"${{RAY_AUTH_TOKEN:?...}} (found {env.get('RAY_AUTH_TOKEN')!r})"
            )

    for name, service in services.items():
        for variable, value in _environment(service).items():
            if SECRET_NAME.search(variable) and not re.fullmatch(r"\$\{\w+:\?[^}]*\}", value):
                problems.append(
                    f"compose.yaml: {name} {variable} is not a required ${{VAR:?...}} "
                    "reference (a literal or defaulted secret)"
                )
        for port, host_ip in _published_host_ips(service):
            if host_ip != "127.0.0.1":
                problems.append(f"compose.yaml: {name} publishes {port} beyond 127.0.0.1")
        depends = service.get("depends_on", {})
        if isinstance(depends, list):
            problems.append(f"compose.yaml: {name} depends_on without conditions")
            depends = {}
        for dependency, condition in depends.items():
            if condition.get("condition") != "service_healthy":
                problems.append(
                    f"compose.yaml: {name} waits for {dependency} without service_healthy"
                )
            if "healthcheck" not in services.get(dependency, {}):
                problems.append(
                    f"compose.yaml: {name} waits for {dependency}, which has no healthcheck"
                )
        if "healthcheck" not in service:
            problems.append(f"compose.yaml: {name} has no healthcheck")
    return problems


@cache
def compose_doc() -> dict[str, Any]:
    return _read_yaml(COMPOSE)


def test_compose_runs_the_stack_of_stack_py_exporting_its_variables_on_loopback():
    problems = compose_problems(copy.deepcopy(compose_doc()))
    assert not problems, "\n".join(problems)


def _break_compose(change) -> list[str]:
    doc = copy.deepcopy(compose_doc())
    change(doc["services"])
    return compose_problems(doc)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda s: s["mlflow"].update(ports=["5000:5000"]), "mlflow publishes 5000:5000 beyond"),
        (lambda s: s["s3"].update(ports=[{"target": 9000, "published": 9000}]), "s3 publishes"),
        (lambda s: s["prefect-worker"]["environment"].pop("RAY_ADDRESS"),
         "prefect-worker does not set RAY_ADDRESS"),
        (lambda s: s["prefect-worker"]["environment"].update(PREFECT_API_URL="http://mlflow:4200/api"),
         "does not point at http://prefect-server:4200/api"),
        (lambda s: s.pop("ray-head"), "infra/local/stack.py's SERVICES"),
        (lambda s: s.update(extra={"image": "busybox", "healthcheck": {"test": ["NONE"]}}),
         "starts ['extra',"),
        (lambda s: s["postgres"].pop("healthcheck"), "waits for postgres, which has no healthcheck"),
        (lambda s: s["mlflow"]["environment"].update(PGPASSWORD="hunter22"), "mlflow PGPASSWORD"),
        (lambda s: s["mlflow"]["depends_on"]["s3"].update(condition="service_healty"),
         "services/mlflow/depends_on: "),  # the Compose spec's enum rejects it, not our rule
        (lambda s: s["prefect-worker"]["environment"].update(RAY_AUTH_MODE="disabled"),
         "Ray node prefect-worker has RAY_AUTH_MODE='disabled', not token"),
        # ray-head and ray-worker share one environment mapping (a YAML alias): give the
        # broken service its own.
        (lambda s: s["ray-worker"].update(environment={
            k: v for k, v in s["ray-worker"]["environment"].items() if k != "RAY_AUTH_TOKEN"}),
         "Ray node ray-worker does not take RAY_AUTH_TOKEN"),
        (lambda s: s["ray-head"].update(environment={
            **s["ray-head"]["environment"], "RAY_AUTH_TOKEN": "${HEAD_TOKEN:?set it}"}),
         "Ray node ray-head does not take RAY_AUTH_TOKEN"),
        (lambda s: s["ray-head"].update(command=["ray", "start", "--head", "--block"], environment={}),
         "Ray node ray-head has RAY_AUTH_MODE=None"),
    ],
)  # fmt: skip
def test_a_compose_file_that_breaks_a_rule_fails(change, expected):
    problems = "\n".join(_break_compose(change))
    assert expected in problems, problems


def env_example_problems(compose: str, example: str) -> list[str]:
    """env.example names every variable compose requires, and leaves the token empty (a
    token in a committed file is no secret)."""
    required = set(re.findall(r"\$\{(\w+):\?", compose))
    values = dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", example, re.MULTILINE))
    problems = [
        f"env.example does not name {variable}, which compose.yaml requires"
        for variable in sorted(required - set(values))
    ]
    if values.get("RAY_AUTH_TOKEN", "").strip():
        problems.append("env.example commits a RAY_AUTH_TOKEN")
    return problems


def test_the_compose_env_example_names_every_required_variable():
    problems = env_example_problems(COMPOSE.read_text(), COMPOSE_ENV_EXAMPLE.read_text())
    assert "RAY_AUTH_TOKEN" in re.findall(r"\$\{(\w+):\?", COMPOSE.read_text())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("RAY_AUTH_TOKEN=\n", "", "does not name RAY_AUTH_TOKEN"),
        ("RAY_AUTH_TOKEN=\n", "RAY_AUTH_TOKEN=0123abcd\n", "commits a RAY_AUTH_TOKEN"),
    ],
)
def test_a_compose_env_example_that_misses_or_commits_the_token_fails(old, new, expected):
    example = COMPOSE_ENV_EXAMPLE.read_text()
    assert old in example
    problems = "\n".join(env_example_problems(COMPOSE.read_text(), example.replace(old, new)))
    assert expected in problems, problems


# ----------------------------------------------------------------------------- KubeRay


def _format_checker() -> jsonschema.FormatChecker:
    """Kubernetes' integer formats, which JSON Schema does not define."""
    checker = jsonschema.FormatChecker()
    for name, bits in (("int32", 32), ("int64", 64)):

        def in_range(value, bits=bits):
            return not isinstance(value, int) or -(2 ** (bits - 1)) <= value < 2 ** (bits - 1)

        checker.checks(name)(in_range)
    return checker


@cache
def crd_schema(plural: str) -> dict[str, Any]:
    return json.loads((DATA / "kuberay" / f"{plural}.v1.schema.json").read_text())


OBJECT_META = {"name", "namespace", "labels", "annotations", "generateName"}


def structural_problems(doc: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """What the API server would prune or what no schema here can check: fields the schema
    does not declare (a typo is silently dropped by a structural schema), CEL rules
    (x-kubernetes-validations, not evaluated here, so the manifests must avoid them),
    and duplicate keys in list-type map/set lists."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    problems = []
    if "x-kubernetes-validations" in schema:
        problems.append(f"{path or '/'}: carries CEL rules this test cannot evaluate")
    if isinstance(doc, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in doc.items():
            if path == "" and key == "metadata":
                problems += [f"/metadata/{k}: not ObjectMeta" for k in set(value) - OBJECT_META]
            elif properties is not None and key in properties:
                problems += structural_problems(value, properties[key], f"{path}/{key}")
            elif isinstance(extra, dict):
                problems += structural_problems(value, extra, f"{path}/{key}")
            elif extra is not True:
                problems.append(f"{path}/{key}: unknown field (the API server would drop it)")
    elif isinstance(doc, list) and isinstance(schema.get("items"), dict):
        kind = schema.get("x-kubernetes-list-type")
        keys = schema.get("x-kubernetes-list-map-keys", [])
        if kind == "map":
            seen = [tuple(item.get(k) for k in keys) for item in doc if isinstance(item, dict)]
        elif kind == "set":
            seen = [json.dumps(item, sort_keys=True) for item in doc]
        else:
            seen = []
        if len(seen) != len(set(seen)):
            problems.append(f"{path}: duplicate entries in a list-type {kind}")
        for i, item in enumerate(doc):
            problems += structural_problems(item, schema["items"], f"{path}/{i}")
    return problems


def kuberay_problems(doc: dict[str, Any], plural: str) -> list[str]:
    schema = crd_schema(plural)
    validator = jsonschema.Draft4Validator(schema, format_checker=_format_checker())
    problems = [
        f"{plural}: /{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(doc)
    ]
    problems += [f"{plural}: {p}" for p in structural_problems(doc, schema)]
    return problems


@cache
def k8s_docs() -> tuple[dict, dict, dict]:
    return _read_yaml(RAYCLUSTER), _read_yaml(RAYJOB), _read_yaml(ENDPOINTS)


def _containers(cluster_spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    groups = [("head", cluster_spec["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in cluster_spec.get("workerGroupSpecs", [])]
    return [(name, c) for name, g in groups for c in g["template"]["spec"]["containers"]]


def cluster_spec_problems(spec: dict[str, Any], endpoints: dict[str, Any]) -> list[str]:
    """A CPU head, an autoscaled GPU worker group, the project image at the pinned Ray,
    the stack's variables from the endpoints ConfigMap and the S3 Secret, Ray token auth
    through KubeRay's authOptions (KubeRay v1.5.1+: it generates the token Secret and sets
    RAY_AUTH_MODE and RAY_AUTH_TOKEN in every Ray container, the autoscaler's and the
    RayJob submitter's, ray-operator/controllers/ray/common/pod.go)."""
    _, exported = stack_constants()
    tag = image_tag(DOCKERFILE.read_text())
    problems = []
    if spec.get("rayVersion") != project_pins()["ray"]:
        problems.append(
            f"rayVersion {spec.get('rayVersion')} is not pyproject's ray=={project_pins()['ray']}"
        )
    if not spec.get("enableInTreeAutoscaling"):
        problems.append("the autoscaler is off (enableInTreeAutoscaling)")
    auth = spec.get("authOptions") or {}
    if auth.get("mode") != "token":
        problems.append(f"Ray token auth is off (authOptions: {auth or None})")

    def gpus(group: dict[str, Any]) -> int:
        containers = group["template"]["spec"]["containers"]
        return sum(
            int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
            for c in containers
        )

    if gpus(spec["headGroupSpec"]):
        problems.append("the head asks for GPUs")
    gpu_groups = [g for g in spec.get("workerGroupSpecs", []) if gpus(g)]
    if not gpu_groups:
        problems.append("no worker group asks for nvidia.com/gpu")
    for group in spec.get("workerGroupSpecs", []):
        if not group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]:
            problems.append(f"group {group['groupName']}: replicas outside min..max")
        if group["maxReplicas"] <= group["minReplicas"]:
            problems.append(f"group {group['groupName']}: min == max, nothing to autoscale")

    keys = set(endpoints["data"])
    for group, container in _containers(spec):
        where = f"{group}/{container['name']}"
        image = container.get("image", "")
        if not re.fullmatch(rf"([\w.\-]+(:\d+)?/)*segclip:{re.escape(tag)}", image):
            problems.append(f"{where}: image {image} is not <registry>/segclip:{tag}")
        env = {e["name"]: e for e in container.get("env", [])}
        for variable in sorted(set(exported) - KUBERAY_SETS - set(env)):
            problems.append(f"{where}: does not set {variable}")
        for variable in sorted(KUBERAY_SETS & set(env)):
            problems.append(f"{where}: sets {variable}, which KubeRay sets to the head service")
        for variable in sorted(RAY_AUTH_ENV & set(env)):
            problems.append(f"{where}: sets {variable}, which KubeRay sets from authOptions")
        for variable, entry in env.items():
            source = entry.get("valueFrom", {})
            if (
                variable in CREDENTIALS or SECRET_NAME.search(variable)
            ) and "secretKeyRef" not in source:
                problems.append(f"{where}: {variable} does not come from a Secret")
            ref = source.get("configMapKeyRef")
            if ref and (
                ref["name"] != endpoints["metadata"]["name"]
                or (ref["key"] not in keys and not ref.get("optional"))
            ):
                problems.append(f"{where}: {variable} reads {ref}, which endpoints.yaml lacks")
    return problems


def entrypoint_problems(entrypoint: str) -> list[str]:
    """`segclip run --profile P overrides...`, with overrides the config accepts."""
    argv = shlex.split(entrypoint)
    if argv[:2] != ["segclip", "run"]:
        return [f"the entrypoint {argv[:2]} is not `segclip run`"]
    if pyproject()["project"]["scripts"].get("segclip") != "flows.cli:entry_point":
        return ["pyproject no longer installs `segclip` as flows.cli:entry_point"]
    parser = argparse.ArgumentParser(prog="segclip run", exit_on_error=False)
    add_config_arguments(parser, "demo")  # the arguments flows.cli's `run` takes
    parser.add_argument("--force", action="append", default=[])
    try:
        args = parser.parse_args(argv[2:])
        config = load_config(args.profile, args.overrides)
    except (argparse.ArgumentError, ConfigError) as error:
        return [f"the entrypoint's configuration is invalid: {error}"]
    problems = []
    if not config.runtime.workdir.startswith("s3://"):
        problems.append(f"runtime.workdir={config.runtime.workdir} is not on object storage")
    if not config.runtime.use_gpu:
        problems.append("the entrypoint trains without GPUs (runtime.use_gpu)")
    return problems


def test_the_kuberay_manifests_validate_against_the_crds_and_know_every_field():
    cluster, job, _ = k8s_docs()
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    problems = kuberay_problems(cluster, "rayclusters") + kuberay_problems(job, "rayjobs")
    assert not problems, "\n".join(problems)


def test_the_rayjob_runs_the_pipeline_once_on_the_rayclusters_spec():
    cluster, job, endpoints = k8s_docs()
    assert job["spec"]["rayClusterSpec"] == cluster["spec"], (
        "rayjob.yaml's rayClusterSpec differs from raycluster.yaml's spec: keep them equal"
    )
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    problems = cluster_spec_problems(cluster["spec"], endpoints)
    problems += entrypoint_problems(job["spec"]["entrypoint"])
    assert not problems, "\n".join(problems)


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of doc with the value at a /-separated path replaced (None deletes)."""
    doc = copy.deepcopy(doc)
    *parents, leaf = [int(p) if p.isdigit() else p for p in path.strip("/").split("/")]
    node = doc
    for part in parents:
        node = node[part]
    if value is None:
        del node[leaf]
    else:
        node[leaf] = value
    return doc


GPU_GROUP = "/spec/workerGroupSpecs/0"
HEAD_CONTAINER = "/spec/headGroupSpec/template/spec/containers/0"


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (f"{GPU_GROUP}/minReplicas", "0", "'0' is not of type 'integer'"),
        (f"{GPU_GROUP}/rayStartParams", {"num-gpus": 1}, "1 is not of type 'string'"),
        (
            f"{GPU_GROUP}/template/spec/containers/0/resources/limits/memory",
            "48 GB",
            "does not match",
        ),  # int-or-string quantities keep their pattern
        (f"{GPU_GROUP}/idleTimeoutSeconds", 2**40, "is not a 'int32'"),
        (f"{HEAD_CONTAINER}/ports/1/containerPort", 6379, "duplicate entries"),
        ("/spec/enableInTreeAutoscalling", True, "enableInTreeAutoscalling: unknown field"),
        (f"{HEAD_CONTAINER}/envv", [], "envv: unknown field"),
        ("/metadata/nmae", "x", "/metadata/nmae: not ObjectMeta"),
        ("/spec/managedBy", "ray.io/kuberay-operator", "CEL rules"),
        ("/spec/authOptions/mode", "on", "'on' is not one of ['disabled', 'token']"),
        ("/spec/authOptions/mdoe", "token", "authOptions/mdoe: unknown field"),
    ],
)
def test_a_broken_raycluster_fails_validation(path, value, expected):
    cluster, _, _ = k8s_docs()
    problems = "\n".join(kuberay_problems(_set(cluster, path, value), "rayclusters"))
    assert expected in problems, problems


def test_a_misspelt_field_fails_as_missing_required_and_unknown():
    cluster, _, _ = k8s_docs()
    broken = _set(cluster, f"{GPU_GROUP}/groupNmae", "gpu")
    broken = _set(broken, f"{GPU_GROUP}/groupName", None)
    problems = "\n".join(kuberay_problems(broken, "rayclusters"))
    assert "'groupName' is a required property" in problems
    assert "groupNmae: unknown field" in problems


def test_a_misspelt_optional_rayjob_field_passes_the_schema_but_not_the_field_walk():
    _, job, _ = k8s_docs()
    broken = _set(job, "/spec/shutdownAfterJobFinish", True)
    broken = _set(broken, "/spec/shutdownAfterJobFinishes", None)
    schema_errors = list(jsonschema.Draft4Validator(crd_schema("rayjobs")).iter_errors(broken))
    assert not schema_errors  # what jsonschema alone misses, and the API server prunes
    assert "shutdownAfterJobFinish: unknown field" in "\n".join(kuberay_problems(broken, "rayjobs"))


def _container(spec: dict[str, Any], group: int | None = None) -> dict[str, Any]:
    """The first container of the head (group None) or of a worker group."""
    node = spec["headGroupSpec"] if group is None else spec["workerGroupSpecs"][group]
    return node["template"]["spec"]["containers"][0]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda s: s.update(rayVersion="2.59.0"), "rayVersion 2.59.0 is not pyproject's ray==2.60.0"),
        (lambda s: _container(s, 0)["resources"]["limits"].pop("nvidia.com/gpu"), "no worker group asks for nvidia.com/gpu"),
        (lambda s: s["workerGroupSpecs"][0].update(maxReplicas=0), "min == max"),
        (lambda s: _container(s).update(image="segclip:latest"), "is not <registry>/segclip:"),
        (lambda s: _container(s)["env"].append({"name": "RAY_ADDRESS", "value": "x:1"}), "sets RAY_ADDRESS"),
        (lambda s: _container(s, 1).update(env=[{"name": "AWS_SECRET_ACCESS_KEY", "value": "inline"}]), "AWS_SECRET_ACCESS_KEY does not come from a Secret"),
        (lambda s: s.pop("authOptions"), "Ray token auth is off (authOptions: None)"),
        (lambda s: s["authOptions"].update(mode="disabled"), "Ray token auth is off (authOptions: {'mode': 'disabled'})"),
        (lambda s: _container(s, 0).update(env=[{"name": "RAY_AUTH_MODE", "value": "disabled"}]), "gpu/ray-worker: sets RAY_AUTH_MODE, which KubeRay sets from authOptions"),
    ],
)  # fmt: skip
def test_a_cluster_spec_that_breaks_a_rule_fails(change, expected):
    cluster, _, endpoints = k8s_docs()
    spec = copy.deepcopy(cluster["spec"])
    change(spec)
    problems = "\n".join(cluster_spec_problems(spec, endpoints))
    assert expected in problems, problems


@pytest.mark.parametrize(
    ("entrypoint", "expected"),
    [
        (
            "segclip run --profile paper runtime.workdr=s3://b/w runtime.use_gpu=true",
            "runtime.workdr: unknown field",
        ),
        (
            "segclip run --profile paper runtime.workdir=s3://b/w runtime.use_gpu=maybe",
            "runtime.use_gpu",
        ),
        ("segclip run --profile paper runtime.use_gpu=true", "not on object storage"),
        ("segclip train --profile paper", "is not `segclip run`"),
        ("segclip run --profile nosuch runtime.workdir=s3://b/w", "unknown profile"),
    ],
)
def test_an_entrypoint_the_cli_would_reject_fails(entrypoint, expected):
    problems = "\n".join(entrypoint_problems(entrypoint))
    assert expected in problems, problems


# ----------------------------------------------------------------- Ray cluster launcher


@cache
def ray_launcher_schema() -> dict[str, Any]:
    """The schema `ray up` validates against, from the installed ray (not imported)."""
    spec = importlib.util.find_spec("ray")
    assert spec and spec.submodule_search_locations, "ray is not installed"
    path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def launcher_problems(doc: dict[str, Any]) -> list[str]:
    python, _ = makefile()
    problems = [
        f"cluster.yaml: /{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(ray_launcher_schema()).iter_errors(doc)
    ]
    if problems:
        return problems
    # The cross-field rules of ray's own validate_config, and ours.
    types = doc.get("available_node_types", {})
    if doc.get("head_node_type") not in types:
        problems.append(
            f"cluster.yaml: head_node_type {doc.get('head_node_type')} is not a node type"
        )
    if sum(t.get("min_workers", 0) for t in types.values()) > doc.get("max_workers", 0):
        problems.append("cluster.yaml: the min_workers add up to more than max_workers")
    for name, node in types.items():
        if name != doc.get("head_node_type") and not node.get("min_workers", 0) <= node.get(
            "max_workers", 0
        ):
            problems.append(f"cluster.yaml: {name} has min_workers > max_workers")
    gpu_types = [
        n
        for n, t in types.items()
        if t["resources"].get("GPU", 0) > 0 and t.get("max_workers", 0) > t.get("min_workers", 0)
    ]
    if not gpu_types:
        problems.append("cluster.yaml: no autoscaled worker type has GPUs")
    if types.get(doc.get("head_node_type"), {}).get("resources", {}).get("GPU"):
        problems.append("cluster.yaml: the head has GPUs")

    mounts = doc.get("file_mounts", {})
    project = next((remote for remote, local in mounts.items() if local in {".", "./"}), None)
    if project is None:
        return [*problems, "cluster.yaml: the checkout (.) is not synced to the nodes"]
    setup = " ;\n".join(doc.get("setup_commands", []))
    problems += install_problems("cluster.yaml setup_commands", pip_installs(setup), project)
    venv = re.search(r"python(\d+\.\d+) -m venv", setup)
    if not venv or venv.group(1) != python:
        found = venv.group(1) if venv else None
        problems.append(
            f"cluster.yaml: the nodes' venv uses Python {found}, the Makefile python{python}"
        )
    head_start = " ".join(doc.get("head_start_ray_commands", []))
    if "--dashboard-host=127.0.0.1" not in head_start:
        problems.append("cluster.yaml: the head's dashboard listens beyond its loopback")
    env_file = f"{project}/{LAUNCHER_ENV_EXAMPLE.relative_to(ROOT).with_suffix('')}"
    if env_file not in setup:
        problems.append(f"cluster.yaml: the setup never reads {env_file}")
    return problems + launcher_auth_problems(doc, setup)


def launcher_auth_problems(doc: dict[str, Any], setup: str) -> list[str]:
    """Every `ray start` runs with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (so its Ray
    processes and the job drivers they start do too), naming a file the setup writes from
    cluster.env's RAY_AUTH_TOKEN (the token is in no committed file)."""
    problems, token_files = [], set()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in doc.get(key, []) if RAY_START.search(c)]
        if not starts:
            problems.append(f"cluster.yaml: {key} never runs `ray start`")
        for command in starts:
            prefix = command[: RAY_START.search(command).start()]
            if not re.search(r"\bRAY_AUTH_MODE=token\b", prefix):
                problems.append(f"cluster.yaml: {key}: `ray start` without RAY_AUTH_MODE=token")
            path = re.search(r"\bRAY_AUTH_TOKEN_PATH=(\S+)", prefix)
            if path is None:
                problems.append(f"cluster.yaml: {key}: `ray start` without RAY_AUTH_TOKEN_PATH")
            else:
                token_files.add(path.group(1).strip("\"'").replace("$HOME", "~"))
    for path in sorted(token_files):
        written = rf'"\$RAY_AUTH_TOKEN"\s*>\s*{re.escape(path)}(\s|$|\))'
        if not re.search(written, setup.replace("$HOME", "~")):
            problems.append(f"cluster.yaml: the setup never writes $RAY_AUTH_TOKEN to {path}")
    return problems


@cache
def launcher_doc() -> dict[str, Any]:
    return _read_yaml(LAUNCHER)


def test_the_ray_launcher_config_validates_and_installs_the_pins():
    problems = launcher_problems(copy.deepcopy(launcher_doc()))
    assert not problems, "\n".join(problems)


def test_the_launcher_env_example_names_only_the_stacks_variables_and_the_token():
    _, exported = stack_constants()
    text = LAUNCHER_ENV_EXAMPLE.read_text()
    names = re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", text, re.MULTILINE)
    assert {"MLFLOW_TRACKING_URI", "PREFECT_API_URL", "RAY_AUTH_TOKEN"} <= set(names)
    assert set(names) <= (set(exported) - KUBERAY_SETS - CREDENTIALS) | {"RAY_AUTH_TOKEN"}, names
    assert re.search(r"^RAY_AUTH_TOKEN=$", text, re.MULTILINE), "the example commits a token"


def _in_setup(old: str, new: str):
    """A change that edits every setup command of a launcher config."""
    return lambda d: d.update(setup_commands=[c.replace(old, new) for c in d["setup_commands"]])


def _in_start(node: str, old: str, new: str):
    """A change that edits the head's or the workers' start commands (and must)."""
    key = f"{node}_start_ray_commands"

    def change(doc: dict[str, Any]) -> None:
        assert any(old in c for c in doc[key]), (old, doc[key])
        doc[key] = [c.replace(old, new) for c in doc[key]]

    return change


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.update(max_workers="16"), "'16' is not of type 'integer'"),
        (lambda d: d.update(setup_comands=[]), "Additional properties are not allowed"),
        (lambda d: d["available_node_types"]["gpu_worker"].update(min_workers=9), "gpu_worker has min_workers > max_workers"),
        (lambda d: d["available_node_types"]["gpu_worker"]["resources"].pop("GPU"), "no autoscaled worker type has GPUs"),
        (_in_setup("torch==2.13.0", "torch==2.12.0"), "torch==2.12.0, but pyproject.toml pins torch==2.13.0"),
        (_in_setup("--no-deps ", ""), "img2dataset is installed without --no-deps"),
        (_in_setup("python3.11 -m venv", "python3.12 -m venv"), "Python 3.12, the Makefile python3.11"),
        (lambda d: d.update(head_start_ray_commands=["ray start --head --dashboard-host=0.0.0.0"]), "dashboard listens beyond its loopback"),
        (_in_start("head", "RAY_AUTH_MODE=token ", ""), "head_start_ray_commands: `ray start` without RAY_AUTH_MODE=token"),
        (_in_start("worker", "RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled"), "worker_start_ray_commands: `ray start` without RAY_AUTH_MODE=token"),
        (_in_start("worker", "RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token ", ""), "worker_start_ray_commands: `ray start` without RAY_AUTH_TOKEN_PATH"),
        (_in_start("head", "$HOME/.ray/auth_token", "$HOME/.ray/token"), "the setup never writes $RAY_AUTH_TOKEN to ~/.ray/token"),
        (_in_setup('"$RAY_AUTH_TOKEN" > ~/.ray/auth_token', '"$RAY_AUTH_TOKEN" > ~/.ray/auth_token.new'), "the setup never writes $RAY_AUTH_TOKEN to ~/.ray/auth_token"),
        (lambda d: d.update(worker_start_ray_commands=["ray stop"]), "worker_start_ray_commands never runs `ray start`"),
    ],
)  # fmt: skip
def test_a_broken_launcher_config_fails(change, expected):
    doc = copy.deepcopy(launcher_doc())
    change(doc)
    problems = "\n".join(launcher_problems(doc))
    assert expected in problems, problems


# ------------------------------------------------------------------------ image tags


def test_every_deployment_names_the_image_by_the_same_pinned_tag():
    """The tag spells the pins, so an image built before a pin change is not reused."""
    dockerfile = DOCKERFILE.read_text()
    tag = image_tag(dockerfile)
    pins = f"{pyproject()['project']['version']}-py{makefile()[0]}-torch{project_pins()['torch']}"
    assert re.fullmatch(rf"{re.escape(pins)}-cu\d+", tag), (tag, pins)
    assert compose_doc()["x-segclip-image"]["image"] == f"segclip:{tag}"
    built = [s for s in compose_doc()["services"].values() if "build" in s]
    assert built and all(s["image"] == f"segclip:{tag}" for s in built)
    for path in (DOCKERFILE, INFRA / "README.md", RAYCLUSTER, RAYJOB):
        named = set(re.findall(r"segclip:(\d[\w.\-]*)", path.read_text()))
        assert named == {tag}, f"{path.relative_to(ROOT)} names segclip:{sorted(named)}, not {tag}"
