"""Model weights compared tensor by tensor, for the seeding tests (unit and integration)."""

from __future__ import annotations

import torch


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit-identical state dicts: the same names and equal tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
