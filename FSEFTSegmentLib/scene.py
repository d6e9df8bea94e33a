"""The MRML bridge: a scene's volumes out to job files, the engine's segmentations back in.

This is the only engine module that touches MRML. It needs `slicer` (the application, or PyPI
`slicer-core` headless) but no Qt, so it is tested without the application. It uses storage nodes
directly rather than `slicer.util.loadSegmentation`/`saveNode`, which need `slicer.app`.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import slicer
import vtk

from .errors import InputError


def export_volume(volume_node, folder: str | os.PathLike) -> Path:
    """Write `volume_node` as an uncompressed .nrrd in `folder` and return its path.

    The file stem (the node name, made file-safe and unique in `folder`) becomes the engine's study
    id. Uncompressed: the engine reads it once, so compression would only cost time.
    The storage node writes the IJK-to-RAS geometry exactly (as LPS). The file appears under its final
    name only once complete, so the engine never sees a half-written input. The volume's parent
    transform is not applied: `import_segmentation` puts the result under the same transform.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^\w.-]+", "_", volume_node.GetName() or "volume").strip("._") or "volume"
    path, n = folder / f"{stem}.nrrd", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}_{n}.nrrd"
    _write_nrrd(volume_node, path)
    return path


def _write_nrrd(volume_node, path: Path) -> None:
    """Write a volume (scalar or label map) to `path` as uncompressed NRRD, atomically."""
    partial = path.with_name(f".{path.stem}.partial.nrrd")  # the writer picks the format from ".nrrd"
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(partial))
    storage.SetUseCompression(0)
    if not storage.WriteData(volume_node) or not partial.is_file():  # no voxels: "success", no file
        partial.unlink(missing_ok=True)
        raise InputError(f"could not write volume '{volume_node.GetName()}' (has it any voxels?)", path)
    os.replace(partial, path)


def segmentations_of(scene, volume_node) -> list:
    """The segmentation nodes whose reference geometry is `volume_node`: those drawn in the Segment
    Editor with it as the source volume (or imported with it as reference)."""
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    nodes = (scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
             for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")))
    return [node for node in nodes if node.GetNodeReferenceID(role) == volume_node.GetID()]


def annotated_volumes(scene, volume_nodes, segment_name: str) -> list[tuple]:
    """Pair each volume with its annotation: the segmentation referencing it that holds `segment_name`
    (else the first referencing it, so that `export_supports` names the segments it has instead).
    `InputError` for a volume that no segmentation references."""
    pairs = []
    for volume in volume_nodes:
        candidates = segmentations_of(scene, volume)
        if not candidates:
            raise InputError(f"volume '{volume.GetName()}' has no segmentation: annotate '{segment_name}' in the "
                             "Segment Editor with this volume as the source volume")
        pairs.append((volume, next((s for s in candidates if _segment_id(s, segment_name)), candidates[0])))
    return pairs


def export_supports(scene, pairs, segment_name: str, folder: str | os.PathLike) -> list[tuple[Path, Path]]:
    """Write each annotated volume (`export_volume`) and its segment `segment_name` as a label map
    (value 1, on the volume's own grid, uncompressed `labels/<image stem>.nrrd`); return the
    (image, label) paths in order. One-line `InputError` when the segment is missing (naming the
    segments there) or empty. Nodes the export creates are removed, whatever happens."""
    folder = Path(folder)
    supports = []
    for volume, segmentation_node in pairs:
        segment_id = _segment_id(segmentation_node, segment_name)
        if not segment_id:
            segmentation = segmentation_node.GetSegmentation()
            names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
            raise InputError(f"segmentation '{segmentation_node.GetName()}' has no segment '{segment_name}'"
                             f" (it has: {', '.join(repr(n) for n in names) or 'no segments'})")
        before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
        try:  # the export adds a label map, its display node and a colour table
            labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{volume.GetName()} {segment_name}")
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segment_id)
            # The reference volume is what puts the label map on the volume's grid (else: cropped).
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                    segmentation_node, ids, labelmap, volume):
                raise InputError(f"could not export segment '{segment_name}' of '{segmentation_node.GetName()}'")
            if not slicer.util.arrayFromVolume(labelmap).any():
                raise InputError(f"segment '{segment_name}' of '{segmentation_node.GetName()}' is empty:"
                                 f" draw it on '{volume.GetName()}' first")
            image = export_volume(volume, folder)
            label = folder / "labels" / f"{image.stem}.nrrd"
            label.parent.mkdir(parents=True, exist_ok=True)
            _write_nrrd(labelmap, label)
        finally:
            added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
            for node in reversed([n for n in added if n.GetID() not in before and not n.GetSingletonTag()]):
                scene.RemoveNode(node)
        supports.append((image, label))
    return supports


def _segment_id(segmentation_node, name: str) -> str:
    """The id of the segment called `name`; a case-insensitive match when it is the only one; else ''."""
    segmentation = segmentation_node.GetSegmentation()
    found = segmentation.GetSegmentIdBySegmentName(name)
    if found:
        return found
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())
           if segmentation.GetNthSegment(i).GetName().casefold() == name.casefold()]
    return ids[0] if len(ids) == 1 else ""


