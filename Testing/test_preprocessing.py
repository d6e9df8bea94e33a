"""The paper's preprocessing and its inverse: model space is 1.5 mm RAS in [0, 1], and maps come
back onto the input's own grid for oblique and anisotropic inputs alike."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FSEFTSegmentLib.model.network import Architecture
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
def test_inverse_returns_maps_on_the_native_grid(direction):
    image, organ = body_phantom(direction=direction)
    preprocessing = CTPreprocessing(Architecture())
    preprocessed = preprocessing(image)
    # a "prediction" in model space: the bright sphere, thresholded there
    organ_model_space = (preprocessed[0] > (200 + 175) / 425 - 0.05).float()
    native = preprocessing.to_native(organ_model_space, preprocessed, image)
    assert native.shape == organ.shape
    mask = native > 0.5
    dice = 2 * (mask & organ).sum() / (mask.sum() + organ.sum())
    assert dice > 0.9


def test_inverse_keeps_values_where_grids_coincide():
    """3 mm -> 1.5 mm -> 3 mm samples the same points: the round trip is exact."""
    image, _ = body_phantom(size=(30, 30, 24), spacing=(3.0, 3.0, 3.0))
    preprocessing = CTPreprocessing(Architecture())
    preprocessed = preprocessing(image)
    native = preprocessing.to_native(preprocessed[0], preprocessed, image)
    expected = np.clip((sitk.GetArrayFromImage(image) + 175) / 425, 0, 1)
    inside = expected > 0
    np.testing.assert_allclose(native[inside], expected[inside], atol=1e-5)


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
