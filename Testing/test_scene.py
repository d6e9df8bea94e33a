"""scene.py against real MRML (slicer-core, headless): exact geometry out (oblique, anisotropic),
annotations on other grids resampled onto the volume's with a notice, segmentations back in, a scene
left as it was after a bad file, and what the panel reads. (The module and its panel: test_panel.py.)"""

from __future__ import annotations

import re
import types

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (PyPI) is not installed")
sitk = pytest.importorskip("SimpleITK")
slicerio = pytest.importorskip("slicerio")

from FSEFTSegmentLib import scene  # noqa: E402
from FSEFTSegmentLib.errors import InputError  # noqa: E402

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


def write_seg(path, segments, ijk_to_ras=IJK_TO_RAS):
    """A .seg.nrrd as another program would write it (slicerio, (i,j,k) voxels, IJK-to-LPS), on
    the grid `ijk_to_ras` (default: the test volume's) with the masks' shape."""
    ijk_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_ras
    segmentation = slicerio.create_segmentation(segments[0][2].shape[::-1], ijk_to_lps)
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

    exported = scene.export_supports(mrml_scene, [(volume, annotation)], "pancreas", tmp_path / "supports")

    [(image, label)] = exported.supports
    assert exported.notices == []  # drawn on the volume: nothing resampled
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
     "segmentation 'Annotations' of 'CT chest' has no segment 'pancreas' (it has: 'liver', 'spleen')"),
    ([], "segmentation 'Annotations' of 'CT chest' has no segment 'pancreas' (it has: no segments)"),
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
    with pytest.raises(InputError) as raised:
        scene.annotated_volumes(mrml_scene, [a, add_volume(mrml_scene, "c")], "pancreas")
    assert str(raised.value) == ("volume 'c' has no segmentation: annotate 'pancreas' in the Segment Editor with this volume "
                                 "as the source volume ('on another volume' holding it belongs to volume 'other')")


# --- multi-structure supports; segmentations on other grids or other volumes -----------------------


def block(shape_kji, k, j, i):
    """A boolean array of `shape_kji`, True in the slices k, j, i."""
    mask = np.zeros(shape_kji, bool)
    mask[k, j, i] = True
    return mask


def test_export_supports_labels_the_segments_in_the_order_asked_the_later_winning_an_overlap(mrml_scene, tmp_path):
    volume = add_volume(mrml_scene)
    liver = block(SHAPE_KJI, slice(0, 3), slice(0, 3), slice(0, 4))
    spleen = block(SHAPE_KJI, slice(2, 5), slice(2, 6), slice(3, 7))
    annotation = add_annotation(mrml_scene, volume, [("liver", liver), ("spleen", spleen), ("kidney", ~(liver | spleen))])

    exported = scene.export_supports(mrml_scene, [(volume, annotation)], ["spleen", "liver"], tmp_path)

    [(image, label)] = exported.supports
    expected = np.zeros(SHAPE_KJI, np.uint8)
    expected[spleen], expected[liver] = 1, 2  # values by the order asked; liver, the later, over spleen
    labels = sitk.ReadImage(str(label))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), expected)
    assert labels.GetSize() == sitk.ReadImage(str(image)).GetSize()
    assert exported.notices == [f"segment 'liver' of 'Annotations' overlaps 'spleen' in {(liver & spleen).sum()} voxels,"
                                " labelled 'liver' there"]
    assert list(exported) == exported.supports  # what jobs.adapt_command iterates


def load_annotation(mrml_scene, path, volume, name="Annotations"):
    """A .seg.nrrd loaded from a file, then set to reference `volume`: its labelmap keeps the file's grid."""
    node = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    return node


def index_map(offset=(0.0, 0.0, 0.0), scale=1.0, axes=np.eye(3)):
    """A segmentation voxel index (i, j, k, 1) -> the volume voxel index."""
    matrix = np.eye(4)
    matrix[:3, :3], matrix[:3, 3] = scale * np.asarray(axes, float), offset
    return matrix


def turn_about_k(degrees):
    """The index map of a grid turned about the volume's k axis through its centre."""
    axis = ROTATION[:, 2]
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.deg2rad(degrees)
    turn = np.eye(4)
    turn[:3, :3] = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross  # Rodrigues
    centre = (IJK_TO_RAS @ [3.0, 2.5, 2.0, 1.0])[:3]
    turn[:3, 3] = centre - turn[:3, :3] @ centre
    return np.linalg.solve(IJK_TO_RAS, turn @ IJK_TO_RAS)


