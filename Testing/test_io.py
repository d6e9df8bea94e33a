"""The I/O layer: exact geometry in and out, Slicer-readable segmentations, atomic writes, study lists.

Every file is generated here in tmp_path. The .seg.nrrd checks load our output with Slicer's own
MRML classes (slicer-core), not with our reader, so "Slicer reads it" is proven, not assumed.
"""

from __future__ import annotations

import json
import math
import os
import stat

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from conftest import SHARED_DATA
from FSEFTSegmentLib.errors import InputError
from FSEFTSegmentLib.io.files import atomic_write
from FSEFTSegmentLib.io.images import ct_plausibility, read_image
from FSEFTSegmentLib.io.segmentations import (
    read_structure_mask,
    slicer_geometry_string,
    write_label_map,
    write_label_table,
    write_segmentation,
)
from FSEFTSegmentLib.io.studies import Study, expand_inputs
from FSEFTSegmentLib.labels import novel_structure, resolve_structure
from synthetic import write_dicom_series

REAL_CT = SHARED_DATA / "real-ct"


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_ct(size=(12, 10, 6), pixel=sitk.sitkInt16) -> sitk.Image:
    """Oblique (rotated about all three axes), anisotropic 0.7 x 0.9 x 3 mm, CT-like values."""
    x, y, z = size
    values = (np.arange(x * y * z).reshape(z, y, x) * 37 % 2000 - 1000).astype(np.int16)
    image = sitk.Cast(sitk.GetImageFromArray(values), pixel)
    image.SetSpacing((0.7, 0.9, 3.0))
    image.SetOrigin((-100.25, 50.5, -300.125))
    image.SetDirection(tuple(rotation(0.2, -0.3, 0.4).ravel()))
    return image


def assert_same_geometry(a: sitk.Image, b: sitk.Image, atol: float = 1e-5) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=atol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=atol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=atol)


# ----------------------------------------------------------------------------------------------
# atomic_write


def test_atomic_write_moves_into_place_only_on_success(tmp_path):
    target = tmp_path / "sub" / "out.seg.nrrd"
    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".seg.nrrd") and tmp.name.startswith(".tmp-")
        tmp.write_text("done")
        assert not target.exists()
    assert target.read_text() == "done"
    assert os.listdir(target.parent) == ["out.seg.nrrd"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # readable like any new file, not 0600


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == []

    target.write_text("previous result")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "previous result"
    assert os.listdir(tmp_path) == ["out.nii.gz"]


def test_failed_segmentation_write_leaves_nothing(tmp_path):
    reference = oblique_ct()
    masks = np.zeros((1, *reversed(reference.GetSize())), np.uint8)
    with pytest.raises(ValueError, match="cannot be stored"):
        write_segmentation(tmp_path / "a.seg.nrrd", masks, reference, [resolve_structure("liver")], [{"bad|key": "x"}])

    class Exploding:  # fails in the middle of building the segments
        name = display_name = "x"
        color = (1, 2, 3)

        def slicerio_terminology(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_segmentation(tmp_path / "b.seg.nrrd", masks, reference, [Exploding()])
    with pytest.raises(ValueError, match="masks must be"):
        write_label_map(tmp_path / "c.nii.gz", masks[:, :-1], reference, [resolve_structure("liver")])
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# read_image: geometry and values are the file's


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".hdr", ".nrrd", ".mha"])
def test_read_image_keeps_oblique_anisotropic_geometry(tmp_path, suffix):
    image = oblique_ct()
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(image, str(path), useCompression=True)
    read = read_image(path)
    assert read.GetPixelID() == sitk.sitkFloat32 and read.GetDimension() == 3
    assert_same_geometry(read, image, atol=1e-6 if suffix in (".nrrd", ".mha") else 1e-5)  # NIfTI: float32 sform
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image))


def test_read_image_dicom_series_keeps_geometry_and_hu(tmp_path):
    image = oblique_ct()
    write_dicom_series(image, tmp_path / "series", "1.2.826.0.1.3680043.2.1125.2.101")
    read = read_image(tmp_path / "series")
    assert read.GetPixelID() == sitk.sitkFloat32
    assert_same_geometry(read, image, atol=1e-5)  # positions are written with 6 decimals
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image))


