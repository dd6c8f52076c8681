"""Sweeps: one configuration run over several values of some of its settings.

A sweep is a list of axes (a dotted config field and its values); its members are every
combination. Members that differ only in `train.seed` form one *group* (a distinct config):
the group's results are the mean, standard deviation and count over its seeds, so two
configs compare by whether their difference exceeds the seed noise, not by two single runs.

An override whose value is a list on a field that takes one value (`train.lr_new=[1e-3,2e-3]`)
is an axis; a field that itself takes a list (`eval.methods`, `train.betas`) becomes an axis
only with a list of lists (`eval.methods=[[segclip],[segclip,maskclip]]`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import re
import statistics
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError
from upath import UPath

from segclip.config import ConfigError, MethodName, SegCLIPConfig
from segclip.manifest import KEY_LENGTH, json_digest
from segclip.storage import ensure_folder, location

SEED_FIELD = "train.seed"
SIGNIFICANCE = 0.05  # a difference whose Welch t-test p-value is below this exceeds seed noise
_METRIC_UNSAFE = re.compile(r"[^\w.\- :/]")  # characters MLflow refuses in a metric name


@dataclass(frozen=True)
class Axis:
    """One varied setting: a dotted config field and the values it takes, in order."""

    field: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Member:
    """One combination of the axes' values: a whole pipeline run."""

    settings: tuple[tuple[str, Any], ...]  # (field, value), one per axis, in axis order

    @property
    def overrides(self) -> list[str]:
        """Dotted overrides that select this member (JSON is valid YAML, so values round-trip)."""
        return [f"{name}={json.dumps(value)}" for name, value in self.settings]

    @property
    def label(self) -> str:
        return describe(self.settings)

    @property
    def group(self) -> tuple[tuple[str, Any], ...]:
        """The member's distinct config: its settings without the seed."""
        return tuple((name, value) for name, value in self.settings if name != SEED_FIELD)


def describe(settings: Sequence[tuple[str, Any]]) -> str:
    """`train.lr_new:0.001 train.seed:2`: a name for a member or a group ("" for none)."""
    return " ".join(f"{name}:{json.dumps(value).strip(chr(34))}" for name, value in settings)


def _field_annotation(dotted: str) -> Any:
    """The type annotation of a dotted config field, or None for a name the config lacks
    (validation then names it)."""
    model: type[BaseModel] = SegCLIPConfig
    *sections, leaf = dotted.split(".")
    for name in sections:
        info = model.model_fields.get(name)
        if info is None or not (
            isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
        ):
            return None
        model = info.annotation
    info = model.model_fields.get(leaf)
    return None if info is None else info.annotation


def _takes_a_list(annotation: Any) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_takes_a_list(arg) for arg in typing.get_args(annotation))
    return typing.get_origin(annotation) in (list, tuple) or annotation in (list, tuple)


def is_axis(override: str) -> bool:
    """Whether a dotted override lists several values for a sweep (see the module's doc)."""
    return _as_axis(override) is not None


def _as_axis(override: str) -> Axis | None:
    """The axis an override declares, or None for an ordinary override."""
    name, sep, raw = override.partition("=")
    if not sep:
        return None  # load_config reports the malformed override
    name, value = name.strip(), yaml.safe_load(raw)
    if not isinstance(value, list):
        return None
    annotation = _field_annotation(name)
    if _takes_a_list(annotation) and not (value and all(isinstance(v, list) for v in value)):
        return None
    if not value:
        raise ConfigError(f"override {override!r}: a sweep axis needs at least one value")
    values = tuple(_as_read(annotation, item) for item in value)
    if len({json.dumps(v) for v in values}) != len(values):
        raise ConfigError(f"override {override!r}: an axis lists a value twice")
    return Axis(name, values)


def _as_read(annotation: Any, value: Any) -> Any:
    """An axis value as the config reads it: YAML reads `1e-3` as text and the config as 0.001,
    so members, labels and the repeated-value check see 0.001. Lists become tuples so that
    members and their groups hash. A value the field refuses stays as given: `load_config`
    names the problem."""
    if annotation is not None:
        adapter = TypeAdapter(annotation)
        with contextlib.suppress(ValidationError):
            value = adapter.dump_python(adapter.validate_python(value), mode="json")
    return _frozen(value)


def _frozen(value: Any) -> Any:
    return tuple(_frozen(item) for item in value) if isinstance(value, list) else value


