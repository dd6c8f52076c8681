"""Sliding-window zero-shot segmentation (docs/method.md section 6), by SegCLIP's centers
or by a training-free dense CLIP method on the same model's CLIP tower.

Per window, one vision pass gives the window's class scores (for SegCLIP both the
center embeddings and the image embedding of the class prior), windows are encoded in
batches, and every method shares the tiling, averaging, refinement and background rule.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from segclip.data.transforms import normalize_images
from segclip.eval.dense_clip import DENSE_METHODS, dense_features
from segclip.eval.pamr import pamr
from segclip.eval.protocol import EvalProtocol
from segclip.model import CaptionTokenizer, ImageEncoding, SegCLIP, VisionMode

# The training-free methods an evaluation can run beside SegCLIP ("plain" is their reference).
TRAINING_FREE = tuple(name for name in DENSE_METHODS if name != "plain")
# What a Segmenter's `method` may name: the model's centers, or a training-free method.
METHODS = ("segclip", *TRAINING_FREE)


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets along one side; the last window is shifted back inside the image."""
    if length <= window:
        return [0]
    count = math.ceil((length - window) / stride) + 1
    return [min(i * stride, length - window) for i in range(count)]


def resize_short_side(image: torch.Tensor, short_side: int) -> torch.Tensor:
    """(3, H, W) -> bilinear resize keeping the aspect ratio, short side = `short_side`."""
    height, width = image.shape[-2:]
    scale = short_side / min(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]


