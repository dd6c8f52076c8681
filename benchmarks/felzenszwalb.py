"""Felzenszwalb segmentation per image: scikit-image's against segclip's compiled one.

The superpixel stage spends about nine tenths of its time in this function. Demo scenes at
each size, a profile's parameters, one process; labels must be equal for every image.

    python benchmarks/felzenszwalb.py                    # the demo's: 160 and 224 px
    python benchmarks/felzenszwalb.py --profile paper --sizes 224 448 --images 50
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable

import numpy as np
from skimage import segmentation

from segclip.config import load_config
from segclip.data.felzenszwalb import felzenszwalb
from segclip.data.scenes import render_scene
from segclip.data.superpixels import felzenszwalb_parameters


def per_image_ms(
    segment: Callable[[np.ndarray], np.ndarray], images: list[np.ndarray]
) -> tuple[float, list[np.ndarray]]:
    start = time.perf_counter()
    labels = [segment(image) for image in images]
    return (time.perf_counter() - start) / len(images) * 1e3, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[160, 224])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--profile", default="demo")
    args = parser.parse_args()
    parameters = felzenszwalb_parameters(load_config(args.profile).data)
    print(f"python {shlex.join(['benchmarks/felzenszwalb.py', *sys.argv[1:]])}  {parameters}")
    print("| image px | scikit-image ms | compiled ms | speed-up | labels equal |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        images = [render_scene(np.random.default_rng(i), size).image for i in range(args.images)]
        felzenszwalb(images[0], **parameters)  # numba's compile or cache load, once a process
        ours, ours_labels = per_image_ms(lambda im: felzenszwalb(im, **parameters), images)
        theirs, their_labels = per_image_ms(
            lambda im: segmentation.felzenszwalb(im, channel_axis=-1, **parameters), images
        )
        equal = sum(np.array_equal(a, b) for a, b in zip(ours_labels, their_labels, strict=True))
        print(
            f"| {size} | {theirs:.2f} | {ours:.2f} | {theirs / ours:.2f}x "
            f"| {equal} of {len(images)} |"
        )


if __name__ == "__main__":
    main()
