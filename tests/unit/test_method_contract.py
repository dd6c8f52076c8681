"""The losses and reconstruction targets of METHOD.md section 3 against hand computations:
the superpixel KL (both forms, neither side detached), the loss weights, the patch order of
the reconstruction target and the masked patches the reconstruction loss is taken on."""

import pytest
import torch

from segclip.config import LossConfig
from segclip.losses import reconstruction_loss, segclip_loss, superpixel_kl_loss
from segclip.model import CaptionTokenizer, SegCLIP, TrainOutputs
from segclip.model.reconstruction import patchify

SUPERPIXELS = torch.tensor([[0, 0, 1, 1, 1, 2], [3, 3, 3, 0, 1, 1]])  # (B=2, N=6)


def _hand_pseudo_labels(assign: torch.Tensor, superpixels: torch.Tensor) -> torch.Tensor:
    """P[b, i] = mean of assign[b, j] over the patches j in patch i's superpixel (i included)."""
    rows = []
    for b in range(assign.shape[0]):
        for i in range(assign.shape[1]):
            members = [j for j in range(assign.shape[1]) if superpixels[b, j] == superpixels[b, i]]
            rows.append(sum(assign[b, j] for j in members) / len(members))
    return torch.stack(rows).reshape(assign.shape)


def _softmax(x: torch.Tensor) -> torch.Tensor:
    e = (x - x.max(-1, keepdim=True).values).exp()
    return e / e.sum(-1, keepdim=True)


def _hand_kl(pseudo: torch.Tensor, assign: torch.Tensor, form: str) -> torch.Tensor:
    if form == "reference":  # softmax on top of both vectors; sum / (B*N*G)
        p, h = _softmax(pseudo), _softmax(assign)
        total = (p * (p.log() - h.log())).sum() + (h * (h.log() - p.log())).sum()
        return 0.5 * total / assign.numel()
    # plain: both sides smoothed 5% towards uniform, symmetric KL per patch, mean over patches
    g = assign.shape[-1]
    p, h = 0.95 * pseudo + 0.05 / g, 0.95 * assign + 0.05 / g
    per_patch = (p * (p.log() - h.log())).sum(-1) + (h * (h.log() - p.log())).sum(-1)
    return 0.5 * per_patch.mean()


def _soft_assign(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 6, 4, generator=generator, dtype=torch.float64).mul(2).softmax(-1)


# --- 8. neither side of the superpixel KL is detached ----------------------------------------


@pytest.mark.parametrize("form", ["reference", "plain"])
def test_superpixel_kl_gradient_flows_through_both_sides(form):
    def grad_of(loss_fn):
        assign = _soft_assign().requires_grad_()
        loss = loss_fn(assign)
        (grad,) = torch.autograd.grad(loss, assign)
        return loss.detach(), grad

    ours, ours_grad = grad_of(lambda a: superpixel_kl_loss(a, SUPERPIXELS, form))
    both, both_grad = grad_of(lambda a: _hand_kl(_hand_pseudo_labels(a, SUPERPIXELS), a, form))
    _, detached_grad = grad_of(
        lambda a: _hand_kl(_hand_pseudo_labels(a, SUPERPIXELS).detach(), a, form)
    )
    torch.testing.assert_close(ours, both, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_grad, both_grad, rtol=1e-8, atol=1e-12)
    assert not torch.allclose(both_grad, detached_grad, rtol=1e-3, atol=1e-6)  # it matters


# --- 9. loss.kl_form and the loss weights reach segclip_loss ---------------------------------


def _hand_outputs(seed: int = 0) -> TrainOutputs:
    generator = torch.Generator().manual_seed(seed)
    batch, patches, centers, embed, pixels = 2, 6, 4, 8, 12

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=generator), dim=-1)

    chosen = torch.randint(0, centers, (batch, patches), generator=generator)
    return TrainOutputs(
        image_features=unit(batch, embed),
        text_features=unit(batch, embed),
        logit_scale=torch.tensor(10.0),
        center_features=unit(batch, centers, embed),
        word_features=None,
        patch_assign=torch.nn.functional.one_hot(chosen, centers).float(),
        reconstruction=torch.randn(batch, patches, pixels, generator=generator),
        target=torch.randn(batch, patches, pixels, generator=generator),
        masked=torch.tensor([[True, False, True, True, False, False]] * batch),
    )


def _hand_contrastive(out: TrainOutputs) -> torch.Tensor:
    logits = out.logit_scale * out.image_features @ out.text_features.T
    labels = torch.arange(len(logits))
    ce = torch.nn.functional.cross_entropy
    return (ce(logits, labels) + ce(logits.T, labels)) / 2


def _hand_reconstruction(out: TrainOutputs) -> torch.Tensor:
    per_patch = (out.reconstruction - out.target).pow(2).mean(-1)
    return per_patch[out.masked].mean()


