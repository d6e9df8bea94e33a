"""`fseft evaluate` engine: metrics checked against values worked out by hand on small synthetic masks."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FSEFTSegmentLib.errors import InputError
from FSEFTSegmentLib.evaluation import (
    evaluate,
    parse_structure_selectors,
    score_masks,
    scores_table,
    write_scores_csv,
    write_scores_json,
)
from FSEFTSegmentLib.progress import Progress

REAL_LABELS = Path("/work/shared/data/real-ct/totalseg-abdomen/labels-totalsegmentator.nii.gz")
SHAPE = (20, 30, 30)  # numpy (z, y, x)


class Recorder(Progress):
    """Keeps warnings instead of printing them, so tests can assert the user was told."""

    def __init__(self):
        super().__init__()
        self.warnings: list[str] = []

    def warning(self, message, **fields):
        self.warnings.append(message)


def image(array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(np.asarray(array, dtype=np.uint8))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def write(path: Path, array, **geometry) -> Path:
    sitk.WriteImage(image(array, **geometry), str(path))
    return path


def cube(lo, size=10, shape=SHAPE, value=1) -> np.ndarray:
    """A cube of `size` voxels per side starting at numpy index `lo` = (z, y, x)."""
    a = np.zeros(shape, np.uint8)
    a[tuple(slice(s, s + size) for s in lo)] = value
    return a


def test_cube_dice_is_exact_and_volumes_use_spacing(tmp_path):
    """Shifting a 10^3 cube by 2 voxels in x keeps 800 voxels in common: Dice = 2*800/2000 = 0.8 exactly
    (no +1 smoothing); at 1x1x3 mm a 1000-voxel cube is 3 ml."""
    ref = write(tmp_path / "ref.nii.gz", cube((5, 5, 5), value=5), spacing=(1.0, 1.0, 3.0))
    pred = write(tmp_path / "pred.nii.gz", cube((5, 5, 7), value=5), spacing=(1.0, 1.0, 3.0))
    [s] = evaluate(pred, ref, parse_structure_selectors(["liver=5"]))
    assert (s.name, s.pred_voxels, s.ref_voxels) == ("liver", 1000, 1000)
    assert s.dice == pytest.approx(0.8)
    assert s.pred_volume_ml == pytest.approx(3.0) and s.ref_volume_ml == pytest.approx(3.0)


def test_anisotropic_spacing_measured_in_mm():
    """One 3-mm slice of shift: a whole face (100 of 488 surface voxels, >5 %) is exactly 3 mm from the
    other surface and none farther, so HD95 = 3 mm; surface Dice fails at 2 mm and passes at 3 mm.
    Counting in voxels instead would give HD95 = 1 and surface Dice 1 at 2 mm."""
    ref = image(cube((5, 5, 5)), spacing=(1.0, 1.0, 3.0))
    pred = image(cube((6, 5, 5)), spacing=(1.0, 1.0, 3.0))
    s = score_masks("x", pred, ref, tolerance_mm=2.0)
    assert s.hd95_mm == pytest.approx(3.0)
    assert s.surface_dice < 0.95
    assert score_masks("x", pred, ref, tolerance_mm=3.0).surface_dice == pytest.approx(1.0)


def test_shifted_sphere_hd95_bounded_by_shift():
    """A voxelized sphere moved by 2 voxels (3 mm at 1.5 mm) has each surface voxel's translated twin
    3 mm away, so 0 < HD95 <= 3 mm and every surface point is within a 3-mm tolerance."""
    z, y, x = np.ogrid[:30, :30, :30]
    sphere = lambda cx: ((z - 15) ** 2 + (y - 15) ** 2 + (x - cx) ** 2 <= 64).astype(np.uint8)  # noqa: E731
    ref, pred = (image(sphere(c), spacing=(1.5, 1.5, 1.5)) for c in (13, 15))
    s = score_masks("x", pred, ref, tolerance_mm=3.0)
    assert 0.0 < s.hd95_mm <= 3.0 + 1e-6
    assert s.surface_dice == pytest.approx(1.0)
    assert 0.5 < s.dice < 0.9


@pytest.mark.parametrize(
    "pred_full, ref_full, expected",
    [(False, False, (1.0, 1.0, 0.0)), (True, False, (0.0, 0.0, math.inf)), (False, True, (0.0, 0.0, math.inf))],
)
def test_empty_masks_documented_values(pred_full, ref_full, expected):
    """MONAI answers nan here; we answer what the module docstring promises."""
    empty, full = np.zeros(SHAPE), cube((5, 5, 5))
    s = score_masks("x", image(full if pred_full else empty), image(full if ref_full else empty))
    assert (s.dice, s.surface_dice, s.hd95_mm) == expected


def test_mismatched_grid_is_resampled_with_a_warning(tmp_path):
    """The same cube at half the voxel size (voxel centres landing exactly on reference centres)
    resamples to the reference cube exactly: Dice 1, and the user is told."""
    ref = write(tmp_path / "ref.nii.gz", cube((5, 5, 5), value=5))
    fine = np.zeros((40, 60, 60), np.uint8)
    fine[10:30, 10:30, 10:30] = 5
    pred = write(tmp_path / "pred.nii.gz", fine, spacing=(0.5, 0.5, 0.5))
    progress = Recorder()
    [s] = evaluate(pred, ref, parse_structure_selectors(["liver=5"]), progress=progress)
    assert s.dice == pytest.approx(1.0) and s.pred_voxels == 1000
    assert len(progress.warnings) == 1 and "resampled" in progress.warnings[0]


def test_disjoint_grids_are_refused(tmp_path):
    ref = write(tmp_path / "ref.nii.gz", cube((5, 5, 5), value=5))
    pred = write(tmp_path / "pred.nii.gz", cube((5, 5, 5), value=5), origin=(500.0, 0.0, 0.0))
    with pytest.raises(InputError, match="do not overlap"):
        evaluate(pred, ref, parse_structure_selectors(["liver=5"]))


def write_seg(path: Path, segments: dict[str, np.ndarray], spacing=(1.0, 1.0, 1.0)) -> Path:
    """A Slicer .seg.nrrd (slicerio indexes voxels i, j, k: the numpy (z, y, x) array transposed)."""
    import slicerio

    seg = slicerio.create_segmentation(SHAPE[::-1], np.diag([*spacing, 1.0]))
    for name, mask in segments.items():
        slicerio.add_segment(seg, mask.transpose(2, 1, 0) > 0, {"id": name, "name": name})
    slicerio.write_segmentation(str(path), seg)
    return path


def test_seg_nrrd_prediction_selected_by_name(tmp_path):
    """NAME=VALUE picks the prediction's segment by NAME, not by VALUE: here the .seg.nrrd stores liver
    as label 1 and spleen as 2 while the reference uses 5 and 1, so matching by value would be wrong."""
    liver, spleen = cube((2, 2, 2), size=8), cube((2, 15, 15), size=8)
    pred = write_seg(tmp_path / "pred.seg.nrrd", {"liver": liver, "spleen": spleen})
    ref = write(tmp_path / "ref.nii.gz", liver * 5 + spleen * 1)
    scores = evaluate(pred, ref, parse_structure_selectors(["liver=5", "spleen=1"]))
    assert [(s.name, s.dice, s.pred_voxels) for s in scores] == [("liver", 1.0, 512), ("spleen", 1.0, 512)]
    with pytest.raises(InputError, match="NAME=VALUE"):  # no --structure and a label-map reference
        evaluate(pred, ref, [])
    # no --structure, two segmentations: every segment naming a known structure, matched by name
    assert [(s.name, s.dice) for s in evaluate(pred, pred, [])] == [("liver", 1.0), ("spleen", 1.0)]


def test_name_falls_back_to_value_with_a_warning(tmp_path):
    """NAME=VALUE on a segmentation without a segment NAME uses VALUE there too, and says so."""
    pred = write_seg(tmp_path / "pred.seg.nrrd", {"blob": cube((2, 2, 2), size=8)})
    ref = write(tmp_path / "ref.nii.gz", cube((2, 2, 2), size=8))
    progress = Recorder()
    [s] = evaluate(pred, ref, parse_structure_selectors(["liver=1"]), progress=progress)
    assert s.dice == 1.0 and "using label value 1" in progress.warnings[0]


@pytest.mark.parametrize(
    "spec, expected",
    [("liver=5", ("liver", "liver", "5")), ("liver=1:5", ("liver", "1", "5")), (" liver = Liver:5 ", ("liver", "Liver", "5")), ("liver", ("liver", "liver", "liver"))],
)
def test_selector_rule(spec, expected):
    assert parse_structure_selectors([spec]) == [expected]


@pytest.mark.parametrize("specs", [["=5"], ["liver="], ["liver=:5"], ["liver=1:"], ["liver=5", "liver=6"]])
def test_bad_selectors_rejected(specs):
    with pytest.raises(InputError, match="--structure"):
        parse_structure_selectors(specs)


def test_absent_value_missing_file_and_name_on_label_map(tmp_path):
    """Each a one-line InputError naming the file, never a traceback from deep inside."""
    ref = write(tmp_path / "ref.nii.gz", cube((5, 5, 5), value=5))
    with pytest.raises(InputError, match="ref.nii.gz"):
        evaluate(ref, ref, parse_structure_selectors(["liver=99"]))
    with pytest.raises(InputError, match="file not found"):
        evaluate(tmp_path / "nope.nii.gz", ref, parse_structure_selectors(["liver=5"]))
    with pytest.raises(InputError, match="liver=VALUE"):
        evaluate(ref, ref, parse_structure_selectors(["liver"]))


def test_json_csv_and_table(tmp_path):
    """Both files parse back; inf is JSON null (strict JSON has no inf) and "inf" in CSV and on screen;
    no temporary file is left beside them."""
    scores = [score_masks("liver", image(cube((5, 5, 5))), image(cube((5, 5, 7)))),
              score_masks("spleen", image(np.zeros(SHAPE)), image(cube((5, 5, 5))))]
    write_scores_json(tmp_path / "s.json", scores, {"pred": "p.nii.gz", "tolerance_mm": 2.0})
    write_scores_csv(tmp_path / "s.csv", scores)
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["meta"]["tolerance_mm"] == 2.0
    assert data["structures"][0]["dice"] == pytest.approx(0.8) and data["structures"][1]["hd95_mm"] is None
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert float(rows[0]["dice"]) == pytest.approx(0.8) and rows[1]["hd95_mm"] == "inf"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "s.json"]
    lines = scores_table(scores).splitlines()
    assert len(lines) == 3 and len({len(line) for line in lines}) == 1 and "inf" in lines[2]


@pytest.mark.slow
@pytest.mark.skipif(not REAL_LABELS.exists(), reason=f"real data absent: {REAL_LABELS}")
def test_real_reference_against_itself():
    """TotalSegmentator's liver (value 5) on a real 3-mm abdomen scores perfectly against itself."""
    [s] = evaluate(REAL_LABELS, REAL_LABELS, parse_structure_selectors(["liver=5"]))
    assert (s.dice, s.surface_dice, s.hd95_mm) == (1.0, 1.0, 0.0) and s.ref_voxels > 0
