"""Checkpoints: our own format (safetensors + the config that built it) and the released one.

The authors' release is a plain state dict whose vision tower is split into
`layers0` (blocks before the group module), `layers2` (after it) and
`layers_mae2` (reconstruction blocks); `REFERENCE_KEY_RULES` maps each of its
keys onto this model's names.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from segclip.config import ModelConfig, available_profiles, load_config
from segclip.model.segclip import SegCLIP, build_model
from segclip.storage import atomic_write, local_copy, location

FORMAT_NAME = "segclip"
FORMAT_VERSION = "1"


def save_checkpoint(model: SegCLIP, path: str | Path) -> Path:
    """Write weights and model config to one .safetensors file (a path or URL), atomically."""
    path = location(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {path}")
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_config": model.config.model_dump_json(),
    }
    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


def load_checkpoint(path: str | Path) -> SegCLIP:
    """Rebuild the model from a file written by `save_checkpoint`."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{path} is a safetensors file but not a SegCLIP checkpoint (no 'format: segclip' "
            "metadata); save models with segclip.model.save_checkpoint"
        )
    config = ModelConfig.model_validate_json(metadata["model_config"])
    model = build_model(config.model_copy(update={"pretrained": None}))
    model.load_state_dict(load_file(str(path)), strict=True)
    return model


@dataclass(frozen=True)
class KeyRule:
    """A released-checkpoint key pattern, our name for it, and a value conversion."""

    pattern: re.Pattern[str]
    rename: Callable[[re.Match[str], int], str]
    convert: Callable[[torch.Tensor], torch.Tensor] | None = None


