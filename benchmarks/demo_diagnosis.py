"""Where a demo model loses mIoU: naming whole images, grouping pixels, naming centers.

Issue 18 asks why the demo's result swings with the seed. For each SegCLIP checkpoint
(`make demo`'s `train/*/final/model.safetensors`, or the runs `demo_recipes.py --keep`
saved), on the demo benchmark under the `segclip_learned_scale` protocol:
- mIoU at the protocol's threshold, and the class that loses most of its pixels to the
  background there (a low model often loses one whole class although its centers are
  named right: their class probability stays under the threshold);
- prior recall: the share of objects whose class is among the image embedding's top
  classes (as many as the image has objects);
- grouping oracle mIoU: every center labelled with the majority class of its pixels (the
  background included), which scores the grouping alone;
- center naming: the share of centers over an object whose best class is that object's;
- background named as a shape the image shows (at the protocol's threshold): the share of
  background pixels labelled as one of the image's own objects, the low models' main error
  (an object sharing its center with the background around it);
- assignment logit gap: per patch, the gap between its two best center logits (median
  over the patches of an image, then over the images); the group module's logits have no
  1/sqrt(d) scaling, and where they have grown large the straight-through softmax passes
  no gradient.

    python benchmarks/demo_diagnosis.py workdir/demo/train/*/final/model.safetensors
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass

import numpy as np
from demo_recipes import demo_inputs

import segclip  # noqa: F401  (torchvision fix before open_clip)


@dataclass
class Tally:
    objects: int = 0
    objects_in_prior: int = 0
    object_centers: int = 0
    centers_named: int = 0
    background: int = 0
    background_as_present: int = 0


def diagnose(path: str, benchmark: str) -> dict[str, str]:
    """The table row of one checkpoint: each column's value, formatted."""
    import torch
    import torch.nn.functional as F

    from segclip.data.transforms import normalize_images
    from segclip.data.voc import IGNORE_INDEX
    from segclip.eval.datasets import get_benchmark, read_samples
    from segclip.eval.metrics import ConfusionMatrix
    from segclip.eval.protocol import PROTOCOLS
    from segclip.eval.segment import Segmenter, resize_short_side
    from segclip.model.checkpoint import load_checkpoint
    from segclip.model.segclip import VisionMode
    from segclip.storage import location

    model = load_checkpoint(path).eval()
    spec, protocol = get_benchmark("demo"), PROTOCOLS["segclip_learned_scale"]
    classes = len(spec.class_names)
    threshold = protocol.background_thresholds["demo"]
    segmenter = Segmenter(model, spec.text_classes, protocol, threshold)
    text = segmenter.text  # the class prompts' embeddings, as the protocol makes them
    oracle, scored, tally = ConfusionMatrix(classes), ConfusionMatrix(classes), Tally()
    gaps = []
    with torch.inference_mode():
        for sample in read_samples(spec, location(benchmark)):
            predicted = segmenter.predict(sample.image)
            scored.update(predicted, sample.label)
            image = resize_short_side(normalize_images(sample.image[None])[0], protocol.short_side)
            encoding = model.encode_image(image[None], VisionMode.INFER)
            best_two = encoding.assignment.logits[0].float().topk(2, dim=0).values
            gaps.append((best_two[0] - best_two[1]).median().item())
            soft = encoding.soft_assign.float().reshape(1, -1, *encoding.grid)
            soft = F.interpolate(soft, sample.label.shape, mode="bilinear", align_corners=False)
            centers = soft.argmax(dim=1)[0].numpy()
            present = set(np.unique(sample.label).tolist()) - {0, IGNORE_INDEX}
            prior = F.normalize(encoding.embedding[0].float(), dim=-1) @ text.T
            top = prior.topk(len(present)).indices + 1 if present else prior[:0]
            tally.objects += len(present)
            tally.objects_in_prior += len(present & set(top.tolist()))
            background = sample.label == 0
            tally.background += int(background.sum())
            tally.background_as_present += int(np.isin(predicted[background], list(present)).sum())
            named = (F.normalize(encoding.center_embeddings[0].float(), dim=-1) @ text.T).argmax(1)
            grouped = np.zeros_like(sample.label)
            for center in np.unique(centers):
                region = centers == center
                pixels = sample.label[region]
                pixels = pixels[pixels < classes]
                if not len(pixels):
                    continue
                majority = np.bincount(pixels, minlength=classes).argmax()
                grouped[region] = majority
                if majority:
                    tally.object_centers += 1
                    tally.centers_named += int(named[center].item() + 1 == majority)
            oracle.update(grouped, sample.label)
    to_background = scored.matrix[1:, 0] / scored.matrix[1:].sum(axis=1).clip(min=1)
    lost = int(to_background.argmax())
    return {
        f"mIoU at {threshold} (%)": f"{100 * scored.mean_iou():.1f}",
        "class most lost to background": spec.class_names[lost + 1],
        "its pixels labelled background (%)": f"{100 * to_background[lost]:.1f}",
        "prior recall (%)": f"{100 * tally.objects_in_prior / tally.objects:.1f}",
        "grouping oracle mIoU (%)": f"{100 * oracle.mean_iou():.1f}",
        "center naming (%)": f"{100 * tally.centers_named / tally.object_centers:.1f}",
        "background named as a shape the image shows (%)": (
            f"{100 * tally.background_as_present / tally.background:.1f}"
        ),
        "assignment logit gap": f"{np.median(gaps):.1f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="SegCLIP .safetensors checkpoints")
    args = parser.parse_args()
    _, benchmark = demo_inputs()
    rows = {path: diagnose(path, benchmark) for path in args.checkpoints}
    columns = list(next(iter(rows.values())))
    print("| checkpoint | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for path, row in rows.items():
        print(f"| {path} | " + " | ".join(row.values()) + " |")
    print(f"\ncommand: python benchmarks/demo_diagnosis.py {shlex.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
