import pytest
import torch

from segclip.model.group import GroupedLinear, SemanticGroup, aggregate, straight_through_gumbel


def test_straight_through_sample_is_exactly_one_hot_and_differentiable():
    torch.manual_seed(0)
    logits = torch.randn(4, 8, 50, requires_grad=True)
    hard = straight_through_gumbel(logits, tau=0.9, dim=1)
    assert set(hard.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(hard.detach().sum(dim=1), torch.ones(4, 50))
    (hard * torch.randn_like(hard)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_aggregate_takes_the_mean_of_each_centers_patches_and_zeros_when_empty():
    assign = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]])
    values = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [10.0, 0.0], [20.0, 6.0]]])
    expected = torch.tensor([[[2.0, 3.0], [15.0, 3.0], [0.0, 0.0]]])
    assert torch.equal(aggregate(assign, values), expected)


def test_grouped_linear_matches_a_grouped_convolution():
    torch.manual_seed(0)
    linear = GroupedLinear(width=12, groups=3)
    conv = torch.nn.Conv1d(12, 12, kernel_size=1, groups=3, bias=False)
    conv.weight.data = linear.weight.data.unsqueeze(-1).clone()
    x = torch.randn(2, 5, 12)
    expected = conv(x.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(linear(x), expected)


def _group_and_tokens(batch: int, cross_attention_blocks: int):
    torch.manual_seed(0)
    group = SemanticGroup(
        width=32,
        heads=2,
        num_centers=4,
        cross_attention_blocks=cross_attention_blocks,
        gumbel_tau=0.9,
    )
    return group, torch.randn(batch, 10, 32)


def test_gradients_reach_the_centers_through_the_hard_assignment():
    group, tokens = _group_and_tokens(batch=2, cross_attention_blocks=2)
    out, assignment = group(tokens, stochastic=True)
    assert out.shape == (2, 4, 32)
    assert assignment.hard.shape == assignment.soft.shape == (2, 4, 10)
    out.pow(2).sum().backward()
    assert group.centers.grad is not None and group.centers.grad.abs().sum() > 0
    assert group.key_proj.weight.grad.abs().sum() > 0  # only reachable through the assignment


def test_inference_assignment_is_the_argmax_of_the_soft_map():
    group, tokens = _group_and_tokens(batch=3, cross_attention_blocks=1)
    _, first = group(tokens, stochastic=False)
    _, second = group(tokens, stochastic=False)
    assert torch.equal(first.hard, second.hard)
    expected = torch.nn.functional.one_hot(first.soft.argmax(dim=1), 4).transpose(1, 2).float()
    assert torch.equal(first.hard, expected)
    torch.testing.assert_close(first.soft.sum(dim=1), torch.ones(3, 10))


def test_grouped_linear_rejects_uneven_groups():
    with pytest.raises(ValueError, match="not divisible into 5 groups"):
        GroupedLinear(width=12, groups=5)
