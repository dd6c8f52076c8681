"""The semantic group module: learnable centers that aggregate patch tokens (docs/method.md 2.3)."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm, QuickGELU
from torch import nn


class GroupedLinear(nn.Module):
    """Block-diagonal linear map without bias, i.e. a grouped 1x1 convolution.

    The weight is stored as (out, in / groups), the layout of `nn.Conv1d(groups=g)`
    minus its kernel axis, so released conv weights load by a reshape.
    """

    def __init__(self, width: int, groups: int) -> None:
        super().__init__()
        if width % groups:
            raise ValueError(f"width {width} is not divisible into {groups} groups")
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(width, width // groups))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv1d's default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block = x.shape[-1] // self.groups
        weight = self.weight.view(self.groups, block, block)  # (group, out, in)
        out = torch.einsum("...gi,goi->...go", x.unflatten(-1, (self.groups, block)), weight)
        return out.flatten(-2)


class CenterCrossAttention(nn.Module):
    """Centers attend to [centers, patch tokens] of their own image, then an MLP.

    `nn.MultiheadAttention` without weights runs fused `scaled_dot_product_attention`.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_query = LayerNorm(width)
        self.ln_context = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_mlp = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, hidden)),
                    ("gelu", QuickGELU()),
                    ("c_proj", nn.Linear(hidden, width)),
                ]
            )
        )

    def forward(self, centers: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        # batch_first keeps attention per image: the release's layout bug mixed images.
        context = self.ln_context(torch.cat([centers, tokens], dim=1))
        attended = self.attn(self.ln_query(centers), context, context, need_weights=False)[0]
        centers = centers + attended
        return centers + self.mlp(self.ln_mlp(centers))


def straight_through_gumbel(logits: torch.Tensor, tau: float, dim: int) -> torch.Tensor:
    """Hard Gumbel-softmax sample whose value is exactly one-hot.

    `hard + (soft - soft.detach())` adds an exact zero in value, unlike the usual
    `hard - soft.detach() + soft`, which can leave 0.99999994 in the chosen slot.
    """
    gumbels = -torch.empty_like(logits).exponential_().log()
    soft = ((logits + gumbels) / tau).softmax(dim)
    return argmax_one_hot(soft, dim) + (soft - soft.detach())


def argmax_one_hot(logits: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.zeros_like(logits).scatter_(dim, logits.argmax(dim, keepdim=True), 1.0)


def aggregate(assign: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Mean of `values` (B, N, D) over the patches each center holds in `assign` (B, G, N).

    A center that holds no patch gets zeros (its count is clamped to 1).
    """
    counts = assign.sum(dim=-1, keepdim=True).clamp(min=1)
    return assign @ values / counts


@dataclass
class GroupAssignment:
    """Patch-to-center assignment, each (B, G, N)."""

    logits: torch.Tensor
    soft: torch.Tensor  # softmax over centers, no noise
    hard: torch.Tensor  # one-hot over centers; straight-through when stochastic


class SemanticGroup(nn.Module):
    """Learnable centers that cross-attend to the patches, take each patch, and pool it.

    Choices docs/method.md leaves open, fixed here: `ln_tokens` is the one LayerNorm
    shared by the key and value paths, `ln_query` gives Q after the cross-attention
    blocks, and the output MLP has no residual connection [ref].
    """

    def __init__(
        self,
        width: int,
        heads: int,
        *,
        num_centers: int,
        cross_attention_blocks: int,
        gumbel_tau: float,
    ) -> None:
        super().__init__()
        self.gumbel_tau = gumbel_tau
        self.centers = nn.Parameter(torch.empty(num_centers, width))
        nn.init.trunc_normal_(self.centers, std=0.02)
        self.cross_blocks = nn.ModuleList(
            CenterCrossAttention(width, heads) for _ in range(cross_attention_blocks)
        )
        self.ln_query = LayerNorm(width)
        self.ln_tokens = LayerNorm(width)
        self.key_proj = GroupedLinear(width, heads)
        self.ln_key = LayerNorm(width)
        self.value_proj = GroupedLinear(width, heads)
        self.ln_out = LayerNorm(width)
        self.out_fc1 = nn.Linear(width, 4 * width)
        self.out_fc2 = nn.Linear(4 * width, width)
        self.out_act = QuickGELU()

    @property
    def num_centers(self) -> int:
        return self.centers.shape[0]

    def forward(
        self, tokens: torch.Tensor, stochastic: bool
    ) -> tuple[torch.Tensor, GroupAssignment]:
        """Patch tokens (B, N, D) -> center tokens (B, G, D) and the assignment.

        `stochastic` picks straight-through Gumbel sampling (training passes) over
        a plain argmax (inference).
        """
        centers = self.centers.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        for block in self.cross_blocks:
            centers = block(centers, tokens)
        query = self.ln_query(centers)
        normed = self.ln_tokens(tokens)
        keys = self.ln_key(self.key_proj(normed))
        values = self.value_proj(normed)
        # Not attention, so no fused kernel: the softmax runs over the centers (dim 1), and
        # the logits themselves are returned and sampled from.
        logits = query @ keys.transpose(1, 2)  # no 1/sqrt(d) [ref]
        if stochastic:
            hard = straight_through_gumbel(logits, self.gumbel_tau, dim=1)
        else:
            hard = argmax_one_hot(logits, dim=1)
        pooled = aggregate(hard, values)
        out = self.out_act(self.out_fc2(F.gelu(self.out_fc1(self.ln_out(query + pooled)))))
        return out, GroupAssignment(logits=logits, soft=logits.softmax(dim=1), hard=hard)
