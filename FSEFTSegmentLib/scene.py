"""The MRML bridge: a scene's volumes and annotations out to job files, the engine's segmentations back in.

This is the only engine module that touches MRML. It needs `slicer` (the application, or PyPI
`slicer-core` headless) but no Qt and no torch, so it runs inside Slicer's process and is tested
without the application. It uses storage nodes directly rather than `slicer.util.loadSegmentation`/
`saveNode`, which need `slicer.app`. What the panel needs before a job (`annotations`, `ct_warning`,
`check_free_space`) and after it (`quality_flags`) reads the scene only.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from .errors import InputError
from .io.images import ct_plausibility

_REFERENCE_ROLE = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()

#: The segment tags the engine writes on a checked structure (prediction.quality_tags).
QUALITY_FLAG_TAG, VOLUME_TAG, EXPECTED_VOLUME_TAG = "FSEFT.QualityFlag", "FSEFT.VolumeML", "FSEFT.ExpectedVolumeML"


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
    return [node for node in _segmentation_nodes(scene) if node.GetNodeReferenceID(_REFERENCE_ROLE) == volume_node.GetID()]


@dataclass(frozen=True)
class Annotation:
    """A volume annotated in the scene: the segmentations drawn on it, the names of their segments
    (in order, each once) and those of the names that have voxels."""

    volume: object  # vtkMRMLScalarVolumeNode
    segmentations: tuple  # vtkMRMLSegmentationNode, in scene order
    segment_names: tuple[str, ...]
    non_empty: frozenset[str]


def annotations(scene) -> list[Annotation]:
    """Every scalar volume (not label maps) that a segmentation references as its reference
    geometry, in scene order: what the panel lists as annotated volumes, counts K from (the
    volumes with a non-empty segment of a name) and builds its structure picker from."""
    found = []
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        volume = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
        if volume.IsA("vtkMRMLLabelMapVolumeNode") or volume.IsA("vtkMRMLTensorVolumeNode"):  # tensor: vector, DWI
            continue
        segmentation_nodes = tuple(segmentations_of(scene, volume))
        if not segmentation_nodes:
            continue
        names, non_empty = {}, set()
        for node in segmentation_nodes:
            segmentation = node.GetSegmentation()
            for index in range(segmentation.GetNumberOfSegments()):
                segment = segmentation.GetNthSegment(index)
                names.setdefault(segment.GetName())
                if _has_voxels(segmentation, segment):
                    non_empty.add(segment.GetName())
        found.append(Annotation(volume, segmentation_nodes, tuple(names), frozenset(non_empty)))
    return found


def segment_names(scene) -> list[str]:
    """The segment names of all `annotations`, in order, each once: the structures one can adapt to."""
    return list(dict.fromkeys(name for annotation in annotations(scene) for name in annotation.segment_names))


def annotated_volumes(scene, volume_nodes, segment_names: str | Sequence[str]) -> list[tuple]:
    """Pair each volume with its annotation: of the segmentations drawn on it, the one holding most
    of `segment_names` with voxels (then: by name; the first on ties), so that `export_supports`
    names what is missing there. One-line `InputError` for a volume no segmentation references
    (saying which volumes the segmentations holding those segments belong to instead), and for
    segments drawn on one volume but split over several segmentations."""
    names, volume_nodes = _structure_names(segment_names), list(volume_nodes)
    pairs = []
    for volume in volume_nodes:
        candidates = segmentations_of(scene, volume)
        if not candidates:  # perhaps drawn with another volume as the source: say which
            elsewhere = [f"'{node.GetName()}' holding it belongs to {_owner(node)}" for node in _segmentation_nodes(scene)
                         if node.GetNodeReference(_REFERENCE_ROLE) not in volume_nodes
                         and any(_segment_id(node, name) for name in names)]
            hint = "; ".join(elsewhere[:3]) + (f"; {len(elsewhere) - 3} more" if len(elsewhere) > 3 else "")
            raise InputError(f"volume '{volume.GetName()}' has no segmentation: annotate {_quoted(names)} in the Segment "
                             "Editor with this volume as the source volume" + (f" ({hint})" if hint else ""))
        chosen = max(candidates, key=lambda node: (sum(_drawn(node, name) for name in names),
                                                   sum(bool(_segment_id(node, name)) for name in names)))
        holders = {name: chosen if _drawn(chosen, name) else next((node for node in candidates if _drawn(node, name)), chosen)
                   for name in names}
        if any(node is not chosen for node in holders.values()):
            where = "; ".join(f"'{name}' in '{node.GetName()}'" for name, node in holders.items())
            raise InputError(f"the segments of '{volume.GetName()}' are in different segmentations ({where}): copy them "
                             "into one (Segmentations module, Copy/move segments)")
        pairs.append((volume, chosen))
    return pairs


def _drawn(segmentation_node, name: str) -> bool:
    """Whether the segmentation has a segment `name` (see `_segment_id`) with voxels."""
    segment_id = _segment_id(segmentation_node, name)
    segmentation = segmentation_node.GetSegmentation()
    return bool(segment_id) and _has_voxels(segmentation, segmentation.GetSegment(segment_id))


@dataclass(frozen=True)
class SupportExport:
    """What `export_supports` wrote: (image, label map) paths per support, in order, and notices
    for the user (a segment resampled from another grid, overlapping segments). Iterating yields
    the pairs, so it goes wherever they are expected (`jobs.adapt_command`)."""

    supports: list[tuple[Path, Path]]
    notices: list[str] = field(default_factory=list)

    def __iter__(self):
        return iter(self.supports)


def export_supports(scene, pairs, segment_names: str | Sequence[str], folder: str | os.PathLike) -> SupportExport:
    """Write each annotated (volume, segmentation) pair: the volume (`export_volume`) and a label
    map of `segment_names` (value i+1 for `segment_names[i]`, on the volume's own grid,
    uncompressed `labels/<image stem>.nrrd`), for the engine's `--structure NAME=i+1`.

    Each segment is exported onto the volume's grid by Slicer itself: a segmentation whose labelmap
    lies on another grid (Segment Editor oversampling, a file on another lattice, under another
    transform) is resampled (nearest neighbour), and a notice says so. Where segments overlap, the
    later one in `segment_names` wins (as in the engine's label maps) and a notice counts the voxels.
    One-line `InputError`, before any file is written, for a segmentation drawn on another volume, a
    missing segment (naming those there) or one without voxels on the volume. Nodes the export
    creates are removed, whatever happens."""
    names = _structure_names(segment_names)
    folder = Path(folder)
    labels, notices = [], []
    for volume, segmentation_node in pairs:
        owner = segmentation_node.GetNodeReference(_REFERENCE_ROLE)
        if owner is not volume:
            raise InputError(f"segmentation '{segmentation_node.GetName()}' belongs to {_owner(segmentation_node)}, not to "
                             f"'{volume.GetName()}': annotate '{volume.GetName()}' with it as the Segment Editor's source volume")
        array = None
        for value, name in enumerate(names, start=1):
            mask = _segment_on_grid(scene, segmentation_node, name, volume, notices)
            if array is None:
                array = np.zeros(mask.shape, np.uint8 if len(names) < 256 else np.uint16)
            overlapped = array[mask]
            if overlapped.any():
                earlier = _quoted([names[v - 1] for v in np.unique(overlapped[overlapped > 0])])
                notices.append(f"segment '{name}' of '{segmentation_node.GetName()}' overlaps {earlier} in "
                               f"{np.count_nonzero(overlapped)} voxels, labelled '{name}' there")
            array[mask] = value
        labels.append((volume, array))
    supports = []
    for volume, array in labels:
        image = export_volume(volume, folder)
        label = folder / "labels" / f"{image.stem}.nrrd"
        label.parent.mkdir(parents=True, exist_ok=True)
        with _temporary_nodes(scene):
            labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
            labelmap.SetIJKToRASMatrix(_ijk_to_ras(volume))
            slicer.util.updateVolumeFromArray(labelmap, array)
            _write_nrrd(labelmap, label)
        supports.append((image, label))
    return SupportExport(supports, notices)


def _segment_on_grid(scene, segmentation_node, name: str, volume, notices: list[str]) -> np.ndarray:
    """Segment `name` as a boolean (k, j, i) array on `volume`'s grid; a notice when it was resampled."""
    segmentation = segmentation_node.GetSegmentation()
    segment_id = _segment_id(segmentation_node, name)
    if not segment_id:
        present = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        raise InputError(f"segmentation '{segmentation_node.GetName()}' of '{volume.GetName()}' has no segment '{name}'"
                         f" (it has: {_quoted(present) or 'no segments'})")
    difference = _grid_difference(segmentation_node, segmentation.GetSegment(segment_id), volume)
    with _temporary_nodes(scene):  # the export adds a label map, its display node and a colour table
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        # The reference volume is what puts the label map on the volume's grid (else: cropped).
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, volume):
            raise InputError(f"could not export segment '{name}' of '{segmentation_node.GetName()}'")
        mask = slicer.util.arrayFromVolume(labelmap) != 0
    if not mask.any():
        raise InputError(f"segment '{name}' of '{segmentation_node.GetName()}' is empty: draw it on '{volume.GetName()}' first")
    if difference:
        notices.append(f"segment '{name}' of '{segmentation_node.GetName()}' was on a different grid ({difference}); "
                       f"resampled onto the grid of '{volume.GetName()}'")
    return mask


