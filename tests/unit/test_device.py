"""Evaluation and predict take a device: the model, windows, text and autocast follow it.

The GPU run itself belongs to the GPU check; here the plumbing is tested on the CPU.
"""

import numpy as np
import pytest
import torch

from segclip.config import ConfigError, load_config
from segclip.device import resolve_device
from segclip.eval.protocol import PROTOCOLS
from segclip.eval.segment import Segmenter

CLASSES = ["red circle", "blue square", "green star"]
IMAGE = np.random.default_rng(4).integers(0, 255, (90, 140, 3), np.uint8)


def test_auto_is_cuda_when_visible_else_cpu_and_a_missing_gpu_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU is visible; use auto or cpu"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_the_device_setting_is_validated_when_the_config_loads():
    assert load_config("tiny", ["runtime.device=cuda:1"]).runtime.device == "cuda:1"
    with pytest.raises(ConfigError, match=r"runtime\.device: String should match pattern"):
        load_config("tiny", ["runtime.device=gpu"])


def test_an_explicit_cpu_device_gives_the_default_results(tiny_model):
    protocol = PROTOCOLS["segclip"]
    default = Segmenter(tiny_model, CLASSES, protocol, 0.5)
    on_cpu = Segmenter(tiny_model, CLASSES, protocol, 0.5, device=torch.device("cpu"))
    torch.testing.assert_close(default.scores(IMAGE), on_cpu.scores(IMAGE), rtol=0, atol=0)
    assert on_cpu.device.type == "cpu" and on_cpu.text.device.type == "cpu"
    assert {p.device.type for p in on_cpu.model.parameters()} == {"cpu"}


def test_windows_run_on_the_segmenters_device_under_its_autocast(tiny_model):
    seen = []
    hook = tiny_model.clip.visual.conv1.register_forward_hook(
        lambda module, inputs, output: seen.append((inputs[0].device.type, output.dtype))
    )
    try:
        Segmenter(tiny_model, CLASSES, PROTOCOLS["segclip"], None, bf16=True).predict(IMAGE)
        Segmenter(tiny_model, CLASSES, PROTOCOLS["segclip"], None).predict(IMAGE)
    finally:
        hook.remove()
    assert seen == [("cpu", torch.bfloat16), ("cpu", torch.float32)]
