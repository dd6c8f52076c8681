"""benchmarks/benchmark_noise.py's agreement of two benchmarks, against hand computations."""

import pytest

from tests.benchmark_scripts import load_benchmark

agreement = load_benchmark("benchmark_noise").agreement


def test_agreement_of_three_models_matches_the_hand_computation() -> None:
    # centred scores (-10, 0, 10) and (-10, 1, 9): r = 190 / sqrt(200 * 182);
    # differences 5, 4, 6: sd 1; the 100-scene share of it 1 / sqrt(1 + 100 / 1000)
    found = agreement([60.0, 70.0, 80.0], [55.0, 66.0, 74.0], scenes=100, fresh_scenes=1000)
    assert found.correlation == pytest.approx(190 / (200 * 182) ** 0.5)
    assert found.difference_std == pytest.approx(1.0)
    assert found.benchmark_error == pytest.approx(1 / 1.1**0.5)


def test_equal_benchmarks_share_the_difference_evenly() -> None:
    found = agreement([60.0, 70.0, 80.0], [55.0, 66.0, 74.0], scenes=100, fresh_scenes=100)
    assert found.benchmark_error == pytest.approx(1 / 2**0.5)


def test_too_few_or_unpaired_scores_are_refused() -> None:
    with pytest.raises(ValueError, match="three or more paired scores, got 2 and 2"):
        agreement([1.0, 2.0], [1.0, 2.0], scenes=100, fresh_scenes=1000)
    with pytest.raises(ValueError, match="got 3 and 4"):
        agreement([1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0], scenes=100, fresh_scenes=1000)
