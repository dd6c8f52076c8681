import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from segclip.config import DemoDataConfig
from segclip.data.demo_data import (
    DEMO_CLASS_NAMES,
    demo_scene,
    usable_cpus,
    write_demo_benchmark,
    write_demo_source,
)
from segclip.data.voc import IGNORE_INDEX, mark_borders, voc_palette


def test_voc_palette_matches_the_known_class_colours():
    palette = np.array(voc_palette()).reshape(256, 3)
    assert palette[0].tolist() == [0, 0, 0]
    assert palette[1].tolist() == [128, 0, 0]  # aeroplane
    assert palette[2].tolist() == [0, 128, 0]  # bicycle
    assert palette[15].tolist() == [192, 128, 128]  # person
    assert palette[255].tolist() == [224, 224, 192]  # the ignore border


def test_borders_cover_every_pixel_next_to_another_class():
    labels = np.zeros((6, 6), np.uint8)
    labels[2:4, 2:4] = 3
    marked = mark_borders(labels)
    expected = np.zeros((6, 6), np.uint8)
    expected[1:5, 1:5] = IGNORE_INDEX
    assert np.array_equal(marked, expected)
    wide = np.zeros((9, 9), np.uint8)
    wide[:, 5:] = 2
    assert (mark_borders(wide)[0] == [0, 0, 0, 0, 255, 255, 2, 2, 2]).all()


def test_demo_benchmark_is_a_voc_folder_from_its_own_seed(tmp_path):
    config = DemoDataConfig(benchmark_images=5, image_size=64, seed=3, benchmark_seed=4)
    root = write_demo_benchmark(tmp_path / "voc", config)
    ids = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    assert ids == [f"demo_{i:06d}" for i in range(5)]
    assert (root / "class_names.txt").read_text().split() == list(DEMO_CLASS_NAMES)
    for index, sample_id in enumerate(ids):
        image = Image.open(root / "JPEGImages" / f"{sample_id}.jpg")
        label = Image.open(root / "SegmentationClass" / f"{sample_id}.png")
        assert image.size == (64, 64) and label.size == (64, 64)
        assert label.mode == "P" and label.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
        expected = mark_borders(demo_scene(4, index, 64).class_map)
        assert np.array_equal(np.asarray(label), expected)
        assert set(np.unique(expected)) <= set(range(len(DEMO_CLASS_NAMES))) | {IGNORE_INDEX}
    # Complete folders are kept as they are.
    before = (root / "SegmentationClass/demo_000000.png").stat().st_mtime_ns
    write_demo_benchmark(root, config)
    assert (root / "SegmentationClass/demo_000000.png").stat().st_mtime_ns == before


def test_demo_source_lists_each_scene_with_its_caption(tmp_path):
    config = DemoDataConfig(train_images=4, image_size=48)
    table = pq.read_table(write_demo_source(tmp_path, config)).to_pylist()
    assert [row["file"] for row in table] == [f"images/{i:06d}.png" for i in range(4)]
    for index, row in enumerate(table):
        scene = demo_scene(0, index, 48)
        assert row["caption"] == scene.caption
        assert np.array_equal(np.asarray(Image.open(tmp_path / row["file"])), scene.image)
    assert not np.array_equal(demo_scene(0, 0, 48).image, demo_scene(1, 0, 48).image)


def test_demo_config_rejects_a_benchmark_that_repeats_the_training_seed():
    with pytest.raises(ValueError, match="must not repeat the training scenes"):
        DemoDataConfig(seed=2, benchmark_seed=2)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux affinity call")
def test_usable_cpus_follow_the_process_affinity_not_the_machine():
    allowed = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(allowed)})
        assert usable_cpus() == 1
    finally:
        os.sched_setaffinity(0, allowed)
    assert usable_cpus() == len(allowed)