def test_read_image_two_dicom_series_need_a_choice(tmp_path):
    folder = tmp_path / "mixed"
    first, second = "1.2.826.0.1.3680043.2.1125.2.101", "1.2.826.0.1.3680043.2.1125.2.202"
    write_dicom_series(oblique_ct(), folder, first)
    write_dicom_series(oblique_ct(size=(8, 8, 4)), folder, second)
    with pytest.raises(InputError, match="2 DICOM series") as caught:
        read_image(folder)
    assert first in str(caught.value) and second in str(caught.value) and "\n" not in str(caught.value)
    assert read_image(folder, series_id=second).GetSize() == (8, 8, 4)
    with pytest.raises(InputError, match="no DICOM series 9.9"):
        read_image(folder, series_id="9.9")


def test_read_image_reduces_harmless_extra_dimensions(tmp_path):
    path = tmp_path / "one_frame.mha"  # (NIfTI: ITK itself drops a time axis of 1)
    sitk.WriteImage(sitk.JoinSeries(oblique_ct()), str(path))  # 4D with a single time point
    assert_same_geometry(read_image(path), oblique_ct(), atol=1e-9)
    vector = sitk.Compose(oblique_ct())  # a one-component vector image
    sitk.WriteImage(vector, str(tmp_path / "v.mha"))
    assert read_image(tmp_path / "v.mha").GetSize() == (12, 10, 6)


def _bad_inputs(tmp_path):
    """name -> (path, expected message fragment): every way a user's file can be unusable."""
    good = tmp_path / "good.nii.gz"
    sitk.WriteImage(oblique_ct(size=(40, 40, 20)), str(good), useCompression=True)
    data = good.read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    sitk.WriteImage(oblique_ct(size=(40, 40, 20)), str(tmp_path / "plain.nii"))
    plain = (tmp_path / "plain.nii").read_bytes()
    (tmp_path / "truncated.nii").write_bytes(plain[: len(plain) // 2])
    (tmp_path / "garbage.nii.gz").write_bytes(b"not an image at all" * 20)
    (tmp_path / "text.txt.nrrd").write_text("NRRD0004\ntype: what\n")
    sitk.WriteImage(sitk.Image(16, 16, sitk.sitkInt16), str(tmp_path / "slice2d.nrrd"))
    sitk.WriteImage(sitk.Image(16, 16, 1, sitk.sitkInt16), str(tmp_path / "one_slice.nrrd"))
    sitk.WriteImage(sitk.Image([8, 8, 8, 3], sitk.sitkInt16), str(tmp_path / "dynamic.nii.gz"))
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkVectorUInt8, 3), str(tmp_path / "rgb.mha"))
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "not_dicom").mkdir()
    (tmp_path / "not_dicom" / "notes.txt").write_text("hello")
    return {
        "missing": (tmp_path / "absent.nii.gz", "no such file or folder"),
        "truncated .nii.gz": (tmp_path / "truncated.nii.gz", "truncated"),
        "truncated .nii": (tmp_path / "truncated.nii", "truncated"),
        "garbage": (tmp_path / "garbage.nii.gz", "cannot be read as an image"),
        "corrupt header": (tmp_path / "text.txt.nrrd", "cannot be read as an image"),
        "2D": (tmp_path / "slice2d.nrrd", "2D image"),
        "single slice": (tmp_path / "one_slice.nrrd", "single slice"),
        "4D": (tmp_path / "dynamic.nii.gz", "4D image"),
        "RGB": (tmp_path / "rgb.mha", "3 components"),
        "empty folder": (tmp_path / "empty_folder", "no DICOM series"),
        "folder without DICOM": (tmp_path / "not_dicom", "no DICOM series"),
    }


def test_read_image_errors_are_one_line_naming_the_file(tmp_path):
    for case, (path, fragment) in _bad_inputs(tmp_path).items():
        with pytest.raises(InputError) as caught:
            read_image(path)
        message = str(caught.value)
        assert fragment in message, case
        assert message.startswith(str(path)) and caught.value.path == str(path), case
        assert "\n" not in message and "sitk" not in message and "Exception" not in message, case


# ----------------------------------------------------------------------------------------------
# ct_plausibility


