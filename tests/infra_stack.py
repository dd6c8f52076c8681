"""infra/local/stack.py as a module for the tests: infra/ holds deployment files, not a
package, so the script is imported by its path (once per process)."""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path
from types import ModuleType

STACK_SCRIPT = Path(__file__).resolve().parents[1] / "infra" / "local" / "stack.py"


@cache
def load_stack() -> ModuleType:
    spec = importlib.util.spec_from_file_location("team_stack", STACK_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
