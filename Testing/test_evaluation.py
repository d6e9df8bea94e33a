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


# ----------------------------------------------------------------------------- paper scoring


@pytest.fixture
def phantom(tmp_path, monkeypatch):
    """A 1.5-mm CT phantom (so the 1.5-mm model space is the same voxels, cropped to the body), its
    sphere as the prediction, the sphere plus a detached 2^3 blob as reference value 1, a cube as
    value 2, and a private registry whose 1.5-mm model has no weights on disk."""
    from synthetic import body_phantom

    ct, sphere = body_phantom(size=(40, 36, 30), spacing=(1.5, 1.5, 1.5), origin=(0.0, 0.0, 0.0))
    blob = np.zeros_like(sphere)
    blob[15:17, 17:19, 7:9] = True  # inside the body, 4 voxels clear of the sphere
    other = np.zeros(sphere.shape, np.uint8)
    other[12:16, 5:9, 17:21] = 2

    def save(array, name):
        mask = sitk.GetImageFromArray(np.asarray(array, np.uint8))
        mask.CopyInformation(ct)
        sitk.WriteImage(mask, str(tmp_path / name))
        return str(tmp_path / name)

    registry = tmp_path / "models.json"
    registry.write_text(json.dumps({"models": [{
        "name": "space-test", "description": "architecture only", "architecture": {"spacing_mm": 1.5, "hu_window": [-175, 250]},
        "files": [{"url": "http://127.0.0.1:9/none.pt", "filename": "none.pt", "sha256": None, "size": None}],
    }]}))
    monkeypatch.setenv("FSEFT_REGISTRY", str(registry))
    monkeypatch.setenv("FSEFT_CACHE", str(tmp_path / "cache"))
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    n = int(sphere.sum())
    return {"image": str(tmp_path / "ct.nii.gz"), "pred": save(sphere, "pred.nii.gz"), "ref": save(sphere | blob, "ref.nii.gz"),
            "ref2": save((sphere | blob) + other, "ref2.nii.gz"), "n": n, "blob": int(blob.sum()), "other": int((other > 0).sum())}


def evaluate_cli(capsys, files, *options):
    from FSEFTSegmentLib.cli import main

    code = main(["evaluate", "--pred", files["pred"], "--ref", files["ref"], "--structure", "organ=1", *options])
    return code, capsys.readouterr()


def test_paper_dice_has_one_in_the_denominator_only(tmp_path):
    """In the model space (here the native voxels): a 6^3 cube shifted by 2 voxels keeps 144 of 216,
    so Dice is 2*144/(216+216+1) (native: 2*144/432); the cube against itself gives 432/433, not 1."""
    from synthetic import body_phantom

    from FSEFTSegmentLib.evaluation import Scoring
    from FSEFTSegmentLib.model.network import Architecture

    ct, _ = body_phantom(size=(40, 36, 30), spacing=(1.5, 1.5, 1.5), origin=(0.0, 0.0, 0.0))
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    geometry = {"spacing": (1.5, 1.5, 1.5)}
    ref = write(tmp_path / "ref.nii.gz", cube((12, 15, 17), size=6, shape=(30, 36, 40)), **geometry)
    pred = write(tmp_path / "pred.nii.gz", cube((12, 15, 19), size=6, shape=(30, 36, 40)), **geometry)
    paper = Scoring("paper", tmp_path / "ct.nii.gz", "default", Architecture())
    [native] = evaluate(pred, ref, parse_structure_selectors(["x=1"]))
    [shifted] = evaluate(pred, ref, parse_structure_selectors(["x=1"]), scoring=paper)
    [same] = evaluate(ref, ref, parse_structure_selectors(["x=1"]), scoring=paper)
    assert native.dice == pytest.approx(288 / 432) and native.scoring == "native"
    assert shifted.dice == pytest.approx(288 / 433) and shifted.scoring == "paper"
    assert (same.dice, same.pred_voxels, same.ref_voxels) == (pytest.approx(432 / 433), 216, 216)
    assert same.ref_volume_ml == pytest.approx(216 * 1.5**3 / 1000)


def test_paper_scoring_cuts_a_binary_reference_to_its_largest_component(phantom, capsys, tmp_path):
    """The reference's detached blob counts natively, 2n/(2n + blob); the paper's binary task drops it:
    2n/(2n + 1). The table, the JSON and the CSV say which scoring each number is."""
    code, _ = evaluate_cli(capsys, phantom, "--json", str(tmp_path / "n.json"))
    n, blob = phantom["n"], phantom["blob"]
    assert code == 0 and json.loads((tmp_path / "n.json").read_text())["structures"][0]["dice"] == pytest.approx(2 * n / (2 * n + blob))
    code, out = evaluate_cli(capsys, phantom, "--scoring", "paper", "--image", phantom["image"], "--model", "space-test",
                             "--json", str(tmp_path / "p.json"), "--csv", str(tmp_path / "p.csv"))
    assert code == 0, out.err
    assert out.out.splitlines()[0] == "scoring: paper (model space 1.5 mm of space-test, +1 in the denominator, reference largest component)"
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["meta"]["scoring"] == "paper" and data["meta"]["reference_largest_component"] is True
    [row] = data["structures"]
    assert (row["dice"], row["ref_voxels"], row["scoring"]) == (pytest.approx(2 * n / (2 * n + 1)), n, "paper")
    assert next(csv.DictReader((tmp_path / "p.csv").open()))["scoring"] == "paper"


def test_paper_scoring_of_two_structures_keeps_the_whole_reference(phantom, capsys, tmp_path):
    """Not a binary task: the blob stays in the reference, 2n/(2n + blob + 1). Without --model, the
    registry's default model gives the space."""
    from FSEFTSegmentLib.cli import main

    code = main(["evaluate", "--pred", phantom["ref2"], "--ref", phantom["ref2"], "--structure", "organ=1", "--structure", "other=2",
                 "--scoring", "paper", "--image", phantom["image"], "--json", str(tmp_path / "s.json")])
    out = capsys.readouterr().out
    assert code == 0 and "reference whole: 2 structures" in out.splitlines()[0]
    organ, other = json.loads((tmp_path / "s.json").read_text())["structures"]
    m = phantom["n"] + phantom["blob"]
    assert (organ["dice"], organ["ref_voxels"]) == (pytest.approx(2 * m / (2 * m + 1)), m)
    assert other["dice"] == pytest.approx(2 * phantom["other"] / (2 * phantom["other"] + 1))


def test_native_output_is_unchanged(phantom, capsys):
    """The default prints the table alone, exactly as before --scoring existed."""
    code, out = evaluate_cli(capsys, phantom)
    assert code == 0 and out.out == (
        "structure    Dice  surfDice  HD95 mm  pred ml  ref ml  pred vox  ref vox\n"
        "organ      0.9967    0.9905     0.00     4.08    4.10      1208     1216\n"
    )


@pytest.mark.parametrize("options, message", [(["--scoring", "paper"], "--scoring paper needs --image"),
                                              (["--image", "ct.nii.gz"], "--image and --model go with --scoring paper")])
def test_paper_options_misused_fail_in_one_line(phantom, capsys, options, message):
    code, out = evaluate_cli(capsys, phantom, *options)
    lines = out.err.strip().splitlines()
    assert code == 2 and out.out == "" and len(lines) == 1 and message in lines[0]
