"""The analytic FLOP count equals torch's FlopCounterMode on the forward, to the FLOP."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from segclip.config import load_config
from segclip.model import SegCLIP, build_model
from segclip.model.flops import forward_flops, train_flops_per_sample
from segclip.train.speed import synthetic_batch


def counted_forward_flops(profile: str) -> tuple[int, SegCLIP]:
    """FlopCounterMode's count of one sample's training forward, and the model it ran.

    The math attention kernel runs attention as plain products the counter sees. The
    benchmarks' synthetic caption fills `caption_tokens`, the length the count assumes.
    """
    config = load_config(profile, ["model.pretrained=null"])
    torch.manual_seed(0)
    model = build_model(config.model)
    batch = synthetic_batch(model, 1)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(batch.images, batch.tokens)
    return counter.get_total_flops(), model


@pytest.mark.parametrize("profile", ["tiny", "demo"])  # demo: late blocks on their own center
def test_forward_flops_match_the_counter(profile):
    counted, model = counted_forward_flops(profile)
    assert sum(forward_flops(model).values()) == counted


@pytest.mark.slow
def test_paper_model_trains_at_134_gflop_per_sample():
    counted, model = counted_forward_flops("paper")
    assert sum(forward_flops(model).values()) == counted == 44_774_185_472
    assert train_flops_per_sample(model) == 3 * 44_774_185_472  # 134.3 GFLOP