def _grid_difference(segmentation_node, segment, volume) -> str | None:
    """How the segment's labelmap grid differs from the volume's, seen from the volume, or None when
    their voxel centres coincide (the same lattice, cropped or with axes swapped: exact)."""
    image = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    if image is None:  # drawn as a surface: rasterized on the volume's grid, nothing to align
        return None
    to_volume_frame = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(
            segmentation_node.GetParentTransformNode(), volume.GetParentTransformNode(), to_volume_frame):
        return "under a non-linear transform"
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    segment_to_ras = slicer.util.arrayFromVTKMatrix(to_volume_frame) @ slicer.util.arrayFromVTKMatrix(matrix)
    volume_to_ras = slicer.util.arrayFromVTKMatrix(_ijk_to_ras(volume))
    segment_to_volume = np.linalg.solve(volume_to_ras, segment_to_ras)  # segment voxel index -> volume voxel index
    axes, offset = segment_to_volume[:3, :3], segment_to_volume[:3, 3]
    if np.allclose(axes, np.round(axes), atol=1e-4) and np.allclose(offset, np.round(offset), atol=1e-3) \
            and np.allclose(np.abs(np.round(axes)).sum(axis=0), 1):  # a signed permutation: same voxel centres
        return None
    spacing = np.linalg.norm(segment_to_ras[:3, :3], axis=0)
    volume_spacing = np.linalg.norm(volume_to_ras[:3, :3], axis=0)
    turned = (volume_to_ras[:3, :3] / volume_spacing).T @ (segment_to_ras[:3, :3] / spacing)  # direction cosines
    angle = float(np.degrees(np.arccos(np.clip(np.abs(turned).max(axis=0).min(), -1.0, 1.0))))
    parts = []
    if not np.allclose(spacing, volume_spacing, rtol=1e-4):
        parts.append(f"{_mm(spacing)} mm voxels instead of {_mm(volume_spacing)} mm")
    if angle > 0.01:
        parts.append(f"rotated by {angle:.1f} degrees")
    if not parts:
        parts.append(f"shifted by {', '.join(f'{round(v, 3) or 0.0:g}' for v in offset - np.round(offset))} voxels")
    return "; ".join(parts)


