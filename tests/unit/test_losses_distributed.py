"""The gathered contrastive loss on two real gloo ranks (torch.distributed, no mocks)."""

import socket

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
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_match_open_clip_and_the_single_process_loss():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_main, args=(2, _free_port(), results), nprocs=2, join=True)
        results = dict(results)
    image, text = _features()
    single = contrastive_loss(image, text, torch.tensor(SCALE)).item()
    for ours, reference, gi, ref_gi, gt, ref_gt in results.values():
        assert ours == pytest.approx(reference, rel=1e-6)
        torch.testing.assert_close(gi, ref_gi)
        torch.testing.assert_close(gt, ref_gt)
    # Each rank averages over its own rows, so the ranks' mean is the full-batch loss.
    assert (results[0][0] + results[1][0]) / 2 == pytest.approx(single, rel=1e-6)
