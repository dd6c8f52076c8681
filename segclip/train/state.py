"""Training state on storage: save, check and restore a checkpoint folder.

A checkpoint folder holds the model in our checkpoint format, the optimiser,
schedule, scaler, step and RNG state, and `checkpoint.json`, which names the step
and the size of each file. Copying a folder to storage (or a crash while doing it)
can leave files missing or short; the sizes tell a complete folder from those,
on a local disk or an object store, without reading the tensors.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from upath import UPath

from segclip.model import save_checkpoint
from segclip.storage import local_copy, location
from segclip.train.step import TrainStep

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
INDEX_FILE = "checkpoint.json"


def save_training_state(folder: Path, step_fn: TrainStep, step: int) -> None:
    """Write a complete checkpoint folder (a local one: Ray uploads it where it belongs)."""
    save_checkpoint(step_fn.segclip, folder / MODEL_FILE)
    torch.save(
        {
            "step": step,
            "optimizer": step_fn.optimizer.state_dict(),
            "scheduler": step_fn.scheduler.state_dict(),
            "scaler": step_fn.scaler.state_dict(),
        },
        folder / STATE_FILE,
    )
    sizes = {name: os.path.getsize(folder / name) for name in (MODEL_FILE, STATE_FILE)}
    (folder / INDEX_FILE).write_text(json.dumps({"step": step, "sizes": sizes}))


def saved_step(folder: str | Path | UPath) -> int | None:
    """The step a checkpoint folder holds, or None when it is incomplete."""
    folder = location(folder)
    try:
        index = json.loads((folder / INDEX_FILE).read_text())
        complete = all((folder / n).stat().st_size == size for n, size in index["sizes"].items())
        return int(index["step"]) if complete else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_training_state(folder: str | Path | UPath, step_fn: TrainStep, total_steps: int) -> int:
    """Restore what `save_training_state` wrote; returns the step to continue from.

    The schedule is rebuilt for this run's `total_steps` and moved to the saved step,
    so a run extended with more steps continues on its own (longer) schedule.
    """
    with local_copy(location(folder)) as local:
        step_fn.segclip.load_state_dict(load_file(str(local / MODEL_FILE)))
        state = torch.load(local / STATE_FILE, weights_only=False)
    step_fn.optimizer.load_state_dict(state["optimizer"])
    step_fn.scaler.load_state_dict(state["scaler"])
    step = min(state["step"], total_steps)
    step_fn.scheduler.last_epoch = step - 1
    with warnings.catch_warnings():  # "scheduler before optimizer": intended, nothing is skipped
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
        step_fn.scheduler.step()
    return step


def reseed_for_resume(seed: int, rank: int, step: int) -> None:
    """A run restarted at `step` draws its masking and Gumbel noise from (seed, rank, step) on
    every device, as its data stream restarts from (seed, step): ranks keep distinct draws
    (one saved CPU state would give every rank rank 0's) and a GPU run does not replay the
    draws of step 1 (its CUDA state was never saved)."""
    torch.manual_seed(hash((seed, rank, step)) % 2**63)