@torch.inference_mode()
def class_text_embeddings(
    model: SegCLIP, class_names: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """(K, E): per class, the L2-normalised mean of its unnormalised prompt embeddings."""
    tokenizer = CaptionTokenizer(model.config)
    prompts = [template.format(name) for name in class_names for template in templates]
    tokens = tokenizer(prompts).to(model.clip.logit_scale.device)
    embeddings = model.encode_text(tokens).reshape(len(class_names), len(templates), -1)
    return F.normalize(embeddings.mean(dim=1), dim=-1)


def center_class_affinity(
    centers: torch.Tensor, image: torch.Tensor, text: torch.Tensor, *, top_k: int, scale: float
) -> torch.Tensor:
    """F = p1 * p2, (B, G, K): center-class softmax times the same restricted to the top-k
    classes of the image-level prior; `scale` multiplies the cosine similarities."""
    logits = scale * F.normalize(centers, dim=-1) @ text.T  # (B, G, K)
    prior = scale * F.normalize(image, dim=-1) @ text.T  # (B, K)
    kept = prior.topk(min(top_k, text.shape[0]), dim=-1).indices
    allowed = torch.zeros_like(prior, dtype=torch.bool).scatter_(1, kept, True)
    p2 = logits.masked_fill(~allowed[:, None, :], float("-inf")).softmax(dim=-1)
    return logits.softmax(dim=-1) * p2


def apply_background(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """(K, H, W) class scores -> labels with 0 = background, k + 1 = class k.

    A pixel is background when its best score is below tau = min(threshold, max score).
    """
    best, label = scores.max(dim=0)
    tau = min(threshold, best.max().item())
    return torch.where(best < tau, 0, label + 1)


# Encoded windows and class text embeddings (K, E) -> center-class scores (B, G, K).
CenterLabeller = Callable[[ImageEncoding, torch.Tensor], torch.Tensor]


class Segmenter:
    """Open-vocabulary segmentation of whole images under one protocol, by one method.

    `method` is "segclip" (the model's centers) or a training-free method of
    `segclip.eval.dense_clip` applied to the model's CLIP tower. For SegCLIP, `labeller`
    scores each center against the classes; the default is the protocol's text
    affinity, a baseline may replace it (see `baselines`).
    """

    def __init__(
        self,
        model: SegCLIP,
        class_names: Sequence[str],
        protocol: EvalProtocol,
        background_threshold: float | None,
        *,
        window_batch: int = 16,
        bf16: bool = False,
        device: torch.device | str = "cpu",
        labeller: CenterLabeller | None = None,
        method: str = "segclip",
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
        self.method = method
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.protocol = protocol
        self.background_threshold = background_threshold
        self.window_batch = window_batch
        self.bf16 = bf16
        self.text = class_text_embeddings(self.model, class_names, protocol.templates)
        learned = protocol.affinity_scale is None
        self.affinity_scale = model.logit_scale().item() if learned else protocol.affinity_scale
        self.labeller = labeller or self._text_affinity

    def with_labeller(self, labeller: CenterLabeller) -> Segmenter:
        """The same model, classes and protocol, with another way to label the centers."""
        twin = copy.copy(self)
        twin.labeller = labeller
        return twin

    def _text_affinity(self, encoding: ImageEncoding, text: torch.Tensor) -> torch.Tensor:
        return center_class_affinity(
            encoding.center_embeddings.float(),
            encoding.embedding.float(),
            text,
            top_k=self.protocol.prior_top_k,
            scale=self.affinity_scale,
        )

    @torch.inference_mode()
    def scores(self, image: np.ndarray) -> torch.Tensor:
        """RGB uint8 (H, W, 3) -> class scores (K, H, W), windows averaged where they overlap."""
        height, width = image.shape[:2]
        normalized = normalize_images(image[None])[0].to(self.device)
        resized = resize_short_side(normalized, self.protocol.short_side)
        rows, cols = resized.shape[-2:]
        win_h, win_w = min(self.protocol.window, rows), min(self.protocol.window, cols)
        boxes = [
            (top, left)
            for top in window_starts(rows, win_h, self.protocol.stride)
            for left in window_starts(cols, win_w, self.protocol.stride)
        ]
        total = torch.zeros(len(self.text), rows, cols, device=self.device)
        count = torch.zeros(1, rows, cols, device=self.device)
        for start in range(0, len(boxes), self.window_batch):
            chunk = boxes[start : start + self.window_batch]
            crops = torch.stack([resized[:, y : y + win_h, x : x + win_w] for y, x in chunk])
            for (top, left), window_scores in zip(chunk, self._window_scores(crops), strict=True):
                total[:, top : top + win_h, left : left + win_w] += window_scores
                count[:, top : top + win_h, left : left + win_w] += 1
        scores = total / count
        if self.protocol.pamr is not None:
            settings = self.protocol.pamr
            scores = pamr(
                resized[None],
                scores[None],
                iterations=settings.iterations,
                dilations=settings.dilations,
            )[0]
        full = F.interpolate(scores[None], (height, width), mode="bilinear", align_corners=False)
        return full[0].cpu()

    def _window_scores(self, crops: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) -> (B, K, h, w) class scores of each window's pixels."""
        if self.method == "segclip":
            return self._center_scores(crops)
        return self._dense_scores(crops)

    def _vision_precision(self) -> torch.autocast:
        """bf16 for the vision pass only; scores are computed in fp32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _dense_scores(self, crops: torch.Tensor) -> torch.Tensor:
        """Each patch's class softmax of its scaled cosines to the class texts, bilinear to
        the pixels (the scale is the protocol's, as for the centers). A window that is no
        multiple of the patch size is padded for the vision pass and cropped back."""
        height, width = crops.shape[-2:]
        patch = self.model.patch_size
        padded = F.pad(crops, (0, -width % patch, 0, -height % patch))
        with self._vision_precision():
            features = dense_features(self.model.clip.visual, padded, self.method).float()
        cosines = torch.einsum("behw,ke->bkhw", F.normalize(features, dim=1), self.text)
        probabilities = (self.affinity_scale * cosines).softmax(dim=1)
        size = padded.shape[-2:]
        pixels = F.interpolate(probabilities, size, mode="bilinear", align_corners=False)
        return pixels[..., :height, :width]

    def _center_scores(self, crops: torch.Tensor) -> torch.Tensor:
        """Each pixel takes the affinity row of its argmax center."""
        with self._vision_precision():
            encoding = self.model.encode_image(crops, VisionMode.INFER)
        affinity = self.labeller(encoding, self.text)  # (B, G, K)
        batch, groups = affinity.shape[:2]
        soft = encoding.soft_assign.float().reshape(batch, groups, *encoding.grid)
        soft = F.interpolate(soft, crops.shape[-2:], mode="bilinear", align_corners=False)
        centers = soft.argmax(dim=1)  # (B, h, w)
        per_pixel = affinity.transpose(1, 2).gather(  # (B, K, h*w)
            2, centers.flatten(1)[:, None, :].expand(-1, affinity.shape[2], -1)
        )
        return per_pixel.reshape(batch, -1, *crops.shape[-2:])

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Label map (H, W): with a background threshold 0 is background and k + 1 class k."""
        scores = self.scores(image)
        if self.background_threshold is None:
            return scores.argmax(dim=0).numpy().astype(np.uint8)
        return apply_background(scores, self.background_threshold).numpy().astype(np.uint8)
