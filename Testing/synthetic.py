"""Small generated inputs for tests: CT-like phantoms on arbitrary grids and tiny checkpoints."""

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
