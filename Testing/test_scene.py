"""scene.py against real MRML (slicer-core, headless): exact geometry out, segmentations back in,
a scene left as it was after a bad file; and the module's Logic and self-test run on that MRML."""

from __future__ import annotations

import importlib.util
import stat
import sys
import types
import unittest
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (PyPI) is not installed")
sitk = pytest.importorskip("SimpleITK")
slicerio = pytest.importorskip("slicerio")

from FSEFTSegmentLib import scene  # noqa: E402
from FSEFTSegmentLib.errors import InputError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS, its own inverse

# Oblique (rotated about two axes) and anisotropic, with an origin that is not on any lattice.
_a, _b = np.deg2rad(25.0), np.deg2rad(-10.0)
ROTATION = (np.array([[np.cos(_a), -np.sin(_a), 0], [np.sin(_a), np.cos(_a), 0], [0, 0, 1]])
            @ np.array([[1, 0, 0], [0, np.cos(_b), -np.sin(_b)], [0, np.sin(_b), np.cos(_b)]]))
SPACING = np.array([0.71, 0.83, 2.5])
IJK_TO_RAS = np.eye(4)
IJK_TO_RAS[:3, :3] = ROTATION @ np.diag(SPACING)
IJK_TO_RAS[:3, 3] = [12.25, -40.5, 77.125]
SHAPE_KJI = (5, 6, 7)


def add_volume(mrml_scene, name="CT chest"):
    volume = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    voxels = np.arange(np.prod(SHAPE_KJI), dtype=np.int16).reshape(SHAPE_KJI) - 100
    slicer.util.updateVolumeFromArray(volume, voxels)
    volume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(IJK_TO_RAS))
    return volume


def liver_mask_kji():
    mask = np.zeros(SHAPE_KJI, bool)
    mask[1:4, 2:5, 1:3] = True
    mask[2, 1, 5] = True
    return mask


def write_seg(path, segments):
    """A .seg.nrrd as another program would write it (slicerio, (i,j,k) voxels, IJK-to-LPS)."""
    ijk_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ IJK_TO_RAS
    segmentation = slicerio.create_segmentation(SHAPE_KJI[::-1], ijk_to_lps)
    for name, color, mask_kji in segments:
        slicerio.add_segment(segmentation, mask_kji.transpose(2, 1, 0), {"id": name, "name": name, "color": color})
    slicerio.write_segmentation(str(path), segmentation)
    return path


# --- export_volume -----------------------------------------------------------------------------


def test_export_volume_keeps_oblique_anisotropic_geometry_exactly(mrml_scene, tmp_path):
    volume = add_volume(mrml_scene)
    path = scene.export_volume(volume, tmp_path / "job")

    assert path == tmp_path / "job" / "CT_chest.nrrd"
    assert sorted(p.name for p in path.parent.iterdir()) == ["CT_chest.nrrd"]  # no partial file left
    assert b"encoding: raw" in path.read_bytes()[:1000]
    image = sitk.ReadImage(str(path))
    direction = np.array(image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(image.GetSpacing(), SPACING, rtol=0, atol=1e-12)
    np.testing.assert_allclose(direction, LPS @ ROTATION, rtol=0, atol=1e-12)
    np.testing.assert_allclose(image.GetOrigin(), LPS @ IJK_TO_RAS[:3, 3], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), slicer.util.arrayFromVolume(volume))
    assert volume.GetStorageNode() is None  # the scene's own save settings are untouched


def test_export_volume_never_overwrites_and_makes_names_file_safe(mrml_scene, tmp_path):
    first = scene.export_volume(add_volume(mrml_scene, "a/b: c"), tmp_path)
    second = scene.export_volume(add_volume(mrml_scene, "a/b: c"), tmp_path)
    assert (first.name, second.name) == ("a_b_c.nrrd", "a_b_c_2.nrrd")


