"""The gathered contrastive loss on two real gloo ranks (torch.distributed, no mocks)."""

import socket
import warnings
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segclip.losses import contrastive_loss

GLOBAL_BATCH, DIM, SCALE = 8, 16, 12.0


def _features() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(
        torch.randn(GLOBAL_BATCH, DIM, generator=generator), dim=-1
    )
    text = torch.nn.functional.normalize(
        torch.randn(GLOBAL_BATCH, DIM, generator=generator), dim=-1
    )
    return image, text


def _rank_main(rank: int, world: int, port: int, results: dict) -> None:
    # Imported here, not at the top: a spawned rank must import segclip (above,
    # through segclip.losses) before open_clip, or torchvision fails to load.
    from open_clip.loss import ClipLoss

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        image, text = _features()
        rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        ours_i, ours_t = image[rows].clone().requires_grad_(), text[rows].clone().requires_grad_()
        ref_i, ref_t = image[rows].clone().requires_grad_(), text[rows].clone().requires_grad_()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = contrastive_loss(ours_i, ours_t, torch.tensor(SCALE))
            ours.backward()
        reference = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(
            ref_i, ref_t, torch.tensor(SCALE)
        )
        reference.backward()
        results[rank] = (
            ours.item(),
            reference.item(),
            ours_i.grad,
            ref_i.grad,
            ours_t.grad,
            ref_t.grad,
            [str(warning.message) for warning in caught],
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_two_ranks(rank_main) -> dict:
    """Run `rank_main(rank, world, port, results)` on two gloo ranks; return their results."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(rank_main, args=(2, _free_port(), results), nprocs=2, join=True)
        return dict(results)


@pytest.mark.slow
def test_two_ranks_match_open_clip_and_the_single_process_loss():
    results = _run_two_ranks(_rank_main)
    image, text = _features()
    single = contrastive_loss(image, text, torch.tensor(SCALE)).item()
    for ours, reference, gi, ref_gi, gt, ref_gt, warned in results.values():
        assert warned == []  # no deprecated collective
        assert ours == pytest.approx(reference, rel=1e-6)
        torch.testing.assert_close(gi, ref_gi)
        torch.testing.assert_close(gt, ref_gt)
    # Each rank averages over its own rows, so the ranks' mean is the full-batch loss.
    assert (results[0][0] + results[1][0]) / 2 == pytest.approx(single, rel=1e-6)


# --- the whole training loss under DDP: 2 ranks x batch b == 1 process x batch 2b -------------

HALF = 2


def _deterministic_noise(monkeypatch: pytest.MonkeyPatch | None = None) -> None:
    """Replace the two random draws of a training forward by per-sample deterministic ones.

    Random masks and Gumbel noise depend on batch position and RNG state, so no
    two batch layouts can share them; with these, every sample is treated the same
    wherever it sits, and the only difference left is how the batch is split.

    A spawned rank is its own process and may replace them for good; the test
    process passes `monkeypatch`, so the originals are back when the test ends.
    """
    from segclip.model import group
    from segclip.model import segclip as segclip_model

    def gumbel_free(logits, tau, dim):
        soft = (logits / tau).softmax(dim)
        return group.argmax_one_hot(soft, dim) + (soft - soft.detach())

    def keep_by_content(self, x):
        keep = x.detach().sum(-1).argsort(dim=1)[:, : self.num_visible_patches]
        return x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])), keep

    replace = setattr if monkeypatch is None else monkeypatch.setattr
    replace(group, "straight_through_gumbel", gumbel_free)
    replace(segclip_model.SegCLIP, "_keep_random_patches", keep_by_content)


def _model_and_batch():
    from segclip.config import load_config
    from segclip.model import CaptionTokenizer, build_model, freeze_parameters
    from segclip.train import Batch

    config = load_config("tiny")
    torch.manual_seed(0)
    model = build_model(config.model)
    freeze_parameters(model)  # as training does: embeddings and ln_pre get no gradient
    generator = torch.Generator().manual_seed(3)
    batch = Batch(
        torch.randn(2 * HALF, 3, 128, 128, generator=generator),
        CaptionTokenizer(config.model)(
            ["a red star", "two blue rings", "a cross", "a white hexagon"]
        ),
        torch.randint(0, 6, (2 * HALF, 64), generator=generator),
    )
    return config, model, batch


def _losses(model, batch, config):
    from segclip.losses import segclip_loss

    return segclip_loss(model(batch.images, batch.tokens), batch.superpixels, config.loss)


def _ddp_rank_main(rank: int, world: int, port: int, results: dict) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        _deterministic_noise()
        config, model, batch = _model_and_batch()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        local = batch.select(torch.arange(rank * HALF, (rank + 1) * HALF))
        terms = _losses(ddp, local, config)
        terms.total.backward()
        results[rank] = (
            terms.to_floats(),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ddp_ranks_give_the_loss_and_gradients_of_one_process_with_both_halves(monkeypatch):
    results = _run_two_ranks(_ddp_rank_main)
    _deterministic_noise(monkeypatch)  # this process now computes the single-process reference
    config, model, batch = _model_and_batch()
    terms = _losses(model, batch, config)
    terms.total.backward()
    for name, value in terms.to_floats().items():
        mean = (results[0][0][name] + results[1][0][name]) / 2
        assert mean == pytest.approx(value, rel=1e-4, abs=1e-6), name
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == results[0][1].keys() == results[1][1].keys()
    for name, grad in grads.items():
        torch.testing.assert_close(
            results[0][1][name], results[1][1][name], msg=name
        )  # DDP averaged
        torch.testing.assert_close(results[0][1][name], grad, rtol=1e-3, atol=1e-6, msg=name)


def _no_reconstruction_rank_main(rank: int, world: int, port: int, results: dict) -> None:
    from segclip.train import build_train_step
    from segclip.train.step import DDP_OPTIONS

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        config, model, batch = _model_and_batch()
        config = config.model_copy(
            update={"loss": config.loss.model_copy(update={"reconstruction_weight": 0.0})}
        )
        step = build_train_step(
            model,
            config,
            total_steps=10,
            wrap=partial(torch.nn.parallel.DistributedDataParallel, **DDP_OPTIONS),
        )
        local = batch.select(torch.arange(rank * HALF, (rank + 1) * HALF))
        for _ in range(2):  # DDP raises on the second step if a trainable parameter got no grad
            step(local)
        results[rank] = {n: p.detach().clone() for n, p in model.state_dict().items()}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_train_in_step_without_the_reconstruction_branch():
    results = _run_two_ranks(_no_reconstruction_rank_main)
    _, initial, _ = _model_and_batch()
    for name, value in results[0].items():
        torch.testing.assert_close(value, results[1][name], msg=name)
    moved = {n for n, v in results[0].items() if not torch.equal(v, initial.state_dict()[n])}
    assert moved and not any(n.startswith("reconstruction.") for n in moved)
    # the buffers DDP_OPTIONS does not broadcast are constants: unchanged on every rank
    assert {n for n, _ in initial.named_buffers()} == {
        "clip.attn_mask",
        "reconstruction.decoder.pos_embed",
    }
    assert not moved & {n for n, _ in initial.named_buffers()}
