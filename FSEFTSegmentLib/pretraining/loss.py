"""Partial-label soft Dice (paper-facts section 5).

Per sample and class: dice_c = (2 sum p y + 1) / (sum p + sum y + 1) over the patch, p = sigmoid(logit).
Per sample: L = sum_c w_c (1 - dice_c) / sum_c w_c with w_c = 1 iff the sample's dataset annotates
class c; the loss is the mean over the samples that annotate at least one class. An unannotated
class is not background: its weight is zero, so its logits get exactly no gradient.

With `bce_weight` > 0 the per-voxel binary cross-entropy of the annotated classes is added (Dice +
cross-entropy, as nnU-Net): Dice alone gives a small organ little signal until it is found at all.

With `absent_class_dice=False` a class's Dice counts only in the samples whose patch holds it; its
absence elsewhere is left to the cross-entropy. Why: with smooth 1, a class absent from the patch
scores 1 / (sum p + 1), whose pull towards p = 0 on every voxel, 1 / (sum p + 1)^2, outweighs the pull
2 / (sum y + 1) on a true positive voxel of a present small class while the class is predicted almost
nowhere (small sum p): a small class that starts near zero is held there. nnU-Net's Dice (smooth
1e-5) ignores absent classes the same way.
"""

from __future__ import annotations

import torch


def partial_label_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    annotated: torch.Tensor,
    smooth: float = 1.0,
    bce_weight: float = 0.0,
    absent_class_dice: bool = True,
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
    annotated = annotated.to(dice.device)
    if not bool(annotated.any()):
        return logits.sum() * 0.0
    scored = annotated if absent_class_dice else annotated & (target.sum(dims) > 0)
    loss = _mean_per_sample(1 - dice, scored) if bool(scored.any()) else logits.sum() * 0.0
    if bce_weight:
        voxelwise = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
        per_class = voxelwise.mean(dims)  # (B, C)
        bce = torch.where(annotated, per_class, torch.zeros_like(per_class)).sum() / annotated.sum()
        loss = loss + bce_weight * bce
    return loss


def _mean_per_sample(terms: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over the samples with any weight of each sample's mean `terms` (B, C) over its weighted
    classes. where() rather than a product alone: no gradient reaches an unweighted class even if
    its term were not finite."""
    counts = weights.sum(1)
    has_any = counts > 0
    selected = torch.where(weights, terms, torch.zeros_like(terms))
    return (selected.sum(1)[has_any] / counts[has_any]).mean()
