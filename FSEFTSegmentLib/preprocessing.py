"""The paper's CT preprocessing with MONAI transforms, and its exact inverse back to the native grid.

Forward (pretraining, adaptation and prediction alike): RAS orientation, isotropic resampling
(image bilinear), HU window clipped and mapped to [0, 1], crop to the bounding box of voxels > 0.
MONAI records every invertible step on the MetaTensor, so a probability map computed in that
space is mapped back with the same chain inverted; the result is then written with the input's own
SimpleITK geometry, so size, spacing, origin and direction are identical to the input's.
"""

from __future__ import annotations

import copy

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, CropForeground, Orientation, ResampleToMatch, ScaleIntensityRange, Spacing

from .model.network import Architecture

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def image_to_tensor(image: sitk.Image) -> MetaTensor:
    """A (1, i, j, k) float32 MetaTensor with the image's RAS affine (MONAI's convention)."""
    array = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)  # SimpleITK is (k, j, i)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    affine_lps[:3, 3] = image.GetOrigin()
    data = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    return MetaTensor(data, affine=torch.as_tensor(LPS_TO_RAS @ affine_lps, dtype=torch.float64))


def _foreground(x: torch.Tensor) -> torch.Tensor:
    return x > 0


class CTPreprocessing:
    """Forward and inverse mapping between an image's grid and the model's working space."""

    def __init__(self, architecture: Architecture):
        low, high = architecture.hu_window
        self.transform = Compose(
            [
                Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
                Spacing(pixdim=(architecture.spacing_mm,) * 3, mode="bilinear"),
                ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
                CropForeground(select_fn=_foreground, allow_smaller=True),
            ]
        )

    def __call__(self, image: sitk.Image) -> MetaTensor:
        """The image in model space, shape (1, X, Y, Z), carrying the record needed to invert it."""
        return self.transform(image_to_tensor(image))

    def masks_to_model_space(self, masks: np.ndarray, reference: sitk.Image, preprocessed: MetaTensor) -> torch.Tensor:
        """Binary masks (S, k, j, i) on `reference`'s grid, resampled (nearest) onto the model-space
        grid of `preprocessed` (that image's own preprocessing): (S, X, Y, Z) uint8, voxel-aligned."""
        source = image_to_tensor(reference)
        labels = MetaTensor(torch.from_numpy(np.ascontiguousarray(masks.transpose(0, 3, 2, 1))).float(), affine=source.affine)
        resampled = ResampleToMatch(mode="nearest", padding_mode="zeros")(labels, img_dst=preprocessed)
        return resampled.as_tensor().round().to(torch.uint8)

    def to_native(self, channel: torch.Tensor, preprocessed: MetaTensor, reference: sitk.Image) -> np.ndarray:
        """Map one (X, Y, Z) map from model space back to `reference`'s grid, as a (k, j, i) array.

        The map is inverted through the recorded crop, resampling (bilinear) and reorientation;
        one channel at a time keeps memory at one native-size float volume.
        """
        mapped = MetaTensor(channel[None].float(), meta=preprocessed.meta)
        mapped.applied_operations = copy.deepcopy(preprocessed.applied_operations)  # inverse pops from it
        native = self.transform.inverse(mapped)
        array = native[0].detach().cpu().numpy().transpose(2, 1, 0)
        expected = tuple(reversed(reference.GetSize()))
        if array.shape != expected:
            raise RuntimeError(f"inverse preprocessing gave shape {array.shape}, expected {expected}")
        return array
