"""`fseft` end to end, as a user runs it: real subprocesses, real files, real exit codes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from conftest import SHARED_DATA, fseft, terminate_on_event
from synthetic import body_phantom, oblique_direction

REAL_CT = SHARED_DATA / "real-ct" / "totalseg-abdomen" / "ct.nii.gz"
REAL_LABELS = SHARED_DATA / "real-ct" / "totalseg-abdomen" / "labels-totalsegmentator.nii.gz"
REAL_MR = SHARED_DATA / "real-ct" / "totalseg-mr" / "mr.nii.gz"
def json_events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("fseft: error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def geometry(image: sitk.Image):
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def test_predict_real_ct_end_to_end(environment, tmp_path):
    if not REAL_CT.exists():
        pytest.skip(f"real CT not found at {REAL_CT}")
    out = tmp_path / "out"
    result = fseft(["predict", "--model", "tiny-test", "--structures", "liver,left kidney,Spleen", "--format", "seg.nrrd,nii.gz",
                    "--out", str(out), "--progress", "json", str(REAL_CT)], environment)
    assert result.returncode == 0, result.stderr
    events = json_events(result.stdout)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "info" and "start" in kinds and kinds[-1] == "summary"
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    done = next(e for e in events if e["event"] == "study_done")
    assert done["study"] == "ct" and set(done["voxels"]) == {"liver", "kidney_left", "spleen"}
    assert events[-1]["succeeded"] == 1 and events[-1]["failed"] == 0

    ct = sitk.ReadImage(str(REAL_CT))
    segmentation = slicerio.read_segmentation(str(out / "ct.seg.nrrd"))
    assert [s["id"] for s in segmentation["segments"]] == ["liver", "kidney_left", "spleen"]
    assert [s["name"] for s in segmentation["segments"]] == ["Liver", "Left kidney", "Spleen"]
    liver = segmentation["segments"][0]["terminology"]["type"]
    assert liver[:2] == ["SCT", "10200004"]
    ijk_to_lps = np.asarray(ct.GetDirection()).reshape(3, 3) @ np.diag(ct.GetSpacing())
    np.testing.assert_allclose(segmentation["ijkToLPS"][:3, :3], ijk_to_lps, atol=1e-6)
    np.testing.assert_allclose(segmentation["ijkToLPS"][:3, 3], ct.GetOrigin(), atol=1e-4)

    label_map = sitk.ReadImage(str(out / "ct.nii.gz"))
    for ours, theirs in zip(geometry(label_map), geometry(ct)):
        np.testing.assert_allclose(ours, theirs, atol=1e-4)
    table = json.loads((out / "ct.labels.json").read_text(encoding="utf-8"))
    assert [entry["name"] for entry in table["labels"]] == ["liver", "kidney_left", "spleen"]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_oblique_anisotropic_input_comes_back_on_its_grid(environment, tmp_path):
    image, _ = body_phantom(size=(60, 50, 16), spacing=(1.1, 0.8, 5.0), direction=oblique_direction())
    path = tmp_path / "oblique.nrrd"
    sitk.WriteImage(image, str(path))
    result = fseft(["predict", "--model", "tiny-test", "--format", "nii.gz", "--out", str(tmp_path / "out"), "--progress", "none", str(path)], environment)
    assert result.returncode == 0, result.stderr
    written = sitk.ReadImage(str(tmp_path / "out" / "oblique.nii.gz"))
    for ours, theirs in zip(geometry(written), geometry(image)):
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_batch_goes_on_after_a_bad_study(environment, tmp_path):
    good, _ = body_phantom()
    sitk.WriteImage(good, str(tmp_path / "good.nii.gz"))
    (tmp_path / "broken.nii.gz").write_bytes(b"this is not an image")
    studies = tmp_path / "studies.csv"
    studies.write_text("id,image\npatient-1,good.nii.gz\npatient-2,broken.nii.gz\npatient-3,missing.nrrd\n", encoding="utf-8")
    out = tmp_path / "out"
    result = fseft(["predict", "--model", "tiny-test", "--out", str(out), "--progress", "json", str(studies)], environment)
    assert result.returncode == 5
    summary = json_events(result.stdout)[-1]
    assert summary["event"] == "summary" and summary["succeeded"] == 1 and summary["failed"] == 2
    assert "broken.nii.gz" in summary["failures"]["patient-2"] and "missing.nrrd" in summary["failures"]["patient-3"]
    assert sorted(p.name for p in out.iterdir()) == ["patient-1.seg.nrrd"]
    assert_one_line_error(result, "2 of 3 studies failed")


def test_not_ct_gets_a_warning(environment, tmp_path):
    if not REAL_MR.exists():
        pytest.skip(f"real MR not found at {REAL_MR}")
    result = fseft(["predict", "--model", "tiny-test", "--structures", "liver", "--out", str(tmp_path), "--progress", "none", str(REAL_MR)], environment)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "mr.nii.gz" in warnings[0] and "CT" in warnings[0]


def two_d_image(path: Path) -> Path:
    sitk.WriteImage(sitk.Image(32, 32, sitk.sitkInt16), str(path))
    return path


@pytest.mark.parametrize(
    "make_input, fragments",
    [
        (lambda d: (d / "corrupt.nii.gz").write_bytes(b"\x1f\x8b garbage") and d / "corrupt.nii.gz", ["corrupt.nii.gz"]),
        (lambda d: two_d_image(d / "slice.nrrd"), ["slice.nrrd", "3D"]),
        (lambda d: (d / "empty.txt").write_text("# nothing here\n", encoding="utf-8") and d / "empty.txt", ["empty.txt", "empty"]),
        (lambda d: d / "does-not-exist.txt", ["does-not-exist.txt"]),
    ],
    ids=["corrupt-file", "not-3d", "empty-study-list", "missing-study-list"],
)
def test_bad_inputs_fail_with_one_line(environment, tmp_path, make_input, fragments):
    path = make_input(tmp_path)
    out = tmp_path / "out"
    result = fseft(["predict", "--model", "tiny-test", "--out", str(out), str(path)], environment)
    assert_one_line_error(result, *fragments)
    assert not out.exists() or not any(out.iterdir())


def test_unknown_structure(environment, tmp_path):
    image, _ = body_phantom()
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    result = fseft(["predict", "--model", "tiny-test", "--structures", "liver,pancreaz", str(tmp_path / "ct.nii.gz")], environment, cwd=tmp_path)
    assert_one_line_error(result, "pancreaz", "pancreas")
    assert result.returncode == 2


def test_wrong_checkpoint_layout_and_pickles_are_refused(environment, tmp_path):
    import torch

    image, _ = body_phantom()
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    result = fseft(["predict", "--model", str(tmp_path / "other.pt"), str(tmp_path / "ct.nii.gz")], environment, cwd=tmp_path)
    assert_one_line_error(result, "other.pt")
    assert result.returncode == 3

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": Exploit()}, tmp_path / "evil.pt")
    result = fseft(["predict", "--model", str(tmp_path / "evil.pt"), str(tmp_path / "ct.nii.gz")], environment, cwd=tmp_path)
    assert_one_line_error(result, "evil.pt", "refused")
    assert not marker.exists()


def test_option_errors(environment, tmp_path):
    image, _ = body_phantom()
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    result = fseft(["predict", "--model", "tiny-test", "--format", "png", "ct.nii.gz"], environment, cwd=tmp_path)
    assert_one_line_error(result, "png")
    result = fseft(["predict", "--model", "no-such-model", "ct.nii.gz"], environment, cwd=tmp_path)
    assert_one_line_error(result, "no-such-model")


def test_sigterm_cancels_without_partial_output(environment, tmp_path):
    image, _ = body_phantom(size=(120, 120, 60), spacing=(1.5, 1.5, 3.0))
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    out = tmp_path / "out"
    code, stderr, seconds = terminate_on_event(["predict", "--model", "tiny-test", "--out", str(out), str(tmp_path / "ct.nii.gz")], environment, "progress")
    assert code == 130 and "cancelled" in stderr and "Traceback" not in stderr
    assert seconds < 30
    assert not out.exists() or not any(out.iterdir())


def test_models_list(environment):
    result = fseft(["models", "list"], environment)
    assert result.returncode == 0
    assert any(line.split()[:2] == ["tiny-test", "imported"] or line.startswith("tiny-test") for line in result.stdout.splitlines())


def test_evaluate_prediction_against_reference(environment, tmp_path):
    if not REAL_LABELS.exists():
        pytest.skip(f"real labels not found at {REAL_LABELS}")
    report = tmp_path / "scores.json"
    result = fseft(["evaluate", "--pred", str(REAL_LABELS), "--ref", str(REAL_LABELS), "--structure", "liver=5", "--structure", "spleen=1", "--json", str(report)], environment)
    assert result.returncode == 0, result.stderr
    assert "liver" in result.stdout and "spleen" in result.stdout
    scores = json.loads(report.read_text(encoding="utf-8"))["structures"]
    assert [s["dice"] for s in scores] == [1.0, 1.0]


def test_pretrain_with_a_bad_config(environment, tmp_path):
    config = tmp_path / "pretrain.yaml"
    config.write_text("datasets: []\n", encoding="utf-8")
    result = fseft(["pretrain", "--config", str(config)], environment)
    assert_one_line_error(result, "pretrain.yaml")
    assert result.returncode == 2


def test_pretrain_validate_and_export_name_a_missing_or_misplaced_checkpoint(environment, tmp_path):
    config = Path(__file__).resolve().parents[1] / "Resources" / "pretraining" / "fseft-mini.yaml"
    if not (SHARED_DATA / "label-maps").is_dir():
        pytest.skip(f"the bundled model's label maps are not at {SHARED_DATA / 'label-maps'}")
    missing = tmp_path / "no-such-checkpoint.pt"
    for action in (["--validate"], ["--export", str(tmp_path / "model.safetensors")]):
        result = fseft(["pretrain", "--config", str(config), *action, "--checkpoint", str(missing)], environment)
        assert_one_line_error(result, "no such checkpoint", str(missing))
    assert not (tmp_path / "model.safetensors").exists()
    result = fseft(["pretrain", "--config", str(config), "--checkpoint", str(missing)], environment)
    assert_one_line_error(result, "--checkpoint goes with --export or --validate")