def _mm(values) -> str:
    return "x".join(f"{v:.3g}" for v in values)


def _has_voxels(segmentation, segment) -> bool:
    """Whether a segment holds anything, read from its source representation (no conversion)."""
    data = segment.GetRepresentation(segmentation.GetSourceRepresentationName())
    if data is None:
        return False
    if isinstance(data, slicer.vtkOrientedImageData):  # shared by the segments of a layer: look for its value
        scalars = data.GetPointData().GetScalars()
        return scalars is not None and bool((numpy_support.vtk_to_numpy(scalars) == segment.GetLabelValue()).any())
    return data.GetNumberOfPoints() > 0  # a closed surface


def _segment_id(segmentation_node, name: str) -> str:
    """The id of the segment called `name`; a case-insensitive match when it is the only one; else ''."""
    segmentation = segmentation_node.GetSegmentation()
    found = segmentation.GetSegmentIdBySegmentName(name)
    if found:
        return found
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())
           if segmentation.GetNthSegment(i).GetName().casefold() == name.casefold()]
    return ids[0] if len(ids) == 1 else ""


def _structure_names(segment_names: str | Sequence[str]) -> list[str]:
    """One name or several, as a list; `InputError` when none is given or one repeats (ignoring case)."""
    names = [segment_names] if isinstance(segment_names, str) else list(segment_names)
    if not names or len({name.casefold() for name in names}) != len(names):
        raise InputError(f"name each segment to learn once (got: {_quoted(names) or 'none'})")
    return names


