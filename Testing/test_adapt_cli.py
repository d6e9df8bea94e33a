"""`fseft adapt` end to end: real supports on disk, a real training run, a real adapter folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from safetensors.torch import load_file

from conftest import SHARED_DATA, fseft, terminate_on_event
from FSEFTSegmentLib.io.segmentations import write_segmentation
from FSEFTSegmentLib.labels import resolve_structure
from synthetic import body_phantom

REAL_CT = SHARED_DATA / "real-ct" / "totalseg-abdomen" / "ct.nii.gz"
REAL_LABELS = SHARED_DATA / "real-ct" / "totalseg-abdomen" / "labels-totalsegmentator.nii.gz"
FAST = ["--max-epochs", "2", "--crops-per-step", "1", "--progress", "json"]


@pytest.fixture
def supports(tmp_path):
    """Two phantoms (sphere = 'liver', label value 3) as image + label-map files."""
    pairs = []
    for number, shift in enumerate((0.0, 6.0)):
        image, organ = body_phantom(size=(60, 56, 40), spacing=(1.5, 1.5, 3.0), origin=(shift, 0.0, 0.0))
        image_path, label_path = tmp_path / f"case{number}.nii.gz", tmp_path / f"case{number}-labels.nii.gz"
        labels = sitk.GetImageFromArray(organ.astype(np.uint8) * 3)
        labels.CopyInformation(image)
        sitk.WriteImage(image, str(image_path))
        sitk.WriteImage(labels, str(label_path))
        pairs.append((image_path, label_path))
    return pairs


def events_of(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("fseft: error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_adapt_writes_a_complete_adapter(environment, supports, tmp_path):
    (image0, labels0), (image1, labels1) = supports
    out = tmp_path / "liver-adapter"
    result = fseft(["adapt", "--model", "tiny-test", "--method", "spatial-adapter", "--support", str(image0), f"{labels0}:3",
                    "--support", str(image1), f"{labels1}:3", "--structure", "liver", "--query", str(image1),
                    "--size-prior", "--predict-queries", "--out", str(out), *FAST], environment)
    assert result.returncode == 0, result.stderr
    events = events_of(result.stdout)
    assert events[-1]["event"] == "adapter" and events[-1]["path"] == str(out)
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2] and all({"loss", "lr", "eta", "elapsed"} <= set(e) for e in epochs)
    assert any(e["event"] == "warning" and "also a support" in e["message"] for e in events)

    metadata = json.loads((out / "adapter.json").read_text(encoding="utf-8"))
    assert metadata["method"] == "spatial-adapter" and metadata["k"] == 2 and metadata["seed"] == 0
    assert metadata["base_model"]["name"] == "tiny-test" and len(metadata["base_model"]["sha256"]) == 64
    assert [s["id"] for s in metadata["supports"]] == ["case0", "case1"]
    assert all(len(s["image_sha256"]) == 64 and len(s["labels_sha256"]) == 64 for s in metadata["supports"])
    structure = metadata["structures"][0]
    assert structure["name"] == "liver" and structure["pretrained_row"] == 5 and structure["terminology"]["type"][1] == "10200004"
    assert len(metadata["training_curve"]) == 2 and metadata["hyper_parameters"]["crops_per_step"] == 1
    prior = metadata["size_prior"]["liver"]
    assert prior["prior_voxels"] > 0 and set(prior["queries"]) == {"case1"}
    assert {"torch", "monai", "fseft"} <= set(metadata["versions"])
    low, high = metadata["expected_volumes_ml"]["liver"]
    assert 0 < low < 4.19 < high  # the sphere is 4.19 mL
    tensors = load_file(str(out / "adapter.safetensors"))
    assert set(tensors) == {"head.0.conv1.weight", "head.0.conv2.weight", "head.1.weight", "head.1.bias"}
    assert (out / "predictions" / "case1.seg.nrrd").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_per_query_size_prior_writes_one_adapter_per_query_and_predicts_each(environment, supports, tmp_path):
    """Two queries, the default per-query mode: the paper's episodes, each adapter beside --out
    named after its query, each query segmented by its own adapter; the joint mode writes one."""
    (image0, labels0), (image1, _) = supports
    out = tmp_path / "liver"
    common = ["adapt", "--model", "tiny-test", "--method", "linear-probe", "--support", str(image0), f"{labels0}:3",
              "--structure", "liver", "--query", str(image0), "--query", str(image1), "--size-prior", "--predict-queries", *FAST]
    result = fseft([*common, "--out", str(out), "--precision", "fp32"], environment)
    assert result.returncode == 0, result.stderr
    events = events_of(result.stdout)
    assert [e["path"] for e in events if e["event"] == "adapter"] == [str(tmp_path / "liver-case0"), str(tmp_path / "liver-case1")]
    assert not out.exists()
    for query in ("case0", "case1"):
        metadata = json.loads((tmp_path / f"liver-{query}" / "adapter.json").read_text(encoding="utf-8"))
        assert set(metadata["size_prior"]["liver"]["queries"]) == {query} and metadata["queries"] == [str(image0 if query == "case0" else image1)]
        assert metadata["precision"] == "fp32" and metadata["feature_cache"] is True
        assert metadata["hyper_parameters"]["size_prior_mode"] == "per-query" and metadata["hyper_parameters"]["weight_decay"] == 0.0
        assert [p.name for p in (tmp_path / f"liver-{query}" / "predictions").glob("*.seg.nrrd")] == [f"{query}.seg.nrrd"]
    assert {e["study"] for e in events if e["event"] == "study_done"} == {"case0", "case1"}

    joint = tmp_path / "joint"
    result = fseft([*common, "--out", str(joint), "--size-prior-mode", "joint", "--no-feature-cache"], environment)
    assert result.returncode == 0, result.stderr
    metadata = json.loads((joint / "adapter.json").read_text(encoding="utf-8"))
    assert set(metadata["size_prior"]["liver"]["queries"]) == {"case0", "case1"} and metadata["feature_cache"] is False
    assert sorted(p.name for p in (joint / "predictions").glob("*.seg.nrrd")) == ["case0.seg.nrrd", "case1.seg.nrrd"]


def test_segment_of_a_slicer_segmentation_is_a_support(environment, supports, tmp_path):
    (image0, labels0), _ = supports
    image, mask = sitk.ReadImage(str(image0)), sitk.GetArrayFromImage(sitk.ReadImage(str(labels0))) > 0
    segmentation = tmp_path / "case0.seg.nrrd"
    write_segmentation(segmentation, mask[None].astype(np.uint8), image, [resolve_structure("liver")])
    result = fseft(["adapt", "--model", "tiny-test", "--method", "linear-probe", "--support", str(image0), str(segmentation),
                    "--structure", "Liver", "--out", str(tmp_path / "a"), *FAST], environment)
    assert result.returncode == 0, result.stderr
    result = fseft(["adapt", "--model", "tiny-test", "--method", "linear-probe", "--support", str(image0), f"{segmentation}:Spleen",
                    "--structure", "liver", "--out", str(tmp_path / "b"), *FAST], environment)
    assert_one_line_error(result, "case0.seg.nrrd", "Spleen")
    assert not (tmp_path / "b").exists()


def test_bad_supports_fail_with_one_line(environment, supports, tmp_path):
    (image0, labels0), (image1, labels1) = supports
    out = tmp_path / "adapter"
    base = ["adapt", "--model", "tiny-test", "--out", str(out), *FAST]
    cases = [
        (["--method", "linear-probe", "--support", str(image0), f"{labels0}:7", "--structure", "liver"], ["case0-labels.nii.gz", "7"]),
        (["--method", "linear-probe", "--support", str(image0), f"{labels1}:3", "--structure", "liver"], []),
        (["--method", "linear-probe", "--structure", "liver"], ["no supports"]),
        (["--method", "prompt-tuning", "--support", str(image0), f"{labels0}:3", "--structure", "liver"], ["prompt-tuning", "linear-probe"]),
        (["--method", "full", "--tune-decoder", "--support", str(image0), f"{labels0}:3", "--structure", "liver"], ["tune-decoder"]),
    ]
    for arguments, fragments in cases:
        result = fseft([*base, *arguments], environment)
        assert_one_line_error(result, *fragments)
        assert not out.exists()

    # label on another grid than its image
    shifted = sitk.ReadImage(str(labels0))
    shifted.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(shifted, str(tmp_path / "other-grid.nii.gz"))
    result = fseft([*base, "--method", "linear-probe", "--support", str(image0), f"{tmp_path / 'other-grid.nii.gz'}:3", "--structure", "liver"], environment)
    assert_one_line_error(result, "other-grid.nii.gz", "grid")

    # a label that holds the value but no voxel of the target at all
    empty = sitk.Image(sitk.ReadImage(str(labels0)))
    empty = empty * 0
    empty[0, 0, 0] = 1
    sitk.WriteImage(empty, str(tmp_path / "empty.nii.gz"))
    result = fseft([*base, "--method", "linear-probe", "--support", str(image0), f"{tmp_path / 'empty.nii.gz'}:3", "--structure", "liver"], environment)
    assert_one_line_error(result, "empty.nii.gz")
    assert not out.exists()


def test_sigterm_cancels_and_leaves_no_adapter(environment, supports, tmp_path):
    (image0, labels0), _ = supports
    out = tmp_path / "adapter"
    code, stderr, seconds = terminate_on_event(
        ["adapt", "--model", "tiny-test", "--method", "lora", "--support", str(image0), f"{labels0}:3", "--structure", "liver",
         "--out", str(out), "--max-epochs", "200", "--crops-per-step", "1"], environment, "epoch")
    assert code == 130 and "cancelled" in stderr and "Traceback" not in stderr
    assert seconds < 30
    assert not out.exists() and not list(tmp_path.glob(".*adapter*"))


def test_adapt_on_the_real_ct(environment, tmp_path):
    if not REAL_CT.exists() or not REAL_LABELS.exists():
        pytest.skip(f"real CT or labels not found under {REAL_CT.parent}")
    out = tmp_path / "liver"
    result = fseft(["adapt", "--model", "tiny-test", "--method", "linear-probe", "--support", str(REAL_CT), f"{REAL_LABELS}:5",
                    "--structure", "liver", "--query", str(REAL_CT), "--size-prior", "--predict-queries", "--out", str(out), *FAST], environment)
    assert result.returncode == 0, result.stderr
    prediction = sitk.ReadImage(str(out / "predictions" / "ct.seg.nrrd"))
    ct = sitk.ReadImage(str(REAL_CT))
    assert prediction.GetSize()[:3] == ct.GetSize()
    np.testing.assert_allclose(prediction.GetOrigin()[:3], ct.GetOrigin(), atol=1e-3)
    metadata = json.loads((out / "adapter.json").read_text(encoding="utf-8"))
    assert metadata["size_prior"]["liver"]["prior_ml"] > 500  # a real liver, from its support label
