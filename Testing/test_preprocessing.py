"""The paper's preprocessing and its inverse: model space is 1.5 mm RAS in [0, 1], and maps come
back onto the input's own grid for oblique and anisotropic inputs alike."""

import copy

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FSEFTSegmentLib.model.network import Architecture
from monai.data import MetaTensor

from FSEFTSegmentLib.preprocessing import CTPreprocessing, image_to_tensor
from synthetic import body_phantom, oblique_direction


def test_image_to_tensor_uses_ras_affine():
    image, _ = body_phantom()
    tensor = image_to_tensor(image)
    assert tuple(tensor.shape) == (1, 48, 40, 20)
    affine = tensor.affine.numpy()
    # voxel (1, 0, 0) lies one spacing along +x in LPS, i.e. -x in RAS
    np.testing.assert_allclose(affine[:3, 0], [-1.2, 0, 0])
    np.testing.assert_allclose(affine[:3, 3], [30.0, -12.0, 7.0])


@pytest.mark.parametrize("direction", [None, oblique_direction()], ids=["axis-aligned", "oblique"])
def test_model_space_is_isotropic_windowed_and_cropped(direction):
    image, _ = body_phantom(direction=direction)
    preprocessed = CTPreprocessing(Architecture())(image)
    spacing = np.linalg.norm(preprocessed.affine.numpy()[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, 1.5, atol=1e-6)
    assert 0.0 <= float(preprocessed.min()) and float(preprocessed.max()) <= 1.0
    # the crop keeps the body's bounding box only: every border face touches tissue (> 0)
    volume = preprocessed[0]
    for axis in range(3):
        assert volume.select(axis, 0).max() > 0 and volume.select(axis, -1).max() > 0
    assert [op["class"] for op in preprocessed.applied_operations] == ["Orientation", "SpatialResample", "CropForeground"]


@pytest.mark.parametrize("direction", [None, oblique_direction()], ids=["axis-aligned", "oblique"])
def test_inverse_returns_masks_on_the_native_grid(direction):
    image, organ = body_phantom(direction=direction)
    preprocessing = CTPreprocessing(Architecture())
    preprocessed = preprocessing(image)
    # a "prediction" in model space: the bright sphere, thresholded there
    organ_model_space = (preprocessed[0] > (200 + 175) / 425 - 0.05).float()
    mask = preprocessing.to_native_mask(organ_model_space, preprocessed, image)
    assert mask.shape == organ.shape and mask.dtype == bool
    dice = 2 * (mask & organ).sum() / (mask.sum() + organ.sum())
    assert dice > 0.9


def recorded_inverse(preprocessing: CTPreprocessing, channel: torch.Tensor, preprocessed: MetaTensor) -> np.ndarray:
    """MONAI's own inverse of the recorded transforms, step by step, as a (k, j, i) array."""
    mapped = MetaTensor(channel[None].float(), meta=preprocessed.meta)
    mapped.applied_operations = copy.deepcopy(preprocessed.applied_operations)  # inverse pops from it
    return preprocessing.transform.inverse(mapped)[0].numpy().transpose(2, 1, 0)


@pytest.mark.parametrize("direction", [None, oblique_direction()], ids=["axis-aligned", "oblique"])
@pytest.mark.parametrize("spacing", [(1.2, 0.9, 2.5), (0.7, 0.7, 5.0), (1.5, 1.5, 1.5)], ids=["anisotropic", "thick-slices", "model-grid"])
@pytest.mark.parametrize("where", ["inside", "at-the-edges"])
def test_masks_match_monais_recorded_inverse(direction, spacing, where):
    """One resampling of the box around the voxels above the threshold, against MONAI undoing crop,
    spacing and orientation one by one over the whole volume: the very same masks, also where
    the structure touches the crop or the image's edge (MONAI holds edge values there)."""
    image, _ = body_phantom(spacing=spacing, direction=direction)
    preprocessing = CTPreprocessing(Architecture())
    preprocessed = preprocessing(image)
    smooth = torch.from_numpy(np.random.default_rng(0).random(preprocessed.shape[1:], dtype=np.float32))
    smooth = torch.nn.functional.avg_pool3d(smooth[None, None], 5, stride=1, padding=2, count_include_pad=False)[0, 0]
    if where == "inside":  # a blob away from every edge
        x, y, z = (torch.arange(n, dtype=torch.float32)[:, None, None] for n in preprocessed.shape[1:])
        centre = [(n - 1) / 2 for n in preprocessed.shape[1:]]
        blob = torch.exp(-((x - centre[0]) ** 2 + (y.transpose(0, 1) - centre[1]) ** 2 + (z.permute(1, 2, 0) - centre[2]) ** 2) / 60)
        probability = blob * (0.5 + smooth)
    else:  # high everywhere in the crop: the masks reach its faces and the image's
        probability = 0.3 + smooth
    monai = recorded_inverse(preprocessing, probability, preprocessed)
    for threshold in (0.35, 0.5, 0.6):
        ours, theirs = preprocessing.to_native_mask(probability, preprocessed, image, threshold), monai > threshold
        assert theirs.any() and (ours != theirs).sum() <= 1e-5 * ours.size  # float32 against float64 at the threshold
    assert not preprocessing.to_native_mask(probability, preprocessed, image, 2.0).any()


def test_inverse_keeps_voxels_where_grids_coincide():
    """3 mm -> 1.5 mm -> 3 mm samples the same points: the round trip is exact."""
    image, _ = body_phantom(size=(30, 30, 24), spacing=(3.0, 3.0, 3.0))
    preprocessing = CTPreprocessing(Architecture())
    preprocessed = preprocessing(image)
    expected = np.clip((sitk.GetArrayFromImage(image) + 175) / 425, 0, 1)
    for threshold in (0.1, 0.5, 0.49):
        np.testing.assert_array_equal(preprocessing.to_native_mask(preprocessed[0], preprocessed, image, threshold), expected > threshold)


@pytest.mark.parametrize("direction", [None, oblique_direction()], ids=["axis-aligned", "oblique"])
def test_masks_land_on_the_model_space_voxels_of_their_image(direction):
    image, organ = body_phantom(direction=direction)
    preprocessing = CTPreprocessing(Architecture())
    preprocessed = preprocessing(image)
    labels = preprocessing.masks_to_model_space(organ[None].astype(np.uint8), image, preprocessed)
    assert labels.shape == preprocessed.shape and labels.dtype == torch.uint8
    bright = (preprocessed[0] > 0.8).numpy()
    mask = labels[0].numpy().astype(bool)
    assert 2 * (bright & mask).sum() / (bright.sum() + mask.sum()) > 0.8
