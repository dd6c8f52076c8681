"""Sweep planning and statistics (segclip/sweep.py), against values computed by hand."""

import math

import pytest

from segclip.config import ConfigError, load_config
from segclip.sweep import (
    Member,
    SweepRecord,
    aggregate,
    aggregate_metrics,
    compare,
    is_axis,
    metric_prefix,
    plan_sweep,
    spread,
    summarize,
    sweep_members,
    sweep_table,
)

SEGCLIP, MASKCLIP, SCLIP = (f"miou/{m}/segclip/demo" for m in ("segclip", "maskclip", "sclip"))
ACCURACY = "pixel_accuracy/segclip/segclip/demo"


@pytest.mark.parametrize(
    ("override", "axis"),
    [
        ("train.lr_new=[1e-3,2e-3]", True),  # a list on a one-value field
        ("train.lr_new=1e-3", False),
        ("eval.methods=[segclip,maskclip]", False),  # the field's own list
        ("eval.methods=[[segclip],[segclip,maskclip]]", True),  # a list of its lists
        ("train.betas=[0.9,0.99]", False),
        ("train.betas=[[0.9,0.98],[0.9,0.99]]", True),
    ],
)
def test_a_list_is_an_axis_on_a_one_value_field_and_a_list_of_lists_on_a_list_field(override, axis):
    assert is_axis(override) is axis


@pytest.mark.parametrize(
    ("overrides", "seeds", "message"),
    [
        (["train.seed=[3,4]"], [0, 1], r"train\.seed varied twice"),
        (["train.lr_new=[1e-3,2e-3]", "train.lr_new=[3e-3]"], [], r"train\.lr_new varied twice"),
        (["train.seed=5"], [0, 1], r"train\.seed=5 sets a field the sweep varies"),
        (["train.lr_new=1e-3"], [], r"a sweep needs something to vary"),
        ([], [], r"a sweep needs something to vary"),
        (["train.lr_new=[]"], [], r"'train\.lr_new=\[\]': a sweep axis needs at least one value"),
        (["train.lr_new=[1e-3,2e-3,1e-3]"], [], r"an axis lists a value twice"),
        (["train.lr_new=[1e-3,0.001]"], [], r"an axis lists a value twice"),  # same number
        (["eval.methods=[[segclip],[segclip]]"], [], r"an axis lists a value twice"),
    ],
)
def test_a_sweep_that_cannot_mean_what_it_says_is_refused_naming_why(overrides, seeds, message):
    with pytest.raises(ConfigError, match=message):
        plan_sweep(overrides, seeds=seeds)


def test_members_are_every_combination_with_the_last_axis_fastest():
    fixed, axes = plan_sweep(
        ["train.lr_new=[1e-3,2e-3]", "train.betas=[0.9,0.99]", "train.steps=3"], seeds=[0, 1]
    )
    assert fixed == ["train.betas=[0.9,0.99]", "train.steps=3"]
    assert [(a.field, a.values) for a in axes] == [
        ("train.lr_new", (0.001, 0.002)),  # as the config reads 1e-3, not YAML's text "1e-3"
        ("train.seed", (0, 1)),
    ]
    members = sweep_members(axes)
    assert [m.label for m in members] == [
        "train.lr_new:0.001 train.seed:0",
        "train.lr_new:0.001 train.seed:1",
        "train.lr_new:0.002 train.seed:0",
        "train.lr_new:0.002 train.seed:1",
    ]
    assert [m.group for m in members] == [(("train.lr_new", 0.001),)] * 2 + [
        (("train.lr_new", 0.002),)
    ] * 2
    for member in members:
        config = load_config("tiny", [*fixed, *member.overrides])
        lr, seed = (value for _, value in member.settings)
        assert (config.train.lr_new, config.train.seed) == (lr, seed)
        assert config.train.betas == (0.9, 0.99) and config.train.steps == 3


def test_a_list_field_axis_gives_each_member_its_whole_list():
    fixed, axes = plan_sweep(["eval.methods=[[segclip],[segclip,maskclip]]"], seeds=[0, 1])
    members = sweep_members(axes)
    assert fixed == []
    assert [m.label for m in members] == [
        'eval.methods:["segclip"] train.seed:0',
        'eval.methods:["segclip"] train.seed:1',
        'eval.methods:["segclip", "maskclip"] train.seed:0',
        'eval.methods:["segclip", "maskclip"] train.seed:1',
    ]
    configs = [load_config("tiny", m.overrides) for m in members]
    assert [(c.eval.methods, c.train.seed) for c in configs] == [
        (("segclip",), 0),
        (("segclip",), 1),
        (("segclip", "maskclip"), 0),
        (("segclip", "maskclip"), 1),
    ]
    # Two groups of two seeds; a list value used to make the group unhashable here.
    groups = summarize(members, [{SEGCLIP: 0.5}] * 4)
    assert [g["members"] for g in groups] == [
        [m.label for m in members[:2]],
        [m.label for m in members[2:]],
    ]


