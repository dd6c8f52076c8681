"""SegCLIP on open_clip: CLIP with a semantic group module inside the vision tower."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from functools import cache

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

from segclip.clip_architecture import MODEL_CONFIG_DIR
from segclip.config import ModelConfig
from segclip.model.group import GroupAssignment, SemanticGroup
from segclip.model.reconstruction import MaskedReconstruction, patchify

MAX_LOGIT_SCALE = 100.0
MAX_LOG_LOGIT_SCALE = math.log(MAX_LOGIT_SCALE)


class VisionMode(StrEnum):
    """Which vision path to run; always passed explicitly, never inferred from shapes."""

    TRAIN = "train"  # full image, Gumbel assignment
    MASKED = "masked"  # a random subset of patches, Gumbel assignment (reconstruction pass)
    INFER = "infer"  # full image at any size, argmax assignment, no noise


@dataclass
class ImageEncoding:
    """Everything one vision pass produces. G centers, N encoded patches, E embed dim."""

    embedding: torch.Tensor  # (B, E) image embedding (max over centers), unnormalised
    center_embeddings: torch.Tensor  # (B, G, E) group embeddings for segmentation
    center_tokens: torch.Tensor  # (B, G, D) group-module output, before the late blocks
    assignment: GroupAssignment  # logits / soft / hard, each (B, G, N)
    patch_index: torch.Tensor  # (B, N) grid positions of the encoded patches
    grid: tuple[int, int]  # patch grid of the input image

    @property
    def soft_assign(self) -> torch.Tensor:
        return self.assignment.soft

    @property
    def hard_assign(self) -> torch.Tensor:
        return self.assignment.hard


@dataclass
class TrainOutputs:
    """What the losses need from one training step's forward pass."""

    image_features: torch.Tensor  # (B, E), L2-normalised
    text_features: torch.Tensor  # (B, E), L2-normalised
    logit_scale: torch.Tensor  # scalar, exp(s) clamped to 100
    center_features: torch.Tensor  # (B, G, E), L2-normalised center embeddings
    # (K, E) L2-normalised prompts of the caption words; None when none were given
    word_features: torch.Tensor | None
    patch_assign: torch.Tensor  # (B, N, G): per patch, the full pass's straight-through center
    # None when the forward skipped the masked pass (reconstruction weight 0)
    reconstruction: torch.Tensor | None  # (B, N, p*p*3) predicted pixels
    target: torch.Tensor | None  # (B, N, p*p*3) CLIP-normalised input pixels
    masked: torch.Tensor | None  # (B, N) bool, True where the masked pass hid the patch


