"""Each config choice list names exactly its registry's keys; choices are checked on load."""

from typing import get_args

import pytest

from pipelines.ingest import SOURCES
from segclip import config as cfg
from segclip.data.superpixels import PATCH_REDUCTIONS, SUPERPIXEL_METHODS
from segclip.eval.baselines import BASELINES
from segclip.eval.datasets import BENCHMARKS
from segclip.eval.protocol import PROTOCOLS
from segclip.eval.segment import METHODS
from segclip.losses import KL_FORMS
from segclip.train.step import AUTOCAST_DTYPES


@pytest.mark.parametrize(
    ("choices", "registry"),
    [
        (cfg.KlForm, KL_FORMS),
        (cfg.SuperpixelMethod, SUPERPIXEL_METHODS),
        (cfg.PatchLabel, PATCH_REDUCTIONS),
        (cfg.Precision, AUTOCAST_DTYPES),
        (cfg.ProtocolName, PROTOCOLS),
        (cfg.BenchmarkName, BENCHMARKS),
        (cfg.BaselineName, BASELINES),
        (cfg.IngestSource, SOURCES),
        (cfg.MethodName, METHODS),
    ],
    ids=lambda value: getattr(value, "__name__", ""),
)
def test_choice_list_equals_its_registry(choices, registry):
    assert set(get_args(choices)) == set(registry)


def test_protocol_entries_carry_their_own_name():
    assert all(protocol.name == name for name, protocol in PROTOCOLS.items())


def test_benchmarks_and_protocols_are_checked_when_the_config_loads():
    with pytest.raises(cfg.ConfigError, match=r"eval\.benchmarks\.1: Input should be 'voc'"):
        cfg.load_config("tiny", ["eval.benchmarks=[demo, vocc]"])
    with pytest.raises(cfg.ConfigError, match=r"eval\.protocols\.0: Input should be 'segclip'"):
        cfg.load_config("tiny", ["eval.protocols=[segclip2]"])
    with pytest.raises(cfg.ConfigError, match=r"eval\.methods\.1: Input should be 'segclip'"):
        cfg.load_config("tiny", ["eval.methods=[segclip, maskclip2]"])
