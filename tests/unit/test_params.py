import pytest

from segclip.model import parameter_groups, parameter_role


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("clip.visual.conv1.weight", "frozen"),
        ("clip.visual.positional_embedding", "frozen"),
        ("clip.visual.class_embedding", "frozen"),
        ("clip.visual.ln_pre.bias", "frozen"),
        ("clip.token_embedding.weight", "frozen"),
        ("clip.positional_embedding", "frozen"),
        ("clip.visual.transformer.resblocks.9.attn.in_proj_weight", "pretrained"),
        ("clip.visual.transformer.resblocks.10.attn.in_proj_weight", "new"),
        ("clip.visual.transformer.resblocks.11.mlp.c_fc.bias", "new"),
        ("clip.visual.ln_post.weight", "new"),
        ("clip.visual.proj", "new"),
        ("group.centers", "new"),
        ("reconstruction.decoder.mask_token", "new"),
        ("clip.transformer.resblocks.3.ln_1.weight", "pretrained"),
        ("clip.text_projection", "pretrained"),
        ("clip.logit_scale", "pretrained"),
    ],
)
def test_roles_follow_the_reference_recipe(name, role):
    assert parameter_role(name, group_layer=10) == role


def test_groups_cover_each_trainable_parameter_once(tiny_model, tiny_config):
    groups = parameter_groups(tiny_model, tiny_config.train)
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in tiny_model.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable)
    assert not tiny_model.clip.visual.conv1.weight.requires_grad
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"new/decay", "new/no_decay", "pretrained/decay", "pretrained/no_decay"}
    assert by_name["new/decay"]["lr"] == tiny_config.train.lr_new
    assert by_name["pretrained/no_decay"]["lr"] == tiny_config.train.lr_pretrained
    assert by_name["new/no_decay"]["weight_decay"] == 0.0
    assert by_name["pretrained/decay"]["weight_decay"] == tiny_config.train.weight_decay
    bias = tiny_model.group.out_fc1.bias
    assert any(p is bias for p in by_name["new/no_decay"]["params"])