def test_ct_plausibility_synthetic():
    rng = np.random.default_rng(0)
    body = rng.normal(40, 30, (20, 32, 32))
    body[:, :6, :] = -1000  # air around the body
    body[:, 10:14, 10:14] = -100  # fat

    def image(values):
        return sitk.GetImageFromArray(np.asarray(values, np.float32))

    assert ct_plausibility(image(body)) is None
    assert "below -200 HU" in ct_plausibility(image(np.abs(rng.normal(300, 150, (20, 32, 32)))))  # MR-like
    assert "below -200 HU" in ct_plausibility(image(body + 1024))  # CT without rescale intercept
    assert "Hounsfield" in ct_plausibility(image(body * 20))
    assert "constant" in ct_plausibility(image(np.zeros((4, 4, 4))))


@pytest.mark.parametrize(
    ("relative", "is_ct"),
    [("totalseg-abdomen/ct.nii.gz", True), ("totalseg-cardiac-cta/ct.nii.gz", True), ("totalseg-mr/mr.nii.gz", False)],
)
def test_ct_plausibility_on_real_scans(relative, is_ct):
    path = REAL_CT / relative
    if not path.is_file():
        pytest.skip(f"shared test data absent: {path}")
    warning = ct_plausibility(read_image(path))
    if is_ct:
        assert warning is None
    else:
        assert warning and "\n" not in warning


# ----------------------------------------------------------------------------------------------
# write_segmentation: Slicer reads it


@pytest.fixture
def result():
    """Reference CT, 3 structures (aorta overlapping liver, an empty gallbladder, a novel one) and tags."""
    reference = oblique_ct(size=(20, 16, 8))
    masks = np.zeros((4, 8, 16, 20), np.uint8)
    masks[0, 2:6, 3:10, 4:12] = 1  # liver
    masks[1, 3:7, 5:12, 8:15] = 1  # aorta: overlaps the liver
    masks[3, 0:2, 0:4, 15:20] = 1  # novel structure, apart from the others; gallbladder (2) stays empty
    structures = [resolve_structure(n) for n in ("liver", "aorta", "gallbladder")] + [novel_structure("left renal vein")]
    tags = [{"FSEFT.Quality": "ok"}, {"FSEFT.Quality": "check", "FSEFT.Volume": "12.5 ml"}, None, {}]
    return reference, masks, structures, tags


def _volume_node(scene, image: sitk.Image):
    """A Slicer scalar volume with the SimpleITK image's geometry (LPS -> RAS as slicer-facts.md says)."""
    import slicer

    flip = np.diag([-1.0, -1.0, 1.0])
    matrix = np.eye(4)
    matrix[:3, :3] = flip @ np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    matrix[:3, 3] = flip @ np.array(image.GetOrigin())
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(matrix))
    slicer.util.updateVolumeFromArray(node, sitk.GetArrayFromImage(image))
    return node


def _load_in_slicer(scene, path):
    import slicer

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1, f"Slicer could not read {path}"
    assert isinstance(node, slicer.vtkMRMLSegmentationNode)
    return node


def test_segmentation_loads_in_slicer_with_overlaps_names_colours_terminology(tmp_path, mrml_scene, result):
    import slicer
    import vtk

    reference, masks, structures, tags = result
    path = write_segmentation(tmp_path / "ct.seg.nrrd", masks, reference, structures, tags)
    assert nrrd.read_header(str(path))["dimension"] == 4  # overlapping: layered, as Slicer stores it
    assert [p.name for p in tmp_path.iterdir()] == ["ct.seg.nrrd"]

    node = _load_in_slicer(mrml_scene, path)
    segmentation = node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    assert ids == [s.name for s in structures]  # empty gallbladder included
    assert segmentation.GetNumberOfLayers() == 2
    volume = _volume_node(mrml_scene, reference)
    for index, (structure, segment_id) in enumerate(zip(structures, ids)):
        segment = segmentation.GetSegment(segment_id)
        assert segment.GetName() == structure.display_name
        np.testing.assert_allclose(segment.GetColor(), np.array(structure.color) / 255, atol=1e-6)
        assert segment.GetLabelValue() == index + 1
        entry = vtk.reference("")
        assert segment.GetTag("TerminologyEntry", entry) and str(entry) == structure.terminology_string()
        for key, value in (tags[index] or {}).items():
            found = vtk.reference("")
            assert segment.GetTag(key, found) and str(found) == value
        array = slicer.util.arrayFromSegmentBinaryLabelmap(node, segment_id, volume)
        np.testing.assert_array_equal(array != 0, masks[index] != 0, err_msg=segment_id)

    # The stored reference geometry is the one Slicer computes from the CT volume itself.
    from_volume = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    from_volume.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    key = "Reference image geometry"
    ours = [float(v) for v in segmentation.GetConversionParameter(key).split(";") if v]
    slicers = [float(v) for v in from_volume.GetSegmentation().GetConversionParameter(key).split(";") if v]
    np.testing.assert_allclose(ours, slicers, atol=1e-9)


