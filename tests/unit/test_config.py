import pytest

from segclip.config import ConfigError, available_profiles, config_to_yaml, load_config
from segclip.data.scenes import CATEGORIES


def test_profiles_resolve_to_the_reference_recipe():
    paper = load_config("paper")
    assert paper.model.clip_model == "ViT-B-16"
    assert paper.model.pretrained == "openai"
    assert (paper.model.num_centers, paper.model.group_layer) == (8, 10)
    assert (paper.train.lr_new, paper.train.lr_pretrained) == (4e-3, 4e-6)
    assert paper.train.betas == (0.9, 0.98)
    tiny = load_config("tiny")
    assert tiny.profile == "tiny"
    assert tiny.model.pretrained is None
    assert {"paper", "tiny"} <= set(available_profiles())


def test_dotted_overrides_are_parsed_as_yaml():
    config = load_config(
        "tiny", ["model.num_centers=4", "train.betas=[0.8, 0.9]", "loss.kl_form=plain"]
    )
    assert config.model.num_centers == 4
    assert config.train.betas == (0.8, 0.9)
    assert config.loss.kl_form == "plain"


def test_yaml_round_trip(tmp_path):
    config = load_config("tiny", ["model.num_centers=5"])
    path = tmp_path / "mine.yaml"
    path.write_text(config_to_yaml(config))
    assert load_config(path) == config


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.num_centres=4", "model.num_centres: unknown field"),
        ("model.num_centers=0", "model.num_centers: Input should be greater than or equal to 1"),
        ("loss.kl_form=bogus", "loss.kl_form: Input should be 'reference' or 'plain'"),
        ("model.group_layer=13", "group_layer=13 is past the last vision block of ViT-B-16"),
        ("model.clip_model=ViT-Q-99", "unknown open_clip architecture 'ViT-Q-99'"),
        ("data.crop_scale=[0.9, 0.2]", "crop_scale must be (low, high) with 0 < low <= high"),
        ("nonsense=1", "nonsense: unknown field"),
    ],
)
def test_invalid_values_name_the_field(override, expected):
    with pytest.raises(ConfigError, match="invalid configuration") as error:
        load_config("paper", [override])
    assert expected in str(error.value)


def test_malformed_override_and_unknown_profile():
    with pytest.raises(ConfigError, match=r"must look like section\.field=value"):
        load_config("tiny", ["model.num_centers"])
    with pytest.raises(ConfigError, match=r"unknown profile 'huge': choose one of \[.*'tiny'"):
        load_config("huge")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config("tiny", ["profile.x=1"])


def test_a_profile_can_extend_another(tmp_path):
    derived = tmp_path / "mine.yaml"
    derived.write_text("base: tiny\ntrain:\n  steps: 7\nmodel:\n  num_centers: 4\n")
    config = load_config(derived)
    tiny = load_config("tiny")
    assert config.profile == "mine" and config.train.steps == 7 and config.model.num_centers == 4
    assert config.model.clip_model == tiny.model.clip_model  # kept from the base
    assert config.train.global_batch_size == tiny.train.global_batch_size
    demo = load_config("demo").model  # inherits tiny's model but for its two locality settings
    assert (demo.group_layer, demo.late_block_context) == (1, "own_center")
    reverted = {"group_layer": tiny.model.group_layer, "late_block_context": "all_centers"}
    assert demo.model_copy(update=reverted) == tiny.model


def test_the_demo_profiles_caption_words_are_the_scenes_shape_names():
    loss = load_config("demo").loss
    assert loss.caption_word_weight > 0 and loss.caption_words == CATEGORIES
