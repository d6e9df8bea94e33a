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
    partial = path.with_name(f".{path.stem}.partial.nrrd")  # the writer picks the format from ".nrrd"
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(partial))
    storage.SetUseCompression(0)
    if not storage.WriteData(volume_node) or not partial.is_file():  # no voxels: "success", no file
        partial.unlink(missing_ok=True)
        raise InputError(f"could not write volume '{volume_node.GetName()}' (has it any voxels?)", path)
    os.replace(partial, path)
    return path


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
