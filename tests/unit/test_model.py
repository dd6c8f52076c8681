from collections import Counter

import open_clip
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from segclip.losses import segclip_loss
from segclip.model import CaptionTokenizer, VisionMode, build_model, freeze_parameters


def test_shapes_of_the_three_vision_modes(tiny_model, tiny_images):
    batch, centers = tiny_images.shape[0], tiny_model.group.num_centers
    embed = tiny_model.clip.visual.proj.shape[1]
    num_patches = tiny_model.grid[0] * tiny_model.grid[1]
    for mode, patches in [
        (VisionMode.TRAIN, num_patches),
        (VisionMode.INFER, num_patches),
        (VisionMode.MASKED, tiny_model.num_visible_patches),
    ]:
        out = tiny_model.encode_image(tiny_images, mode=mode)
        assert out.embedding.shape == (batch, embed)
        assert out.center_embeddings.shape == (batch, centers, embed)
        assert out.soft_assign.shape == out.hard_assign.shape == (batch, centers, patches)
        assert out.patch_index.shape == (batch, patches)
    # [ref]: int(0.25 * (1 + 64)) = 16 tokens, CLS included, so 15 patches.
    assert tiny_model.num_visible_patches == 15


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_every_attention_is_fused_and_the_assignment_is_the_only_softmax(
    tiny_model, tiny_images, tiny_config
):
    """Attention runs as scaled_dot_product_attention (fast on a GPU); only the group
    module's assignment computes a softmax itself, as it needs the weights [ref]."""
    tokens = CaptionTokenizer(tiny_config.model)(["a red square"] * len(tiny_images))
    with OpCounter() as counter:
        tiny_model(tiny_images, tokens)
    fused = sum(n for op, n in counter.ops.items() if "scaled_dot_product" in op)
    # Per vision pass 4 early + 2 cross-attention + 2 late blocks, twice; 2 reconstruction
    # and 2 decoder blocks; 4 text blocks.
    assert fused == 2 * (4 + 2 + 2) + 2 + 2 + 4
    # Per vision pass: the Gumbel sample's softmax and the soft assignment.
    assert sum(n for op, n in counter.ops.items() if "softmax" in op) == 2 * 2


def test_image_token_is_the_max_over_center_tokens(tiny_model, tiny_images):
    visual = tiny_model.clip.visual
    out = tiny_model.encode_image(tiny_images, VisionMode.INFER)
    z = tiny_model.run_late_blocks(out.center_tokens)
    expected = visual.ln_post(z.max(dim=1).values) @ visual.proj
    torch.testing.assert_close(out.embedding, expected)


@pytest.mark.parametrize("context", ["all_centers", "own_center"])
def test_late_blocks_mix_centers_only_with_all_centers_context(tiny_config, context):
    config = tiny_config.model.model_copy(update={"late_block_context": context})
    torch.manual_seed(0)
    model = build_model(config).eval()
    centers = torch.randn(2, model.group.num_centers, model.clip.visual.proj.shape[0])
    changed = centers.clone()
    changed[:, 0] += 1.0
    before, after = model.run_late_blocks(centers), model.run_late_blocks(changed)
    assert not torch.allclose(before[:, 0], after[:, 0])
    others_moved = not torch.allclose(before[:, 1:], after[:, 1:])
    assert others_moved == (context == "all_centers")
    if context == "own_center":  # each center is its own sequence: same as running it alone
        alone = model.run_late_blocks(centers[:, 3:4])
        torch.testing.assert_close(before[:, 3:4], alone)


def test_masked_pass_encodes_distinct_random_patches(tiny_model, tiny_images):
    out = tiny_model.encode_image(tiny_images, VisionMode.MASKED)
    for row in out.patch_index:
        assert len(set(row.tolist())) == row.numel() == tiny_model.num_visible_patches
    assert int(out.patch_index.max()) < tiny_model.grid[0] * tiny_model.grid[1]


def test_inference_interpolates_positions_for_other_sizes_but_training_refuses(tiny_model):
    images = torch.randn(1, 3, 160, 224)
    out = tiny_model.encode_image(images, VisionMode.INFER)
    assert out.grid == (10, 14)
    assert out.soft_assign.shape == (1, tiny_model.group.num_centers, 140)
    with pytest.raises(ValueError, match="train mode needs the training grid"):
        tiny_model.encode_image(images, VisionMode.TRAIN)
    with pytest.raises(ValueError, match="is not a valid VisionMode"):
        tiny_model.encode_image(images, mode="guess")