def test_export_volume_without_voxels_is_an_error_not_a_missing_file(mrml_scene, tmp_path):
    empty = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="could not write volume 'empty'"):
        scene.export_volume(empty, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_export_studies_writes_a_study_list_that_names_each_volume(mrml_scene, tmp_path):
    a, b = add_volume(mrml_scene, "CT"), add_volume(mrml_scene, "CT")
    study_list, volumes = scene.export_studies([a, b], tmp_path)
    assert study_list.read_text(encoding="utf-8").splitlines() == ["id,image", "CT,CT.nrrd", "CT_2,CT_2.nrrd"]
    assert volumes == {"CT": a, "CT_2": b}


# --- import_segmentation -----------------------------------------------------------------------


def test_import_segmentation_names_colours_and_voxels(mrml_scene, tmp_path):
    volume = add_volume(mrml_scene)
    spleen = np.zeros(SHAPE_KJI, bool)
    spleen[3:5, 0:2, 4:7] = True
    path = write_seg(tmp_path / "CT_chest.seg.nrrd",
                     [("liver", [0.8, 0.3, 0.2], liver_mask_kji()), ("spleen", [0.6, 0.2, 0.6], spleen)])

    node = scene.import_segmentation(mrml_scene, path, volume)

    segmentation = node.GetSegmentation()
    assert node.GetName() == "CT chest segmentation"
    assert [segmentation.GetNthSegment(i).GetName() for i in range(2)] == ["liver", "spleen"]
    np.testing.assert_allclose(segmentation.GetSegment("liver").GetColor(), [0.8, 0.3, 0.2])
    for name, expected in (("liver", liver_mask_kji()), ("spleen", spleen)):
        array = slicer.util.arrayFromSegmentBinaryLabelmap(node, name, volume)
        np.testing.assert_array_equal(array.astype(bool), expected)
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    assert node.GetNodeReference(role) is volume
    assert node.GetDisplayNode() is not None


def test_import_segmentation_sits_under_the_volume_study_and_transform(mrml_scene, tmp_path):
    volume = add_volume(mrml_scene)
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml_scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient")
    study = sh.CreateStudyItem(patient, "Study")
    sh.CreateItem(study, volume)
    path = write_seg(tmp_path / "x.seg.nrrd", [("liver", [0.8, 0.3, 0.2], liver_mask_kji())])

    node = scene.import_segmentation(mrml_scene, path, volume, name="Organs")

    assert node.GetName() == "Organs"
    assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study
    assert node.GetTransformNodeID() == transform.GetID()


@pytest.mark.parametrize("content", [
    b"",
    b"NRRD0004\ntype: uchar\nthis is not a field\n\n",
    "truncated",
])
def test_a_bad_file_raises_one_line_and_leaves_the_scene_as_it_was(mrml_scene, tmp_path, content):
    volume = add_volume(mrml_scene)
    path = tmp_path / "bad.seg.nrrd"
    if content == "truncated":  # valid header, data cut short: ITK would abort the process
        data = write_seg(path, [("liver", [0.8, 0.3, 0.2], liver_mask_kji())]).read_bytes()
        path.write_bytes(data[: len(data) - 40])
    else:
        path.write_bytes(content)
    before = mrml_scene.GetNumberOfNodes()

    with pytest.raises(InputError) as raised:
        scene.import_segmentation(mrml_scene, path, volume)

    assert str(path) in str(raised.value) and "\n" not in str(raised.value)
    assert mrml_scene.GetNumberOfNodes() == before


@pytest.mark.parametrize("dimension, error", [(5, "not a readable segmentation"), (2, "holds no segments")])
def test_a_well_formed_nrrd_slicer_refuses_is_removed_from_the_scene_too(mrml_scene, tmp_path, dimension, error):
    """Valid NRRD, not a segmentation: ReadData returns 0 (5D) or reads nothing (2D); the node goes."""
    volume = add_volume(mrml_scene)
    path = tmp_path / "image.seg.nrrd"
    sizes = " ".join(["2"] * dimension).encode()
    path.write_bytes(b"NRRD0004\ntype: uchar\ndimension: %d\nsizes: %s\nencoding: raw\n\n" % (dimension, sizes)
                     + bytes(2 ** dimension))
    before = mrml_scene.GetNumberOfNodes()

    with pytest.raises(InputError, match=error):
        scene.import_segmentation(mrml_scene, path, volume)
    assert mrml_scene.GetNumberOfNodes() == before


def test_import_results_imports_what_it_can_then_reports_the_rest(mrml_scene, tmp_path):
    volume = add_volume(mrml_scene)
    good = write_seg(tmp_path / "CT.seg.nrrd", [("liver", [0.8, 0.3, 0.2], liver_mask_kji())])
    outputs = {"CT": [good, tmp_path / "CT.json"], "other": [tmp_path / "other.seg.nrrd"]}

    with pytest.raises(InputError, match="'other' is not one of this run's volumes"):
        scene.import_results(mrml_scene, outputs, {"CT": volume})
    assert mrml_scene.GetFirstNodeByClass("vtkMRMLSegmentationNode").GetName() == "CT chest segmentation"


# --- the Slicer module's Logic and self-test, on this MRML with the Qt parts stubbed --------------


@pytest.fixture
def module(mrml_scene, tmp_path, monkeypatch):
    """FSEFTSegment/FSEFTSegment.py imported with stand-ins for what only the application has."""
    class Base:
        def __init__(self, parent=None):
            self.parent = parent

    class Test(unittest.TestCase):
        def delayDisplay(self, message):
            pass

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setitem(sys.modules, "qt", types.ModuleType("qt"))
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", types.SimpleNamespace(
        parameterNodeWrapper=lambda cls: cls, Choice=lambda choices: choices))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", types.SimpleNamespace(
        ScriptedLoadableModule=Base, ScriptedLoadableModuleWidget=Base,
        ScriptedLoadableModuleLogic=Base, ScriptedLoadableModuleTest=Test))
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(temporaryPath=str(tmp_path)), raising=False)
    spec = importlib.util.spec_from_file_location("FSEFTSegment_under_test", ROOT / "FSEFTSegment" / "FSEFTSegment.py")
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    monkeypatch.setattr(loaded, "python_executable", lambda: sys.executable)
    return loaded