def nearest_on_volume(mask_kji, segment_to_volume):
    """Reference resampling: each volume voxel takes the segmentation voxel nearest its centre."""
    k, j, i = np.indices(SHAPE_KJI).reshape(3, -1)
    source = np.rint(np.linalg.solve(segment_to_volume, np.stack([i, j, k, np.ones_like(i)]))[:3]).astype(int)
    inside = np.all((source >= 0) & (source < np.array(mask_kji.shape[::-1])[:, None]), axis=0)
    found = np.zeros(i.size, bool)
    found[inside] = mask_kji[source[2, inside], source[1, inside], source[0, inside]]
    return found.reshape(SHAPE_KJI)


COARSE = block(SHAPE_KJI, slice(1, 4), slice(2, 5), slice(1, 3)) | block(SHAPE_KJI, 4, 5, 6)
SMALL = block((3, 4, 4), slice(0, 2), slice(1, 3), slice(0, 3))
SWAPPED = block((5, 7, 6), slice(1, 3), slice(0, 5), slice(2, 4))  # (k, j, i) with j along the volume's i
TURNED = block(SHAPE_KJI, slice(1, 4), slice(1, 5), slice(1, 6))


@pytest.mark.parametrize("segment_to_volume, mask, expected, difference", [
    # The Segment Editor's oversampling by 2: each volume voxel split in 8 (its centre at their corner).
    (index_map(offset=(-0.25,) * 3, scale=0.5), COARSE.repeat(2, 0).repeat(2, 1).repeat(2, 2), COARSE,
     "0.355x0.415x1.25 mm voxels instead of 0.71x0.83x2.5 mm"),
    # A cropped grid shifted by a quarter voxel along i: voxel centres v = s + 2.25, nearest s + 2.
    (index_map(offset=(2.25, 1, 0)), SMALL, block(SHAPE_KJI, slice(0, 2), slice(2, 4), slice(2, 5)),
     "shifted by 0.25, 0, 0 voxels"),
    # Cropped on the volume's own lattice, and with i and j swapped: the same voxel centres, no notice.
    (index_map(offset=(2, 1, 0)), SMALL, block(SHAPE_KJI, slice(0, 2), slice(2, 4), slice(2, 5)), None),
    (index_map(axes=[[0, 1, 0], [1, 0, 0], [0, 0, 1]]), SWAPPED, block(SHAPE_KJI, slice(1, 3), slice(2, 4), slice(0, 5)),
     None),
    (turn_about_k(10.0), TURNED, nearest_on_volume(TURNED, turn_about_k(10.0)), "rotated by 10.0 degrees"),
], ids=["oversampled", "quarter-voxel-shift", "cropped", "axes-swapped", "rotated"])
def test_export_supports_puts_a_segmentation_on_another_grid_onto_the_volume_grid_and_says_so(
        mrml_scene, tmp_path, segment_to_volume, mask, expected, difference):
    volume = add_volume(mrml_scene)
    path = write_seg(tmp_path / "elsewhere.seg.nrrd", [("liver", [0.8, 0.3, 0.2], mask)], IJK_TO_RAS @ segment_to_volume)
    annotation = load_annotation(mrml_scene, path, volume)

    exported = scene.export_supports(mrml_scene, [(volume, annotation)], "liver", tmp_path / "supports")

    [(image, label)] = exported.supports
    ct, labels = sitk.ReadImage(str(image)), sitk.ReadImage(str(label))
    assert (labels.GetSize(), labels.GetSpacing(), labels.GetOrigin(), labels.GetDirection()) == \
        (ct.GetSize(), ct.GetSpacing(), ct.GetOrigin(), ct.GetDirection())
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), expected.astype(np.uint8))
    assert exported.notices == ([] if difference is None else [
        f"segment 'liver' of 'Annotations' was on a different grid ({difference}); resampled onto the grid of 'CT chest'"])