def test_a_seed_only_member_has_no_group_settings():
    [member] = sweep_members(plan_sweep([], seeds=[7])[1])
    assert member == Member((("train.seed", 7),))
    assert (member.overrides, member.label, member.group) == (["train.seed=7"], "train.seed:7", ())


def test_spread_is_the_mean_and_sample_standard_deviation():
    three = spread([0.1, 0.2, 0.3])  # deviations ±0.1: sqrt(0.02 / (3 - 1)) = 0.1
    assert (three.mean, three.std, three.count) == (pytest.approx(0.2), pytest.approx(0.1), 3)
    one = spread([0.4])
    assert (one.mean, one.std, one.count) == (0.4, None, 1)
    assert three.format(100) == "20.0 ± 10.0 (3)" and one.format(100) == "40.0 ± - (1)"
    with pytest.raises(ValueError, match="no values"):
        spread([])


def test_aggregate_skips_members_without_a_finite_value():
    spreads = aggregate([{"loss/total": 1.0, "miou/x": math.nan}, {"loss/total": 3.0}])
    assert list(spreads) == ["loss/total"]
    loss = spreads["loss/total"]  # deviations ±1: sqrt(2 / 1)
    assert (loss.mean, loss.std, loss.count) == (2.0, pytest.approx(math.sqrt(2)), 2)


def test_aggregate_metrics_of_a_seed_sweep_have_no_prefix():
    members = sweep_members(plan_sweep([], seeds=[0, 1])[1])
    [group] = summarize(members, [{SEGCLIP: 0.4, "loss/total": 1.0}, {SEGCLIP: 0.5}])
    assert group["label"] == "" and metric_prefix(group["label"]) == ""
    assert aggregate_metrics(group) == {
        f"{SEGCLIP}/mean": pytest.approx(0.45),
        f"{SEGCLIP}/std": pytest.approx(math.sqrt(0.005)),  # deviations ±0.05: sqrt(0.005 / 1)
        f"{SEGCLIP}/count": 2.0,
        "loss/total/mean": 1.0,  # one member logged it: no std
        "loss/total/count": 1.0,
    }


def test_aggregate_metrics_of_a_grid_are_prefixed_by_the_config_in_characters_mlflow_takes():
    _, axes = plan_sweep(
        ["eval.methods=[[segclip,maskclip]]", "train.lr_new=[1e-3,2e-3]"], seeds=[0]
    )
    groups = summarize(sweep_members(axes), [{SEGCLIP: 0.4}, {SEGCLIP: 0.6}])
    assert groups[0]["label"] == 'eval.methods:["segclip", "maskclip"] train.lr_new:0.001'
    prefix = "eval.methods:__segclip__ _maskclip__ train.lr_new:0.001/"  # [ " , ] -> _
    assert metric_prefix(groups[0]["label"]) == prefix
    assert aggregate_metrics(groups[0]) == {
        f"{prefix}{SEGCLIP}/mean": 0.4,
        f"{prefix}{SEGCLIP}/count": 1.0,
    }
    assert list(aggregate_metrics(groups[1])) == [
        f"eval.methods:__segclip__ _maskclip__ train.lr_new:0.002/{SEGCLIP}/{part}"
        for part in ("mean", "count")
    ]


def test_compare_is_welchs_t_test_on_the_difference_of_means():
    comparison = compare([1, 2, 3], [4, 5, 6])
    # Both variances 1: t = 3 / sqrt(1/3 + 1/3) = 3.674 on Welch's (2/3)^2 / (2 (1/3)^2 / 2) = 4
    # degrees of freedom; with 4 of them the two-sided p is 1 - 3x/2 + x^3/2, x = t/sqrt(t^2+4).
    x = math.sqrt(13.5 / 17.5)
    assert comparison.difference == 3
    assert comparison.p_value == pytest.approx(1 - 1.5 * x + 0.5 * x**3, abs=1e-9)
    assert comparison.p_value == pytest.approx(0.0213, abs=1e-3)
    assert comparison.beyond_noise is True
    assert compare([4, 5, 6], [1, 2, 3]).difference == -3  # b minus a


@pytest.mark.parametrize(
    ("a", "b", "difference"),
    [([2, 2], [2, 2], 0), ([1, 1], [3, 3], 2), ([1], [2, 3], 1.5), ([1, 2], [3], 1.5)],
)
def test_compare_has_no_p_value_without_a_spread_or_two_values_a_side(a, b, difference):
    comparison = compare(a, b)
    assert (comparison.difference, comparison.p_value, comparison.beyond_noise) == (
        difference,
        None,
        None,
    )


def two_configs_two_seeds() -> list[dict]:
    """lr 0.001 against 0.002 over seeds 0 and 1: segclip +10 points (t = 0.1 / 0.0283 = 3.54
    on 2 degrees of freedom, p = 1 - t / sqrt(t^2 + 2) = 0.072), maskclip +20 (t = 7.07,
    p = 1 - sqrt(50 / 52) = 0.019), sclip on one seed only for lr 0.002."""
    members = sweep_members(plan_sweep(["train.lr_new=[1e-3,2e-3]"], seeds=[0, 1])[1])
    metrics = [
        {SEGCLIP: 0.40, MASKCLIP: 0.30, SCLIP: 0.20, ACCURACY: 0.70, "loss/total": 1.0},
        {SEGCLIP: 0.44, MASKCLIP: 0.34, SCLIP: 0.22, ACCURACY: 0.74, "loss/total": 0.8},
        {SEGCLIP: 0.50, MASKCLIP: 0.50, SCLIP: 0.30, ACCURACY: 0.80, "loss/total": 0.6},
        {SEGCLIP: 0.54, MASKCLIP: 0.54, ACCURACY: 0.84, "loss/total": 0.6},
    ]
    return summarize(members, metrics)


