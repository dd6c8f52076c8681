"""The model's training input: a batch of images, caption tokens and patch superpixel ids."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) CLIP-normalised
    tokens: torch.Tensor  # (B, L) caption token ids
    superpixels: torch.Tensor  # (B, N) superpixel id of each patch

    def select(self, index: torch.Tensor) -> Batch:
        """The samples at `index` (a subset or a reordering)."""
        return Batch(*(t[index] for t in vars(self).values()))

    def chunks(self, count: int) -> list[Batch]:
        """`count` consecutive micro-batches of equal size."""
        if len(self.images) % count:
            raise ValueError(
                f"a batch of {len(self.images)} does not split into {count} equal parts"
            )
        split = (t.chunk(count) for t in vars(self).values())
        return [Batch(*parts) for parts in zip(*split, strict=True)]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in vars(self).values()))