def test_export_supports_follows_a_transform_between_segmentation_and_volume(mrml_scene, tmp_path):
    volume = add_volume(mrml_scene)
    annotation = add_annotation(mrml_scene, volume, [("liver", block(SHAPE_KJI, slice(1, 3), slice(1, 3), slice(1, 3)))])
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = 1.25 * IJK_TO_RAS[:3, 0]  # a voxel and a quarter along i
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    annotation.SetAndObserveTransformNodeID(transform.GetID())

    exported = scene.export_supports(mrml_scene, [(volume, annotation)], "liver", tmp_path)

    [(_, label)] = exported.supports
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(label))),
                                  block(SHAPE_KJI, slice(1, 3), slice(1, 3), slice(2, 4)))
    assert exported.notices == ["segment 'liver' of 'Annotations' was on a different grid (shifted by 0.25, 0, 0 voxels);"
                                " resampled onto the grid of 'CT chest'"]


def test_export_supports_refuses_a_segmentation_that_belongs_to_another_volume(mrml_scene, tmp_path):
    chest, abdomen = add_volume(mrml_scene, "CT chest"), add_volume(mrml_scene, "CT abdomen")
    drawn_elsewhere = add_annotation(mrml_scene, abdomen, [("liver", liver_mask_kji())])
    loaded = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Loaded")

    for segmentation, owner in ((drawn_elsewhere, "volume 'CT abdomen'"), (loaded, "no volume")):
        with pytest.raises(InputError) as raised:
            scene.export_supports(mrml_scene, [(chest, segmentation)], "liver", tmp_path / "supports")
        assert str(raised.value) == (f"segmentation '{segmentation.GetName()}' belongs to {owner}, not to 'CT chest': "
                                     "annotate 'CT chest' with it as the Segment Editor's source volume")
    assert not (tmp_path / "supports").exists()


def test_annotated_volumes_picks_the_segmentation_holding_the_structures_and_refuses_them_split(mrml_scene):
    ct = add_volume(mrml_scene)
    add_annotation(mrml_scene, ct, [("liver", liver_mask_kji()), ("spleen", np.zeros(SHAPE_KJI, bool))], "draft")
    both = add_annotation(mrml_scene, ct, [("liver", liver_mask_kji()), ("Spleen", liver_mask_kji())], "both")
    add_annotation(mrml_scene, ct, [("liver", liver_mask_kji())], "liver only")

    assert scene.annotated_volumes(mrml_scene, [ct], ["liver", "spleen"]) == [(ct, both)]
    mrml_scene.RemoveNode(both)
    add_annotation(mrml_scene, ct, [("spleen", liver_mask_kji())], "spleen only")
    with pytest.raises(InputError) as raised:
        scene.annotated_volumes(mrml_scene, [ct], ["liver", "spleen"])
    assert str(raised.value) == ("the segments of 'CT chest' are in different segmentations ('liver' in 'draft'; 'spleen' in "
                                 "'spleen only'): copy them into one (Segmentations module, Copy/move segments)")
    assert scene.annotated_volumes(mrml_scene, [ct], "liver")[0][1].GetName() == "draft"  # the first of equals
    with pytest.raises(InputError, match="name each segment to learn once"):
        scene.annotated_volumes(mrml_scene, [ct], ["liver", "Liver"])


# --- what the panel reads: annotations, quality flags, CT plausibility, free space -----------------


def test_annotations_list_the_annotated_volumes_their_segment_names_and_which_have_voxels(mrml_scene):
    a, b = add_volume(mrml_scene, "a"), add_volume(mrml_scene, "b")
    add_volume(mrml_scene, "not annotated")
    labels = mrml_scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    slicer.util.updateVolumeFromArray(labels, np.zeros(SHAPE_KJI, np.int16))
    add_annotation(mrml_scene, labels, [("liver", liver_mask_kji())], "on a label map")
    empty = np.zeros(SHAPE_KJI, bool)
    a1 = add_annotation(mrml_scene, a, [("liver", liver_mask_kji()), ("spleen", empty)], "a1")  # one shared labelmap
    a2 = add_annotation(mrml_scene, a, [("Pancreas", ~liver_mask_kji()), ("liver", empty)], "a2")
    b1 = add_annotation(mrml_scene, b, [("liver", liver_mask_kji())], "b1")

    found = scene.annotations(mrml_scene)

    assert found == [scene.Annotation(a, (a1, a2), ("liver", "spleen", "Pancreas"), frozenset({"liver", "Pancreas"})),
                     scene.Annotation(b, (b1,), ("liver",), frozenset({"liver"}))]
    assert scene.segment_names(mrml_scene) == ["liver", "spleen", "Pancreas"]
    k = {name: sum(name in annotation.non_empty for annotation in found) for name in scene.segment_names(mrml_scene)}
    assert k == {"liver": 2, "spleen": 0, "Pancreas": 1}


