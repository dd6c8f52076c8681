"""One optimisation step, shared by the demo, the benchmark and the distributed trainer."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
from torch import nn

from segclip.caption_words import CaptionWords
from segclip.config import LossConfig, SegCLIPConfig, TrainConfig
from segclip.data.batch import Batch
from segclip.losses import LossTerms, segclip_loss
from segclip.model import SegCLIP
from segclip.model.segclip import CaptionTokenizer
from segclip.train.optim import build_optimizer, build_scheduler


def _ddp_options() -> dict[str, bool]:
    """DistributedDataParallel's options for every trainer. The model's buffers are constants
    (the causal text mask, fixed position embeddings), so broadcasting them from rank 0 before
    each forward was only one more collective per step: 2-3% of the 2-core demo's step.
    torch 2.13 renamed the switch; the GPU machines' torch 2.11 knows only the old name."""
    options = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in options:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


DDP_OPTIONS = _ddp_options()

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


class TrainStep:
    """Forward, the losses, backward, clip, step, schedule and logit-scale clamp.

    `model` may be wrapped in DistributedDataParallel. With `micro_batches` > 1 the
    gradients of equal micro-batches are accumulated (synchronised across ranks
    once, on the last); each micro-batch's contrastive loss then sees only the
    negatives of that micro-batch on every rank. fp16 uses a gradient scaler.
    """

    def __init__(
        self,
        model: SegCLIP | nn.parallel.DistributedDataParallel,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        *,
        loss_config: LossConfig,
        train_config: TrainConfig,
        device_type: str = "cpu",
    ) -> None:
        self.model = model
        self.segclip: SegCLIP = getattr(model, "module", model)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_config = loss_config
        self.reconstructs = loss_config.reconstruction_weight > 0
        self.caption_words = (
            CaptionWords(
                loss_config.caption_words,
                loss_config.caption_word_template,
                CaptionTokenizer(self.segclip.config),
            )
            if loss_config.caption_word_weight
            else None
        )
        self.grad_clip_norm = train_config.grad_clip_norm
        self.device_type = device_type
        self.autocast_dtype = AUTOCAST_DTYPES[train_config.precision]
        self.scaler = torch.amp.GradScaler(device_type, enabled=train_config.precision == "fp16")

    def losses(self, batch: Batch) -> LossTerms:
        """Forward pass and losses under the configured autocast."""
        with torch.autocast(
            self.device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        ):
            words = self.caption_words
            outputs = self.model(
                batch.images,
                batch.tokens,
                reconstruct=self.reconstructs,
                word_prompts=None if words is None else words.prompt_tokens.to(batch.tokens.device),
            )
            named = None if words is None else words.named(batch.tokens)
            return segclip_loss(outputs, batch.superpixels, self.loss_config, named_words=named)

    def __call__(self, batch: Batch, micro_batches: int = 1) -> LossTerms:
        self.optimizer.zero_grad(set_to_none=True)
        parts = batch.chunks(micro_batches)
        history = []
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            no_sync = getattr(self.model, "no_sync", None)
            with nullcontext() if last or no_sync is None else no_sync():
                terms = self.losses(part)
                self.scaler.scale(terms.total / len(parts)).backward()
            history.append(terms)
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.segclip.clamp_logit_scale()
        if len(history) == 1:
            return history[0]
        return LossTerms(*(_mean([getattr(t, f.name) for t in history]) for f in fields(LossTerms)))


@dataclass(frozen=True)
class StepRecord:
    """What one step logs: its loss terms, the learning rates it used, where its time went."""

    losses: dict[str, float]  # `LossTerms.to_floats()`
    lrs: dict[str, float]  # `lr/<group>`
    waiting: float  # for the batch
    computing: float


def timed_step(
    step_fn: TrainStep, batches: Iterator[Batch], *, device: torch.device, micro_batches: int
) -> StepRecord:
    """Fetch the next batch and train on it, timing both."""
    start = time.perf_counter()
    batch = next(batches).to(device)
    fetched = time.perf_counter()
    lrs = {f"lr/{group['name']}": group["lr"] for group in step_fn.optimizer.param_groups}
    terms = step_fn(batch, micro_batches)
    return StepRecord(terms.to_floats(), lrs, fetched - start, time.perf_counter() - fetched)


def _mean(values: list[torch.Tensor | None]) -> torch.Tensor | None:
    """A loss term averaged over micro-batches; None where the term was not computed."""
    if values[0] is None:
        return None
    return sum(v.detach() for v in values) / len(values)


def build_train_step(
    model: SegCLIP,
    config: SegCLIPConfig,
    *,
    total_steps: int,
    device_type: str = "cpu",
    wrap: Callable[[SegCLIP], nn.Module] | None = None,
) -> TrainStep:
    """The recipe's optimiser, its schedule over `total_steps` and its losses around `model`.

    `wrap` (DistributedDataParallel, Ray Train's `prepare_model`) is applied after the
    optimiser has taken the parameters, so the wrapper never waits for gradients that frozen
    parameters do not get.
    """
    if not config.loss.reconstruction_weight:  # never run: no gradient for DDP to wait for
        model.reconstruction.requires_grad_(False)
    optimizer = build_optimizer(model, config.train)
    return TrainStep(
        wrap(model) if wrap else model,
        optimizer,
        build_scheduler(optimizer, config.train, total_steps),
        loss_config=config.loss,
        train_config=config.train,
        device_type=device_type,
    )
