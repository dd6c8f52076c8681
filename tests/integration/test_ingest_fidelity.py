"""What the ingest stage stores for every edge case of tests/integration/edge_kit.py.

One run over the whole kit: each case either becomes a sample that looks as a browser shows
the image (orientation, bit depth, transparency on white, first frame) at the keep_ratio
size, with its caption byte for byte, or a row of failures.parquet with its reason.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from pipelines import ingest
from segclip.config import load_config
from segclip.stage import StageResult
from tests.integration import edge_kit
from tests.integration.edge_kit import Case, Kit, Stored, case_names, serve_kit, write_list

pytestmark = pytest.mark.slow

TIMEOUT_S = 1
DEADLINE_S = 3
OVERRIDES = [
    "runtime.ingest_processes=1",
    "runtime.ingest_threads=8",
    "ingest.source=urls",
    "ingest.retries=0",
    f"ingest.timeout={TIMEOUT_S}",
    f"ingest.download_deadline={DEADLINE_S}",
    f"ingest.image_size={edge_kit.IMAGE_SIZE}",
    "ingest.resize_mode=keep_ratio",
    f"ingest.min_image_size={edge_kit.MIN_IMAGE_SIZE}",
    f"ingest.max_image_pixels={edge_kit.MAX_IMAGE_PIXELS}",
    f"ingest.max_aspect_ratio={edge_kit.MAX_ASPECT_RATIO}",
    "ingest.samples_per_shard=16",
    "ingest.dedup=[url, content]",
]
CSV_CAPTION_CASES = ["jpeg_baseline", "caption_null", "caption_empty", "caption_whitespace"]
CSV_HOSTILE_CASES = ["caption_control", "caption_csv_hostile", "caption_unicode", "caption_padded"]


@dataclass
class Outcome:
    cases: list[Case]
    result: StageResult
    failures: pd.DataFrame  # url, caption, reason
    samples: dict[str, list[dict[str, bytes]]]  # url -> members by extension, per sample

    def case(self, name: str) -> Case:
        return next(c for c in self.cases if c.name == name)


def read_samples(shard_urls: list[str]) -> dict[str, list[dict[str, bytes]]]:
    """Every sample's members (extension -> bytes), grouped by the url in its json."""
    by_url: dict[str, list[dict[str, bytes]]] = {}
    for shard in shard_urls:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for info in tar:
                if info.isfile():
                    key, _, extension = Path(info.name).name.partition(".")
                    members.setdefault(key, {})[extension] = tar.extractfile(info).read()
        for key, sample in members.items():
            assert "json" in sample, f"sample {key} of {shard} has no json: {sorted(sample)}"
            by_url.setdefault(json.loads(sample["json"])["url"], []).append(sample)
    return by_url


def run_list(kit_cases: list[Case], folder: Path, list_name: str) -> Outcome:
    folder.mkdir(parents=True, exist_ok=True)
    url_list = write_list(kit_cases, folder / list_name)
    config = load_config(
        "tiny", [f"runtime.workdir={folder / 'work'}", *OVERRIDES, f"ingest.path={url_list}"]
    )
    result = ingest.run(config)
    failures = pd.read_parquet(str(result.output_dir / "failures.parquet"))
    failures["caption"] = [c if isinstance(c, str) else None for c in failures["caption"]]
    return Outcome(kit_cases, result, failures, read_samples(result.shard_urls))


@pytest.fixture(scope="module")
def kit() -> Iterator[Kit]:
    with serve_kit(timeout=TIMEOUT_S, deadline=DEADLINE_S) as served:
        yield served


