"""Stage keys hold every setting that changes a stage's output, and nothing that does not."""

import pytest

from pipelines import train
from pipelines.registry import get_stage, stages
from segclip.config import load_config
from segclip.manifest import DataRef, stage_key

UPSTREAM = [DataRef(url="/work/superpixels/k", digest="d")]


def key(stage_name: str, *overrides: str) -> str:
    stage = get_stage(stage_name)
    config = load_config("tiny", list(overrides))
    inputs = [] if stage.reads is None else UPSTREAM
    return stage_key(stage.settings(config), inputs)


@pytest.mark.parametrize(
    "override",
    [
        "runtime.train_workers=4",  # which rank reads which shards, in which order
        "runtime.loader_workers=2",  # sample order within a rank
        "runtime.max_worker_batch=4",  # micro-batches: the contrastive negatives
        "train.seed=1",
        "train.lr_new=0.5",
        "loss.kl_form=plain",
        "model.num_centers=4",
        "data.patch_label=majority",
    ],
)
def test_a_setting_that_changes_trained_weights_changes_the_train_key(override):
    assert key("train", override) != key("train")


def test_caption_words_change_the_train_key_only_when_their_term_has_a_weight():
    words = "loss.caption_words=[circle,square]"
    assert key("train", words) == key("train")
    assert key("train", words, "loss.caption_word_template=a {}.") == key("train")
    weighted = key("train", words, "loss.caption_word_weight=1")
    assert weighted != key("train")
    assert key("train", "loss.caption_words=[circle]", "loss.caption_word_weight=1") != weighted


def test_trial_starts_change_the_train_key_only_when_there_are_several():
    assert key("train", "train.start_trial_steps=7") == key("train")  # one start: keys as before
    several = key("train", "train.start_trials=2")
    assert several != key("train")
    assert key("train", "train.start_trials=2", "train.start_trial_steps=7") != several


def test_a_new_sample_stream_version_changes_the_train_key(monkeypatch):
    before = key("train")
    monkeypatch.setattr(train, "SAMPLE_STREAM_VERSION", train.SAMPLE_STREAM_VERSION + 1)
    assert key("train") != before


@pytest.mark.parametrize(
    "override",
    [
        "runtime.log_every=1",
        "runtime.checkpoint_every=7",
        "runtime.ray_address=10.0.0.1:6379",
        "runtime.tracking_uri=http://127.0.0.1:5000",
        "runtime.max_failures=0",
        "runtime.device=cpu",
        "eval.overlays=1",
    ],
)
def test_how_a_run_is_carried_out_leaves_the_train_key_alone(override):
    assert key("train", override) == key("train")


@pytest.mark.parametrize(
    ("stage", "override"),
    [
        ("ingest", "ingest.image_size=64"),
        ("ingest", "demo.seed=5"),
        ("superpixels", "data.felzenszwalb_scale=50"),
        ("evaluate", "eval.protocols=[tcl448]"),
        ("evaluate", "eval.methods=[segclip, naclip]"),
        ("evaluate", "eval.benchmarks=[demo]"),
        ("evaluate", "train.seed=3"),  # the random_centers baseline draws with it
    ],
)
def test_each_stage_key_follows_its_own_settings(stage, override):
    assert key(stage, override) != key(stage)


def test_a_stage_key_ignores_what_only_later_stages_use():
    assert key("ingest", "train.lr_new=0.5") == key("ingest")
    assert key("superpixels", "data.crop_scale=[0.2, 1.0]") == key("superpixels")
    assert key("superpixels", "runtime.train_workers=4") == key("superpixels")


def test_the_registry_orders_the_four_stages_each_reading_the_one_before():
    assert [s.name for s in stages()] == ["ingest", "superpixels", "train", "evaluate"]
    assert [s.reads for s in stages()] == [None, "ingest", "superpixels", "train"]
