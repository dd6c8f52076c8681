"""Best of several starts (segclip/train/starts.py): each start draws its own batches, the
lowest second-half loss goes on, and it goes on exactly as a plain run from its seed and
stream would."""

import pytest
import torch

from segclip.config import ConfigError, SegCLIPConfig, load_config
from segclip.model import CaptionTokenizer, build_model
from segclip.train import Batch, build_train_step
from segclip.train.plan import plan_training
from segclip.train.starts import choose_start, start_line, start_metrics, start_seed
from segclip.train.step import timed_step
from tests.weights import same_weights

SEED, TRIAL_STEPS, TOTAL_STEPS = 5, 4, 7


def _config(trials: int) -> SegCLIPConfig:
    return load_config(
        "tiny",
        [
            f"train.seed={SEED}",
            f"train.start_trials={trials}",
            f"train.start_trial_steps={TRIAL_STEPS}",
        ],
    )


def _batches(config: SegCLIPConfig, stream: int):
    """Stream `stream` of small batches, the same every time it is opened."""
    generator = torch.Generator().manual_seed(11 + stream)
    tokens = CaptionTokenizer(config.model)(["a red star", "two blue rings"])
    while True:
        yield Batch(
            torch.randn(2, 3, 128, 128, generator=generator),
            tokens,
            torch.randint(0, 6, (2, 64), generator=generator),
        )


class Opened:
    """`open_start` for the tests: a fresh model and stream, recording which were opened."""

    def __init__(self, config: SegCLIPConfig) -> None:
        self.config, self.streams = config, []

    def __call__(self, stream: int):
        self.streams.append(stream)
        model = build_model(self.config.model)
        return build_train_step(model, self.config, total_steps=TOTAL_STEPS), _batches(
            self.config, stream
        )


def _step(step_fn, batches):
    return timed_step(step_fn, batches, device=torch.device("cpu"), micro_batches=1)


def test_one_start_is_the_plain_run_seeded_from_the_seed():
    config = _config(trials=1)
    opened = Opened(config)
    start, losses = choose_start(config.train, rank=1, open_start=opened, step=_step)
    assert (start.index, start.records, losses, opened.streams) == (0, [], [], [0])
    torch.manual_seed(SEED + 1)  # seed + rank
    assert same_weights(start.step_fn.segclip.state_dict(), build_model(config.model).state_dict())


def test_the_lowest_loss_goes_on_as_a_plain_run_from_its_own_seed():
    config = _config(trials=3)
    opened = Opened(config)
    start, losses = choose_start(config.train, rank=0, open_start=opened, step=_step)
    assert opened.streams == [0, 1, 2] and len(losses) == 3
    assert start.index == losses.index(min(losses))
    assert len(start.records) == TRIAL_STEPS
    second_half = [r.losses["loss/total"] for r in start.records[TRIAL_STEPS // 2 :]]
    assert start.loss == pytest.approx(sum(second_half) / len(second_half)) == min(losses)
    for _ in range(TOTAL_STEPS - TRIAL_STEPS):
        _step(start.step_fn, start.batches)

    # A plain run seeded as the start that went on, on its batches, all its steps.
    torch.manual_seed(start_seed(SEED, 0, start.index))
    step_fn, batches = Opened(config)(start.index)
    plain = [_step(step_fn, batches) for _ in range(TOTAL_STEPS)]
    kept = [(r.losses, r.lrs) for r in start.records]
    assert [(r.losses, r.lrs) for r in plain[:TRIAL_STEPS]] == kept
    assert kept[0][1] != kept[-1][1]  # each record holds the learning rates of its own step
    assert same_weights(start.step_fn.segclip.state_dict(), step_fn.segclip.state_dict())


def test_trial_starts_never_share_a_plain_run_seed():
    plain = {seed + rank for seed in range(1000) for rank in range(8)}
    trial = {
        start_seed(seed, rank, k) for seed in range(1000) for rank in range(8) for k in (1, 2, 3)
    }
    assert start_seed(3, 1, 0) == 4 and not plain & trial


def test_the_chosen_start_is_reported_with_every_loss():
    config = _config(trials=2)
    start, losses = choose_start(config.train, rank=0, open_start=Opened(config), step=_step)
    other = 1 - start.index
    metrics = start_metrics(start, losses)
    assert metrics["start/chosen"] == start.index
    assert metrics[f"start/{other}/loss"] > metrics[f"start/{start.index}/loss"] == start.loss
    assert start_line(start, losses).startswith(f"start {start.index} of 2 goes on")
    assert f"{other}: {losses[other]:.3f}" in start_line(start, losses)


def test_trial_steps_must_leave_steps_to_train():
    too_long = "start_trial_steps=100 leaves nothing of the run's 100 steps after its 2 trial"
    with pytest.raises(ConfigError, match=too_long):  # a fixed length fails as it loads
        load_config("tiny", ["train.steps=100", "train.start_trials=2"])
    tried = load_config("tiny", ["train.global_batch_size=10", "train.start_trials=2"])
    with pytest.raises(ConfigError, match=too_long):  # 1000 samples: one epoch of 100 steps
        plan_training(tried, samples=1000)
    assert plan_training(tried, samples=1010).total_steps == 101
    fewer = load_config(
        "tiny", ["train.steps=100", "train.start_trials=2", "train.start_trial_steps=99"]
    )
    assert plan_training(fewer, samples=10_000).total_steps == 100