def test_segmentation_without_overlap_is_a_single_labelmap(tmp_path, mrml_scene, result):
    import slicer

    reference, masks, structures, _ = result
    masks = masks[[0, 2, 3]]
    structures = [structures[i] for i in (0, 2, 3)]
    path = write_segmentation(tmp_path / "flat.seg.nrrd", masks, reference, structures)
    header = nrrd.read_header(str(path))
    assert header["dimension"] == 3 and header["type"] == "uint8"
    node = _load_in_slicer(mrml_scene, path)
    assert node.GetSegmentation().GetNumberOfLayers() == 1
    volume = _volume_node(mrml_scene, reference)
    for index, structure in enumerate(structures):
        array = slicer.util.arrayFromSegmentBinaryLabelmap(node, structure.name, volume)
        np.testing.assert_array_equal(array != 0, masks[index] != 0)


def test_segmentation_reads_back_with_slicerio(tmp_path, result):
    reference, masks, structures, tags = result
    path = write_segmentation(tmp_path / "ct.seg.nrrd", masks, reference, structures, tags)
    segmentation = slicerio.read_segmentation(str(path))
    expected = np.eye(4)
    expected[:3, :3] = np.array(reference.GetDirection()).reshape(3, 3) @ np.diag(reference.GetSpacing())
    expected[:3, 3] = reference.GetOrigin()
    np.testing.assert_allclose(segmentation["ijkToLPS"], expected, atol=1e-12)
    for index, structure in enumerate(structures):
        segment = slicerio.segment_from_id(segmentation, structure.name)
        assert segment["labelValue"] == index + 1 and segment["name"] == structure.display_name
        assert segment["terminology"] == structure.slicerio_terminology()
        assert segment.get("tags", {}) == (tags[index] or {})
        mask = slicerio.segment_mask(segmentation, structure.name)  # (i, j, k)
        np.testing.assert_array_equal(mask.transpose(2, 1, 0), masks[index] != 0)
    assert slicer_geometry_string(reference).count(";") == 22


# ----------------------------------------------------------------------------------------------
# label map + table, read_structure_mask


def test_label_map_and_table(tmp_path, result):
    reference, masks, structures, _ = result
    path = write_label_map(tmp_path / "ct.nii.gz", masks, reference, structures)
    labels = sitk.ReadImage(str(path))
    assert_same_geometry(labels, reference, atol=1e-5)
    array = sitk.GetArrayFromImage(labels)
    assert array.dtype == np.uint8
    assert set(np.unique(array)) == {0, 1, 2, 4}  # gallbladder (3) is empty
    assert (array[masks[1] != 0] == 2).all()  # the later structure wins where masks overlap
    assert (array[(masks[0] != 0) & (masks[1] == 0)] == 1).all()

    table_path = write_label_table(tmp_path / "ct.labels.json", structures)
    table = json.loads(table_path.read_text())
    assert [entry["value"] for entry in table["labels"]] == [1, 2, 3, 4]
    liver = table["labels"][0]
    assert liver["name"] == "liver" and liver["display_name"] == "Liver" and liver["color"] == list(structures[0].color)
    assert liver["terminology"]["type"] == ["SCT", "10200004", "Liver"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.labels.json", "ct.nii.gz"]


def test_read_structure_mask_from_label_map(tmp_path, result):
    reference, masks, structures, _ = result
    path = write_label_map(tmp_path / "ct.nii.gz", masks, reference, structures)
    for selector in (4, "4"):
        mask = read_structure_mask(path, selector)
        assert mask.GetPixelID() == sitk.sitkUInt8
        assert_same_geometry(mask, reference)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), masks[3])
    with pytest.raises(InputError, match=r"no voxel with label 3; labels present: 1, 2, 4$"):
        read_structure_mask(path, 3)
    with pytest.raises(InputError, match="by its value"):
        read_structure_mask(path, "liver")


