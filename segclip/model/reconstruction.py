"""Masked reconstruction: centers back onto visible patches, an MAE decoder (docs/method.md 3)."""

from __future__ import annotations

from functools import partial

import torch
from open_clip.transformer import QuickGELU, ResidualAttentionBlock
from timm.models.vision_transformer import Block
from torch import nn


def sincos_positions_2d(width: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sin-cos positions (1 + H*W, width), row 0 (the prepended token) zero.

    Half the channels encode the row, half the column; each half is sin then cos
    of the position times frequencies 1 / 10000^(i / (width / 4)).
    """
    if width % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {width}")
    quarter = width // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64),
        torch.arange(grid[1], dtype=torch.float64),
        indexing="ij",
    )

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(rows), encode(cols)], dim=1)
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), table]).float()


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), each patch flattened row by row, channels last."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


class PixelDecoder(nn.Module):
    """MAE-style decoder: visible tokens + mask tokens at their grid places -> pixels."""

    def __init__(
        self,
        in_width: int,
        grid: tuple[int, int],
        patch_size: int,
        *,
        width: int,
        depth: int,
        heads: int,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(in_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("pos_embed", sincos_positions_2d(width, grid).unsqueeze(0))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)
        )
        self.norm = norm(width)
        self.pred = nn.Linear(width, patch_size * patch_size * 3)

    def forward(self, tokens: torch.Tensor, patch_index: torch.Tensor) -> torch.Tensor:
        """Tokens (B, n, D) of the patches `patch_index` (B, n) -> pixels (B, N, p*p*3)."""
        summary = tokens.mean(dim=1, keepdim=True)
        x = self.embed(torch.cat([summary, tokens], dim=1))
        batch, width = x.shape[0], x.shape[-1]
        num_patches = self.pos_embed.shape[1] - 1
        grid_tokens = (
            self.mask_token.to(x.dtype)
            .expand(batch, num_patches, width)
            .scatter(1, patch_index.unsqueeze(-1).expand(-1, -1, width), x[:, 1:])
        )
        x = torch.cat([x[:, :1], grid_tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]


class MaskedReconstruction(nn.Module):
    """Re-expand center tokens onto the visible patches, encode them, decode every patch."""

    def __init__(
        self,
        width: int,
        heads: int,
        *,
        num_centers: int,
        num_blocks: int,
        grid: tuple[int, int],
        patch_size: int,
        decoder_width: int,
        decoder_depth: int,
        decoder_heads: int,
    ) -> None:
        super().__init__()
        self.assign_proj = nn.Linear(num_centers, num_centers)
        self.act = QuickGELU()
        # New, randomly initialised CLIP-style blocks, not tied to the late vision blocks.
        self.blocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, act_layer=QuickGELU) for _ in range(num_blocks)
        )
        self.decoder = PixelDecoder(
            width, grid, patch_size, width=decoder_width, depth=decoder_depth, heads=decoder_heads
        )

    def forward(
        self, center_tokens: torch.Tensor, hard_assign: torch.Tensor, patch_index: torch.Tensor
    ) -> torch.Tensor:
        """Centers (B, G, D), assignment (B, G, n), visible patch indices (B, n) -> pixels."""
        weights = self.assign_proj(hard_assign.transpose(1, 2))  # (B, n, G)
        tokens = self.act(weights @ center_tokens)
        for block in self.blocks:
            tokens = block(tokens)
        return self.decoder(tokens, patch_index)