def test_module_self_test_passes_headless(module):
    module.FSEFTSegmentTest("test_roundtrip_through_stand_in_engine").runTest()


STAND_IN_ENGINE = """\
#!{python}
# Stands for `python -m FSEFTSegmentLib predict ... --progress json STUDY_LIST`: reads the study list,
# "segments" each volume (a box) and reports like the engine.
import csv, json, sys
from pathlib import Path
import numpy as np, SimpleITK as sitk, slicerio
args = sys.argv[1:]
assert args[:4] == ["-m", "FSEFTSegmentLib", "predict", "--model"], args
option = lambda name: args[args.index(name) + 1]
assert option("--progress") == "json" and option("--format") == "seg.nrrd", args
out = Path(option("--out")); out.mkdir(parents=True)
study_list = Path(args[-1])
rows = list(csv.DictReader(open(study_list, encoding="utf-8")))
print(json.dumps({{"event": "start", "studies": len(rows), "structures": option("--structures")}}))
for row in rows:
    image = sitk.ReadImage(str(study_list.parent / row["image"]))
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    ijk_to_lps[:3, 3] = image.GetOrigin()
    segmentation = slicerio.create_segmentation(image.GetSize(), ijk_to_lps)
    mask = np.zeros(image.GetSize(), bool); mask[1:3, 2:4, 1:4] = True
    slicerio.add_segment(segmentation, mask, {{"id": "liver", "name": "liver", "color": [0.8, 0.3, 0.2]}})
    path = out / (row["id"] + ".seg.nrrd")
    slicerio.write_segmentation(str(path), segmentation)
    print(json.dumps({{"event": "study_done", "study": row["id"], "outputs": [str(path)], "message": "done"}}))
print(json.dumps({{"event": "summary", "succeeded": len(rows), "failed": 0}}))
"""


def test_module_logic_runs_a_batch_through_the_engine_command_line(module, mrml_scene, tmp_path, monkeypatch):
    engine = tmp_path / "engine"
    engine.write_text(STAND_IN_ENGINE.format(python=sys.executable))
    engine.chmod(engine.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(module, "python_executable", lambda: str(engine))
    volumes = [add_volume(mrml_scene, "CT"), add_volume(mrml_scene, "CT")]

    logic = module.FSEFTSegmentLogic()
    job = logic.run(volumes, "fseft-swinunetr", "liver, spleen", "cpu", waitForCompletion=True)

    assert job.state is module.JobState.COMPLETED, job.message
    assert job.command[job.command.index("--structures") + 1] == "liver,spleen"
    results = [mrml_scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode") for i in range(2)]
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    assert [r.GetNodeReference(role) for r in results] == volumes
    expected = np.zeros(SHAPE_KJI, bool)
    expected[1:4, 2:4, 1:3] = True
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(results[1], "liver", volumes[1]), expected)
    assert logic.temporaryFolder is None and list(tmp_path.glob("FSEFTSegment-*")) == []