def plan_sweep(
    overrides: Sequence[str], *, seeds: Sequence[int] = ()
) -> tuple[list[str], list[Axis]]:
    """Split a command line's overrides into the ones every member shares and the axes;
    `seeds` adds a `train.seed` axis."""
    fixed, axes = [], []
    for override in overrides:
        axis = _as_axis(override)
        if axis is None:
            fixed.append(override)
        else:
            axes.append(axis)
    if seeds:
        axes.append(_as_axis(f"{SEED_FIELD}={json.dumps(list(seeds))}"))
    fields = [axis.field for axis in axes]
    repeated = sorted({name for name in fields if fields.count(name) > 1})
    if repeated:
        raise ConfigError(
            f"{', '.join(repeated)} varied twice: give each field one list of values "
            "(--seeds is the same as train.seed=[...])"
        )
    overridden = [o for o in fixed if o.partition("=")[0].strip() in fields]
    if overridden:  # the members' values would silently replace it
        raise ConfigError(
            f"{', '.join(overridden)} sets a field the sweep varies: give it once, as a list "
            "of values (--seeds is the same as train.seed=[...])"
        )
    if not axes:
        raise ConfigError(
            "a sweep needs something to vary: --seeds 0,1,2 or an override with a list of "
            "values such as train.lr_new=[1e-3,2e-3]"
        )
    return fixed, axes


def sweep_members(axes: Sequence[Axis]) -> list[Member]:
    """Every combination of the axes' values (the last axis varies fastest)."""
    combos = itertools.product(*(axis.values for axis in axes))
    return [Member(tuple(zip((a.field for a in axes), combo, strict=True))) for combo in combos]


@dataclass(frozen=True)
class Spread:
    """A metric over a group's members: mean, sample standard deviation (None for one
    member) and count."""

    mean: float
    std: float | None
    count: int

    def format(self, scale: float = 1.0, digits: int = 1) -> str:
        spread = "-" if self.std is None else f"{scale * self.std:.{digits}f}"
        return f"{scale * self.mean:.{digits}f} ± {spread} ({self.count})"


def spread(values: Sequence[float]) -> Spread:
    if not values:
        raise ValueError("no values to aggregate")
    std = statistics.stdev(values) if len(values) > 1 else None
    return Spread(statistics.fmean(values), std, len(values))


def aggregate(per_member: Sequence[Mapping[str, float]]) -> dict[str, Spread]:
    """Each metric's spread over the members that logged it (finite values only)."""
    names = sorted({name for metrics in per_member for name in metrics})
    spreads = {}
    for name in names:
        values = _column(per_member, name)
        if values:
            spreads[name] = spread(values)
    return spreads


def metric_prefix(group_label: str) -> str:
    """Where a group's aggregates go on the sweep run: `<group>/` when the sweep varies more
    than the seed (characters MLflow refuses become `_`), nothing for a seed sweep."""
    return f"{_METRIC_UNSAFE.sub('_', group_label)}/" if group_label else ""


def aggregate_metrics(group: Mapping[str, Any]) -> dict[str, float]:
    """A `summarize` group as MLflow metrics: `<metric>/mean`, `/std` (two or more members) and
    `/count`, under `metric_prefix` of its label."""
    prefix, metrics = metric_prefix(group["label"]), {}
    for name, values in group["metrics"].items():
        metrics[f"{prefix}{name}/mean"] = values["mean"]
        metrics[f"{prefix}{name}/count"] = float(values["count"])
        if values["std"] is not None:
            metrics[f"{prefix}{name}/std"] = values["std"]
    return metrics


@dataclass(frozen=True)
class Comparison:
    """Group b against group a on one metric: the difference of means and Welch's t-test."""

    difference: float
    p_value: float | None  # None: fewer than two members on a side, or no spread at all

    @property
    def beyond_noise(self) -> bool | None:
        return None if self.p_value is None else self.p_value < SIGNIFICANCE


def compare(a: Sequence[float], b: Sequence[float]) -> Comparison:
    difference = statistics.fmean(b) - statistics.fmean(a)
    if len(a) < 2 or len(b) < 2 or (statistics.stdev(a) == 0 and statistics.stdev(b) == 0):
        return Comparison(difference, None)
    from scipy import stats  # a second of imports that `segclip --help` need not pay

    return Comparison(difference, float(stats.ttest_ind(b, a, equal_var=False).pvalue))


SWEEPS_DIR = "sweeps"  # <workdir>/sweeps/<key>/: one folder per sweep
RECORD_FILE = "sweep.json"


