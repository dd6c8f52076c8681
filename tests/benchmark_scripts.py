"""benchmarks/ scripts as modules for the tests: benchmarks/ is a folder of scripts that
import each other by name (demo_recipes), not a package, so it goes on the path once."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py, imported as the module `name` (registered, so dataclasses work)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))  # after everything installed: no shadowing
    return importlib.import_module(name)
