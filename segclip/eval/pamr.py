"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020, "Single-Stage Semantic
Segmentation from Image Labels", section on local consistency / PAMR).

Written from the paper's equations. For an image ``I`` with ``C`` channels and masks ``m`` with
``K`` classes, both at the same resolution, with ``D`` the set of dilations:

Neighbour set (the paper's dilated 3x3 kernel without its centre)::

    N(i) = { i + d * o  :  d in D,  o in {-1, 0, 1}^2 minus (0, 0) }      |N(i)| = 8 |D|

Positions outside the image are clamped to the border (replicate padding), so near a border
one location can appear several times in ``N(i)`` (each occurrence is its own term) and the
pixel itself can re-enter through a clamped offset.

Local standard deviation, per channel ``c``, over the same neighbour set (population form)::

    mu_ic    = 1/|N| sum_{j in N(i)} I_jc
    sigma_ic = sqrt( 1/|N| sum_{j in N(i)} (I_jc - mu_ic)^2 )

Kernel, averaged over channels, and affinity (softmax over all neighbours of all dilations)::

    kappa(i, j) = -1/C sum_c |I_ic - I_jc| / (sigma_ic + eps)          eps = 1e-8
    alpha(i, j) = exp kappa(i, j) / sum_{j' in N(i)} exp kappa(i, j')

Each iteration (``iterations`` of them; the affinities are computed once from the image)::

    m_ik  <-  sum_{j in N(i)} alpha(i, j) m_jk

Choices the paper leaves open, made here:

* The centre pixel is not a neighbour: ``N(i)`` is the 8 off-centre taps of each dilated 3x3
  kernel, as in the paper. Including it would give it ``kappa = 0``, the largest possible value,
  so it would always hold the single largest weight and damp the propagation towards a lazy
  average; without it a pixel's new score is purely its neighbours' affinity-weighted average.
  (The chain cannot oscillate: diagonal and axis taps together close odd cycles.)
* ``sigma_i`` is taken over the same neighbour set as the softmax (not including ``i``), per
  channel, with the population (divide by ``|N|``) variance. On a constant patch ``sigma = 0``
  and all ``kappa`` are equal, so the weights are uniform; ``eps`` only keeps that finite.
* Dilations must be distinct positive integers (a repeated dilation would count its taps twice).
* Computation is in float32 (float64 if the masks are float64) on the inputs' device without
  gradients; the result is cast back to the masks' dtype.

Each iteration is a convex combination of neighbouring scores, so per-pixel class sums and the
range of every class map are preserved.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

_EPS = 1e-8
_PAPER_ITERATIONS = 10
_PAPER_DILATIONS = (1, 2, 4, 8, 12, 24)


def _check_settings(iterations: int, dilations: tuple[int, ...]) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be an integer >= 0, got {iterations!r}")
    if not isinstance(dilations, tuple) or not dilations:
        raise ValueError(f"dilations must be a non-empty tuple, got {dilations!r}")
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dilations):
        raise ValueError(f"dilations must be positive integers, got {dilations!r}")
    if len(set(dilations)) != len(dilations):
        raise ValueError(f"dilations must be distinct, got {dilations!r}")


@dataclass(frozen=True)
class PamrSettings:
    """PAMR's settings as an evaluation protocol holds them; ``pamr(img, m, **s.as_dict())``."""

    iterations: int = _PAPER_ITERATIONS
    dilations: tuple[int, ...] = _PAPER_DILATIONS

    def __post_init__(self) -> None:
        _check_settings(self.iterations, self.dilations)

    def as_dict(self) -> dict:
        return asdict(self)


def _offsets(dilations: tuple[int, ...]) -> list[tuple[int, int]]:
    """(dy, dx) of every neighbour: the 8 off-centre taps of a 3x3 kernel at each dilation."""
    return [
        (d * dy, d * dx)
        for d in dilations
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
        if (dy, dx) != (0, 0)
    ]


def _shifted(padded: torch.Tensor, pad: int, dy: int, dx: int, height: int, width: int):
    """The view of a replicate-padded map whose pixel i holds the value at i + (dy, dx)."""
    return padded[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width]


def _affinity(image: torch.Tensor, offsets: list[tuple[int, int]], pad: int) -> torch.Tensor:
    """alpha(i, j) of the module docstring: (B, C, H, W) image -> (B, |N|, H, W) weights."""
    height, width = image.shape[-2:]
    padded = F.pad(image, (pad, pad, pad, pad), mode="replicate")
    neighbours = torch.stack(
        [_shifted(padded, pad, dy, dx, height, width) for dy, dx in offsets], dim=2
    )  # (B, C, N, H, W)
    sigma = neighbours.std(dim=2, correction=0, keepdim=True)  # (B, C, 1, H, W)
    kappa = -((image.unsqueeze(2) - neighbours).abs() / (sigma + _EPS)).mean(dim=1)
    return kappa.softmax(dim=1)


def _propagate(
    masks: torch.Tensor, affinity: torch.Tensor, offsets: list[tuple[int, int]], pad: int
) -> torch.Tensor:
    """One step m_i <- sum_j alpha(i, j) m_j, accumulated tap by tap (memory O(B K H W))."""
    height, width = masks.shape[-2:]
    padded = F.pad(masks, (pad, pad, pad, pad), mode="replicate")
    out = torch.zeros_like(masks)
    for n, (dy, dx) in enumerate(offsets):
        out.addcmul_(affinity[:, n : n + 1], _shifted(padded, pad, dy, dx, height, width))
    return out


@torch.no_grad()
def pamr(
    image: torch.Tensor,
    masks: torch.Tensor,
    *,
    iterations: int = _PAPER_ITERATIONS,
    dilations: tuple[int, ...] = _PAPER_DILATIONS,
) -> torch.Tensor:
    """Refine class scores ``masks`` (B, K, H, W) with the image (1 or B, C, H, W), see module doc.

    Returns a tensor of the masks' shape and dtype on their device (image and masks must share
    it). An image batch of 1 is shared by all masks in the batch.
    """
    _check_settings(iterations, dilations)
    if image.ndim != 4 or masks.ndim != 4:
        raise ValueError(
            f"expected image (B, C, H, W) and masks (B, K, H, W), got {tuple(image.shape)} "
            f"and {tuple(masks.shape)}"
        )
    if image.shape[-2:] != masks.shape[-2:]:
        raise ValueError(
            f"image and masks must share H, W: {tuple(image.shape)} vs {tuple(masks.shape)}"
        )
    if image.shape[0] not in (1, masks.shape[0]):
        raise ValueError(
            f"image batch must be 1 or the masks' batch {masks.shape[0]}, got {image.shape[0]}"
        )
    if image.device != masks.device:
        raise ValueError(f"image and masks on different devices: {image.device}, {masks.device}")
    if not masks.is_floating_point():
        raise TypeError(f"masks must be floating point, got {masks.dtype}")

    dtype = torch.float64 if masks.dtype == torch.float64 else torch.float32
    offsets = _offsets(dilations)
    pad = max(dilations)
    affinity = _affinity(image.to(dtype), offsets, pad)
    refined = masks.to(dtype)
    for _ in range(iterations):
        refined = _propagate(refined, affinity, offsets, pad)
    return refined.to(masks.dtype) if iterations else masks.clone()
