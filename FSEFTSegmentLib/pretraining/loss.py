"""Partial-label soft Dice (paper-facts section 5).

Per sample and class: dice_c = (2 sum p y + 1) / (sum p + sum y + 1) over the patch, p = sigmoid(logit).
Per sample: L = sum_c w_c (1 - dice_c) / sum_c w_c with w_c = 1 iff the sample's dataset annotates
class c; the loss is the mean over the samples that annotate at least one class. An unannotated
class is not background: its weight is zero, so its logits get exactly no gradient.

With `bce_weight` > 0 the per-voxel binary cross-entropy of the annotated classes is added (Dice +
cross-entropy, as nnU-Net): Dice alone gives a small organ little signal until it is found at all.
"""

from __future__ import annotations

import torch


def partial_label_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor, smooth: float = 1.0, bce_weight: float = 0.0
) -> torch.Tensor:
    """Scalar loss of `logits` (B, C, ...) against 0/1 `target` (B, C, ...), `annotated` (B, C) bool."""
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    if annotated.shape != logits.shape[:2]:
        raise ValueError(f"annotated has shape {tuple(annotated.shape)}, expected {tuple(logits.shape[:2])}")
    probabilities = torch.sigmoid(logits.float())
    target = target.to(probabilities.dtype)
    dims = tuple(range(2, logits.dim()))
    intersection = (probabilities * target).sum(dims)
    total = probabilities.sum(dims) + target.sum(dims)
    dice = (2 * intersection + smooth) / (total + smooth)  # (B, C)
    weights = annotated.to(device=dice.device, dtype=dice.dtype)
    # where() rather than a product alone: no gradient reaches an unannotated class even if its
    # dice were not finite
    terms = torch.where(annotated.to(dice.device), 1 - dice, torch.zeros_like(dice)) * weights
    counts = weights.sum(1)
    has_any = counts > 0
    if not bool(has_any.any()):
        return logits.sum() * 0.0
    per_sample = terms.sum(1)[has_any] / counts[has_any]
    loss = per_sample.mean()
    if bce_weight:
        voxelwise = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
        per_class = voxelwise.mean(dims)  # (B, C)
        bce = torch.where(annotated.to(dice.device), per_class, torch.zeros_like(per_class)).sum() / weights.sum()
        loss = loss + bce_weight * bce
    return loss
