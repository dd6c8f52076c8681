"""The training recipe of METHOD.md section 5, pinned by value: learning rates by role, the
warmup + cosine schedule, gradient clipping, the logit-scale clamp, Gumbel noise in training
passes, micro-batch accumulation, autocast precision and seeding."""

import copy
import math

import pytest
import torch

from segclip.config import SegCLIPConfig
from segclip.losses import segclip_loss
from segclip.model import CaptionTokenizer, SegCLIP, VisionMode, build_model, parameter_groups
from segclip.model import group as group_module
from segclip.model.group import argmax_one_hot, straight_through_gumbel
from segclip.train import (
    Batch,
    TrainStep,
    build_optimizer,
    build_scheduler,
    build_train_step,
    warmup_cosine,
)
from segclip.train.state import reseed_for_resume
from tests.weights import same_weights

LR_NEW, LR_PRETRAINED = 1e-2, 1e-5
TOTAL_STEPS, WARMUP_FRACTION = 20, 0.25  # warmup = int(0.25 * 20) = 5 steps


def _train_config(config: SegCLIPConfig, **changes):
    base = {
        "lr_new": LR_NEW,
        "lr_pretrained": LR_PRETRAINED,
        "warmup_fraction": WARMUP_FRACTION,
    }
    return config.train.model_copy(update={**base, **changes})


def _batch(config: SegCLIPConfig, size: int = 2, seed: int = 3) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    captions = ["a red star", "two blue rings", "a cross", "a white hexagon"][:size]
    return Batch(
        torch.randn(size, 3, 128, 128, generator=generator),
        CaptionTokenizer(config.model)(captions),
        torch.randint(0, 6, (size, 64), generator=generator),
    )


def _fresh_model(config: SegCLIPConfig) -> SegCLIP:
    torch.manual_seed(0)
    return build_model(config.model)


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that records, at each step(), the gradients it is about to apply."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.seen_grads: list[dict[int, torch.Tensor]] = []

    def step(self, closure=None):
        self.seen_grads.append(
            {
                id(p): p.grad.detach().clone()
                for group in self.param_groups
                for p in group["params"]
                if p.grad is not None
            }
        )
        return super().step(closure)

    def last_grad_norm(self) -> float:
        grads = self.seen_grads[-1].values()
        return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


def _recording_step(model, train_config, loss_config, total_steps=TOTAL_STEPS):
    optimizer = RecordingAdamW(
        parameter_groups(model, train_config), betas=train_config.betas, eps=train_config.eps
    )
    scheduler = build_scheduler(optimizer, train_config, total_steps)
    step = TrainStep(
        model, optimizer, scheduler, loss_config=loss_config, train_config=train_config
    )
    return step, optimizer, scheduler


# --- 1. two learning rates, by role ---------------------------------------------------------


def test_learning_rates_by_role_and_scaled_by_the_schedule_after_one_step(tiny_config):
    model = _fresh_model(tiny_config)
    train = _train_config(tiny_config)
    optimizer = build_optimizer(model, train)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    late = model.group_layer  # first vision block after the group module
    expected = {
        "group.centers": LR_NEW,
        "group.out_fc1.bias": LR_NEW,
        "reconstruction.decoder.mask_token": LR_NEW,
        f"clip.visual.transformer.resblocks.{late}.attn.in_proj_weight": LR_NEW,
        "clip.visual.ln_post.weight": LR_NEW,
        "clip.visual.proj": LR_NEW,
        "clip.visual.transformer.resblocks.0.attn.in_proj_weight": LR_PRETRAINED,
        f"clip.visual.transformer.resblocks.{late - 1}.mlp.c_fc.bias": LR_PRETRAINED,
        "clip.transformer.resblocks.0.attn.in_proj_weight": LR_PRETRAINED,
        "clip.text_projection": LR_PRETRAINED,
        "clip.logit_scale": LR_PRETRAINED,
    }
    for name, lr in expected.items():
        assert lr_of[id(names[name])] == lr, name

    scheduler = build_scheduler(optimizer, train, TOTAL_STEPS)
    step = TrainStep(model, optimizer, scheduler, loss_config=tiny_config.loss, train_config=train)
    step(_batch(tiny_config))
    assert scheduler.last_epoch == 1
    multiplier = 0.4  # warmup 5 steps: after one step (1 + 1) / 5
    for group in optimizer.param_groups:
        base = LR_NEW if group["name"].startswith("new/") else LR_PRETRAINED
        assert group["lr"] == pytest.approx(base * multiplier, rel=1e-12), group["name"]
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lr_of[id(model.group.centers)] == pytest.approx(LR_NEW * multiplier, rel=1e-12)
    early = model.clip.visual.transformer.resblocks[0].attn.in_proj_weight
    assert lr_of[id(early)] == pytest.approx(LR_PRETRAINED * multiplier, rel=1e-12)