def test_summarize_gives_each_config_its_spreads_and_its_difference_from_the_first():
    first, second = two_configs_two_seeds()
    assert first["label"] == "train.lr_new:0.001" and second["label"] == "train.lr_new:0.002"
    assert first["members"] == [
        "train.lr_new:0.001 train.seed:0",
        "train.lr_new:0.001 train.seed:1",
    ]
    assert first["metrics"][SEGCLIP] == {
        "mean": pytest.approx(0.42),
        "std": pytest.approx(math.sqrt(0.0008)),  # deviations ±0.02: sqrt(0.0008 / 1)
        "count": 2,
    }
    assert first["metrics"]["loss/total"] == {
        "mean": pytest.approx(0.9),
        "std": pytest.approx(math.sqrt(0.02)),
        "count": 2,
    }
    assert second["metrics"]["loss/total"] == {"mean": 0.6, "std": 0.0, "count": 2}
    assert second["metrics"][SCLIP] == {"mean": 0.30, "std": None, "count": 1}
    assert "versus_first" not in first
    versus = second["versus_first"]
    assert list(versus) == [MASKCLIP, SCLIP, SEGCLIP]  # mIoU only, no accuracy or loss
    t = 0.1 / math.sqrt(0.0008)
    assert versus[SEGCLIP] == {
        "difference": pytest.approx(0.1),
        "p_value": pytest.approx(1 - t / math.sqrt(t**2 + 2)),
        "beyond_noise": False,
    }
    assert versus[MASKCLIP] == {
        "difference": pytest.approx(0.2),
        "p_value": pytest.approx(1 - math.sqrt(50 / 52)),
        "beyond_noise": True,
    }
    assert versus[SCLIP] == {
        "difference": pytest.approx(0.09),
        "p_value": None,
        "beyond_noise": None,
    }


def test_the_table_of_a_grid_has_a_config_column_and_each_config_against_the_first():
    table = sweep_table(two_configs_two_seeds())
    assert table.splitlines()[0] == (
        "| config | benchmark | protocol | method | mIoU | pixel acc. |"
    )
    assert (
        "| train.lr_new:0.001 | demo | segclip | segclip | 42.0 ± 2.8 (2) | 72.0 ± 2.8 (2) |"
        in table
    )
    assert "| train.lr_new:0.002 | demo | segclip | sclip | 30.0 ± - (1) | - |" in table
    assert "final losses of train.lr_new:0.001: total 0.900 ± 0.141 (2)" in table
    assert "final losses of train.lr_new:0.002: total 0.600 ± 0.000 (2)" in table
    versus = table.split("train.lr_new:0.002 versus train.lr_new:0.001", 1)[1].splitlines()
    assert versus[3:] == [  # the trained model first, then the training-free methods
        "| demo | segclip | segclip | +10.0 | 0.072 | no |",
        "| demo | segclip | maskclip | +20.0 | 0.019 | yes |",
        "| demo | segclip | sclip | +9.0 | - | too few seeds |",
    ]


def test_the_table_of_a_seed_sweep_has_one_row_per_result():
    members = sweep_members(plan_sweep([], seeds=[0, 1, 2])[1])
    # mean 0.412, deviations -0.022, 0, +0.022: std sqrt(2 * 0.022^2 / 2) = 0.022
    groups = summarize(members, [{SEGCLIP: 0.390}, {SEGCLIP: 0.412}, {SEGCLIP: 0.434}])
    assert sweep_table(groups).splitlines() == [
        "| benchmark | protocol | method | mIoU | pixel acc. |",
        "|---|---|---|---|---|",
        "| demo | segclip | segclip | 41.2 ± 2.2 (3) | - |",
    ]


def test_a_sweep_record_comes_back_for_the_same_member_configs(tmp_path):
    members = sweep_members(plan_sweep([], seeds=[0, 1])[1])
    configs = [load_config("tiny", [f"runtime.workdir={tmp_path}", *m.overrides]) for m in members]
    record = SweepRecord.open(configs)
    assert record.run_id is None and record.folder.parent == tmp_path / "sweeps"
    record.run_id = "sweep-run"
    record.members = {
        members[0].label: {"run_id": "a", "evaluate": "/e"},
        members[1].label: {"run_id": "b"},
    }
    record.save()
    again = SweepRecord.open(configs)
    assert (again.folder, again.run_id, again.members) == (
        record.folder,
        "sweep-run",
        record.members,
    )
    assert [again.finished(m) for m in members] == [True, False]
    assert SweepRecord.open(configs[:1]).folder != record.folder  # another sweep
