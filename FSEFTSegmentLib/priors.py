"""Size priors from the support examples: the transductive loss and the volume quality flag.

The supports say how big the target structure is. Two uses follow (paper-facts §9):

- **Transductive size prior (TI).** S, the mean support size, constrains Ŝ, the sum of the query's
  foreground probabilities, with the paper's L1 hinge outside [(1-γ)S, (1+γ)S]
  (`size_prior_loss`, γ = 0.3, weighted by λ = 0.1 in the training loop).
- **Quality flag.** A predicted volume well outside what the supports imply is flagged
  (`quality_flag`). No peer tool (nnU-Net, TotalSegmentator, MONAI Label) tells the user that a
  volume is implausible, yet a few-shot model's typical failure is exactly that: a leak into a
  neighbouring organ (too big) or a miss (too small). Comparing with the supports costs nothing
  and points the user at the studies to check.

Pure functions on tensors and numbers; no I/O.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch

#: γ: the half-width of the accepted band around the prior, relative (paper: 0.3)
GAMMA = 0.3
#: the 2023 code trims support sizes to median ± std only from this many supports on
TRIM_FROM = 5


def support_size(mask: torch.Tensor) -> float:
    """Voxels in the largest 26-connected component of a binary (X, Y, Z) mask; 0 for an empty mask.

    As the 2023 code, which keeps only the largest candidate: a stray labelled island in a support
    must not inflate the prior. Any non-zero voxel counts as foreground.
    """
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if array.ndim != 3:
        raise ValueError(f"support_size expects a 3-D (X, Y, Z) mask, got shape {tuple(array.shape)}")
    foreground = (array != 0).astype(np.uint8)
    if not foreground.any():
        return 0.0
    components = sitk.ConnectedComponent(sitk.GetImageFromArray(foreground), True)  # 26-connectivity
    largest = sitk.RelabelComponent(components, sortByObjectSize=True)  # label 1 = the largest
    return float(np.count_nonzero(sitk.GetArrayViewFromImage(largest) == 1))


def size_prior(sizes: Sequence[float]) -> float:
    """S: the mean support size; from `TRIM_FROM` (5) supports on, of those within median ± std.

    The trimming is the 2023 code's (population std, as `np.std`); its bounds were strict, which
    empties the selection when all sizes are equal, so here they are inclusive, and an empty
    selection falls back to all sizes.
    """
    values = np.asarray(list(sizes), dtype=np.float64)
    if values.size == 0:
        raise ValueError("size_prior needs at least one support size")
    if values.size >= TRIM_FROM:
        median, spread = np.median(values), np.std(values)
        kept = values[(values >= median - spread) & (values <= median + spread)]
        if kept.size:
            values = kept
    return float(values.mean())


def size_prior_loss(predicted_size: torch.Tensor, prior: float, gamma: float = GAMMA) -> torch.Tensor:
    """The paper's symmetric L1 hinge on Ŝ outside [(1-γ)S, (1+γ)S], divided by S.

    relu((1-γ) - Ŝ/S) + relu(Ŝ/S - (1+γ)): zero inside the band, growing linearly outside it,
    continuous at both bounds and differentiable in Ŝ (gradient -1/S below, +1/S above, 0 inside).
    Dividing the paper's L_TI by S makes it scale-free, so λ means the same for a gallbladder and a
    liver and for any crop size.

    The 2023 code's penalty (|e|-m above, |e|+m below, e = (S-Ŝ)/max(Ŝ, S)) has a sign slip in its
    second branch: same gradient, but the loss jumps by 2m at the bound. This follows the paper.

    `predicted_size`: Ŝ, the sum of the query's foreground probabilities (any shape: elementwise).
    `prior`: S (> 0), in the same units (voxels at the same spacing and pooling).
    """
    if not prior > 0:
        raise ValueError(f"size prior must be positive, got {prior}")
    if not 0 <= gamma < 1:
        raise ValueError(f"gamma must be in [0, 1), got {gamma}")
    ratio = predicted_size / prior
    return torch.relu((1 - gamma) - ratio) + torch.relu(ratio - (1 + gamma))


def expected_volume_range(support_volumes_ml: Sequence[float], gamma: float = GAMMA) -> tuple[float, float]:
    """The volumes the supports make plausible: ((1-γ)·smallest, (1+γ)·largest), in mL.

    Wider than the training band (it spans all supports, not their mean), so that a flag means
    "outside anything the examples showed", not "different from the average patient".
    """
    volumes = [float(v) for v in support_volumes_ml]
    if not volumes:
        raise ValueError("expected_volume_range needs at least one support volume")
    return (1 - gamma) * min(volumes), (1 + gamma) * max(volumes)


def quality_flag(volume_ml: float, expected: tuple[float, float]) -> str | None:
    """A one-line warning when a predicted volume is outside `expected` (mL), else None.

    "above" suggests a leak into a neighbour, "below" a partial or missed structure.
    """
    low, high = expected
    band = f"{low:.1f}–{high:.1f} mL the supports imply"
    if volume_ml > high:
        return f"volume {volume_ml:.1f} mL above the {band}"
    if volume_ml < low:
        return f"volume {volume_ml:.1f} mL below the {band}"
    return None
