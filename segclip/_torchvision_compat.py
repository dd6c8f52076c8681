"""Make `import torchvision` work next to a CPU-only torch build.

The registry's torchvision wheel is a CUDA build. Beside the local CPU torch its
compiled ops library fails to load, and torchvision's import then dies on
`operator torchvision::nms does not exist` while registering fake kernels. We
try to load the real library first; only if that fails do we declare the two op
schemas the import needs, so transforms and open_clip work (the compiled ops
themselves, nms and `torchvision.io` decoding, stay unavailable: decode with
PIL). On a machine where the ops load this is a no-op. `fix_torchvision_on_import`
defers all of it (and torch's import) to the first `import torchvision`, so a process
that never needs torch does not pay for it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_OP_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
# Kept alive for the process lifetime: dropping the Library object would
# unregister the schemas again.
_fallback_library: torch.library.Library | None = None


def _has_op(name: str) -> bool:
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True


def ensure_torchvision_importable() -> None:
    """Load torchvision's ops library, or declare the op schemas it needs."""
    import torch

    global _fallback_library
    if "torchvision" in sys.modules or _has_op("nms"):
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    lib_path = next(Path(spec.origin).parent.glob("_C*.so"), None)
    if lib_path is not None:
        try:
            torch.ops.load_library(str(lib_path))
            return
        except OSError:
            pass
    _fallback_library = torch.library.Library("torchvision", "DEF")
    for schema in _OP_SCHEMAS:
        if not _has_op(schema.split("(")[0]):
            _fallback_library.define(schema)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs the fix when torchvision is first looked up, then leaves the import to the
    normal finders (it finds nothing itself)."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            ensure_torchvision_importable()
        return None


def fix_torchvision_on_import() -> None:
    """Apply the fix before the first `import torchvision` of this process (or now, if torch
    has already imported it)."""
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(finder, _BeforeTorchvision) for finder in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
