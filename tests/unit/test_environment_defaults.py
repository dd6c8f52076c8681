"""segclip's environment defaults reach every process that runs a stage before img2dataset
imports albumentations, which otherwise asks pypi.org for its latest version on import (a
2 s timeout on a machine without internet, a warning on one with it)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
# The variable's value at albumentations' first import, whoever imports it.
PROBE = """
import builtins, os
seen = []
real_import = builtins.__import__
def spy(name, *args, **kwargs):
    if name.startswith("albumentations") and not seen:
        seen.append(os.environ.get("NO_ALBUMENTATIONS_UPDATE"))
    return real_import(name, *args, **kwargs)
builtins.__import__ = spy
import pipelines.img2dataset_job
print(seen)
"""


def test_a_stage_module_imported_first_sets_the_defaults_before_albumentations() -> None:
    env = {
        k: v for k, v in os.environ.items() if k not in ("NO_ALBUMENTATIONS_UPDATE", "WANDB_MODE")
    }
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "['1']"
    assert "A new version of Albumentations" not in done.stderr