def test_read_structure_mask_from_seg_nrrd(tmp_path, result):
    reference, masks, structures, _ = result
    path = write_segmentation(tmp_path / "ct.seg.nrrd", masks, reference, structures)
    for selector, index in (("aorta", 1), ("Aorta", 1), (2, 1), ("1", 0), ("left_renal_vein", 3), ("gallbladder", 2)):
        mask = read_structure_mask(path, selector)
        assert mask.GetPixelID() == sitk.sitkUInt8
        assert_same_geometry(mask, reference, atol=1e-9)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), masks[index], err_msg=str(selector))
    with pytest.raises(InputError, match="no segment 'spleen'; segments: Liver \\(id liver, value 1\\)") as caught:
        read_structure_mask(path, "spleen")
    assert "\n" not in str(caught.value)


def test_read_structure_mask_from_slicer_file():
    """A segmentation saved by Slicer itself (shipped in the slicerio wheel), with overlapping layers."""
    path = os.path.join(os.path.dirname(slicerio.__file__), "data", "SegmentationOverlapping.seg.nrrd")
    if not os.path.isfile(path):
        pytest.skip("slicerio's sample segmentation is not installed")
    segmentation = slicerio.read_segmentation(path)
    for name in ("overlapping sphere", "right lung"):
        mask = read_structure_mask(path, name)
        expected = slicerio.segment_mask(segmentation, name).transpose(2, 1, 0)
        assert expected.any()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), expected)
    with pytest.raises(InputError, match="several segments match '1'"):
        read_structure_mask(path, 1)  # value 1 exists in both layers


def test_read_structure_mask_errors(tmp_path):
    (tmp_path / "broken.seg.nrrd").write_bytes(b"NRRD0004\nsizes: banana\n\n")
    (tmp_path / "broken.nii.gz").write_bytes(b"nonsense" * 10)
    for path, fragment in (
        (tmp_path / "absent.seg.nrrd", "no such file"),
        (tmp_path / "broken.seg.nrrd", "cannot be read"),
        (tmp_path / "broken.nii.gz", "cannot be read"),
    ):
        with pytest.raises(InputError, match=fragment) as caught:
            read_structure_mask(path, 1)
        assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)


# ----------------------------------------------------------------------------------------------
# studies


@pytest.fixture
def images(tmp_path):
    """a/ct.nii.gz, b/ct.nii.gz, c/scan.nrrd and a DICOM folder dcm/patient7."""
    paths = {}
    for relative in ("a/ct.nii.gz", "b/ct.nii.gz", "c/scan.nrrd"):
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")  # expand_inputs does not read images
        paths[relative] = path
    paths["dicom"] = tmp_path / "dcm" / "patient7"
    paths["dicom"].mkdir(parents=True)
    return paths


def test_expand_direct_inputs(images):
    studies = expand_inputs([str(images["c/scan.nrrd"]), images["dicom"]])
    assert studies == [Study("scan", images["c/scan.nrrd"]), Study("patient7", images["dicom"])]
    with pytest.raises(InputError, match="no such file"):
        expand_inputs([str(images["dicom"].parent / "absent.nii.gz")])


def test_current_folder_is_named_after_itself(images, monkeypatch):
    monkeypatch.chdir(images["dicom"])
    assert [s.id for s in expand_inputs(["."])] == ["patient7"]


def test_same_file_names_take_the_folder_name(images):
    studies = expand_inputs([images["a/ct.nii.gz"], images["b/ct.nii.gz"], images["c/scan.nrrd"]])
    assert [s.id for s in studies] == ["a_ct", "b_ct", "scan"]
    assert [s.id for s in expand_inputs([images["a/ct.nii.gz"]] * 2)] == ["a_ct", "a_ct-2"]


