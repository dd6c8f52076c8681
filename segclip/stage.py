"""The stage contract: a declared `Stage` and the one place where a stage runs.

A stage reads the outputs it names (or, for a source stage, the files its config
names), works in `<workdir>/<stage>/<key>/` and finishes by writing its manifest.
`Stage.run` reads top to bottom: inputs, checks that fail before any work, the
keyed folder, skip when finished, the MLflow run, the body (which resumes from
whatever an interrupted run left in the folder), the manifest. Orchestrators
(Prefect flows, the CLI, tests) only call `run`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from upath import UPath

from segclip.config import SegCLIPConfig
from segclip.manifest import (
    DataRef,
    FailedSample,
    Manifest,
    ShardRef,
    StageResult,
    code_revision,
    package_versions,
    read_result,
    stage_dir,
    stage_key,
    write_manifest,
)
from segclip.storage import (
    check_writable,
    ensure_folder,
    location,
    remove_tree,
    use_s3_endpoint,
)
from segclip.tracking import (
    NO_LINEAGE,
    Lineage,
    TrackedRun,
    fail_stage_run,
    finish_stage_run,
    open_stage_run,
    tracking_client,
)

Prepared = TypeVar("Prepared")

# Errors a second attempt cannot fix: bad settings, missing data or paths, corrupt files.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # ConfigError and pydantic's ValidationError included
    TypeError,
    LookupError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


def can_succeed_on_retry(error: BaseException) -> bool:
    """Whether retrying a failed stage is worth it (a download, a flaky store), or not."""
    return not isinstance(error, PERMANENT_ERRORS)


@dataclass
class StageOutput:
    """What a stage body reports; `Stage.run` adds the bookkeeping and writes the manifest."""

    counts: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    failed_samples: list[FailedSample] = field(default_factory=list)
    shards: list[ShardRef] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # named outputs for later stages
    timings: dict[str, float] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)  # where the work ran, on a cluster


@dataclass(frozen=True)
class StageContext(Generic[Prepared]):
    """What a stage body works with."""

    config: SegCLIPConfig
    output_dir: UPath  # the keyed folder; may hold what an interrupted run finished
    inputs: list[DataRef]
    prepared: Prepared  # what the stage's `prepare` checked and derived
    tracked: TrackedRun  # the stage's MLflow run


@dataclass(frozen=True, kw_only=True)
class Stage(Generic[Prepared]):
    """One pipeline stage, declared.

    `settings` returns everything the output depends on besides the inputs: the
    key digests it. `prepare` runs before any work, skipped or not, so bad settings
    and missing data fail in seconds; its result reaches the body. A source stage
    (`reads=None`) digests the files `sources` names instead of reading a stage. A
    stage that reads one may let the config name its input instead (`given`: evaluate
    scores a given checkpoint without training).
    """

    name: str
    settings: Callable[[SegCLIPConfig], dict[str, Any]]
    prepare: Callable[[SegCLIPConfig, list[DataRef]], Prepared]
    body: Callable[[StageContext[Prepared]], StageOutput]
    reads: str | None = None  # the stage whose output this one reads; None: a source stage
    sources: Callable[[SegCLIPConfig], list[DataRef]] | None = None
    given: Callable[[SegCLIPConfig], DataRef | None] = lambda config: None
    retries: int = 0  # orchestrator retries, for errors `can_succeed_on_retry` accepts

    def __post_init__(self) -> None:
        if (self.reads is None) == (self.sources is None):
            raise TypeError(f"stage {self.name!r}: declare exactly one of `reads` and `sources`")

    def resolve_inputs(self, config: SegCLIPConfig, upstream: Sequence[DataRef]) -> list[DataRef]:
        """A source stage's own input files, or the one upstream output this stage reads."""
        if self.sources is not None:
            if upstream:
                raise ValueError(
                    f"the {self.name} stage is a source: its inputs come from the config, "
                    f"not from {len(upstream)} stage output(s)"
                )
            return self.sources(config)
        if (named := self.given(config)) is not None:
            return [named]
        if len(upstream) != 1:
            raise ValueError(
                f"the {self.name} stage reads one {self.reads} output, got {len(upstream)} inputs"
            )
        return list(upstream)

    def output_dir(self, config: SegCLIPConfig, inputs: Sequence[DataRef]) -> UPath:
        """The keyed folder for this config and these (resolved) inputs, finished or not."""
        key = stage_key(self.settings(config), list(inputs))
        return stage_dir(config.runtime.workdir, self.name, key)

    def run(
        self,
        config: SegCLIPConfig,
        inputs: Sequence[DataRef] = (),
        *,
        force: bool = False,
        lineage: Lineage = NO_LINEAGE,
    ) -> StageResult:
        """Skip when this exact output is finished; else resume or start it, tracked."""
        use_s3_endpoint(config.runtime.s3_endpoint_url)
        inputs = self.resolve_inputs(config, inputs)
        prepared = self.prepare(config, inputs)
        check_writable(location(config.runtime.workdir))
        output_dir = self.output_dir(config, inputs)
        if force:
            remove_tree(output_dir)
        finished = read_result(output_dir)
        if finished is not None:
            return finished

        ensure_folder(output_dir)
        tracked = open_stage_run(
            tracking_client(config),
            config,
            stage=self.name,
            output_dir=output_dir,
            inputs=inputs,
            lineage=lineage,
        )
        start = time.perf_counter()
        try:
            output = self.body(StageContext(config, output_dir, inputs, prepared, tracked))
        except BaseException:
            fail_stage_run(tracked)
            raise
        manifest = Manifest(
            stage=self.name,
            key=output_dir.name,
            config=self.settings(config),
            inputs=inputs,
            counts=output.counts,
            failures=output.failures,
            failed_samples=output.failed_samples,
            shards=output.shards,
            files=output.files,
            timings={**output.timings, "total": time.perf_counter() - start},
            nodes=sorted(set(output.nodes)),
            versions=package_versions(),
            code_revision=code_revision(),
        )
        result = write_manifest(output_dir, manifest)
        finish_stage_run(tracked, result)
        return result