def import_segmentation(scene, seg_path: str | os.PathLike, reference_volume_node, name: str | None = None):
    """Load a .seg.nrrd into `scene` as a segmentation node aligned with `reference_volume_node`.

    Names, colours and terminology come from the file (the engine sets them). The node shares the
    volume's parent transform and sits beside it in subject hierarchy (under its study, if any).
    Raises `InputError` with one line naming the file; on any failure the nodes added are removed,
    so the scene is as it was.
    """
    seg_path = Path(seg_path)
    _check_nrrd(seg_path)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{reference_volume_node.GetName()} segmentation")
    try:
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(seg_path))
        if not storage.ReadData(node):  # also creates the display node (the node is in the scene)
            raise InputError("not a readable segmentation (.seg.nrrd)", seg_path)
        if not node.GetSegmentation().GetNumberOfSegments():  # e.g. a 2D image read as an empty one
            raise InputError("holds no segments (not a .seg.nrrd written by the engine?)", seg_path)
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
        node.SetAndObserveTransformNodeID(reference_volume_node.GetTransformNodeID())
        _place_beside(scene, node, reference_volume_node)
    except BaseException:
        _remove(scene, node)
        raise
    return node


def export_studies(volume_nodes, folder: str | os.PathLike) -> tuple[Path, dict]:
    """Export the volumes of one run and a study list (`id,image`) naming them; return the list's
    path and study id -> volume node. Explicit ids map each result back to its volume exactly,
    whatever the engine would derive from a file name."""
    folder = Path(folder)
    volumes, rows = {}, [("id", "image")]
    for node in volume_nodes:
        path = export_volume(node, folder)
        volumes[path.stem] = node
        rows.append((path.stem, path.name))  # relative: the engine resolves it beside the list
    study_list = folder / "studies.csv"
    with open(study_list, "w", newline="", encoding="utf-8") as file:
        csv.writer(file).writerows(rows)
    return study_list, volumes


def import_results(scene, outputs: dict, volumes: dict) -> list:
    """Import each study's .seg.nrrd beside its volume (the job's importer). One bad result does not
    lose the others: all that can be imported are, then one `InputError` lists the failures."""
    nodes, errors = [], []
    for study, paths in outputs.items():
        for path in (Path(p) for p in paths if str(p).endswith(".seg.nrrd")):
            try:
                nodes.append(import_segmentation(scene, path, volumes[study]))
            except KeyError:
                errors.append(f"{path}: study {study!r} is not one of this run's volumes")
            except InputError as error:
                errors.append(str(error))
    if errors:
        raise InputError("; ".join(errors))
    return nodes


def _check_nrrd(path: Path) -> None:
    """Reject unreadable files in Python first.

    ITK throws on a malformed header or truncated data and, through the MRML storage node, that
    aborts the whole process (Slicer included) instead of making `ReadData` return 0.
    """
    import nrrd  # an engine requirement, installed on first run; not needed to load the module

    try:
        nrrd.read(str(path))
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    except Exception as error:  # pynrrd raises several unrelated types for bad files
        raise InputError(f"not a readable segmentation (.seg.nrrd): {error}", path) from None


def _place_beside(scene, node, volume_node) -> None:
    """Put `node` under the volume's subject-hierarchy parent (its study) when that is not the scene."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    volume_item = sh.GetItemByDataNode(volume_node)
    parent = sh.GetItemParent(volume_item) if volume_item else 0
    if not parent or parent == sh.GetSceneItemID():
        return
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, parent)
    else:  # without the application's plugins nothing creates items for new nodes
        sh.CreateItem(parent, node)


def _remove(scene, node) -> None:
    """Remove `node` with its display nodes (removing a displayable node alone leaves them behind)."""
    for i in range(node.GetNumberOfDisplayNodes()):
        display = node.GetNthDisplayNode(i)
        if display is not None:
            scene.RemoveNode(display)
    scene.RemoveNode(node)


def add_phantom_volume(scene, seed: int = 0, size=(96, 96, 80), spacing=(3.0, 3.0, 3.0), name: str = "FSEFT phantom"):
    """A procedural abdominal CT phantom (`pretraining.phantoms`) as a scalar volume node, plus its
    label map (universal ids, KJI like `slicer.util.arrayFromVolume`): sample data and ground truth
    for the self-test and for trying the module without patient data."""
    import numpy as np
    import SimpleITK as sitk

    from .pretraining.phantoms import make_phantom

    image, labels = make_phantom(seed, size=size, spacing=spacing)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(volume, sitk.GetArrayFromImage(image).astype(np.int16))
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = lps_to_ras @ np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    ijk_to_ras[:3, 3] = lps_to_ras @ np.array(image.GetOrigin())
    volume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
    volume.CreateDefaultDisplayNodes()
    return volume, sitk.GetArrayFromImage(labels)