def _rule(
    pattern: str,
    rename: str | Callable[[re.Match[str], int], str],
    convert: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> KeyRule:
    renamer = rename if callable(rename) else (lambda m, _k, t=rename: m.expand(t))
    return KeyRule(re.compile(pattern), renamer, convert)


_GROUP = r"^clip\.visual\.transformer\.semantic_layer2\."

REFERENCE_KEY_RULES: tuple[KeyRule, ...] = (
    _rule(
        r"^clip\.visual\.transformer\.layers0\.(\d+)\.(.+)$",
        r"clip.visual.transformer.resblocks.\1.\2",
    ),
    _rule(
        r"^clip\.visual\.transformer\.layers2\.(\d+)\.(.+)$",
        lambda m, k: f"clip.visual.transformer.resblocks.{k + int(m[1])}.{m[2]}",
    ),
    _rule(r"^clip\.visual\.transformer\.layers_mae2\.(.+)$", r"reconstruction.blocks.\1"),
    _rule(
        r"^clip\.visual\.transformer\.reconstruct_layer2\.rec_proj_a\.a_fc\.(.+)$",
        r"reconstruction.assign_proj.\1",
    ),
    _rule(_GROUP + r"semantic_center$", "group.centers"),
    _rule(_GROUP + r"norm\.(.+)$", r"group.ln_tokens.\1"),
    _rule(_GROUP + r"cross_ln\.(.+)$", r"group.ln_query.\1"),
    _rule(_GROUP + r"cross_att\.(\d+)\.ln_x\.(.+)$", r"group.cross_blocks.\1.ln_query.\2"),
    _rule(_GROUP + r"cross_att\.(\d+)\.ln_k\.(.+)$", r"group.cross_blocks.\1.ln_context.\2"),
    _rule(_GROUP + r"cross_att\.(\d+)\.ln_2\.(.+)$", r"group.cross_blocks.\1.ln_mlp.\2"),
    _rule(_GROUP + r"cross_att\.(\d+)\.(attn|mlp)\.(.+)$", r"group.cross_blocks.\1.\2.\3"),
    _rule(_GROUP + r"k_conv\.weight$", "group.key_proj.weight", lambda w: w.squeeze(-1)),
    _rule(_GROUP + r"v_conv\.weight$", "group.value_proj.weight", lambda w: w.squeeze(-1)),
    _rule(_GROUP + r"k_ln\.(.+)$", r"group.ln_key.\1"),
    _rule(_GROUP + r"proj_o\.ln\.(.+)$", r"group.ln_out.\1"),
    _rule(_GROUP + r"proj_o\.mlp\.fc(\d)\.(.+)$", r"group.out_fc\1.\2"),
    _rule(r"^vis_mae_decoder\.mask_token$", "reconstruction.decoder.mask_token"),
    _rule(
        r"^vis_mae_decoder\.decoder_(embed|pos_embed|blocks|norm|pred)(.*)$",
        r"reconstruction.decoder.\1\2",
    ),
    _rule(r"^(clip\..+)$", r"\1"),  # the rest of CLIP keeps open_clip's names
)


def map_reference_key(key: str, group_layer: int) -> tuple[str, Callable | None]:
    """Our parameter name for a released key (first matching rule wins)."""
    for rule in REFERENCE_KEY_RULES:
        match = rule.pattern.match(key)
        if match:
            return rule.rename(match, group_layer), rule.convert
    raise KeyError(f"released checkpoint key {key!r} matches no rule in REFERENCE_KEY_RULES")


def convert_reference_state_dict(
    state_dict: dict[str, torch.Tensor], group_layer: int
) -> dict[str, torch.Tensor]:
    converted = {}
    for key, value in state_dict.items():
        name, convert = map_reference_key(key.removeprefix("module."), group_layer)
        converted[name] = convert(value) if convert else value
    return converted


def reference_model_config(state_dict: dict[str, torch.Tensor]) -> ModelConfig:
    """The `paper` architecture with the center count and group layer the weights imply."""
    early = {key.split(".")[4] for key in state_dict if ".transformer.layers0." in key}
    centers = state_dict.get("clip.visual.transformer.semantic_layer2.semantic_center")
    if not early or centers is None:
        raise ValueError(
            "not a released SegCLIP state dict: expected keys 'clip.visual.transformer.layers0.*' "
            "and 'clip.visual.transformer.semantic_layer2.semantic_center'"
        )
    return load_config("paper").model.model_copy(
        update={"pretrained": None, "num_centers": centers.shape[0], "group_layer": len(early)}
    )


def load_reference_checkpoint(path: str | Path, config: ModelConfig | None = None) -> SegCLIP:
    """Load the authors' released `segclip.bin` (a plain torch state dict)."""
    state_dict = torch.load(str(path), map_location="cpu", weights_only=True)
    state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    config = (config or reference_model_config(state_dict)).model_copy(update={"pretrained": None})
    model = build_model(config)
    converted = convert_reference_state_dict(state_dict, model.group_layer)
    problem = f"{path} does not fit the {config.clip_model} SegCLIP architecture"
    try:
        missing, unexpected = model.load_state_dict(converted, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(f"{problem}: {error}") from None
    if missing or unexpected:
        raise ValueError(
            f"{problem}: missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )
    return model


_CHECKPOINT_LOADERS: dict[str, Callable[[Path], SegCLIP]] = {
    ".safetensors": load_checkpoint,
    ".bin": load_reference_checkpoint,
    ".pt": load_reference_checkpoint,
    ".pth": load_reference_checkpoint,
}


OPEN_CLIP_PREFIX = "open_clip:"  # open_clip:ARCHITECTURE[:WEIGHTS], e.g. open_clip:ViT-B-16:openai


def named_model(source: str | Path) -> ModelConfig | None:
    """The model a name gives, untrained around its CLIP: a profile's, or any open_clip ViT
    with its pretrained weights (`open_clip:ViT-L-14:laion2b_s32b_b82k`); None for a file."""
    name = str(source)
    if name in available_profiles():
        return load_config(name).model
    if name.startswith(OPEN_CLIP_PREFIX):
        architecture, _, weights = name.removeprefix(OPEN_CLIP_PREFIX).partition(":")
        # group_layer None: depth - 2, valid for any depth (the grouping is not what is used)
        return ModelConfig(clip_model=architecture, pretrained=weights or None, group_layer=None)
    return None


def load_model(source: str | Path) -> SegCLIP:
    """A model from our checkpoint or the released one (a path or any fsspec URL), or from a
    name (`named_model`: a profile or an open_clip architecture and weights)."""
    if (config := named_model(source)) is not None:
        return build_model(config)
    path = location(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"{source} is neither a checkpoint file nor a model name: a profile "
            f"({', '.join(available_profiles())}) or {OPEN_CLIP_PREFIX}ARCHITECTURE[:WEIGHTS]"
        )
    loader = _CHECKPOINT_LOADERS.get(path.suffix)
    if loader is None:
        raise ValueError(
            f"cannot tell the format of {path}: use a .safetensors file from "
            "segclip.model.save_checkpoint or the released .bin "
            f"(known suffixes: {sorted(_CHECKPOINT_LOADERS)})"
        )
    with local_copy(path) as local:
        return loader(local)