@pytest.fixture(scope="module")
def outcome(kit: Kit, tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    return run_list(kit.cases, tmp_path_factory.mktemp("fidelity"), "kit.parquet")


def assert_outcome(outcome: Outcome, case: Case, *, failed_captions: bool = True) -> None:
    """The case's row became what it expects; rows sharing its url are checked together.
    `failed_captions`: failures.parquet also holds each failed row's caption as listed (a
    csv list cannot tell a null caption from an empty one, so its test leaves them out)."""
    url = case.path_or_url
    same_url = [c for c in outcome.cases if c.path_or_url == url]
    rows = outcome.failures[outcome.failures["url"] == url]
    keep = (lambda caption: caption) if failed_captions else (lambda caption: "")
    found = Counter(zip(map(keep, rows["caption"]), rows["reason"], strict=True))
    expected = Counter((keep(c.caption), c.reason) for c in same_url if c.reason)
    samples = outcome.samples.get(url, [])
    stored_captions = [s.get("txt", b"").decode("utf-8") for s in samples]
    assert found == expected, (
        f"{case.name}: failures {dict(found)} (stored captions {stored_captions}), "
        f"expected {dict(expected)}"
    )
    successes = [c for c in same_url if not c.reason]
    assert len(samples) == len(successes), f"{case.name}: {len(samples)} samples of {url}"
    if case.reason:
        return
    (sample,) = samples
    assert sample["txt"] == case.caption.encode("utf-8"), f"{case.name}: caption changed"
    assert set(sample) == {"jpg", "txt", "json"}, f"{case.name}: members {sorted(sample)}"
    metadata = json.loads(sample["json"])
    for field in ("url", "width", "height", "original_width", "original_height"):
        assert field in metadata, f"{case.name}: no {field} in {metadata}"
    stored: Stored = case.expected  # type: ignore[assignment]
    image = Image.open(io.BytesIO(sample["jpg"]))
    assert image.format == "JPEG", f"{case.name}: stored as {image.format}"
    assert image.mode == "RGB", f"{case.name}: stored in mode {image.mode}, not RGB"
    assert image.size == (stored.width, stored.height), f"{case.name}: size {image.size}"
    assert (metadata["width"], metadata["height"]) == image.size, f"{case.name}: {metadata}"
    for probe in stored.probes:
        point = (int(probe.x * image.width), int(probe.y * image.height))
        pixel = image.getpixel(point)
        assert max(abs(p - e) for p, e in zip(pixel, probe.rgb, strict=True)) <= probe.tolerance, (
            f"{case.name}: pixel {pixel} at {point}, expected {probe.rgb} ± {probe.tolerance}"
        )


@pytest.mark.parametrize("name", case_names())
def test_each_case_is_stored_as_shown_or_failed_with_its_reason(outcome: Outcome, name: str):
    assert_outcome(outcome, outcome.case(name))


def test_the_manifest_counts_every_requested_row_once(outcome: Outcome):
    reasons = Counter(c.reason for c in outcome.cases if c.reason)
    manifest = outcome.result.manifest
    assert manifest.failures == dict(reasons)
    assert manifest.counts["requested"] == len(outcome.cases)
    assert manifest.counts["samples"] == len(outcome.cases) - reasons.total()
    assert manifest.counts["requested"] == manifest.counts["samples"] + reasons.total()
    assert sum(len(s) for s in outcome.samples.values()) == manifest.counts["samples"]
    assert len(outcome.failures) == reasons.total()
    assert Counter(outcome.failures["reason"]) == reasons


def test_a_csv_list_refuses_null_and_empty_captions_as_parquet_does(kit: Kit, tmp_path: Path):
    cases = [kit.case(name) for name in CSV_CAPTION_CASES]
    outcome = run_list(cases, tmp_path, "captions.csv")
    text = (tmp_path / "captions.csv").read_text()
    assert f"{kit.case('caption_null').path_or_url},\n" in text  # null: an empty field
    assert f'{kit.case("caption_empty").path_or_url},""\n' in text  # empty: a quoted ""
    for case in cases:
        assert_outcome(outcome, case, failed_captions=False)


def test_a_csv_list_keeps_quoted_captions_byte_for_byte(kit: Kit, tmp_path: Path):
    """Quoted fields may hold newlines, commas, doubled quotes and edge whitespace."""
    cases = [kit.case(name) for name in CSV_HOSTILE_CASES]
    outcome = run_list(cases, tmp_path, "hostile.csv")
    for case in cases:
        assert_outcome(outcome, case)