def _owner(segmentation_node) -> str:
    """The volume a segmentation was drawn on, for messages."""
    volume = segmentation_node.GetNodeReference(_REFERENCE_ROLE)
    return f"volume '{volume.GetName()}'" if volume is not None else "no volume"


def _quoted(names) -> str:
    return ", ".join(f"'{name}'" for name in names)


def _segmentation_nodes(scene) -> list:
    return [scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))]


def _ijk_to_ras(volume_node) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return matrix


@contextmanager
def _temporary_nodes(scene):
    """Remove the nodes added inside the block (the singletons excepted), whatever happens."""
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    finally:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in reversed([n for n in added if n.GetID() not in before and not n.GetSingletonTag()]):
            scene.RemoveNode(node)


def ct_warning(volume_node) -> str | None:
    """The engine's own one-line "does not look like a CT in HU" warning (`io.images.ct_plausibility`)
    for a volume, else None (also for a volume without voxels): shown before a job, which still runs."""
    if volume_node.GetImageData() is None:
        return None
    return ct_plausibility(sitk.GetImageFromArray(slicer.util.arrayFromVolume(volume_node)))


def check_free_space(folder: str | os.PathLike, volume_nodes, factor: float = 1.5) -> int:
    """Refuse a job whose folder would fill the disk, before anything is written; return the bytes
    it needs. The estimate: per voxel of each volume, its exported image (uncompressed), a support
    label map and a result (one byte each, before compression), times `factor` for what else the
    engine writes (layered results, reports). One-line `InputError` naming the folder, the MB
    needed and free, and what to do."""
    needed = int(factor * sum(
        node.GetImageData().GetNumberOfPoints()
        * (node.GetImageData().GetScalarSize() * node.GetImageData().GetNumberOfScalarComponents() + 2)
        for node in volume_nodes if node.GetImageData() is not None))
    existing = Path(folder).absolute()
    while not existing.exists():  # the job folder itself may not exist yet
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise InputError(f"not enough disk space for this job: about {needed / 1e6:.0f} MB needed, {free / 1e6:.0f} MB "
                         "free; free some space or choose another temporary folder (Slicer: Edit > Application "
                         "Settings > General > Temporary directory)", folder)
    return needed


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


def import_results(scene, outputs: Mapping, volumes: Mapping, names: Mapping[str, str] | None = None) -> list:
    """Import each study's .seg.nrrd beside its volume (the job's importer), named `names[study]`
    when given (else "<volume> segmentation"). Each file comes in whole or not at all; one bad
    result does not lose the others: all that can be imported are, then one `InputError` lists
    the failures."""
    nodes, errors = [], []
    for study, paths in outputs.items():
        for path in (Path(p) for p in paths if str(p).endswith(".seg.nrrd")):
            try:
                nodes.append(import_segmentation(scene, path, volumes[study], name=(names or {}).get(study)))
            except KeyError:
                errors.append(f"{path}: study {study!r} is not one of this run's volumes")
            except InputError as error:
                errors.append(str(error))
    if errors:
        raise InputError("; ".join(errors))
    return nodes


@dataclass(frozen=True)
class SegmentQuality:
    """The engine's volume check of one predicted structure, as its segment tags hold it (text,
    as written): the flag (None: plausible), the volume in mL and the expected range in mL."""

    flag: str | None
    volume_ml: str | None
    expected_ml: str | None


def segment_quality(segmentation_node) -> dict[str, SegmentQuality]:
    """Segment name -> the engine's volume check, for the segments that carry one (those with an
    expected volume: an adapter's size prior)."""
    found = {}
    segmentation = segmentation_node.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        tags = [_tag(segment, key) for key in (QUALITY_FLAG_TAG, VOLUME_TAG, EXPECTED_VOLUME_TAG)]
        if any(tags):
            found[segment.GetName()] = SegmentQuality(*tags)
    return found


def quality_flags(segmentation_node) -> dict[str, str]:
    """Segment name -> the engine's warning for the segments whose volume is implausible."""
    return {name: quality.flag for name, quality in segment_quality(segmentation_node).items() if quality.flag}


def _tag(segment, key: str) -> str | None:
    value = vtk.reference("")
    return str(value) if segment.GetTag(key, value) and str(value) else None


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
