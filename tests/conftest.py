"""Shared fixtures. Importing segclip first applies the torchvision fix for every test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import segclip  # noqa: F401  (must precede torchvision / open_clip imports)
from segclip.config import SegCLIPConfig, load_config
from segclip.model import SegCLIP, build_model

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def tiny_config() -> SegCLIPConfig:
    return load_config("tiny")


@pytest.fixture
def tiny_model(tiny_config: SegCLIPConfig) -> SegCLIP:
    torch.manual_seed(0)
    return build_model(tiny_config.model)


@pytest.fixture
def tiny_images(tiny_model: SegCLIP) -> torch.Tensor:
    size = tiny_model.grid[0] * tiny_model.patch_size
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
