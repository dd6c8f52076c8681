import ast

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from segclip.config import load_config
from segclip.model import (
    VisionMode,
    build_model,
    load_checkpoint,
    load_model,
    named_model,
    save_checkpoint,
)
from segclip.model.checkpoint import map_reference_key
from segclip.model.segclip import register_model_configs
from tests.conftest import FIXTURES

# Where a released key must land in our model: written by hand, not by the key map.
EXPECTED_LANDINGS = {
    "clip.visual.transformer.layers0.9.mlp.c_fc.weight": "clip.visual.transformer.resblocks.9.mlp.c_fc.weight",
    "clip.visual.transformer.layers2.0.attn.in_proj_weight": "clip.visual.transformer.resblocks.10.attn.in_proj_weight",
    "clip.visual.transformer.layers2.1.ln_2.bias": "clip.visual.transformer.resblocks.11.ln_2.bias",
    "clip.visual.transformer.semantic_layer2.semantic_center": "group.centers",
    "clip.visual.transformer.semantic_layer2.norm.weight": "group.ln_tokens.weight",
    "clip.visual.transformer.semantic_layer2.cross_ln.bias": "group.ln_query.bias",
    "clip.visual.transformer.semantic_layer2.cross_att.1.ln_x.weight": "group.cross_blocks.1.ln_query.weight",
    "clip.visual.transformer.semantic_layer2.cross_att.0.ln_k.bias": "group.cross_blocks.0.ln_context.bias",
    "clip.visual.transformer.semantic_layer2.cross_att.0.attn.in_proj_weight": "group.cross_blocks.0.attn.in_proj_weight",
    "clip.visual.transformer.semantic_layer2.proj_o.mlp.fc2.weight": "group.out_fc2.weight",
    "clip.visual.transformer.layers_mae2.1.attn.out_proj.weight": "reconstruction.blocks.1.attn.out_proj.weight",
    "clip.visual.transformer.reconstruct_layer2.rec_proj_a.a_fc.weight": "reconstruction.assign_proj.weight",
    "vis_mae_decoder.decoder_blocks.2.attn.qkv.weight": "reconstruction.decoder.blocks.2.attn.qkv.weight",
    "vis_mae_decoder.decoder_pos_embed": "reconstruction.decoder.pos_embed",
    "vis_mae_decoder.mask_token": "reconstruction.decoder.mask_token",
    "clip.token_embedding.weight": "clip.token_embedding.weight",
    "clip.logit_scale": "clip.logit_scale",
}


def _reference_state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    state = {}
    for line in (FIXTURES / "reference-checkpoint-keys.tsv").read_text().splitlines():
        key, shape, dtype = line.split("\t")
        assert dtype == "float32"
        state[key] = torch.randn(ast.literal_eval(shape), generator=generator)
    return state


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    state = _reference_state_dict()
    path = tmp_path_factory.mktemp("released") / "segclip.bin"
    torch.save(state, path)
    return state, load_model(path)


def test_released_checkpoint_loads_every_key_where_the_map_says(released):
    state, model = released
    ours = model.state_dict()
    targets = {map_reference_key(key, model.group_layer)[0] for key in state}
    assert len(targets) == len(state)  # no two released keys land on one parameter
    assert targets == set(ours)  # nothing missing, nothing unexpected
    for key, name in EXPECTED_LANDINGS.items():
        assert torch.equal(ours[name], state[key]), key
    for conv in ("k_conv", "v_conv"):
        key = f"clip.visual.transformer.semantic_layer2.{conv}.weight"
        name = f"group.{'key' if conv == 'k_conv' else 'value'}_proj.weight"
        assert torch.equal(ours[name], state[key][:, :, 0])
    for key, value in state.items():
        assert torch.equal(
            ours[map_reference_key(key, model.group_layer)[0]].reshape(value.shape), value
        )
    assert (model.group_layer, model.group.num_centers) == (10, 8)


def test_released_checkpoint_of_the_wrong_architecture_is_refused(tmp_path):
    state = _reference_state_dict()
    del state["vis_mae_decoder.mask_token"]
    torch.save(state, tmp_path / "partial.bin")
    with pytest.raises(ValueError, match=r"missing \['reconstruction.decoder.mask_token'\]"):
        load_model(tmp_path / "partial.bin")
    state["clip.visual.proj"] = torch.zeros(768, 256)
    torch.save(state, tmp_path / "bad.bin")
    with pytest.raises(
        ValueError, match=r"(?s)bad.bin does not fit .*size mismatch for clip.visual.proj"
    ):
        load_model(tmp_path / "bad.bin")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.bin")
    with pytest.raises(ValueError, match="not a released SegCLIP state dict"):
        load_model(tmp_path / "other.bin")


def test_own_checkpoint_round_trip_is_bit_identical(tmp_path):
    config = load_config("tiny", ["model.num_centers=4"]).model
    torch.manual_seed(0)
    model = build_model(config).eval()
    images = torch.randn(2, 3, 128, 128)
    path = save_checkpoint(model, tmp_path / "ckpt" / "model.safetensors")
    restored = load_checkpoint(path).eval()
    assert restored.config == config.model_copy(update={"pretrained": None})
    before = model.encode_image(images, VisionMode.INFER)
    after = restored.encode_image(images, VisionMode.INFER)
    assert torch.equal(before.center_embeddings, after.center_embeddings)
    assert torch.equal(before.soft_assign, after.soft_assign)
    assert torch.equal(load_model(path).group.centers, model.group.centers)
    assert not list(path.parent.glob(".*tmp*"))


def test_pretrained_weights_load_from_a_local_open_clip_file(tmp_path):
    """`model.pretrained` takes a local path exactly as it takes `openai` on a real run."""
    register_model_configs()  # this package's tiny architecture, for open_clip itself
    torch.manual_seed(3)
    clip = open_clip.create_model("segclip-tiny")
    path = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), path)
    model = build_model(load_config("tiny", [f"model.pretrained={path}"]).model)
    for name, value in clip.state_dict().items():
        assert torch.equal(model.clip.state_dict()[name], value), name


def test_an_open_clip_name_gives_that_clip_untrained_around_it(tmp_path):
    """open_clip:ARCHITECTURE[:WEIGHTS]: the floor of the training-free methods on any ViT."""
    register_model_configs()  # this package's tiny architecture, for open_clip itself
    torch.manual_seed(3)
    clip = open_clip.create_model("segclip-tiny")
    path = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), path)
    model = load_model(f"open_clip:segclip-tiny:{path}")
    assert named_model(f"open_clip:segclip-tiny:{path}").clip_model == "segclip-tiny"
    for name, value in clip.state_dict().items():
        assert torch.equal(model.clip.state_dict()[name], value), name
    assert named_model("open_clip:segclip-tiny").pretrained is None
    assert named_model(tmp_path / "model.safetensors") is None


def test_bad_sources_get_clear_errors(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"neither a checkpoint file nor a model name: a profile \(.*tiny.*\) or open_clip:",
    ):
        load_model(tmp_path / "missing.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="not a SegCLIP checkpoint"):
        load_model(tmp_path / "foreign.safetensors")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_model(tmp_path / "weights.npz")
    with pytest.raises(ValueError, match=r"must end in \.safetensors"):
        save_checkpoint(build_model(load_config("tiny").model), tmp_path / "model.pt")
