"""Training-free dense CLIP features from the vision tower of an open_clip ViT.

`dense_features(visual, images, method)` runs `visual` (an `open_clip.transformer.
VisionTransformer`: `model.clip.visual` here, or `open_clip.create_model(...).visual`) on
CLIP-normalised images of any size whose sides are multiples of the patch size, and returns
one embedding per patch in the joint image-text space, (B, E, h, w), not normalised: every
patch token after `ln_post` and `@ proj`, as CLIP treats its class token.

The methods differ only in the last residual block; blocks 1..L-1 run unchanged, with the
class token in the sequence as CLIP runs them. Notation for the last block, input tokens X
(class token first, then the patches row-major), per head h with scale s = head_dim ** -0.5:

    Y = ln_1(X);  q, k, v = Y W_q^T + b_q, Y W_k^T + b_k, Y W_v^T + b_v  (in_proj rows [q; k; v])
    Attn(A) = ls_1(out_proj(concat_h(A_h v_h)))       A_h: (L, L) weights, rows sum to 1 or 2
    FFN(Z)  = ls_2(mlp(ln_2(Z)))

    plain      Z = X + Attn(softmax(q k^T s)),             out = Z + FFN(Z)   (CLIP itself)
    maskclip   Z = X + ls_1(out_proj(v)),                  out = Z + FFN(Z)
    sclip      Z = X + Attn(softmax(q q^T s) + softmax(k k^T s)),  out = Z + FFN(Z)
    clearclip  out = Attn(softmax(q q^T s))                (no residual, no FFN)
    naclip     out = Attn(softmax(k k^T s + G))            (no residual, no FFN)

G is a Gaussian over patch-grid positions, G_ij = exp(-|p_i - p_j|^2 / (2 std^2)), 0 in the
class token's row and column. Every method's last-block function takes `modified=False`, which
turns all its modifications off at once: it then computes the plain block above through the
same code (our own q/k/v split and softmax), so its features equal `plain`'s.

The positional embedding of the patch tokens is resized bicubically from the trained grid to
the input's grid (align_corners=False); the class token's position is kept as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# (last block, tokens (B, L, D) batch first with the class token at 0, patch grid (h, w),
#  **options) -> tokens (B, L, D)
LastBlock = Callable[..., torch.Tensor]
# (q, k, v), each (B, heads, L, head_dim) -> (B, heads, L, head_dim)
HeadMixer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DenseMethod:
    name: str
    paper: str  # the paper that defines the last-block change
    last_block: LastBlock


# --- the pieces of a residual block ----------------------------------------------------------


def _run_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An unmodified block on batch-first tokens, in the layout its attention expects."""
    if block.attn.batch_first:
        return block(x)
    return block(x.transpose(0, 1)).transpose(0, 1)


