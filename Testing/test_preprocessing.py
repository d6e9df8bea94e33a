"""The paper's preprocessing and its inverse: model space is 1.5 mm RAS in [0, 1], and maps come
back onto the input's own grid for oblique and anisotropic inputs alike."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FSEFTSegmentLib.model.network import Architecture
from FSEFTSegmentLib.preprocessing import CTPreprocessing, image_to_tensor


def body_phantom(size=(48, 40, 20), spacing=(1.2, 0.9, 4.0), direction=None, origin=(-30.0, 12.0, 7.0)):
    """Air around a soft-tissue ellipsoid holding a bright sphere, on the given (possibly oblique) grid."""
    image = sitk.Image(list(size), sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    k, j, i = np.indices(tuple(reversed(size)), dtype=float)
    centre = [(n - 1) / 2 for n in size]
    body = ((i - centre[0]) / (0.4 * size[0])) ** 2 + ((j - centre[1]) / (0.4 * size[1])) ** 2 + ((k - centre[2]) / (0.45 * size[2])) ** 2 <= 1
    physical = np.stack([(i - centre[0]) * spacing[0], (j - centre[1]) * spacing[1], (k - centre[2]) * spacing[2]])
    organ = (physical**2).sum(0) <= 10.0**2
    array = np.where(body, 40.0, -1000.0) + np.where(organ, 160.0, 0.0)
    result = sitk.GetImageFromArray(array.astype(np.float32))
    result.CopyInformation(image)
    return result, organ


def oblique_direction(degrees=20.0):
    angle = np.deg2rad(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    tilt = np.array([[1, 0, 0], [0, np.cos(angle / 2), -np.sin(angle / 2)], [0, np.sin(angle / 2), np.cos(angle / 2)]])
    return tuple((rotation @ tilt).ravel())


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