class SegCLIP(nn.Module):
    """open_clip CLIP whose vision tower groups patches into learnable centers.

    Submodules: `clip` (the unchanged open_clip model, so pretrained weights load
    as they are), `group` (the semantic group module placed after vision block
    `group_layer`) and `reconstruction` (the masked-reconstruction head).
    """

    def __init__(self, clip: open_clip.CLIP, config: ModelConfig) -> None:
        super().__init__()
        visual = clip.visual
        if not isinstance(visual, open_clip.transformer.VisionTransformer):
            raise TypeError(
                f"SegCLIP needs open_clip's VisionTransformer, got {type(visual).__name__}"
            )
        self.config = config
        self.clip = clip
        blocks = visual.transformer.resblocks
        self.group_layer = config.group_layer if config.group_layer is not None else len(blocks) - 2
        width = visual.conv1.out_channels
        heads = blocks[0].attn.num_heads
        self.patch_size = visual.conv1.kernel_size[0]
        self.grid: tuple[int, int] = tuple(visual.grid_size)
        self.group = SemanticGroup(
            width,
            heads,
            num_centers=config.num_centers,
            cross_attention_blocks=config.cross_attention_blocks,
            gumbel_tau=config.gumbel_tau,
        )
        self.reconstruction = MaskedReconstruction(
            width,
            heads,
            num_centers=config.num_centers,
            num_blocks=config.reconstruction_blocks,
            grid=self.grid,
            patch_size=self.patch_size,
            decoder_width=config.decoder_width,
            decoder_depth=config.decoder_depth,
            decoder_heads=config.decoder_heads,
        )

    @property
    def early_blocks(self) -> nn.ModuleList:
        return self.clip.visual.transformer.resblocks[: self.group_layer]

    @property
    def late_blocks(self) -> nn.ModuleList:
        return self.clip.visual.transformer.resblocks[self.group_layer :]

    @property
    def num_visible_patches(self) -> int:
        """Patches the masked pass keeps: int((1 + N) * ratio) tokens minus the CLS [ref]."""
        num_patches = self.grid[0] * self.grid[1]
        return max(1, int((num_patches + 1) * self.config.reconstruction_keep_ratio) - 1)

    def _patch_positions(self, grid: tuple[int, int], mode: VisionMode) -> torch.Tensor:
        positions = self.clip.visual.positional_embedding[1:]
        if grid == self.grid:
            return positions
        if mode is not VisionMode.INFER:
            raise ValueError(
                f"{mode.value} mode needs the training grid {self.grid} "
                f"({self.grid[0] * self.patch_size} px), got {grid}; "
                "use VisionMode.INFER for other sizes"
            )
        table = positions.reshape(1, *self.grid, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=grid, mode="bicubic", align_corners=False)
        return table.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)

    def _keep_random_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, num_patches, width = x.shape
        order = torch.rand(batch, num_patches, device=x.device).argsort(dim=1)
        keep = order[:, : self.num_visible_patches]
        return x.gather(1, keep.unsqueeze(-1).expand(-1, -1, width)), keep

    def run_late_blocks(self, centers: torch.Tensor) -> torch.Tensor:
        """The vision blocks after the group module, on the center tokens (B, G, D).

        With `late_block_context="own_center"` [fix] each center is its own length-1
        sequence: trained from scratch, self-attention across centers made them near
        copies of one another (mean cosine 0.98), so no center described its own region.
        """
        batch, groups, width = centers.shape
        own_center = self.config.late_block_context == "own_center"
        z = centers.reshape(batch * groups, 1, width) if own_center else centers
        for block in self.late_blocks:
            z = block(z)
        return z.reshape(batch, groups, width)

    def encode_image(self, images: torch.Tensor, mode: VisionMode) -> ImageEncoding:
        """Images (B, 3, H, W), CLIP-normalised -> `ImageEncoding` for the chosen path."""
        mode = VisionMode(mode)
        visual = self.clip.visual
        x = visual.conv1(images)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        # CLS is dropped right after ln_pre in every path [ref]; LayerNorm is per token,
        # so never building it gives the same patch tokens.
        x = visual.ln_pre(x + self._patch_positions(grid, mode).to(x.dtype))
        if mode is VisionMode.MASKED:
            x, patch_index = self._keep_random_patches(x)
        else:
            patch_index = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        for block in self.early_blocks:
            x = block(x)
        center_tokens, assignment = self.group(x, stochastic=mode is not VisionMode.INFER)
        z = self.run_late_blocks(center_tokens)
        tokens = torch.cat([z.max(dim=1, keepdim=True).values, z], dim=1)
        tokens = visual.ln_post(tokens) @ visual.proj
        return ImageEncoding(
            embedding=tokens[:, 0],
            center_embeddings=tokens[:, 1:],
            center_tokens=center_tokens,
            assignment=assignment,
            patch_index=patch_index,
            grid=grid,
        )

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L), L <= context length -> unnormalised text embeddings (B, E).

        Causal attention and pooling at the end token make the embedding
        independent of padding, so the tower runs only up to the batch's last end
        token: the demo's short captions cost half of the 32 positions.
        """
        clip = self.clip
        tokens = tokens[:, : _last_pooled_position(tokens, clip) + 1]
        length = tokens.shape[1]
        if length > clip.context_length:
            raise ValueError(f"{length} tokens exceed the context length {clip.context_length}")
        x = clip.token_embedding(tokens) + clip.positional_embedding[:length]
        x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
        x = text_global_pool(clip.ln_final(x), tokens, clip.text_pool_type, clip.text_eos_id)
        if isinstance(clip.text_projection, nn.Linear):
            return clip.text_projection(x)
        return x @ clip.text_projection

    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep exp(s) <= 100; the training loop calls this after each optimiser step."""
        self.clip.logit_scale.clamp_(max=MAX_LOG_LOGIT_SCALE)

    def forward(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        *,
        reconstruct: bool = True,
        word_prompts: torch.Tensor | None = None,
    ) -> TrainOutputs:
        """One training step's forward: full pass, masked pass, text; losses are separate.

        `reconstruct=False` skips the masked pass and the decoder, about half of a tiny
        model's step, for recipes that give the reconstruction loss no weight.
        `word_prompts` (K, L) token ids are encoded by the text tower in the same pass (so
        a DistributedDataParallel wrapper sees them) for the caption-word loss.
        """
        full = self.encode_image(images, VisionMode.TRAIN)
        pixels = target = masked = None
        if reconstruct:
            masked_pass = self.encode_image(images, VisionMode.MASKED)
            pixels = self.reconstruction(
                masked_pass.center_tokens, masked_pass.hard_assign, masked_pass.patch_index
            )
            masked = torch.ones(pixels.shape[:2], dtype=torch.bool, device=pixels.device)
            masked.scatter_(1, masked_pass.patch_index, False)
            target = patchify(images, self.patch_size)
        return TrainOutputs(
            image_features=F.normalize(full.embedding, dim=-1),
            text_features=F.normalize(self.encode_text(tokens), dim=-1),
            logit_scale=self.logit_scale(),
            center_features=F.normalize(full.center_embeddings, dim=-1),
            word_features=None
            if word_prompts is None
            else F.normalize(self.encode_text(word_prompts), dim=-1),
            patch_assign=full.hard_assign.transpose(1, 2),
            reconstruction=pixels,
            target=target,
            masked=masked,
        )


@cache
def register_model_configs() -> None:
    """Make the package's JSON architectures (e.g. `segclip-tiny`) known to open_clip."""
    open_clip.add_model_config(MODEL_CONFIG_DIR)


def build_model(config: ModelConfig) -> SegCLIP:
    """Create the open_clip model (with `config.pretrained` weights) and wrap it."""
    register_model_configs()
    clip = open_clip.create_model(
        config.clip_model, pretrained=config.pretrained, force_quick_gelu=config.quick_gelu
    )
    return SegCLIP(clip, config)


def _last_pooled_position(tokens: torch.Tensor, clip: nn.Module) -> int:
    """The latest position any row pools its embedding from (the last one if unknown)."""
    if clip.text_pool_type == "argmax":  # CLIP: the end token has the highest id
        return int(tokens.argmax(dim=-1).max())
    if clip.text_pool_type == "eos":
        return int((tokens == clip.text_eos_id).int().argmax(dim=-1).max())
    return tokens.shape[1] - 1


class CaptionTokenizer:
    """open_clip's BPE tokenizer that keeps `max_tokens` tokens plus start and end [ref]."""

    def __init__(self, config: ModelConfig) -> None:
        register_model_configs()
        self._tokenizer = open_clip.get_tokenizer(config.clip_model)
        self.context_length = config.caption_tokens + 2

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        return self._tokenizer(texts, context_length=self.context_length)
