"""The caption-word term: which words a caption names, its loss by hand, its place in a step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from segclip.caption_words import CaptionWords
from segclip.config import LossConfig, load_config
from segclip.data.batch import Batch
from segclip.losses import caption_word_loss
from segclip.model.segclip import CaptionTokenizer
from segclip.train.step import build_train_step


@pytest.fixture(scope="module")
def tokenize(tiny_config):
    return CaptionTokenizer(tiny_config.model)


def test_a_caption_names_a_word_when_the_words_tokens_appear_in_a_row(tokenize):
    words = CaptionWords(("triangle", "hexagon", "star"), "a photo of a {}.", tokenize)
    captions = ["A blue Triangle and a hexagon.", "a star", "a photo of a hex", "starfish"]
    named = words.named(tokenize(captions))
    # "hexagon" is two tokens (hex, agon): "hex" alone does not name it; "starfish" is
    # its own token, not "star".
    assert named.tolist() == [
        [True, True, False],
        [False, False, True],
        [False, False, False],
        [False, False, False],
    ]
    assert words.prompt_tokens.shape[0] == 3
    assert torch.equal(words.prompt_tokens[0], tokenize(["a photo of a triangle."])[0])


def test_caption_word_loss_by_hand():
    # One image, two centers, three words on a plane: cosines chosen exactly.
    centers = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1, 2, 2)
    angle = math.radians(60)
    words = torch.tensor([[1.0, 0.0], [math.cos(angle), math.sin(angle)], [-1.0, 0.0]])
    named = torch.tensor([[True, False, True]])
    scale = torch.tensor(2.0)
    # best center per word: word 0 -> 1.0, word 1 -> max(0.5, 0.866) = 0.866, word 2 -> 0.0
    best = [1.0, math.sin(angle), 0.0]
    log_z = math.log(sum(math.exp(2.0 * b) for b in best))
    expected = -((2.0 * best[0] - log_z) + (2.0 * best[2] - log_z)) / 2
    got = caption_word_loss(centers, words, named, scale)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_a_caption_naming_no_word_adds_nothing():
    centers = F.normalize(torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    words = F.normalize(torch.randn(5, 4, generator=torch.Generator().manual_seed(1)), dim=-1)
    named = torch.tensor([[False] * 5, [True, False, False, True, False]])
    both = caption_word_loss(centers, words, named, torch.tensor(10.0))
    second = caption_word_loss(centers[1:], words, named[1:], torch.tensor(10.0))
    torch.testing.assert_close(both, second)
    nothing = caption_word_loss(centers, words, torch.zeros_like(named), torch.tensor(10.0))
    assert nothing.item() == 0.0


def test_a_weight_without_words_is_refused_naming_the_fix():
    with pytest.raises(ValidationError, match=r"loss\.caption_words is empty"):
        LossConfig(caption_word_weight=1.0)
    with pytest.raises(ValidationError, match=r"has no \{\} for the word"):
        LossConfig(caption_word_template="a photo")


def test_a_train_step_with_the_term_logs_it_and_its_weight_moves_the_total(
    tiny_config, tiny_model, tiny_images, tokenize
):
    config = load_config(
        "tiny", ["loss.caption_word_weight=1", "loss.caption_words=[circle,square]"]
    )
    tokens = tokenize(["a red circle.", "a square and a circle", "a star"])
    superpixels = torch.zeros(3, tiny_model.grid[0] * tiny_model.grid[1], dtype=torch.long)
    batch = Batch(tiny_images, tokens, superpixels)
    terms = build_train_step(tiny_model, config, total_steps=10).losses(batch)
    assert terms.caption_words is not None and terms.caption_words.item() > 0
    rest = terms.contrastive + terms.superpixel_kl + terms.reconstruction
    torch.testing.assert_close(terms.total, rest + terms.caption_words)
    assert "loss/caption_words" in terms.to_floats()
    off = build_train_step(tiny_model, tiny_config, total_steps=10).losses(batch)
    assert off.caption_words is None