def test_txt_study_list(tmp_path, images):
    lists = tmp_path / "lists"
    lists.mkdir()
    study_list = lists / "batch.txt"
    study_list.write_text(f"# my batch\n\n../a/ct.nii.gz\n   {images['c/scan.nrrd']}  \n  # done\n../dcm/patient7\n")
    studies = expand_inputs([study_list])
    assert [s.id for s in studies] == ["ct", "scan", "patient7"]
    assert studies[0].path.resolve() == images["a/ct.nii.gz"].resolve()
    assert studies[1].path == images["c/scan.nrrd"]


def test_csv_study_list(tmp_path, images):
    study_list = tmp_path / "batch.csv"
    study_list.write_text(
        "\ufeffID, Image ,note\n"  # a spreadsheet's BOM and spacing
        "case1,a/ct.nii.gz,first\n"
        ",b/ct.nii.gz,no id given\n"
        "case1,c/scan.nrrd,same id again\n"
        ",,\n"
        "odd/name,dcm/patient7,\n",
        encoding="utf-8",
    )
    studies = expand_inputs([study_list])
    assert [s.id for s in studies] == ["case1", "ct", "case1-2", "odd_name"]
    assert [s.path for s in studies] == [images["a/ct.nii.gz"], images["b/ct.nii.gz"], images["c/scan.nrrd"], images["dicom"]]


def test_study_list_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("# nothing yet\n\n")
    (tmp_path / "empty.csv").write_text("id,image\n")
    (tmp_path / "header.csv").write_text("name,path\nx,a.nii.gz\n")
    (tmp_path / "noimage.csv").write_text("id,image\nx,\n")
    for name, fragment in (
        ("absent.txt", "study list not found"),
        ("absent.csv", "study list not found"),
        ("empty.txt", "study list is empty"),
        ("empty.csv", "study list is empty"),
        ("header.csv", "needs the header 'id,image' \\(found: name,path\\)"),
        ("noimage.csv", "line 2: no image path"),
    ):
        with pytest.raises(InputError, match=fragment) as caught:
            expand_inputs([tmp_path / name])
        assert caught.value.path == str(tmp_path / name)


def test_segmentation_on_real_ct_matches_slicers_own_reading_of_the_ct(tmp_path, mrml_scene):
    """Real scan: Slicer loads the CT file itself, and our segments land on its voxels exactly."""
    import slicer

    folder = REAL_CT / "totalseg-abdomen"
    if not (folder / "ct.nii.gz").is_file() or not (folder / "labels-totalsegmentator.nii.gz").is_file():
        pytest.skip(f"shared test data absent: {folder}")
    ct = read_image(folder / "ct.nii.gz")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labels-totalsegmentator.nii.gz")))
    structures = [resolve_structure(n) for n in ("spleen", "liver", "aorta")]
    masks = np.stack([labels == value for value in (1, 5, 52)]).astype(np.uint8)
    assert all(m.any() for m in masks)
    path = write_segmentation(tmp_path / "ct.seg.nrrd", masks, ct, structures)

    volume = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = mrml_scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(folder / "ct.nii.gz"))
    assert storage.ReadData(volume) == 1
    node = _load_in_slicer(mrml_scene, path)
    for index, structure in enumerate(structures):
        array = slicer.util.arrayFromSegmentBinaryLabelmap(node, structure.name, volume)
        np.testing.assert_array_equal(array != 0, masks[index] != 0, err_msg=structure.name)


def test_non_ascii_names_are_written_as_ascii_headers(tmp_path):
    """NRRD headers are ASCII: a novel structure named with accents must still be written."""
    from FSEFTSegmentLib.labels import novel_structure

    image = sitk.Image(8, 8, 8, sitk.sitkFloat32)
    masks = np.zeros((1, 8, 8, 8), np.uint8)
    masks[0, 2:4, 2:4, 2:4] = 1
    path = write_segmentation(tmp_path / "x.seg.nrrd", masks, image, [novel_structure("músculo glúteo")],
                              segment_tags=[{"FSEFT.QualityFlag": "volume 9.0 mL above the 1.0–2.0 mL"}])
    segment = slicerio.read_segmentation(str(path))["segments"][0]
    assert (segment["id"], segment["name"]) == ("musculo_gluteo", "musculo gluteo")
    assert segment["tags"]["FSEFT.QualityFlag"] == "volume 9.0 mL above the 1.0-2.0 mL"