def test_a_result_imports_under_its_name_with_the_engine_quality_flags(mrml_scene, tmp_path):
    prediction = pytest.importorskip("FSEFTSegmentLib.prediction", reason="the engine (torch) is not installed")
    from FSEFTSegmentLib.io.segmentations import write_segmentation
    from FSEFTSegmentLib.labels import resolve_structures

    volume = add_volume(mrml_scene)
    reference = sitk.ReadImage(str(scene.export_volume(volume, tmp_path)))  # the engine's view of the oblique volume
    structures = resolve_structures(["liver", "spleen", "pancreas"])
    masks = np.stack([liver_mask_kji(), block(SHAPE_KJI, 4, slice(0, 2), slice(4, 7)), block(SHAPE_KJI, 0, 0, 0)])
    quality = prediction.assess_quality(structures, [50.0, 120.0, 3.0], {"liver": (1.0, 2.0), "pancreas": (2.0, 4.0)})
    path = write_segmentation(tmp_path / "CT_chest.seg.nrrd", masks, reference, structures,
                              prediction.quality_tags(structures, quality))

    [node] = scene.import_results(mrml_scene, {"CT_chest": [path]}, {"CT_chest": volume},
                                  names={"CT_chest": "CT chest \u2013 liver, spleen (lora)"})

    assert node.GetName() == "CT chest \u2013 liver, spleen (lora)"
    liver, spleen, pancreas = (structure.display_name for structure in structures)
    assert scene.quality_flags(node) == {liver: "volume 50.0 mL above the 1.0-2.0 mL the supports imply"}
    assert scene.segment_quality(node) == {liver: scene.SegmentQuality(scene.quality_flags(node)[liver], "50", "1-2"),
                                           pancreas: scene.SegmentQuality(None, "3", "2-4")}
    for segment_id, mask in zip((s.name for s in structures), masks):
        np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(node, segment_id, volume).astype(bool), mask)


def test_ct_warning_flags_a_volume_that_is_not_a_ct_in_hounsfield_units(mrml_scene):
    rng = np.random.default_rng(0)
    mr, ct = add_volume(mrml_scene, "MR"), add_volume(mrml_scene, "CT")
    slicer.util.updateVolumeFromArray(mr, rng.uniform(0, 1000, SHAPE_KJI).astype(np.int16))
    hounsfield = rng.normal(40, 30, SHAPE_KJI)
    hounsfield[:, :2] = -1000  # air around the body
    slicer.util.updateVolumeFromArray(ct, hounsfield.astype(np.int16))

    assert scene.ct_warning(ct) is None
    assert scene.ct_warning(mr).startswith("only 0.0% of voxels are below -200 HU (no air or lung)")
    assert scene.ct_warning(mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")) is None


def test_check_free_space_refuses_a_job_the_disk_cannot_hold(mrml_scene, tmp_path, monkeypatch):
    volume = add_volume(mrml_scene)  # 210 int16 voxels: 2 bytes each, + 1 for the label + 1 for the result
    folder = tmp_path / "jobs" / "next"  # not made yet: the disk is asked about the nearest folder that is

    assert scene.check_free_space(folder, [volume, volume]) == int(1.5 * 2 * 210 * 4)
    with pytest.raises(InputError) as raised:
        scene.check_free_space(folder, [volume], factor=1e12)
    assert re.fullmatch(rf"{re.escape(str(folder))}: not enough disk space for this job: about 840000000 MB needed, \d+ MB "
                        r"free; free some space or choose another temporary folder \(Slicer: Edit > Application Settings "
                        r"> General > Temporary directory\)", str(raised.value))
    asked = []
    monkeypatch.setattr(scene.shutil, "disk_usage", lambda path: asked.append(path) or types.SimpleNamespace(free=1000))
    with pytest.raises(InputError, match="not enough disk space"):
        scene.check_free_space(folder, [volume])
    assert asked == [tmp_path]
