"""Model smoke demo: train the tiny SegCLIP on procedural scenes for a few steps on the CPU.

It exercises the real model, losses, superpixels, optimiser, schedule and
checkpoint format end to end, and checks that the loss goes down. The full
pipeline demo (ingest, superpixels, Ray training, evaluation) replaces it once
those stages exist.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from segclip.config import SegCLIPConfig
from segclip.data.scenes import render_scene
from segclip.data.superpixels import compute_superpixels, patch_superpixel_ids
from segclip.data.transforms import normalize_images
from segclip.model import (
    CaptionTokenizer,
    SegCLIP,
    VisionMode,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from segclip.train import Batch, TrainStep, build_optimizer, build_scheduler


def scene_dataset(config: SegCLIPConfig, model: SegCLIP, num_scenes: int, seed: int) -> Batch:
    """Scenes at the model's input size, with captions and per-patch superpixel ids."""
    rng = np.random.default_rng(seed)
    size = model.grid[0] * model.patch_size
    scenes = [render_scene(rng, size) for _ in range(num_scenes)]
    labels = np.stack([compute_superpixels(s.image, config.data) for s in scenes])
    return Batch(
        images=normalize_images(np.stack([s.image for s in scenes])),
        tokens=CaptionTokenizer(config.model)([s.caption for s in scenes]),
        superpixels=patch_superpixel_ids(
            torch.from_numpy(labels), model.patch_size, config.data.patch_label
        ),
    )


@dataclass
class DemoResult:
    first_loss: float
    last_loss: float
    seconds: float
    checkpoint: Path


def run_demo(
    config: SegCLIPConfig, steps: int, batch_size: int, output: Path, num_scenes: int = 128
) -> DemoResult:
    torch.manual_seed(config.train.seed)
    model = build_model(config.model)
    data = scene_dataset(config, model, num_scenes, seed=config.train.seed)
    optimizer = build_optimizer(model, config.train)
    step = TrainStep(
        model, optimizer, build_scheduler(optimizer, config.train, steps), config.loss, config.train
    )
    generator = torch.Generator().manual_seed(config.train.seed)
    history: list[float] = []
    start = time.perf_counter()
    progress = tqdm(range(steps), desc="training tiny SegCLIP", unit="step")
    for _ in progress:
        index = torch.randperm(num_scenes, generator=generator)[:batch_size]
        terms = step(Batch(*(t[index] for t in vars(data).values())))
        history.append(terms.total.item())
        progress.set_postfix(
            {k.removeprefix("loss/"): f"{v:.3f}" for k, v in terms.to_floats().items()}
        )
    seconds = time.perf_counter() - start
    path = save_checkpoint(model, output / "model.safetensors")
    restored = load_checkpoint(path).eval()
    model.eval()
    probe = data.images[:2]
    if not torch.equal(
        model.encode_image(probe, VisionMode.INFER).center_embeddings,
        restored.encode_image(probe, VisionMode.INFER).center_embeddings,
    ):
        raise RuntimeError(f"checkpoint {path} does not reproduce the trained model")
    window = max(1, steps // 5)
    return DemoResult(
        first_loss=float(np.mean(history[:window])),
        last_loss=float(np.mean(history[-window:])),
        seconds=seconds,
        checkpoint=path,
    )
