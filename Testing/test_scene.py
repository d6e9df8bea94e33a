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


# --- export_supports: annotated volumes out as image + label map --------------------------------


def add_annotation(mrml_scene, volume, segments, name="Annotations"):
    """A segmentation drawn on `volume` as in the Segment Editor: reference geometry = the volume."""
    node = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for segment, mask in segments:
        segment_id = node.GetSegmentation().AddEmptySegment("", segment, [0.9, 0.7, 0.2])
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), node, segment_id, volume)
    return node


def node_ids(mrml_scene):
    return sorted(mrml_scene.GetNthNode(i).GetID() for i in range(mrml_scene.GetNumberOfNodes()))


def test_export_supports_writes_the_segment_as_a_label_map_on_the_volume_grid(mrml_scene, tmp_path):
    volume = add_volume(mrml_scene)
    pancreas = np.zeros(SHAPE_KJI, bool)
    pancreas[0, 0, 0] = pancreas[4, 5, 6] = True  # opposite corners: a cropped export would lose the lattice
    pancreas[2:4, 1:3, 2:6] = True
    annotation = add_annotation(mrml_scene, volume, [("liver", liver_mask_kji()), ("pancreas", pancreas)])
    before = node_ids(mrml_scene)

    [(image, label)] = scene.export_supports(mrml_scene, [(volume, annotation)], "pancreas", tmp_path / "supports")

    assert (image, label) == (tmp_path / "supports" / "CT_chest.nrrd", tmp_path / "supports" / "labels" / "CT_chest.nrrd")
    assert b"encoding: raw" in label.read_bytes()[:1000]
    ct, labels = sitk.ReadImage(str(image)), sitk.ReadImage(str(label))
    for read in (ct, labels):
        np.testing.assert_allclose(read.GetSpacing(), SPACING, rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.array(read.GetDirection()).reshape(3, 3), LPS @ ROTATION, rtol=0, atol=1e-12)
        np.testing.assert_allclose(read.GetOrigin(), LPS @ IJK_TO_RAS[:3, 3], rtol=0, atol=1e-12)
    assert labels.GetSize() == ct.GetSize() == SHAPE_KJI[::-1]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), pancreas.astype(np.int16))  # value 1, liver absent
    assert node_ids(mrml_scene) == before  # the label map, its display node and colour table are gone


def test_export_supports_finds_a_segment_by_name_whatever_its_case(mrml_scene, tmp_path):
    volume = add_volume(mrml_scene)
    annotation = add_annotation(mrml_scene, volume, [("Pancreas", liver_mask_kji())])
    [(_, label)] = scene.export_supports(mrml_scene, [(volume, annotation)], "pancreas", tmp_path)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(label))).sum() == liver_mask_kji().sum()


@pytest.mark.parametrize("segments, error", [
    ([("liver", liver_mask_kji()), ("spleen", liver_mask_kji())],
     "segmentation 'Annotations' has no segment 'pancreas' (it has: 'liver', 'spleen')"),
    ([], "segmentation 'Annotations' has no segment 'pancreas' (it has: no segments)"),
    ([("pancreas", np.zeros(SHAPE_KJI, bool))], "segment 'pancreas' of 'Annotations' is empty: draw it on 'CT chest' first"),
])
def test_export_supports_refuses_a_missing_or_empty_segment_in_one_line_leaving_no_nodes(
        mrml_scene, tmp_path, segments, error):
    volume = add_volume(mrml_scene)
    annotation = add_annotation(mrml_scene, volume, segments)
    before = node_ids(mrml_scene)

    with pytest.raises(InputError) as raised:
        scene.export_supports(mrml_scene, [(volume, annotation)], "pancreas", tmp_path / "supports")

    assert str(raised.value) == error
    assert node_ids(mrml_scene) == before
    assert not (tmp_path / "supports").exists()  # checked before anything is written


def test_annotated_volumes_pairs_each_volume_with_the_segmentation_drawn_on_it(mrml_scene):
    a, b, other = add_volume(mrml_scene, "a"), add_volume(mrml_scene, "b"), add_volume(mrml_scene, "other")
    add_annotation(mrml_scene, other, [("pancreas", liver_mask_kji())], "on another volume")
    a_without = add_annotation(mrml_scene, a, [("liver", liver_mask_kji())], "a: liver only")
    a_with = add_annotation(mrml_scene, a, [("pancreas", liver_mask_kji())], "a: pancreas")
    b_without = add_annotation(mrml_scene, b, [("liver", liver_mask_kji())], "b: liver only")

    assert scene.segmentations_of(mrml_scene, a) == [a_without, a_with]
    assert scene.annotated_volumes(mrml_scene, [a, b], "pancreas") == [(a, a_with), (b, b_without)]
    with pytest.raises(InputError, match=r"^volume 'c' has no segmentation: annotate 'pancreas' in the Segment Editor"):
        scene.annotated_volumes(mrml_scene, [a, add_volume(mrml_scene, "c")], "pancreas")


# --- the Slicer module's Logic and self-test, on this MRML with the Qt parts stubbed --------------


