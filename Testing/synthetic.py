"""Small generated inputs for tests (and benchmarks): CT-like phantoms on arbitrary grids, tiny
checkpoints, and DICOM series written from any volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from FSEFTSegmentLib.model.network import Architecture, FoundationSwinUNETR


def body_phantom(size=(48, 40, 20), spacing=(1.2, 0.9, 4.0), direction=None, origin=(-30.0, 12.0, 7.0)):
    """Air around a soft-tissue ellipsoid holding a bright sphere; returns (image, sphere mask (k, j, i))."""
    size = tuple(size)
    k, j, i = np.indices(tuple(reversed(size)), dtype=float)
    centre = [(n - 1) / 2 for n in size]
    body = ((i - centre[0]) / (0.4 * size[0])) ** 2 + ((j - centre[1]) / (0.4 * size[1])) ** 2 + ((k - centre[2]) / (0.45 * size[2])) ** 2 <= 1
    physical = np.stack([(i - centre[0]) * spacing[0], (j - centre[1]) * spacing[1], (k - centre[2]) * spacing[2]])
    organ = (physical**2).sum(0) <= 10.0**2
    array = np.where(body, 40.0, -1000.0) + np.where(organ, 160.0, 0.0)
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image, organ


def oblique_direction(degrees=20.0):
    angle = np.deg2rad(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    tilt = np.array([[1, 0, 0], [0, np.cos(angle / 2), -np.sin(angle / 2)], [0, np.sin(angle / 2), np.cos(angle / 2)]])
    return tuple((rotation @ tilt).ravel())


def tiny_checkpoint(path: Path, seed: int = 0, out_channels: int = 29) -> Path:
    """A random feature-size-12 foundation network saved in the released layout (classifier head)."""
    torch.manual_seed(seed)
    network = FoundationSwinUNETR(Architecture(feature_size=12, out_channels=out_channels))
    torch.save(network.state_dict(), path)
    return path


def write_dicom_series(image: sitk.Image, folder, series_uid: str) -> None:
    """One CT slice file per k with the tags a series needs (SimpleITK's "DICOM series from array").

    Stored with RescaleIntercept -1024 (GDCM stores HU + 1024), so reading must apply it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    orientation = "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        position = "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
            "0008|0018": f"{series_uid}.{k + 1}",
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": position,
            "0020|0037": orientation,
            "0028|1052": "-1024",
            "0028|1053": "1",
        }
        for key, value in tags.items():
            slice_.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{series_uid.rsplit('.', 1)[-1]}-{k:03d}.dcm"))  # never a hidden ".xx" name
        writer.Execute(slice_)
