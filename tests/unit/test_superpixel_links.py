"""benchmarks/superpixel_links.py's counts on a hand-made scene of four 16 px patches."""

import torch

from tests.benchmark_scripts import load_benchmark

superpixel_links = load_benchmark("superpixel_links")


def scene() -> tuple[torch.Tensor, torch.Tensor]:
    """Patches, row-major: 0 background in superpixel 0; 1 an object whose pixels are half
    superpixel 0, half superpixel 2; 2 an object in superpixel 1; 3 background in superpixel 2."""
    superpixels = torch.zeros(32, 32, dtype=torch.long)
    superpixels[:16, 24:] = 2
    superpixels[16:, :16] = 1
    superpixels[16:, 16:] = 2
    classes = torch.zeros(32, 32, dtype=torch.long)
    classes[:16, 16:] = 1
    classes[16:, :16] = 1
    return superpixels, classes


def test_the_truncated_mean_gives_a_border_patch_a_third_superpixel() -> None:
    # patch 1's ids average 1.0: superpixel 1, none of its pixels', shared with object patch 2
    links = superpixel_links.count_links(*scene(), patch=16, reduction="mean")
    assert links == superpixel_links.Links(
        patches=4, absent=1, not_majority=1, objects=2, objects_linked=0
    )


def test_the_majority_ties_a_border_object_patch_to_the_background_it_touches() -> None:
    # patch 1's tie goes to the smaller id, 0: the background patch 0's superpixel
    links = superpixel_links.count_links(*scene(), patch=16, reduction="majority")
    assert links == superpixel_links.Links(
        patches=4, absent=0, not_majority=0, objects=2, objects_linked=1
    )
    assert links + links == superpixel_links.Links(8, 0, 0, 4, 2)