def test_outputs_do_not_depend_on_batch_partners(tiny_model, tiny_images):
    """The released code mixed images inside the cross-attention when batch > 1."""
    tiny_model.eval()
    alone = tiny_model.encode_image(tiny_images[:1], VisionMode.INFER)
    together = tiny_model.encode_image(tiny_images, VisionMode.INFER)
    shuffled = tiny_model.encode_image(tiny_images.flip(0), VisionMode.INFER)
    torch.testing.assert_close(together.embedding[:1], alone.embedding, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shuffled.embedding[-1:], alone.embedding, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together.soft_assign[:1], alone.soft_assign, rtol=1e-5, atol=1e-5)


def test_text_encoder_matches_open_clip_and_ignores_padding(tiny_model, tiny_config):
    tokenizer = CaptionTokenizer(tiny_config.model)
    captions = ["a red square left of a blue circle", "two green triangles"]
    short = tokenizer(captions)
    padded = open_clip.tokenize(captions)  # 77 tokens, as open_clip encodes them
    expected = tiny_model.clip.encode_text(padded)
    torch.testing.assert_close(tiny_model.encode_text(short), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tiny_model.encode_text(padded), expected, rtol=1e-5, atol=1e-5)


def test_text_tower_runs_only_up_to_the_batch_s_last_end_token(tiny_model, tiny_config):
    tokens = CaptionTokenizer(tiny_config.model)(["a cross", "two green triangles on a pattern"])
    longest = int((tokens != 0).sum(dim=1).max())  # start + words + end of the longer caption
    assert longest < tokens.shape[1]
    seen = []
    hook = tiny_model.clip.transformer.register_forward_pre_hook(
        lambda _, args: seen.append(args[0].shape[1])
    )
    try:
        trimmed = tiny_model.encode_text(tokens)
    finally:
        hook.remove()
    assert seen == [longest]
    one_by_one = torch.cat([tiny_model.encode_text(row[None]) for row in tokens])
    torch.testing.assert_close(trimmed, one_by_one, rtol=1e-5, atol=1e-5)


def test_captions_are_truncated_to_30_tokens_plus_start_and_end(tiny_config):
    tokens = CaptionTokenizer(tiny_config.model)(["word " * 100])
    assert tokens.shape == (1, 32)
    sot, eot = open_clip.tokenize([""])[0, :2].tolist()
    assert tokens[0, 0] == sot and tokens[0, -1] == eot
    assert (tokens[0] != 0).all()


