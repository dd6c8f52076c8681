import pytest

from segclip.config import ConfigError, load_config
from segclip.train.plan import plan_training


def plan(samples, *overrides):
    return plan_training(load_config("tiny", list(overrides)), samples)


def test_global_batch_is_split_over_workers_and_steps_follow_the_data():
    p = plan(1000, "train.global_batch_size=32", "runtime.train_workers=4", "train.epochs=3")
    assert (p.world_size, p.worker_batch, p.micro_batches) == (4, 8, 1)
    assert (p.steps_per_epoch, p.total_steps) == (1000 // 32, 3 * (1000 // 32))
    assert plan(1000, "train.steps=7").total_steps == 7


def test_a_memory_cap_turns_the_worker_batch_into_accumulated_micro_batches():
    def micro(cap):
        p = plan(
            1000,
            "train.global_batch_size=48",
            "runtime.train_workers=2",
            f"runtime.max_worker_batch={cap}",
        )
        assert p.worker_batch == 24
        return p.micro_batches

    assert micro(8) == 3  # 3 x 8
    assert micro(7) == 4  # 4 x 6: the fewest equal parts of at most 7
    assert micro(5) == 6  # 6 x 4
    assert micro(100) == 1


def test_plans_that_cannot_work_fail_naming_the_setting():
    with pytest.raises(
        ConfigError,
        match=r"global_batch_size=30 does not split evenly over runtime.train_workers=4",
    ):
        plan(1000, "train.global_batch_size=30", "runtime.train_workers=4")
    with pytest.raises(ConfigError, match="10 training samples do not fill one global batch of 32"):
        plan(10, "train.global_batch_size=32")
