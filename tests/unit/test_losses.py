import math

import numpy as np
import pytest
import torch
from open_clip.loss import ClipLoss

from segclip.config import LossConfig
from segclip.losses import (
    PLAIN_KL_SMOOTHING,
    contrastive_loss,
    reconstruction_loss,
    segclip_loss,
    superpixel_kl_loss,
    superpixel_pseudo_labels,
)
from segclip.model import TrainOutputs

ASSIGN = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])  # (B=1, N=3, G=2)
SUPERPIXELS = torch.tensor([[0, 0, 1]])


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_pseudo_labels_are_the_superpixel_share_of_each_center():
    expected = torch.tensor([[[0.5, 0.5], [0.5, 0.5], [0.0, 1.0]]])
    assert torch.equal(superpixel_pseudo_labels(ASSIGN, SUPERPIXELS), expected)


def test_reference_kl_matches_a_hand_computation():
    pseudo = np.array([[0.5, 0.5], [0.5, 0.5], [0.0, 1.0]])
    hard = ASSIGN[0].numpy().astype(np.float64)
    total = 0.0
    for p_row, h_row in zip(pseudo, hard, strict=True):
        p, h = _softmax(p_row), _softmax(h_row)
        total += 0.5 * (np.sum(p * np.log(p / h)) + np.sum(h * np.log(h / p)))
    expected = total / (1 * 3 * 2)
    loss = superpixel_kl_loss(ASSIGN, SUPERPIXELS, "reference")
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_plain_kl_matches_a_hand_computation():
    eps = PLAIN_KL_SMOOTHING
    pseudo = np.array([[0.5, 0.5], [0.5, 0.5], [0.0, 1.0]])
    hard = ASSIGN[0].numpy().astype(np.float64)
    kls = []
    for p_row, h_row in zip(pseudo, hard, strict=True):
        p, h = (1 - eps) * p_row + eps / 2, (1 - eps) * h_row + eps / 2
        kls.append(0.5 * (np.sum(p * np.log(p / h)) + np.sum(h * np.log(h / p))))
    loss = superpixel_kl_loss(ASSIGN, SUPERPIXELS, "plain")
    assert loss.item() == pytest.approx(np.mean(kls), rel=1e-5)


def test_kl_is_zero_when_superpixels_agree_and_flows_to_both_sides():
    agree = torch.tensor([[0, 1, 1]])
    assert superpixel_kl_loss(ASSIGN, agree).item() == pytest.approx(0.0, abs=1e-7)
    assign = ASSIGN.clone().requires_grad_(True)
    superpixel_kl_loss(assign, SUPERPIXELS).backward()
    assert assign.grad.abs().sum() > 0


def test_unknown_kl_form_is_rejected():
    with pytest.raises(
        ValueError, match=r"unknown kl_form 'fancy'; choose one of \['plain', 'reference'\]"
    ):
        superpixel_kl_loss(ASSIGN, SUPERPIXELS, "fancy")


def test_reconstruction_loss_averages_masked_patches_only():
    prediction = torch.zeros(1, 3, 2)
    target = torch.tensor([[[1.0, 3.0], [2.0, 2.0], [100.0, 100.0]]])
    masked = torch.tensor([[True, True, False]])
    # patch 0: (1 + 9) / 2 = 5, patch 1: (4 + 4) / 2 = 4, patch 2 is visible.
    assert reconstruction_loss(prediction, target, masked).item() == pytest.approx(4.5)


def test_contrastive_loss_matches_open_clip_on_one_rank():
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    scale = torch.tensor(14.3)
    expected = ClipLoss(local_loss=True, gather_with_grad=True)(image, text, scale)
    torch.testing.assert_close(contrastive_loss(image, text, scale), expected)


def test_contrastive_loss_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = torch.tensor(2.0)
    logits = 2.0 * np.array([[1.0, 0.6], [0.0, 0.8]])  # image i against text j

    def ce(rows):
        return np.mean([-math.log(_softmax(row)[i]) for i, row in enumerate(rows)])

    expected = (ce(logits) + ce(logits.T)) / 2
    assert contrastive_loss(image, text, scale).item() == pytest.approx(expected, rel=1e-6)


def test_combined_loss_weights_each_term():
    torch.manual_seed(0)
    outputs = TrainOutputs(
        image_features=torch.nn.functional.normalize(torch.randn(1, 4), dim=-1),
        text_features=torch.nn.functional.normalize(torch.randn(1, 4), dim=-1),
        logit_scale=torch.tensor(10.0),
        center_features=torch.nn.functional.normalize(torch.randn(1, 2, 4), dim=-1),
        word_features=None,
        patch_assign=ASSIGN,
        reconstruction=torch.zeros(1, 3, 2),
        target=torch.ones(1, 3, 2),
        masked=torch.tensor([[True, False, True]]),
    )
    config = LossConfig(contrastive_weight=0.5, superpixel_kl_weight=2.0, reconstruction_weight=3.0)
    terms = segclip_loss(outputs, SUPERPIXELS, config)
    expected = 0.5 * terms.contrastive + 2.0 * terms.superpixel_kl + 3.0 * terms.reconstruction
    torch.testing.assert_close(terms.total, expected)
    assert terms.reconstruction.item() == pytest.approx(1.0)
    assert set(terms.to_floats()) == {
        "loss/total",
        "loss/contrastive",
        "loss/superpixel_kl",
        "loss/reconstruction",
    }