def test_kl_form_selects_the_plain_or_the_reference_kl_and_weights_scale_each_term():
    out = _hand_outputs()
    pseudo = _hand_pseudo_labels(out.patch_assign, SUPERPIXELS)
    plain = _hand_kl(pseudo, out.patch_assign, "plain")
    reference = _hand_kl(pseudo, out.patch_assign, "reference")
    assert abs(plain.item() - reference.item()) > 1e-3  # the two forms are told apart

    weights = {"contrastive_weight": 0.5, "superpixel_kl_weight": 2.0, "reconstruction_weight": 3.0}
    for form, expected in [("plain", plain), ("reference", reference)]:
        terms = segclip_loss(out, SUPERPIXELS, LossConfig(kl_form=form, **weights))
        assert terms.superpixel_kl.item() == pytest.approx(expected.item(), rel=1e-6), form
        con, rec = _hand_contrastive(out), _hand_reconstruction(out)
        assert terms.contrastive.item() == pytest.approx(con.item(), rel=1e-6)
        assert terms.reconstruction.item() == pytest.approx(rec.item(), rel=1e-6)
        total = 0.5 * con + 2.0 * expected + 3.0 * rec
        assert terms.total.item() == pytest.approx(total.item(), rel=1e-6)


# --- 10. reconstruction targets: row-major patches, each flattened row by row, channels last -


def _hand_patches(images: torch.Tensor, p: int) -> torch.Tensor:
    """Explicit slicing: patch n is grid cell (n // cols, n % cols), its (p, p, C) pixels flat."""
    batch, channels, height, width = images.shape
    rows, cols = height // p, width // p
    out = torch.empty(batch, rows * cols, p * p * channels, dtype=images.dtype)
    for n in range(rows * cols):
        r, c = divmod(n, cols)
        cell = images[:, :, r * p : (r + 1) * p, c * p : (c + 1) * p]  # (B, C, p, p)
        out[:, n] = cell.permute(0, 2, 3, 1).reshape(batch, -1)  # row, column, channel
    return out


def _scalar_patches(images: torch.Tensor, p: int) -> torch.Tensor:
    """The same, one value at a time: rows of the patch, then columns, then channels."""
    batch, channels, height, width = images.shape
    cols = width // p
    patches = []
    for b in range(batch):
        for n in range((height // p) * cols):
            r, c = divmod(n, cols)
            patches.append(
                [
                    images[b, ch, r * p + y, c * p + x].item()
                    for y in range(p)
                    for x in range(p)
                    for ch in range(channels)
                ]
            )
    return torch.tensor(patches).reshape(batch, -1, p * p * channels)


def test_patchify_orders_patches_row_major_and_pixels_row_by_row_channels_last():
    images = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).reshape(2, 3, 8, 12)  # grid 2x3
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    torch.testing.assert_close(patches, _scalar_patches(images, 4), rtol=0, atol=0)
    torch.testing.assert_close(_hand_patches(images, 4), _scalar_patches(images, 4), rtol=0, atol=0)
    # Patch 1 is the second cell of the top row; its first values are pixel (0, 4), RGB.
    assert patches[0, 1, :3].tolist() == [images[0, c, 0, 4].item() for c in range(3)]


# --- 11. reconstruction on the masked patches ------------------------------------------------


def _forward_recording_visible(model, images, tokens, monkeypatch):
    visible = []
    original = SegCLIP._keep_random_patches

    def recording(self, x):
        kept, keep = original(self, x)
        visible.append(keep)
        return kept, keep

    monkeypatch.setattr(SegCLIP, "_keep_random_patches", recording)
    out = model(images, tokens)
    assert len(visible) == 1  # one masked pass per step
    return out, visible[0]


def test_train_outputs_mark_exactly_the_hidden_patches_and_target_the_input_pixels(
    tiny_model, tiny_images, tiny_config, monkeypatch
):
    tokens = CaptionTokenizer(tiny_config.model)(["a photo"] * len(tiny_images))
    with torch.no_grad():
        out, visible = _forward_recording_visible(tiny_model, tiny_images, tokens, monkeypatch)
    num_patches = tiny_model.grid[0] * tiny_model.grid[1]
    expected = torch.ones(len(tiny_images), num_patches, dtype=torch.bool)
    for b, row in enumerate(visible):
        expected[b, row] = False
    assert torch.equal(out.masked, expected)
    assert out.masked.sum(1).tolist() == [num_patches - tiny_model.num_visible_patches] * 3
    torch.testing.assert_close(
        out.target, _hand_patches(tiny_images, tiny_model.patch_size), rtol=0, atol=0
    )


def test_reconstruction_loss_is_the_mse_over_masked_patches_only():
    prediction = torch.zeros(2, 5, 4)
    target = torch.arange(40, dtype=torch.float32).reshape(2, 5, 4) / 10
    masked = torch.tensor([[True, False, True, False, False], [False, False, False, True, True]])
    # Per-patch MSE of the masked patches (0,0), (0,2), (1,3), (1,4), then their mean.
    hand = [
        sum(((target[b, n, k] - prediction[b, n, k]) ** 2).item() for k in range(4)) / 4
        for b, n in [(0, 0), (0, 2), (1, 3), (1, 4)]
    ]
    assert reconstruction_loss(prediction, target, masked).item() == pytest.approx(
        sum(hand) / 4, rel=1e-6
    )
    visible_changed = prediction.clone()
    visible_changed[~masked] = 100.0  # visible patches do not count
    assert reconstruction_loss(visible_changed, target, masked).item() == pytest.approx(
        sum(hand) / 4, rel=1e-6
    )