def _heads(block: nn.Module, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of the block's attention for normalised tokens y (B, L, D), split per head as
    nn.MultiheadAttention splits them: (B, heads, L, head_dim) each."""
    attn = block.attn
    if attn.in_proj_weight is not None:
        weights = attn.in_proj_weight.chunk(3)
    else:
        weights = (attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight)
    biases = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None,) * 3
    batch, length, _ = y.shape
    return tuple(
        F.linear(y, w, b).reshape(batch, length, attn.num_heads, -1).transpose(1, 2)
        for w, b in zip(weights, biases, strict=True)
    )


def _attention_branch(block: nn.Module, mixed: torch.Tensor) -> torch.Tensor:
    """Heads (B, heads, L, head_dim) concatenated, then out_proj and ls_1: (B, L, D)."""
    batch, _, length, _ = mixed.shape
    merged = mixed.transpose(1, 2).reshape(batch, length, -1)
    return block.ls_1(block.attn.out_proj(merged))


def _ffn_branch(block: nn.Module, z: torch.Tensor) -> torch.Tensor:
    return block.ls_2(block.mlp(block.ln_2(z)))


def _block(
    block: nn.Module, x: torch.Tensor, mixer: HeadMixer, *, residual: bool, ffn: bool
) -> torch.Tensor:
    """A last block whose heads mix the values with `mixer`, with or without the residual
    connection around the attention and with or without the FFN residual branch."""
    q, k, v = _heads(block, block.ln_1(x))
    out = _attention_branch(block, mixer(q, k, v))
    if residual:
        out = x + out
    if ffn:
        out = out + _ffn_branch(block, out)
    return out


def _scale(q: torch.Tensor) -> float:
    return q.shape[-1] ** -0.5


def _softmax_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """softmax(a b^T * s) over the last axis, per head."""
    return (a @ b.transpose(-2, -1) * _scale(a)).softmax(dim=-1)


def _query_key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _softmax_similarity(q, k) @ v


def _plain_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CLIP's own block recomputed through `_block`: what every method falls back to with
    modified=False."""
    return _block(block, x, _query_key, residual=True, ffn=True)


# --- the methods' last blocks ----------------------------------------------------------------


def plain_last_block(
    block: nn.Module, x: torch.Tensor, grid: tuple[int, int], *, modified: bool = True
) -> torch.Tensor:
    """The unmodified CLIP block (its own forward): out = Z + FFN(Z), Z = X + Attn(softmax(q k^T
    s)). The reference the other methods are compared with; `modified` is accepted for a uniform
    signature and changes nothing."""
    return _run_block(block, x)


def maskclip_last_block(
    block: nn.Module, x: torch.Tensor, grid: tuple[int, int], *, modified: bool = True
) -> torch.Tensor:
    """MaskCLIP (Zhou, Loy and Dai, "Extract Free Dense Labels from CLIP", ECCV 2022, sec. 3.2).

    The query and key embeddings of the last attention layer are dropped and the value
    embedding and the output projection are applied to every token on its own (the paper's
    two 1x1 convolutions), i.e. each token attends only to itself. On a ViT the paper keeps the
    rest of the block around this value path: the input is added back (the residual) and the
    block's FFN residual branch follows.

        Z = X + ls_1(out_proj(v)),   v = ln_1(X) W_v^T + b_v
        out = Z + ls_2(mlp(ln_2(Z)))

    The paper's key smoothing and prompt denoising are post-processing of the class scores,
    not of the features, and are not part of this function.
    """
    if not modified:
        return _plain_block(block, x)
    return _block(block, x, lambda q, k, v: v, residual=True, ffn=True)


def _correlative(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (_softmax_similarity(q, q) + _softmax_similarity(k, k)) @ v


def sclip_last_block(
    block: nn.Module, x: torch.Tensor, grid: tuple[int, int], *, modified: bool = True
) -> torch.Tensor:
    """SCLIP (Wang, Mei and Yuille, "SCLIP: Rethinking Self-Attention for Dense
    Vision-Language Inference", 2023, sec. 3.2-3.3): correlative self-attention (CSA).

    The last attention layer reuses its pretrained projections but scores tokens by their
    correlation with each other in the query space and in the key space, and sums the two
    attention maps (each row of the sum adds up to 2). Only the attention map changes: the
    residual connection and the block's FFN residual branch stay as CLIP has them (as in the
    authors' released encoder, wangf3014/SCLIP clip/model.py).

        Z = X + ls_1(out_proj(concat_h((softmax(q_h q_h^T s) + softmax(k_h k_h^T s)) v_h)))
        out = Z + ls_2(mlp(ln_2(Z)))
    """
    if not modified:
        return _plain_block(block, x)
    return _block(block, x, _correlative, residual=True, ffn=True)


def _query_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _softmax_similarity(q, q) @ v


def clearclip_last_block(
    block: nn.Module, x: torch.Tensor, grid: tuple[int, int], *, modified: bool = True
) -> torch.Tensor:
    """ClearCLIP (Lan et al., "ClearCLIP: Decomposing CLIP Representations for Dense
    Vision-Language Inference", ECCV 2024, sec. 3.3): the final layer keeps only its attention
    output X_attn. Three changes: the residual connection is removed, the attention is
    query-query (self-self) attention, and the FFN is discarded.

        out = ls_1(out_proj(concat_h(softmax(q_h q_h^T s) v_h)))
    """
    if not modified:
        return _plain_block(block, x)
    return _block(block, x, _query_query, residual=False, ffn=False)


def neighbourhood_bias(
    grid: tuple[int, int],
    std: float,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """NACLIP's Gaussian neighbourhood term for a class token followed by an h x w patch grid
    (row-major): (1 + h*w, 1 + h*w), entry (i, j) = exp(-|p_i - p_j|^2 / (2 std^2)) for patches
    at grid positions p_i, p_j (peak 1 on the diagonal), 0 in the class token's row and column
    (the kernel is defined over patch positions only)."""
    h, w = grid
    rows = torch.arange(h, device=device, dtype=torch.float64).repeat_interleave(w)
    cols = torch.arange(w, device=device, dtype=torch.float64).repeat(h)
    squared = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    bias = torch.zeros(1 + h * w, 1 + h * w, device=device, dtype=torch.float64)
    bias[1:, 1:] = torch.exp(-squared / (2 * std**2))
    return bias.to(dtype)


def naclip_last_block(
    block: nn.Module,
    x: torch.Tensor,
    grid: tuple[int, int],
    *,
    modified: bool = True,
    std: float = 5.0,
) -> torch.Tensor:
    """NACLIP (Hajimiri, Ben Ayed and Dolz, "Pay Attention to Your Neighbours: Training-Free
    Open-Vocabulary Semantic Segmentation", WACV 2025, sec. 3): neighbour-aware attention in the
    last block. Tokens are scored by key-key similarity plus a Gaussian kernel G over patch-grid
    positions (std 5 in the paper, the `std` keyword here), which makes each patch attend to
    its spatial neighbourhood; the last block is reduced to this attention: no residual
    connection and no FFN.

        out = ls_1(out_proj(concat_h(softmax(k_h k_h^T s + G) v_h)))

    G = `neighbourhood_bias(grid, std)`, 0 for every pair that involves the class token.
    """
    if not modified:
        return _plain_block(block, x)
    bias = neighbourhood_bias(grid, std, device=x.device, dtype=x.dtype)

    def neighbour_aware(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (k @ k.transpose(-2, -1) * _scale(k) + bias).softmax(dim=-1) @ v

    return _block(block, x, neighbour_aware, residual=False, ffn=False)


DENSE_METHODS: dict[str, DenseMethod] = {
    "plain": DenseMethod("plain", "Radford et al., CLIP, ICML 2021 (unmodified)", plain_last_block),
    "maskclip": DenseMethod(
        "maskclip",
        "Zhou, Loy and Dai, Extract Free Dense Labels from CLIP, ECCV 2022",
        maskclip_last_block,
    ),
    "sclip": DenseMethod(
        "sclip",
        "Wang, Mei and Yuille, SCLIP: Rethinking Self-Attention for Dense Vision-Language "
        "Inference, 2023",
        sclip_last_block,
    ),
    "clearclip": DenseMethod(
        "clearclip",
        "Lan et al., ClearCLIP: Decomposing CLIP Representations for Dense Vision-Language "
        "Inference, ECCV 2024",
        clearclip_last_block,
    ),
    "naclip": DenseMethod(
        "naclip",
        "Hajimiri, Ben Ayed and Dolz, Pay Attention to Your Neighbours: Training-Free "
        "Open-Vocabulary Semantic Segmentation, WACV 2025",
        naclip_last_block,
    ),
}


# --- the vision tower --------------------------------------------------------------------------


def _check_visual(visual: nn.Module) -> None:
    if getattr(visual, "attn_pool", None) is not None:
        raise ValueError("dense features need a ViT without attentional pooling")
    for block in visual.transformer.resblocks:
        attn = getattr(block, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention):
            raise TypeError(
                f"dense features need open_clip ResidualAttentionBlocks with an "
                f"nn.MultiheadAttention; got {type(block).__name__}"
            )
        if attn.bias_k is not None or attn.add_zero_attn:
            raise ValueError("attention with bias_k/bias_v or add_zero_attn is not supported")


def interpolate_positional_embedding(visual: nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    """The positional embedding (1 + h*w, D) for an h x w patch grid: the class token's row as
    trained, the patch rows resized bicubically from the trained grid (align_corners=False)."""
    pos = visual.positional_embedding
    trained_h, trained_w = visual.grid_size
    if pos.shape[0] != 1 + trained_h * trained_w:
        raise ValueError(
            f"positional embedding has {pos.shape[0]} rows, expected 1 + {trained_h}x{trained_w}"
        )
    patches = pos[1:].reshape(1, trained_h, trained_w, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=grid, mode="bicubic", align_corners=False)
    patches = patches.to(pos.dtype).permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)
    return torch.cat([pos[:1], patches])


def _embed(visual: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Tokens entering the first block (B, 1 + h*w, D), class token first, and the grid."""
    if images.ndim != 4:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    patch_h, patch_w = visual.patch_size
    if images.shape[-2] % patch_h or images.shape[-1] % patch_w:
        raise ValueError(
            f"image size {tuple(images.shape[-2:])} is not a multiple of the patch size "
            f"{(patch_h, patch_w)}"
        )
    x = visual.conv1(images)  # (B, D, h, w)
    batch, width, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)  # (B, h*w, D), row-major
    cls = visual.class_embedding.to(x.dtype).expand(batch, 1, width)
    x = torch.cat([cls, x], dim=1) + interpolate_positional_embedding(visual, (h, w)).to(x.dtype)
    # No patch dropout: every patch is needed (PatchDropout is the identity in eval anyway).
    return visual.ln_pre(x), (h, w)


def dense_features(visual: nn.Module, images: torch.Tensor, method: str, **options) -> torch.Tensor:
    """Per-patch embeddings (B, E, h, w) of CLIP-normalised `images` (B, 3, H, W), h = H /
    patch, w = W / patch, after `ln_post` and `@ proj` (not normalised), with the last block
    replaced by `method`'s (a key of DENSE_METHODS). `options` go to the method's last-block
    function (`modified=False` for any method, `std=` for naclip). Runs in the tensors' dtype
    and under the caller's autograd mode; the caller puts `visual` in eval mode."""
    if method not in DENSE_METHODS:
        raise ValueError(f"unknown dense method {method!r}; known: {sorted(DENSE_METHODS)}")
    _check_visual(visual)
    x, grid = _embed(visual, images)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = _run_block(block, x)
    x = DENSE_METHODS[method].last_block(blocks[-1], x, grid, **options)
    patches = visual.ln_post(x[:, 1:])
    if visual.proj is not None:
        patches = patches @ visual.proj
    batch = patches.shape[0]
    return patches.reshape(batch, grid[0], grid[1], -1).permute(0, 3, 1, 2)