# --- 2. warmup + cosine ---------------------------------------------------------------------

# total 20, warmup 5: steps 0-4 rise (s + 1) / 5; then 0.5 (1 + cos(pi (s - 5) / 15)).
HAND_SCHEDULE = {
    0: 0.2,
    2: 0.6,
    4: 1.0,
    5: 1.0,
    10: 0.75,  # progress 1/3: 0.5 (1 + 0.5)
    15: 0.25,  # progress 2/3: 0.5 (1 - 0.5)
    19: 0.010926199633097156,  # progress 14/15: 0.5 (1 - cos(pi / 15))
    20: 0.0,
}


def test_warmup_cosine_multiplier_by_hand():
    for step, value in HAND_SCHEDULE.items():
        assert warmup_cosine(step, TOTAL_STEPS, 5) == pytest.approx(value, abs=1e-12), step


def test_scheduler_follows_warmup_then_cosine_for_both_rates(tiny_config):
    model = _fresh_model(tiny_config)
    train = _train_config(tiny_config)
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train, TOTAL_STEPS)
    seen = {}
    for step in range(TOTAL_STEPS + 1):
        if step in HAND_SCHEDULE:
            seen[step] = {g["name"]: g["lr"] for g in optimizer.param_groups}
        optimizer.step()  # no gradients: only keeps the scheduler's call order honest
        scheduler.step()
    for step, value in HAND_SCHEDULE.items():
        for name, lr in seen[step].items():
            base = LR_NEW if name.startswith("new/") else LR_PRETRAINED
            assert lr == pytest.approx(base * value, rel=1e-9, abs=1e-15), (step, name)


# --- 3. gradient clipping -------------------------------------------------------------------


def test_gradients_reaching_the_optimiser_are_clipped_to_the_configured_norm(tiny_config):
    clip = 1e-3  # far below the tiny model's gradient norm
    model = _fresh_model(tiny_config)
    step, optimizer, _ = _recording_step(
        model, _train_config(tiny_config, grad_clip_norm=clip), tiny_config.loss
    )
    step(_batch(tiny_config))
    assert len(optimizer.seen_grads) == 1
    # clip_grad_norm_ scales by clip / (norm + 1e-6): the norm lands on the clip value.
    assert optimizer.last_grad_norm() == pytest.approx(clip, rel=1e-3)


# --- 4. logit-scale clamp -------------------------------------------------------------------


def test_train_step_clamps_the_logit_scale_to_100(tiny_config):
    model = _fresh_model(tiny_config)
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(1000.0))
    step, _, _ = _recording_step(model, _train_config(tiny_config), tiny_config.loss)
    step(_batch(tiny_config))
    assert model.clip.logit_scale.exp().item() <= 100.0 * (1 + 1e-6)
    assert model.clip.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-6)


# --- 5. Gumbel noise in training passes, none at inference ----------------------------------


