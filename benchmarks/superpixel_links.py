"""How often the superpixel KL ties an object's patches to the background, by patch reduction.

The superpixel KL pulls every patch toward the centers its superpixel's patches take. A
patch's superpixel is one id reduced from its 16x16 pixels: the reference takes the
truncated mean of the ids, which for a patch on a border can be a third, unrelated
superpixel; `data.patch_label=majority` takes the most frequent id. On demo training scenes
(the whole scene resized to the model's input, as a crop of scale 1 is), with each patch's
ground-truth class the majority of its pixels:
- patches whose id is none of their pixels' ids;
- object patches sharing an id with a background patch (the KL then pulls the object toward
  the background's centers, the demo models' main error; issue 18).

    python benchmarks/superpixel_links.py --scenes 300
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import astuple, dataclass

import numpy as np
import torch
import torch.nn.functional as F

import segclip  # noqa: F401  (torchvision fix before open_clip)
from segclip.clip_architecture import describe_clip
from segclip.config import load_config
from segclip.data.demo_data import demo_scene
from segclip.data.superpixels import compute_superpixels, patch_superpixel_ids


def _resized(grid: np.ndarray, size: int) -> torch.Tensor:
    """Nearest-neighbour resize of an id map, as the loader resizes label maps."""
    tensor = torch.from_numpy(grid.astype(np.int64))[None, None].float()
    return F.interpolate(tensor, size=(size, size), mode="nearest")[0, 0].long()


@dataclass
class Links:
    """Patch counts of one or more scenes."""

    patches: int = 0
    absent: int = 0  # patches whose id none of their pixels has
    not_majority: int = 0  # patches whose id is not their most frequent one
    objects: int = 0  # patches whose pixels are mostly an object's
    objects_linked: int = 0  # object patches sharing an id with a background patch

    def __add__(self, other: Links) -> Links:
        return Links(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


def count_links(
    superpixels: torch.Tensor, classes: torch.Tensor, *, patch: int, reduction: str
) -> Links:
    """Links of one scene: superpixel ids and ground-truth classes (H, W), 0 the background."""
    ids = patch_superpixel_ids(superpixels, patch, reduction)
    patch_classes = patch_superpixel_ids(classes, patch, "majority")
    rows, columns = superpixels.shape[0] // patch, superpixels.shape[1] // patch
    pixels = superpixels.reshape(rows, patch, columns, patch).transpose(1, 2)
    present = (pixels.reshape(ids.numel(), -1) == ids[:, None]).any(dim=1)
    same = ids[:, None] == ids[None, :]
    same.fill_diagonal_(False)
    is_object = patch_classes > 0
    linked = (same & (patch_classes[None, :] == 0)).any(dim=1) & is_object
    return Links(
        patches=ids.numel(),
        absent=int((~present).sum()),
        not_majority=int((ids != patch_superpixel_ids(superpixels, patch, "majority")).sum()),
        objects=int(is_object.sum()),
        objects_linked=int(linked.sum()),
    )


def links(*, scenes: int, reduction: str, overrides: list[str]) -> dict[str, str]:
    """The table's row for one reduction over the first `scenes` demo training scenes."""
    config = load_config("demo", overrides)
    architecture = describe_clip(config.model.clip_model)
    size, patch = architecture.image_size, architecture.patch_size
    total, superpixel_count = Links(), 0
    for index in range(scenes):
        scene = demo_scene(config.demo.seed, index, config.demo.image_size)
        superpixels = compute_superpixels(scene.image, config.data)
        superpixel_count += int(superpixels.max()) + 1
        total += count_links(
            _resized(superpixels, size),
            _resized(scene.class_map, size),
            patch=patch,
            reduction=reduction,
        )
    return {
        "superpixels a scene": f"{superpixel_count / scenes:.1f}",
        "patches with an id none of their pixels has": f"{total.absent / total.patches:.1%}",
        "patches whose id is not their majority id": f"{total.not_majority / total.patches:.1%}",
        "object patches sharing an id with background": (
            f"{total.objects_linked / total.objects:.1%}"
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=300, help="demo training scenes")
    parser.add_argument(
        "--override", action="append", default=[], help="dotted demo-profile override"
    )
    args = parser.parse_args()
    rows = {
        r: links(scenes=args.scenes, reduction=r, overrides=args.override)
        for r in ("mean", "majority")
    }
    columns = list(next(iter(rows.values())))
    print("| patch reduction | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for reduction, row in rows.items():
        print(f"| {reduction} | " + " | ".join(row[c] for c in columns) + " |")
    print("\ncommand: python " + shlex.join(sys.argv))


if __name__ == "__main__":
    main()