def test_training_step_reaches_every_trainable_part(tiny_model, tiny_images, tiny_config):
    freeze_parameters(tiny_model)
    tokens = CaptionTokenizer(tiny_config.model)(["a photo"] * tiny_images.shape[0])
    out = tiny_model(tiny_images, tokens)
    num_patches = tiny_model.grid[0] * tiny_model.grid[1]
    assert out.patch_assign.shape == (3, num_patches, tiny_model.group.num_centers)
    assert out.reconstruction.shape == out.target.shape == (3, num_patches, 16 * 16 * 3)
    assert out.masked.sum(dim=1).tolist() == [num_patches - tiny_model.num_visible_patches] * 3
    superpixels = torch.arange(num_patches).div(8, rounding_mode="floor").expand(3, -1)
    segclip_loss(out, superpixels, tiny_config.loss).total.backward()
    no_grad = [
        name
        for name, p in tiny_model.named_parameters()
        if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert no_grad == []
    assert tiny_model.clip.visual.conv1.weight.grad is None


def test_logit_scale_is_clamped_to_100(tiny_model):
    tiny_model.clip.logit_scale.data.fill_(10.0)
    assert tiny_model.logit_scale().item() == pytest.approx(100.0)
    tiny_model.clamp_logit_scale()
    assert tiny_model.clip.logit_scale.item() == pytest.approx(
        torch.log(torch.tensor(100.0)).item()
    )


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_training_step_runs_under_each_precision(tiny_model, tiny_images, tiny_config, precision):
    from segclip.train import Batch, TrainStep, build_optimizer, build_scheduler

    train_config = tiny_config.train.model_copy(update={"precision": precision})
    optimizer = build_optimizer(tiny_model, train_config)
    step = TrainStep(
        tiny_model,
        optimizer,
        build_scheduler(optimizer, train_config, 10),
        loss_config=tiny_config.loss,
        train_config=train_config,
    )
    tokens = CaptionTokenizer(tiny_config.model)(["a photo"] * tiny_images.shape[0])
    superpixels = torch.zeros(tiny_images.shape[0], 64, dtype=torch.long)
    before = tiny_model.group.centers.detach().clone()
    terms = step(Batch(tiny_images, tokens, superpixels))
    assert torch.isfinite(terms.total)
    assert not torch.equal(tiny_model.group.centers, before)


def test_accumulated_micro_batches_take_one_optimiser_step(tiny_model, tiny_config):
    from segclip.train import Batch, TrainStep, build_optimizer, build_scheduler

    optimizer = build_optimizer(tiny_model, tiny_config.train)
    scheduler = build_scheduler(optimizer, tiny_config.train, 10)
    step = TrainStep(
        tiny_model,
        optimizer,
        scheduler,
        loss_config=tiny_config.loss,
        train_config=tiny_config.train,
    )
    images = torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    batch = Batch(
        images,
        CaptionTokenizer(tiny_config.model)(["a", "b", "c", "d"]),
        torch.arange(4 * 64).reshape(4, 64) % 5,
    )
    parts = batch.chunks(2)
    assert [p.images.shape[0] for p in parts] == [2, 2]
    assert torch.equal(parts[1].superpixels, batch.superpixels[2:])
    with pytest.raises(ValueError, match="a batch of 4 does not split into 3 equal parts"):
        batch.chunks(3)
    terms = step(batch, micro_batches=2)
    assert scheduler.last_epoch == 1  # one scheduler (and optimiser) step for both halves
    assert torch.isfinite(terms.total) and terms.total.requires_grad is False
    expected = terms.contrastive + terms.superpixel_kl + terms.reconstruction  # weights are 1
    assert torch.allclose(terms.total, expected, atol=1e-5)


def test_training_state_round_trip_and_incomplete_folders(tiny_model, tiny_config, tmp_path):
    from segclip.model import build_model
    from segclip.train import Batch, TrainStep, build_optimizer, build_scheduler
    from segclip.train.state import (
        MODEL_FILE,
        STATE_FILE,
        load_training_state,
        save_training_state,
        saved_step,
    )

    def new_step(model):
        optimizer = build_optimizer(model, tiny_config.train)
        scheduler = build_scheduler(optimizer, tiny_config.train, 20)
        return TrainStep(
            model,
            optimizer,
            scheduler,
            loss_config=tiny_config.loss,
            train_config=tiny_config.train,
        )

    saved = new_step(tiny_model)
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    batch = Batch(images, CaptionTokenizer(tiny_config.model)(["a", "b"]), torch.zeros(2, 64))
    for _ in range(2):
        saved(batch)
    save_training_state(tmp_path, saved, step=2)
    assert saved_step(tmp_path) == 2

    restored = new_step(build_model(tiny_config.model))
    assert load_training_state(tmp_path, restored, total_steps=20) == 2
    assert restored.scheduler.get_last_lr() == saved.scheduler.get_last_lr()
    moments = restored.optimizer.state_dict()["state"]
    assert moments and all(
        torch.equal(moments[k]["exp_avg"], v["exp_avg"])
        for k, v in saved.optimizer.state_dict()["state"].items()
    )
    for name, value in tiny_model.state_dict().items():
        assert torch.equal(restored.segclip.state_dict()[name], value), name

    # A folder cut off while being copied is not a resume point.
    state = (tmp_path / STATE_FILE).read_bytes()
    (tmp_path / STATE_FILE).write_bytes(state[: len(state) // 2])
    assert saved_step(tmp_path) is None
    (tmp_path / STATE_FILE).write_bytes(state)
    (tmp_path / MODEL_FILE).unlink()
    assert saved_step(tmp_path) is None
