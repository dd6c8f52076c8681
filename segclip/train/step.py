"""One optimisation step, shared by the demo, the benchmark and the distributed trainer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from segclip.config import LossConfig, TrainConfig
from segclip.losses import LossTerms, segclip_loss
from segclip.model import SegCLIP

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) CLIP-normalised
    tokens: torch.Tensor  # (B, L) caption token ids
    superpixels: torch.Tensor  # (B, N) superpixel id of each patch

    def select(self, index: torch.Tensor) -> Batch:
        """The samples at `index` (a subset or a reordering)."""
        return Batch(*(t[index] for t in vars(self).values()))


class TrainStep:
    """Forward, the three losses, backward, clip, step, schedule and logit-scale clamp.

    fp16 uses a gradient scaler; bf16 and fp32 do not need one.
    """

    def __init__(
        self,
        model: SegCLIP,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        loss_config: LossConfig,
        train_config: TrainConfig,
        device_type: str = "cpu",
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_config = loss_config
        self.grad_clip_norm = train_config.grad_clip_norm
        self.device_type = device_type
        self.autocast_dtype = AUTOCAST_DTYPES[train_config.precision]
        self.scaler = torch.amp.GradScaler(device_type, enabled=train_config.precision == "fp16")

    def losses(self, batch: Batch) -> LossTerms:
        """Forward pass and losses under the configured autocast."""
        with torch.autocast(
            self.device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        ):
            outputs = self.model(batch.images, batch.tokens)
            return segclip_loss(outputs, batch.superpixels, self.loss_config)

    def __call__(self, batch: Batch) -> LossTerms:
        self.optimizer.zero_grad(set_to_none=True)
        terms = self.losses(batch)
        self.scaler.scale(terms.total).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.model.clamp_logit_scale()
        return terms
