"""Imports run one way: flows -> pipelines -> segclip, and inside segclip from higher to lower
layers. The library imports no framework (Ray, Prefect), not even inside a function."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
FRAMEWORKS = ("ray", "prefect")
# segclip's layers, lowest first: a module may import from a lower layer or from its own
# subpackage, never from a higher layer. `segclip` itself (the package face) is on top.
SEGCLIP_LAYERS = (
    ("segclip._torchvision_compat", "segclip.storage", "segclip.clip_architecture",
     "segclip.device", "segclip.charts"),
    ("segclip.config",),
    ("segclip.manifest",),
    ("segclip.tracking", "segclip.sweep"),
    ("segclip.model",),
    ("segclip.losses", "segclip.caption_words"),
    ("segclip.data",),
    ("segclip.train", "segclip.eval"),
    ("segclip.stage",),
    ("segclip.app",),
    ("segclip.cli",),
    ("segclip",),
)  # fmt: skip
# pipelines/ modules that other pipelines/ modules may import: stage modules import no stage
# module, only the registry knows them all.
PIPELINE_SHARED = ("pipelines.ray_runtime", "pipelines.train_worker", "pipelines.img2dataset_job")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every absolute module an import statement names, at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def layer_of(name: str) -> int:
    """The index of the most specific layer entry that holds `name`."""
    matches = [
        (len(entry), index)
        for index, layer in enumerate(SEGCLIP_LAYERS)
        for entry in layer
        if _within(name, entry)
    ]
    return max(matches)[1]


def subpackage(name: str) -> str:
    return ".".join(name.split(".")[:2])


def violations(root: Path) -> list[str]:
    found = []
    for path in sorted(root.glob("*/**/*.py")):
        package = path.relative_to(root).parts[0]
        if package not in ("segclip", "pipelines", "flows"):
            continue
        module = module_name(path, root)
        for imported in sorted(imported_modules(path)):
            top = imported.split(".")[0]
            if package == "segclip":
                if top in (*FRAMEWORKS, "pipelines", "flows"):
                    found.append(f"{module} imports {imported}: the library imports no framework")
                elif (
                    top == "segclip"
                    and module != "segclip"
                    and subpackage(imported) != subpackage(module)
                    and layer_of(imported) >= layer_of(module)
                ):
                    found.append(f"{module} imports {imported} from a higher layer")
            elif package == "pipelines":
                if top == "flows":
                    found.append(f"{module} imports {imported}: pipelines/ must not import flows/")
                elif (
                    top == "pipelines"
                    and module != "pipelines.registry"
                    and imported != "pipelines"
                    and not any(_within(imported, shared) for shared in PIPELINE_SHARED)
                ):
                    found.append(f"{module} imports {imported}: stage modules import no stage")
    return found


def test_the_code_imports_downwards_only():
    assert violations(ROOT) == []


@pytest.mark.parametrize(
    ("path", "source", "problem"),
    [
        ("segclip/train/x.py", "def f():\n    import ray.train\n", "imports no framework"),
        ("segclip/model/x.py", "from prefect import flow\n", "imports no framework"),
        ("segclip/data/x.py", "from pipelines.registry import STAGES\n", "no framework"),
        ("segclip/config.py", "from segclip.eval.protocol import PROTOCOLS\n", "higher layer"),
        ("segclip/data/x.py", "from segclip.train.step import TrainStep\n", "higher layer"),
        ("pipelines/x.py", "import flows.pipeline\n", "must not import flows/"),
        ("pipelines/evaluate.py", "from pipelines.train import STAGE\n", "import no stage"),
    ],
)
def test_each_kind_of_upward_import_is_caught(tmp_path, path, source, problem):
    (tmp_path / path).parent.mkdir(parents=True)
    (tmp_path / path).write_text(source)
    found = violations(tmp_path)
    assert found and all(problem in line for line in found), found