@pytest.fixture
def module(mrml_scene, tmp_path, monkeypatch):
    """FSEFTSegment/FSEFTSegment.py imported with stand-ins for what only the application has."""
    parameters = types.SimpleNamespace(adapterPath="")

    class Base:
        def __init__(self, parent=None):
            self.parent = parent

        def getParameterNode(self):
            return parameters

    class Test(unittest.TestCase):
        def delayDisplay(self, message):
            pass

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setitem(sys.modules, "qt", types.ModuleType("qt"))
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", types.SimpleNamespace(
        parameterNodeWrapper=lambda cls: lambda node: node, Choice=lambda choices: choices))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", types.SimpleNamespace(
        ScriptedLoadableModule=Base, ScriptedLoadableModuleWidget=Base,
        ScriptedLoadableModuleLogic=Base, ScriptedLoadableModuleTest=Test))
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(temporaryPath=str(tmp_path),
                                                             defaultScenePath=str(tmp_path / "Slicer")), raising=False)
    spec = importlib.util.spec_from_file_location("FSEFTSegment_under_test", ROOT / "FSEFTSegment" / "FSEFTSegment.py")
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    monkeypatch.setattr(loaded, "python_executable", lambda: sys.executable)
    loaded.parameters = parameters
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
assert args[:3] == ["-m", "FSEFTSegmentLib", "predict"], args
option = lambda name: args[args.index(name) + 1]
assert option("--progress") == "json" and option("--format") == "seg.nrrd", args
out = Path(option("--out")); out.mkdir(parents=True)
study_list = Path(args[-1])
rows = list(csv.DictReader(open(study_list, encoding="utf-8")))
print(json.dumps({{"event": "start", "studies": len(rows)}}))
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


STAND_IN_ADAPT = """\
#!{python}
# Stands for `python -m FSEFTSegmentLib adapt ... --predict-queries --progress json`: checks each support's
# label map against its image, "predicts" each query (a box) into OUT/predictions, reports the adapter.
import json, sys
from pathlib import Path
import numpy as np, SimpleITK as sitk, slicerio
args = sys.argv[1:]
assert args[:3] == ["-m", "FSEFTSegmentLib", "adapt"] and args[-2:] == ["--progress", "json"], args
values = lambda name: [args[i + 1] for i, arg in enumerate(args) if arg == name]
assert values("--structure") == ["pancreas=1"] and values("--method") == ["lora"] and "--size-prior" in args, args
for i, arg in enumerate(args):
    if arg == "--support":
        image, label = (sitk.ReadImage(path) for path in args[i + 1:i + 3])
        assert image.GetSize() == label.GetSize() and image.GetDirection() == label.GetDirection(), args
        assert np.unique(sitk.GetArrayFromImage(label)).tolist() == [0, 1], args
for epoch in (1, 2):
    print(json.dumps({{"event": "epoch", "epoch": epoch, "epochs": 2, "loss": 0.5, "message": f"epoch {{epoch}}/2"}}))
out = Path(values("--out")[0])
(out / "predictions").mkdir(parents=True)
for query in values("--query"):
    image = sitk.ReadImage(query)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    ijk_to_lps[:3, 3] = image.GetOrigin()
    segmentation = slicerio.create_segmentation(image.GetSize(), ijk_to_lps)
    mask = np.zeros(image.GetSize(), bool); mask[1:3, 2:4, 1:4] = True
    slicerio.add_segment(segmentation, mask, {{"id": "pancreas", "name": "pancreas", "color": [0.9, 0.7, 0.2]}})
    slicerio.write_segmentation(str(out / "predictions" / (Path(query).name[:-len(".nrrd")] + ".seg.nrrd")), segmentation)
print(json.dumps({{"event": "adapter", "path": str(out)}}))
"""


def test_module_logic_adapts_imports_the_queries_and_applies_the_adapter(module, mrml_scene, tmp_path, monkeypatch):
    engine = tmp_path / "adapt-engine"
    engine.write_text(STAND_IN_ADAPT.format(python=sys.executable))
    engine.chmod(engine.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(module, "python_executable", lambda: str(engine))
    supports = [add_volume(mrml_scene, "S1"), add_volume(mrml_scene, "S2")]
    for support in supports:
        add_annotation(mrml_scene, support, [("pancreas", liver_mask_kji())])
    query = add_volume(mrml_scene, "Query")
    before = mrml_scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")

    logic = module.FSEFTSegmentLogic()
    job = logic.adapt(supports, " pancreas ", "lora", "fseft-swinunetr", sizePrior=True, queryVolumes=[query],
                      waitForCompletion=True)

    assert job.state is module.JobState.COMPLETED, job.message
    assert job.fraction == 1.0
    adapter = Path(module.parameters.adapterPath)
    assert adapter == job.adapter and adapter.parent == tmp_path / "Slicer" / "FSEFTSegment adapters"
    assert adapter.name.startswith("pancreas-lora-") and "--predict-queries" in job.command
    result = mrml_scene.GetNthNodeByClass(before, "vtkMRMLSegmentationNode")
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    assert result.GetNodeReference(role) is query and result.GetName() == "Query segmentation"
    expected = np.zeros(SHAPE_KJI, bool)
    expected[1:4, 2:4, 1:3] = True
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(result, "pancreas", query), expected)
    assert logic.temporaryFolder is None and list(tmp_path.glob("FSEFTSegment-*")) == []

    engine.write_text(STAND_IN_ENGINE.format(python=sys.executable))  # Apply now runs the adapter
    job = logic.run([query], "fseft-swinunetr", adapterPath=str(adapter), waitForCompletion=True)
    assert job.state is module.JobState.COMPLETED, job.message
    assert job.command[job.command.index("--adapter") + 1] == str(adapter) and "--model" not in job.command


def test_module_logic_adapt_refuses_a_volume_without_annotation(module, mrml_scene, tmp_path):
    logic = module.FSEFTSegmentLogic()
    with pytest.raises(InputError, match="volume 'CT chest' has no segmentation"):
        logic.adapt([add_volume(mrml_scene)], "pancreas", "lora", "m")
    with pytest.raises(ValueError, match="Name the annotated segment"):
        logic.adapt([add_volume(mrml_scene)], " ", "lora", "m")