@dataclass
class SweepRecord:
    """A sweep's folder: its MLflow run, each member's run and evaluation output once the member
    finished, and the aggregates. A rerun of the same sweep (same member configs, same key)
    continues the same runs and skips the finished members."""

    folder: UPath
    run_id: str | None = None
    members: dict[str, dict[str, str]] = field(default_factory=dict)  # label -> run_id, evaluate
    groups: list[dict[str, Any]] = field(default_factory=list)  # what `sweep_summary` computed

    @classmethod
    def open(cls, configs: Sequence[SegCLIPConfig]) -> SweepRecord:
        """The record of the sweep these member configs make, empty if it never ran."""
        key = json_digest([c.model_dump(mode="json") for c in configs])[:KEY_LENGTH]
        folder = location(configs[0].runtime.workdir) / SWEEPS_DIR / key
        return cls.read(folder) if (folder / RECORD_FILE).is_file() else cls(folder)

    @classmethod
    def read(cls, folder: str | UPath) -> SweepRecord:
        folder = location(folder)
        data = json.loads((folder / RECORD_FILE).read_text())
        return cls(folder, data["run_id"], data["members"], data["groups"])

    def save(self) -> None:
        ensure_folder(self.folder)
        content = {"run_id": self.run_id, "members": self.members, "groups": self.groups}
        (self.folder / RECORD_FILE).write_text(json.dumps(content, indent=2))

    def finished(self, member: Member) -> bool:
        return "evaluate" in self.members.get(member.label, {})


def summarize(
    members: Sequence[Member], metrics: Sequence[Mapping[str, float]]
) -> list[dict[str, Any]]:
    """Per distinct config (in member order): its members, each metric's spread over them and,
    for every config after the first, each result's difference from the first config's with
    Welch's t-test over the two configs' seeds. `metrics` are the members' own (finished ones)."""
    grouped: dict[tuple, list[int]] = {}
    for i, member in enumerate(members):
        grouped.setdefault(member.group, []).append(i)
    summaries, first = [], None
    for settings, indices in grouped.items():
        values = [metrics[i] for i in indices]
        summary: dict[str, Any] = {
            "label": describe(settings),
            "members": [members[i].label for i in indices],
            "metrics": {name: vars(s) for name, s in aggregate(values).items()},
        }
        if first is None:
            first = values
        else:
            summary["versus_first"] = {
                name: {**vars(c), "beyond_noise": c.beyond_noise}
                for name in sorted(set(summary["metrics"]) & set(_names(first)))
                if name.startswith("miou/")
                for c in [compare(_column(first, name), _column(values, name))]
            }
        summaries.append(summary)
    return summaries


def _names(rows: Sequence[Mapping[str, float]]) -> set[str]:
    return {name for row in rows for name in row}


def _column(rows: Sequence[Mapping[str, float]], name: str) -> list[float]:
    return [row[name] for row in rows if name in row and math.isfinite(row[name])]


def _result_order(name: str) -> tuple:
    """`miou/<method>/<protocol>/<benchmark>`: by benchmark and protocol, then the model, the
    training-free methods and the baselines."""
    _, method, protocol, benchmark = name.split("/", 3)
    rank = 0 if method == "segclip" else 1 if method in typing.get_args(MethodName) else 2
    return benchmark, protocol, rank, method


def sweep_table(groups: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: each result as mean ± std (members) per config, then the final losses, then
    each later config's differences from the first with whether they exceed seed noise."""
    several = len(groups) > 1
    head = ["config"] if several else []
    lines = [
        "| " + " | ".join([*head, "benchmark", "protocol", "method", "mIoU", "pixel acc."]) + " |",
        "|" + "---|" * (len(head) + 5),
    ]
    for group in groups:
        metrics = group["metrics"]
        for name in sorted((n for n in metrics if n.startswith("miou/")), key=_result_order):
            _, method, protocol, benchmark = name.split("/", 3)
            accuracy = metrics.get(f"pixel_accuracy/{method}/{protocol}/{benchmark}")
            cells = [group["label"]] if several else []
            cells += [benchmark, protocol, method, Spread(**metrics[name]).format(100)]
            cells.append(Spread(**accuracy).format(100) if accuracy else "-")
            lines.append("| " + " | ".join(cells) + " |")
    for group in groups:
        losses = [n for n in group["metrics"] if n.startswith("loss/")]
        if losses:
            named = ", ".join(
                f"{n.removeprefix('loss/')} {Spread(**group['metrics'][n]).format(digits=3)}"
                for n in sorted(losses)
            )
            lines.append(f"\nfinal losses{' of ' + group['label'] if several else ''}: {named}")
    for group in groups[1:]:
        lines += [
            f"\n{group['label']} versus {groups[0]['label']} (mIoU points, Welch's t-test over "
            "seeds; p < 0.05 exceeds the seed noise):",
            "| benchmark | protocol | method | difference | p | beyond seed noise |",
            "|---|---|---|---|---|---|",
        ]
        for name, c in sorted(group["versus_first"].items(), key=lambda i: _result_order(i[0])):
            _, method, protocol, benchmark = name.split("/", 3)
            p = "-" if c["p_value"] is None else f"{c['p_value']:.3f}"
            verdict = {None: "too few seeds", True: "yes", False: "no"}[c["beyond_noise"]]
            lines.append(
                f"| {benchmark} | {protocol} | {method} | {100 * c['difference']:+.1f} | {p} | "
                f"{verdict} |"
            )
    return "\n".join(lines)
