"""Model FLOPs of one training sample, from the model's own shapes (for MFU).

Counted analytically rather than with `torch.utils.flop_counter`: the counter has no
formula for the CPU's fused attention kernel, so its total depends on which kernels
the device picks; this count is the same on every device. Only matrix products count
(2 FLOPs per multiply-add; norms, activations and softmaxes are left out, as is
usual for MFU), attention's QK^T and AV included. The losses add under 0.01%.

The `paper` model (ViT-B/16: width D=768, MLP 3072, N=196 patches, 10 blocks before
the group module; G=8 centers, 2 cross-attention blocks; the masked pass keeps
V=48 patches; reconstruction: 2 blocks of width 768, a decoder of 3 blocks of width
384 on 197 tokens; text: 12 blocks of width 512 on 32 tokens), forward, per sample:

    one block on L tokens, width W, MLP M:  8*L*W^2 (QKV, out) + 4*L^2*W (QK^T, AV)
                                            + 4*L*W*M (MLP)
    full pass    patch conv 0.231 + 10 blocks at L=196 28.925 + group 1.280
                 + 2 late blocks at L=8 0.227 + projection 0.007      = 30.671 GFLOP
    masked pass  patch conv 0.231 + 10 blocks at L=48 6.866 + group 0.542
                 + late blocks 0.227 + projection 0.007               =  7.873 GFLOP
    reconstruction  2 blocks at L=48 1.373 + decoder 2.415 (3 blocks at
                 L=197 2.270) + assignment 0.001                      =  3.789 GFLOP
    text         12 blocks at L=32 2.441 + projection 0.001           =  2.442 GFLOP
                                                            forward  = 44.774 GFLOP

Backward costs twice the forward (a product's gradient for its input and for its
weight), so one training sample is 3 x 44.774 = 134.3 GFLOP, the usual MFU convention.
FlopCounterMode with the math attention kernel counts the same 44.774 forward (the
unit tests pin the two to the FLOP). The 128.5 GFLOP per sample that
benchmarks/train_step.py used to count on the CPU is lower because the counter did
not see the attention inside the CPU's fused kernel, and because some products need
no gradient in practice (the frozen patch embedding).
"""

from __future__ import annotations

from torch import nn

from segclip.model.segclip import SegCLIP


def _linear(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def _block(queries: int, width: int, hidden: int, *, keys: int | None = None) -> int:
    """A transformer block: Q and output projections on the queries, K and V on the keys."""
    keys = queries if keys is None else keys
    projections = 2 * _linear(queries, width, width) + 2 * _linear(keys, width, width)
    attention = 2 * (2 * queries * keys * width)
    mlp = _linear(queries, width, hidden) + _linear(queries, hidden, width)
    return projections + attention + mlp


def _mlp_hidden(block: nn.Module) -> int:
    mlp = block.mlp
    return (mlp.c_fc if hasattr(mlp, "c_fc") else mlp.fc1).out_features


def _vision_pass(model: SegCLIP, patches: int) -> int:
    """The vision tower when `patches` of the image's patches reach the blocks."""
    visual, group = model.clip.visual, model.group
    width = visual.conv1.out_channels
    num_patches = model.grid[0] * model.grid[1]
    centers = group.num_centers
    flops = _linear(num_patches, 3 * model.patch_size**2, width)  # runs on every patch
    flops += sum(_block(patches, width, _mlp_hidden(b)) for b in model.early_blocks)
    flops += sum(
        _block(centers, width, _mlp_hidden(b), keys=centers + patches) for b in group.cross_blocks
    )
    flops += 2 * _linear(patches, width // group.key_proj.groups, width)  # grouped K and V
    flops += 2 * (2 * centers * patches * width)  # assignment logits, pooling
    flops += _linear(centers, width, group.out_fc1.out_features)
    flops += _linear(centers, group.out_fc1.out_features, width)
    # own_center: each center is a 1-token sequence of its own; all_centers: one of G tokens
    own_center = model.config.late_block_context == "own_center"
    sequences, length = (centers, 1) if own_center else (1, centers)
    flops += sum(sequences * _block(length, width, _mlp_hidden(b)) for b in model.late_blocks)
    return flops + _linear(centers + 1, width, visual.proj.shape[1])


def _reconstruction(model: SegCLIP) -> int:
    rec, visible = model.reconstruction, model.num_visible_patches
    width, centers = model.clip.visual.conv1.out_channels, model.group.num_centers
    decoder = rec.decoder
    tokens = decoder.pos_embed.shape[1]  # every patch plus the summary token
    flops = _linear(visible, centers, centers) + 2 * visible * centers * width
    flops += sum(_block(visible, width, _mlp_hidden(b)) for b in rec.blocks)
    flops += _linear(visible + 1, width, decoder.embed.out_features)
    flops += sum(_block(tokens, decoder.embed.out_features, _mlp_hidden(b)) for b in decoder.blocks)
    return flops + _linear(tokens, decoder.embed.out_features, decoder.pred.out_features)


def _text(model: SegCLIP) -> int:
    """At the full caption length: a batch of shorter captions stops at its longest one."""
    clip = model.clip
    tokens = model.config.caption_tokens + 2  # the tokenizer's start and end tokens
    width = clip.transformer.width
    projection = clip.text_projection
    out = projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1]
    flops = sum(_block(tokens, width, _mlp_hidden(b)) for b in clip.transformer.resblocks)
    return flops + _linear(1, width, out)  # projected at the end token only


def forward_flops(model: SegCLIP) -> dict[str, int]:
    """FLOPs of one sample's training forward (`SegCLIP.forward`), per part."""
    return {
        "full_pass": _vision_pass(model, model.grid[0] * model.grid[1]),
        "masked_pass": _vision_pass(model, model.num_visible_patches),
        "reconstruction": _reconstruction(model),
        "text": _text(model),
    }


def train_flops_per_sample(model: SegCLIP) -> int:
    """Forward plus backward (twice the forward) of one training sample."""
    return 3 * sum(forward_flops(model).values())
