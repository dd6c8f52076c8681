"""SegCLIP's three losses and the optional caption-word term, as pure functions of tensors
(docs/method.md section 3)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from segclip.config import LossConfig
from segclip.model.segclip import TrainOutputs


class _GatherRows(torch.autograd.Function):
    """Every rank's rows in rank order. Each rank's loss uses every rank's rows, so a rank's
    own rows get the sum over ranks of the gradients of their slice (one all-reduce of the
    small gathered gradient: gloo and NCCL alike; torch.distributed.nn's all_gather, which
    did the same, is deprecated)."""

    @staticmethod
    def forward(ctx, features: torch.Tensor) -> torch.Tensor:
        features = features.contiguous()
        parts = [torch.empty_like(features) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, features)
        ctx.rows = slice(dist.get_rank() * len(features), (dist.get_rank() + 1) * len(features))
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rows]


def gather_with_grad(features: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' features concatenated in rank order (gradients flow back), and this rank.

    Without an initialised process group this is the identity on rank 0.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, 0
    return _GatherRows.apply(features), dist.get_rank()


def contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's pairs against every rank's (normalised) features.

    Same semantics as open_clip's `ClipLoss(local_loss=True, gather_with_grad=True)`;
    every rank must hold the same number of pairs.
    """
    all_images, rank = gather_with_grad(image_features)
    all_texts, _ = gather_with_grad(text_features)
    labels = torch.arange(image_features.shape[0], device=image_features.device)
    labels = labels + rank * image_features.shape[0]
    logits_per_image = logit_scale * image_features @ all_texts.T
    logits_per_text = logit_scale * text_features @ all_images.T
    return (
        F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
    ) / 2


def caption_word_loss(
    center_features: torch.Tensor,
    word_features: torch.Tensor,
    named: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """For every word a caption names, cross-entropy of that word among the vocabulary's
    words, scored by the image's best center (scaled cosine), averaged over named words.

    `center_features` (B, G, E) and `word_features` (K, E) are normalised, `named` (B, K)
    is bool. The contrastive loss sees only the element-wise maximum over centers, so a
    model trained from scratch can spread a word over several centers; segmentation labels
    single centers. Captions that name no word add nothing.
    """
    best = torch.einsum("bge,ke->bgk", center_features, word_features).amax(dim=1)
    log_probs = (logit_scale * best).log_softmax(dim=-1)
    weights = named.to(log_probs.dtype)
    return -(log_probs * weights).sum() / weights.sum().clamp(min=1)


def superpixel_pseudo_labels(assign: torch.Tensor, superpixel_ids: torch.Tensor) -> torch.Tensor:
    """P (B, N, G): the share of each patch's superpixel that every center holds.

    `assign` (B, N, G) is the straight-through hard assignment, `superpixel_ids`
    (B, N) the superpixel id of each patch.
    """
    same = (superpixel_ids.unsqueeze(2) == superpixel_ids.unsqueeze(1)).to(assign.dtype)
    return same @ assign / same.sum(dim=-1, keepdim=True).clamp(min=1)


def _kl_reference(pseudo: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """[ref] Symmetric KL between softmax(P) and softmax(H), summed, over B*N*G."""
    log_p = pseudo.log_softmax(dim=-1)
    log_h = assign.log_softmax(dim=-1)
    kl_ph = (log_p.exp() * (log_p - log_h)).sum()
    kl_hp = (log_h.exp() * (log_h - log_p)).sum()
    return 0.5 * (kl_ph + kl_hp) / assign.numel()


PLAIN_KL_SMOOTHING = 0.05


def _kl_plain(pseudo: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """[fix] Symmetric KL of P and H as the distributions they already are, mean over patches.

    H is one-hot, so both sides are smoothed towards uniform by PLAIN_KL_SMOOTHING
    to keep the logarithms finite and the gradients bounded.
    """
    num_centers = assign.shape[-1]
    p = (1 - PLAIN_KL_SMOOTHING) * pseudo + PLAIN_KL_SMOOTHING / num_centers
    h = (1 - PLAIN_KL_SMOOTHING) * assign + PLAIN_KL_SMOOTHING / num_centers
    kl = (p * (p.log() - h.log())).sum(-1) + (h * (h.log() - p.log())).sum(-1)
    return 0.5 * kl.mean()


KL_FORMS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "reference": _kl_reference,
    "plain": _kl_plain,
}


def superpixel_kl_loss(
    assign: torch.Tensor, superpixel_ids: torch.Tensor, form: str = "reference"
) -> torch.Tensor:
    """KL between each patch's assignment (B, N, G) and its superpixel's pseudo-label.

    Neither side is detached: the loss pulls patches of one superpixel together.
    """
    if form not in KL_FORMS:
        raise ValueError(f"unknown kl_form {form!r}; choose one of {sorted(KL_FORMS)}")
    return KL_FORMS[form](superpixel_pseudo_labels(assign, superpixel_ids), assign)


def reconstruction_loss(
    prediction: torch.Tensor, target: torch.Tensor, masked: torch.Tensor
) -> torch.Tensor:
    """MSE per patch (mean over its values), averaged over the masked patches only."""
    per_patch = (prediction - target).pow(2).mean(dim=-1)
    weights = masked.to(per_patch.dtype)
    return (per_patch * weights).sum() / weights.sum().clamp(min=1)


@dataclass
class LossTerms:
    total: torch.Tensor
    contrastive: torch.Tensor
    superpixel_kl: torch.Tensor
    reconstruction: torch.Tensor | None  # None: not computed (reconstruction weight 0)
    caption_words: torch.Tensor | None = None  # None: not computed (caption-word weight 0)

    def to_floats(self) -> dict[str, float]:
        """Detached scalars keyed `loss/<term>`, for logging; terms not computed are left out."""
        return {
            f"loss/{name}": value.item() for name, value in vars(self).items() if value is not None
        }


def segclip_loss(
    outputs: TrainOutputs,
    superpixel_ids: torch.Tensor,
    config: LossConfig,
    *,
    named_words: torch.Tensor | None = None,
) -> LossTerms:
    """L = w_con L_con + w_kl L_kl + w_rec L_rec (+ w_words L_words), each term kept for logging.

    A forward without the masked pass has no reconstruction term (None, never logged,
    rather than a loss of 0) and needs a reconstruction weight of 0. A caption-word
    weight needs the forward's word features and `named_words` (B, K), which words each
    caption names (`segclip.caption_words.CaptionWords.named`).
    """
    con = contrastive_loss(outputs.image_features, outputs.text_features, outputs.logit_scale)
    kl = superpixel_kl_loss(outputs.patch_assign, superpixel_ids, config.kl_form)
    total = config.contrastive_weight * con + config.superpixel_kl_weight * kl
    rec = None
    if outputs.reconstruction is not None:
        rec = reconstruction_loss(outputs.reconstruction, outputs.target, outputs.masked)
        total = total + config.reconstruction_weight * rec
    elif config.reconstruction_weight:
        raise ValueError(
            "loss.reconstruction_weight is not 0 but the forward skipped the masked pass: "
            "call the model with reconstruct=True"
        )
    words = None
    if config.caption_word_weight:
        if outputs.word_features is None or named_words is None:
            raise ValueError(
                "loss.caption_word_weight is not 0 but the forward got no word prompts or "
                "the loss no named words: use TrainStep, which passes both"
            )
        words = caption_word_loss(
            outputs.center_features, outputs.word_features, named_words, outputs.logit_scale
        )
        total = total + config.caption_word_weight * words
    return LossTerms(
        total=total, contrastive=con, superpixel_kl=kl, reconstruction=rec, caption_words=words
    )
