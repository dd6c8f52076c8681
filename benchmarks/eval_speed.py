"""Images/s of zero-shot segmentation on VOC-sized images against a naive sliding window.

Ours: `Segmenter` (windows batched, one vision pass per window gives both the
center embeddings and the image embedding for the prior). Naive: one window at a
time, batch 1, and a second encoder pass per window for the image embedding.
Both produce the same labels (checked), on 500x375 images, CPU, fp32.

    python benchmarks/eval_speed.py                     # paper and tiny
    python benchmarks/eval_speed.py --profiles tiny --images 4
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

import segclip  # noqa: F401  (torchvision fix before open_clip)
from segclip.config import load_config
from segclip.data.transforms import normalize_images
from segclip.eval.class_names import VOC
from segclip.eval.protocol import PROTOCOLS
from segclip.eval.segment import (
    Segmenter,
    apply_background,
    center_class_affinity,
    resize_short_side,
    window_starts,
)
from segclip.eval.speed import VOC_SIZE, images_per_second, pixel_agreement, random_images
from segclip.model import VisionMode, build_model

HEIGHT, WIDTH = VOC_SIZE


@torch.inference_mode()
def naive_predict(segmenter: Segmenter, image: np.ndarray) -> np.ndarray:
    """The straightforward loop: each window alone, encoded twice (centers, then prior)."""
    protocol, model = segmenter.protocol, segmenter.model
    resized = resize_short_side(normalize_images(image[None])[0], protocol.short_side)
    rows, cols = resized.shape[-2:]
    size = protocol.window
    total = torch.zeros(len(segmenter.text), rows, cols)
    count = torch.zeros(1, rows, cols)
    for top in window_starts(rows, size, protocol.stride):
        for left in window_starts(cols, size, protocol.stride):
            crop = resized[None, :, top : top + size, left : left + size]
            centers = model.encode_image(crop, VisionMode.INFER)
            image_embedding = model.encode_image(crop, VisionMode.INFER).embedding
            affinity = center_class_affinity(
                centers.center_embeddings,
                image_embedding,
                segmenter.text,
                top_k=protocol.prior_top_k,
                scale=segmenter.affinity_scale,
            )[0]
            soft = centers.soft_assign.reshape(1, -1, *centers.grid)
            owner = F.interpolate(soft, (size, size), mode="bilinear").argmax(1)[0]
            total[:, top : top + size, left : left + size] += affinity[owner].permute(2, 0, 1)
            count[:, top : top + size, left : left + size] += 1
    scores = F.interpolate((total / count)[None], (HEIGHT, WIDTH), mode="bilinear")[0]
    return apply_background(scores, segmenter.background_threshold).numpy().astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", nargs="*", default=["tiny", "paper"])
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args()
    images = random_images(args.images)
    rows = []
    for profile in args.profiles:
        config = load_config(profile, ["model.pretrained=null"])
        torch.manual_seed(0)
        segmenter = Segmenter(build_model(config.model), VOC[1:], PROTOCOLS["segclip"], 0.8)
        ours, ours_labels = images_per_second(segmenter.predict, images)
        naive, naive_labels = images_per_second(partial(naive_predict, segmenter), images)
        agree = pixel_agreement(ours_labels, naive_labels)
        rows.append((profile, ours, naive, agree))
        print(f"done {profile}", file=sys.stderr)
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"machine: {os.cpu_count()} cores, {torch.get_num_threads()} threads; "
        f"{args.images} images of {WIDTH}x{HEIGHT}, protocol segclip v1, VOC classes, fp32"
    )
    print("\n| profile | ours images/s | naive images/s | speed-up | same labels | target |")
    print("|---|---|---|---|---|---|")
    for profile, ours, naive, agree in rows:
        print(
            f"| {profile} | {ours:.2f} | {naive:.2f} | {ours / naive:.2f}x | "
            f"{100 * agree:.1f}% | >= 2x |"
        )


if __name__ == "__main__":
    main()