def test_training_passes_sample_with_gumbel_noise_inference_takes_the_argmax(
    tiny_model, tiny_images
):
    def assignment(mode, seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return tiny_model.encode_image(tiny_images, mode).assignment

    train_a, train_b = assignment(VisionMode.TRAIN, 1), assignment(VisionMode.TRAIN, 2)
    torch.testing.assert_close(train_a.logits, train_b.logits)  # same input, same logits
    assert not torch.equal(train_a.hard, train_b.hard)  # the noise differs with the seed
    assert not torch.equal(train_a.hard, argmax_one_hot(train_a.logits, dim=1))
    assert torch.equal(train_a.hard.sum(dim=1), torch.ones_like(train_a.hard[:, 0]))  # one-hot

    infer_a, infer_b = assignment(VisionMode.INFER, 1), assignment(VisionMode.INFER, 2)
    assert torch.equal(infer_a.hard, infer_b.hard)
    assert torch.equal(infer_a.hard, argmax_one_hot(infer_a.logits, dim=1))


def test_straight_through_gumbel_samples_the_softmax_of_the_logits():
    # Gumbel-max: P(pick 1) = softmax([0, log 3])[1] = 3/4, whatever the temperature.
    torch.manual_seed(0)
    logits = torch.tensor([0.0, math.log(3.0)]).repeat(20000, 1).requires_grad_()
    hard = straight_through_gumbel(logits, tau=0.9, dim=1)
    assert torch.equal(hard.detach().sum(1), torch.ones(20000))
    assert hard[:, 1].mean().item() == pytest.approx(0.75, abs=0.015)  # 5 standard errors
    (hard * torch.tensor([1.0, 2.0])).sum().backward()
    assert logits.grad.abs().sum() > 0  # straight-through: the soft sample carries gradient


# --- 6. micro-batches: 1/k-scaled accumulation, one optimiser and scheduler step -----------


def _deterministic_noise(monkeypatch):
    """Per-sample deterministic stand-ins for the Gumbel noise and the random mask."""

    def gumbel_free(logits, tau, dim):
        soft = (logits / tau).softmax(dim)
        return argmax_one_hot(soft, dim) + (soft - soft.detach())

    def keep_by_content(self, x):
        keep = x.detach().sum(-1).argsort(dim=1)[:, : self.num_visible_patches]
        return x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])), keep

    monkeypatch.setattr(group_module, "straight_through_gumbel", gumbel_free)
    monkeypatch.setattr(SegCLIP, "_keep_random_patches", keep_by_content)


def test_micro_batches_accumulate_scaled_gradients_into_one_step(tiny_config, monkeypatch):
    _deterministic_noise(monkeypatch)
    # No effective clipping: AdamW is nearly scale-invariant and clipping would hide a
    # missing 1/k, so the gradients are compared where the optimiser sees them.
    train = _train_config(tiny_config, grad_clip_norm=1e9)
    batch = _batch(tiny_config, size=4)

    model = _fresh_model(tiny_config)
    step, optimizer, scheduler = _recording_step(model, train, tiny_config.loss)
    terms = step(batch, micro_batches=2)

    reference = _fresh_model(tiny_config)
    ref_optimizer = torch.optim.AdamW(
        parameter_groups(reference, train), betas=train.betas, eps=train.eps
    )
    ref_scheduler = build_scheduler(ref_optimizer, train, TOTAL_STEPS)
    ref_optimizer.zero_grad()
    halves = []
    for rows in (torch.arange(0, 2), torch.arange(2, 4)):
        half = batch.select(rows)
        half_terms = segclip_loss(
            reference(half.images, half.tokens), half.superpixels, tiny_config.loss
        )
        (half_terms.total / 2).backward()
        halves.append(half_terms)
    torch.nn.utils.clip_grad_norm_(reference.parameters(), train.grad_clip_norm)
    expected_grads = {
        name: p.grad.clone() for name, p in reference.named_parameters() if p.grad is not None
    }
    ref_optimizer.step()
    ref_scheduler.step()
    reference.clamp_logit_scale()

    assert len(optimizer.seen_grads) == 1  # one optimiser step for the whole batch
    assert scheduler.last_epoch == 1  # and one scheduler step
    seen = optimizer.seen_grads[0]
    params = dict(model.named_parameters())
    assert {n for n, p in params.items() if id(p) in seen} == set(expected_grads)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(seen[id(params[name])], grad, rtol=1e-4, atol=1e-7, msg=name)
    for (name, p), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, ref, rtol=1e-4, atol=1e-6, msg=name)
    for field in ("total", "contrastive", "superpixel_kl", "reconstruction"):
        mean = (getattr(halves[0], field) + getattr(halves[1], field)).item() / 2
        assert getattr(terms, field).item() == pytest.approx(mean, rel=1e-5), field


# --- 7. autocast precision ------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`:UserWarning")
@pytest.mark.parametrize(
    ("precision", "dtype"),
    [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)],
)
def test_train_step_runs_the_vision_tower_in_the_configured_precision(
    tiny_config, precision, dtype
):
    # fp16 also tells an ignored dtype apart: CPU autocast's default dtype is bfloat16.
    # (fp16's first scaled step may overflow and be skipped; only the dtypes matter here.)
    model = _fresh_model(tiny_config)
    step, _, _ = _recording_step(
        model, _train_config(tiny_config, precision=precision), tiny_config.loss
    )
    seen = []
    linear = model.clip.visual.transformer.resblocks[0].mlp.c_fc
    assert isinstance(linear, torch.nn.Linear)
    linear.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    step(_batch(tiny_config))
    assert seen and set(seen) == {dtype}


# --- 8. one seed, one run -------------------------------------------------------------------


