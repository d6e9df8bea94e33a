"""Post-processing of predicted masks: the largest-component clean-up works inside the patient's body.

A CT with a soft-tissue body holding a bright organ and lungs (air inside the body), and a bright
table slab detached below the body. A stand-in "model" fires on bright voxels (organ and table), so
the table is a false positive outside the body that is LARGER than the organ: the largest component
alone would keep the table and drop the organ; restricted to the body first, the organ is kept.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from FSEFTSegmentLib.inference import (
    InferenceSettings,
    SegmentationPredictor,
    body_mask,
    keep_largest_component,
    native_bf16_cpu,
)
from FSEFTSegmentLib.model.network import Architecture
from FSEFTSegmentLib.progress import Progress

SIZE = (40, 44, 24)  # (i, j, k); SimpleITK arrays are (k, j, i)
SPACING = (3.0, 3.0, 3.0)


def scene():
    """(image, body, organ, lungs, table) with the masks as (k, j, i) bool arrays."""
    k, j, i = np.indices(tuple(reversed(SIZE)), dtype=float)
    body = ((i - 19.5) / 15) ** 2 + ((j - 17) / 12) ** 2 + ((k - 11.5) / 13) ** 2 <= 1  # touches the first and last slices
    organ = ((i - 24) ** 2 + (j - 17) ** 2 + (k - 11.5) ** 2) <= 4**2
    inner = ((i - 19.5) / 12) ** 2 + ((j - 17) / 9) ** 2 + ((k - 11.5) / 13) ** 2 <= 1  # in-plane: 3 voxels in
    lungs = (((i - 14) ** 2 + (j - 17) ** 2) <= 4**2) & inner & (k >= 14)  # reach the last slice: 3D filling would miss them
    table = (j >= 38) & (j <= 41) & (i >= 2) & (i <= 37)  # below the body (j = 29 at most), every slice
    array = np.full(body.shape, -1000.0)
    array[body] = 40.0
    array[lungs] = -850.0
    array[organ] = 200.0
    array[table] = 200.0
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing(SPACING)
    image.SetOrigin((-60.0, -40.0, 100.0))
    assert table.sum() > organ.sum() and body.sum() > table.sum()
    return image, body, organ, lungs, table


class _Stub(nn.Module):
    """Only what the predictor reads of a network before the (replaced) sliding window runs."""

    def __init__(self):
        super().__init__()
        self.architecture = Architecture(feature_size=12, out_channels=1, patch_size=32, spacing_mm=3.0)


def predict(image: sitk.Image, **settings) -> np.ndarray:
    """One channel: positive where the windowed intensity is organ-bright (HU > about 120)."""
    predictor = SegmentationPredictor(_Stub(), torch.device("cpu"), InferenceSettings(**settings))
    predictor.logits = lambda volume, heads, study="": (torch.as_tensor(volume).float() - 0.7) * 50.0
    return predictor.segment(image, [nn.Identity()])[0].astype(bool)


def test_body_mask_is_the_body_with_its_air_filled_and_without_the_table():
    image, body, _, lungs, table = scene()
    found = body_mask(image)
    assert found.dtype == bool and found.shape == body.shape
    assert np.array_equal(found, body)  # lungs filled (slice by slice), table detached and smaller: out
    assert found[lungs].all() and not found[table].any()
    air = sitk.GetImageFromArray(np.full((4, 5, 6), -1000.0, np.float32))
    assert body_mask(air) is None


def test_body_mask_fills_air_across_the_head_feet_axis_of_a_permuted_image():
    image, body, _, lungs, _ = scene()
    # the same volume stored with its slices along the first index axis (a sagittal-like layout)
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    permuted = sitk.GetImageFromArray(np.ascontiguousarray(array))
    permuted.SetSpacing(SPACING)
    permuted.SetDirection((0, 0, 1, 0, 1, 0, 1, 0, 0))  # index i runs along z
    found = body_mask(permuted)
    assert np.array_equal(found, body.transpose(2, 1, 0))
    assert found[lungs.transpose(2, 1, 0)].all()


def test_largest_component_keeps_the_organ_not_the_larger_false_positive_outside_the_body():
    image, _, organ, _, table = scene()
    raw = predict(image)
    assert raw[organ].all() and raw[table].sum() > 0.9 * table.sum()  # the stand-in fires on both
    cleaned = predict(image, largest_component=True)
    assert np.array_equal(cleaned, organ)  # the table is outside the body: gone; the organ stays
    # without the body restriction the largest component is the table: why the restriction exists
    unrestricted = predict(image, largest_component=True, body_mask=False)
    assert not unrestricted[organ].any() and unrestricted[table].any()
    assert np.array_equal(unrestricted, keep_largest_component(raw.astype(np.uint8)).astype(bool))


class _Recorder(Progress):
    def __init__(self):
        super().__init__()
        self.events = []

    def emit(self, event, **fields):
        self.events.append((event, fields.get("message", "")))


def test_bf16_on_a_cpu_that_emulates_it_is_obeyed_with_a_warning():
    warned = {}
    for precision in ("auto", "fp32", "bf16"):
        recorder = _Recorder()
        SegmentationPredictor(_Stub(), torch.device("cpu"), InferenceSettings(precision=precision), recorder)
        warned[precision] = [message for event, message in recorder.events if event == "warning"]
    assert not warned["auto"] and not warned["fp32"]
    assert bool(warned["bf16"]) == (not native_bf16_cpu()) and all("--precision auto" in m for m in warned["bf16"])

