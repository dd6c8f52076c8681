"""Optimisation: AdamW with the recipe's groups, warmup + cosine, one shared training step."""

from segclip.data.batch import Batch
from segclip.train.optim import build_optimizer, build_scheduler, warmup_cosine
from segclip.train.step import TrainStep, build_train_step

__all__ = [
    "Batch",
    "TrainStep",
    "build_optimizer",
    "build_scheduler",
    "build_train_step",
    "warmup_cosine",
]