def _seeded_model(config: SegCLIPConfig, seed: int) -> tuple[SegCLIP, dict[str, torch.Tensor]]:
    """A model built after `manual_seed(seed)`, as a training worker builds it, and a copy
    of its initial weights."""
    torch.manual_seed(seed)
    model = build_model(config.model)
    return model, {name: value.clone() for name, value in model.state_dict().items()}


def _one_step(
    config: SegCLIPConfig, model: SegCLIP
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Loss terms and updated weights of one step, drawn from torch's RNG as it stands."""
    train = _train_config(config)
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train, TOTAL_STEPS)
    step = TrainStep(model, optimizer, scheduler, loss_config=config.loss, train_config=train)
    return step(_batch(config)).to_floats(), model.state_dict()


def test_a_seed_repeats_a_training_step_exactly_and_another_seed_draws_anew(tiny_config):
    model, initial = _seeded_model(tiny_config, seed=0)
    twin = copy.deepcopy(model)  # the same initial weights, for other draws below
    terms, updated = _one_step(tiny_config, model)
    assert not same_weights(updated, initial)  # the step did update the weights

    again, again_initial = _seeded_model(tiny_config, seed=0)
    assert same_weights(again_initial, initial)
    again_terms, again_updated = _one_step(tiny_config, again)
    assert again_terms == terms
    assert same_weights(again_updated, updated)

    assert not same_weights(_seeded_model(tiny_config, seed=1)[1], initial)
    torch.manual_seed(1)  # other masking and Gumbel draws from the same weights: other losses
    redrawn_terms, _ = _one_step(tiny_config, twin)
    assert redrawn_terms["loss/total"] != terms["loss/total"]
    assert redrawn_terms["loss/reconstruction"] != terms["loss/reconstruction"]


def test_the_masked_pass_keeps_the_patches_its_seed_draws(tiny_model, tiny_images):
    def kept(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return tiny_model.encode_image(tiny_images, VisionMode.MASKED).patch_index

    assert torch.equal(kept(1), kept(1))
    assert not torch.equal(kept(1), kept(2))


def test_a_resumed_run_reseeds_each_rank_from_the_seed_and_the_step():
    def draws(seed, rank, step):
        reseed_for_resume(seed, rank, step)
        return torch.rand(4)

    assert torch.equal(draws(0, 1, 200), draws(0, 1, 200))
    assert not torch.equal(draws(0, 0, 200), draws(0, 1, 200))  # ranks stay distinct
    assert not torch.equal(draws(0, 0, 200), draws(0, 0, 400))
    assert not torch.equal(draws(0, 0, 200), draws(1, 0, 200))


# --- 7. a recipe without the reconstruction loss -------------------------------------------


def test_a_zero_reconstruction_weight_skips_the_masked_pass_and_trains_the_rest(tiny_config):
    config = tiny_config.model_copy(
        update={"loss": tiny_config.loss.model_copy(update={"reconstruction_weight": 0.0})}
    )
    model = _fresh_model(config)
    decoder_runs = []
    model.reconstruction.register_forward_hook(lambda *_: decoder_runs.append(1))
    before = copy.deepcopy(model.state_dict())
    step = build_train_step(model, config, total_steps=TOTAL_STEPS)
    terms = step(_batch(config))
    assert decoder_runs == []
    assert terms.reconstruction is None  # not computed, so never logged (not as a loss of 0)
    assert set(terms.to_floats()) == {"loss/total", "loss/contrastive", "loss/superpixel_kl"}
    weights = config.loss
    expected = weights.contrastive_weight * terms.contrastive + weights.superpixel_kl_weight * (
        terms.superpixel_kl
    )
    assert terms.total.item() == pytest.approx(expected.item(), rel=1e-6)
    changed = {n for n, v in model.state_dict().items() if not torch.equal(v, before[n])}
    assert not any(n.startswith("reconstruction.") for n in changed)
    assert any(n.startswith("group.") for n in changed)
    assert any(n.startswith("clip.transformer.") for n in changed)  # the text tower trains


def test_a_forward_without_the_masked_pass_needs_a_zero_reconstruction_weight(
    tiny_model, tiny_config
):
    batch = _batch(tiny_config)
    outputs = tiny_model(batch.images, batch.tokens, reconstruct=False)
    assert outputs.reconstruction is None and outputs.masked is None
    with pytest.raises(ValueError, match=r"reconstruction_weight.*reconstruct=True"):
        segclip_loss(outputs, batch.superpixels, tiny_config.loss)
