"""Writing results (Slicer .seg.nrrd, label map + JSON table) and reading one structure back.

The .seg.nrrd is what Slicer loads without any extension: names, colours, terminology and
extra tags travel in the header, so a result opened by drag and drop already looks right.
It is written with slicerio (pure Python, so the engine needs no Slicer) on the reference CT's
exact grid, and the reference geometry is stored too, so editing it in Slicer keeps that grid.
Structures may overlap (a vessel inside an organ), which a single label map cannot hold: the
masks are then spread over layers (a 4D "list domain domain domain" NRRD), exactly as Slicer
stores overlapping segments. Label value c+1 always means structure c, in every layer.
"""

from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import nrrd
import numpy as np
import SimpleITK as sitk
import slicerio

from ..errors import InputError
from .files import atomic_write, check_readable

if TYPE_CHECKING:  # labels.py is imported lazily by callers; only the attributes are used here
    from ..labels import Structure

_GEOMETRY_DESCRIPTION = (
    "Image geometry description string determining the geometry of the labelmap that is created in course of "
    "conversion. Can be copied from a volume, using the button."
)


def _check(masks: np.ndarray, reference: sitk.Image, structures: Sequence[Structure]) -> np.ndarray:
    """Programming errors (not user errors): wrong mask stack shape or structure count."""
    masks = np.asarray(masks)
    expected = tuple(reversed(reference.GetSize()))
    if masks.ndim != 4 or masks.shape[1:] != expected:
        raise ValueError(f"masks must be (C, {', '.join(map(str, expected))}) on the reference grid, got {masks.shape}")
    if masks.shape[0] != len(structures):
        raise ValueError(f"{masks.shape[0]} masks for {len(structures)} structures")
    names = [s.name for s in structures]
    if len(set(names)) != len(names):  # names are the segment IDs
        raise ValueError(f"structure names repeat: {names}")
    return masks


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    """4x4 voxel-index (i, j, k) to LPS matrix of a SimpleITK image: direction x spacing, origin."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def slicer_geometry_string(image: sitk.Image) -> str:
    """Slicer's "Reference image geometry" string: IJK-to-RAS row by row, then the extent."""
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_lps(image)
    extent = [v for n in image.GetSize() for v in (0, n - 1)]
    return "".join(f"{float(v)!r};" for v in ijk_to_ras.ravel()) + "".join(f"{v};" for v in extent)


def _layers(masks: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Pack binary masks into as few label layers as possible without overwriting any voxel.

    Mask c gets value c+1 in the first layer where it overlaps nothing (Slicer's own rule, but
    with global values so that a value names one structure). Returns (L, z, y, x), layer per mask.
    """
    dtype = np.uint8 if len(masks) < 256 else np.uint16
    layers: list[np.ndarray] = []
    placement = []
    for value, mask in enumerate(masks, start=1):
        inside = mask != 0
        for index, layer in enumerate(layers):
            if not layer[inside].any():
                break
        else:
            layers.append(np.zeros(masks.shape[1:], dtype))
            index = len(layers) - 1
        layers[index][inside] = value
        placement.append(index)
    if not layers:
        layers.append(np.zeros(masks.shape[1:], dtype))
    return np.stack(layers), placement


def header_text(text: str) -> str:
    """Text as a NRRD header can hold it: ASCII on one line (pynrrd, and so slicerio, write ASCII
    headers only): dashes and ellipses spelled out, accents dropped ("glúteo" -> "gluteo"), no '|'."""
    for fancy, plain in (("\u2013", "-"), ("\u2014", "-"), ("\u2212", "-"), ("\u2026", "..."), ("|", "/")):
        text = text.replace(fancy, plain)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return " ".join(text.split())


def _header_values(value):
    """`header_text` applied to every string of a (nested) terminology entry."""
    if isinstance(value, str):
        return header_text(value)
    if isinstance(value, dict):
        return {key: _header_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_header_values(item) for item in value]
    return value


def _check_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """Slicer stores tags as `key:value|key:value|`: keys cannot hold ':' or '|', values not '|'."""
    for key, value in tags.items():
        if not key or ":" in key or "|" in key or "|" in str(value):
            raise ValueError(f"segment tag {key!r}: {value!r} cannot be stored (':' or '|' in it)")
    return {key: header_text(str(value)) for key, value in tags.items()}


def write_segmentation(
    path: str | os.PathLike,
    masks: np.ndarray,
    reference: sitk.Image,
    structures: Sequence[Structure],
    segment_tags: Sequence[Mapping[str, str] | None] | None = None,
) -> Path:
    """Write a Slicer .seg.nrrd (atomically) with one segment per structure, on `reference`'s grid.

    `masks` is (C, z, y, x) in SimpleITK array order, any non-zero voxel inside. Segment c has
    ID `structures[c].name` (stable across runs, so scripts can find it), the display name,
    colour and terminology of the structure, label value c+1, and the tags `segment_tags[c]`
    (e.g. a quality flag). Empty masks still give a (empty) segment. Returns the path.
    """
    masks = _check(masks, reference, structures)
    if segment_tags is not None and len(segment_tags) != len(structures):
        raise ValueError(f"{len(segment_tags)} tag sets for {len(structures)} structures")
    layers, placement = _layers(masks)
    voxels = layers[0].transpose(2, 1, 0) if len(layers) == 1 else layers.transpose(0, 3, 2, 1)  # -> (i, j, k)
    full_extent = [v for n in reference.GetSize() for v in (0, n - 1)]
    segments = []
    for index, structure in enumerate(structures):
        segment = {
            "id": structure.name,
            "name": header_text(structure.display_name),
            "nameAutoGenerated": False,
            "color": [round(c / 255, 6) for c in structure.color],
            "colorAutoGenerated": False,
            "labelValue": index + 1,
            "layer": placement[index],
            # Full extent on purpose: some Slicer versions crop a layer to its first segment's extent.
            "extent": full_extent,
            "terminology": _header_values(structure.slicerio_terminology()),
        }
        if segment_tags is not None and segment_tags[index]:
            segment["tags"] = _check_tags(segment_tags[index])
        segments.append(segment)
    segmentation = {
        "voxels": voxels,
        "ijkToLPS": ijk_to_lps(reference),
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        # Written as the raw header field: Slicer only takes a parameter followed by "&", and
        # slicerio's "conversionParameters" joins them without the final one (the last is lost).
        "Segmentation_ConversionParameters": f"Reference image geometry|{slicer_geometry_string(reference)}|{_GEOMETRY_DESCRIPTION}&",
        "segments": segments,
    }
    with atomic_write(path) as tmp:
        slicerio.write_segmentation(str(tmp), segmentation, compression_level=1)
    return Path(path)


def write_label_map(path: str | os.PathLike, masks: np.ndarray, reference: sitk.Image, structures: Sequence[Structure]) -> Path:
    """Write a label map (format from the suffix: .nii.gz, .nrrd, .mha...) atomically.

    Voxel value c+1 is `structures[c]`, 0 is background. A label map holds one value per voxel,
    so where masks overlap the LATER structure in `structures` wins; use the .seg.nrrd to keep
    overlaps. The image has the reference's exact geometry.
    """
    masks = _check(masks, reference, structures)
    labels = np.zeros(masks.shape[1:], np.uint8 if len(masks) < 256 else np.uint16)
    for value, mask in enumerate(masks, start=1):
        labels[mask != 0] = value
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(reference)
    with atomic_write(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return Path(path)


def label_table(structures: Sequence[Structure]) -> dict:
    """The JSON-ready description of label map values (see `write_label_table`)."""
    return {
        "background": 0,
        "labels": [
            {
                "value": value,
                "name": s.name,
                "display_name": s.display_name,
                "color": [int(c) for c in s.color],
                "terminology": s.slicerio_terminology(),
                "terminology_entry": s.terminology_string(),
            }
            for value, s in enumerate(structures, start=1)
        ],
    }


def write_label_table(path: str | os.PathLike, structures: Sequence[Structure]) -> Path:
    """Write the label map's value table as JSON (value, names, RGB 0-255, terminology codes), atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(label_table(structures), indent=2) + "\n", encoding="utf-8")
    return Path(path)


def _read(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError:
        raise InputError("cannot be read as a label map or segmentation", path) from None


def _segment_mask(path: Path, selector: str | int) -> sitk.Image:
    try:
        segments = slicerio.read_segmentation(str(path), skip_voxels=True)["segments"]
    except Exception:  # slicerio raises IOError, NRRDError, ValueError... all mean "not a segmentation"
        raise InputError("cannot be read as a Slicer segmentation", path) from None
    wanted = str(selector)
    found = [s for s in segments if s.get("id") == wanted] or [s for s in segments if s.get("name") == wanted]
    if not found and wanted.isdigit():
        found = [s for s in segments if s.get("labelValue", 1) == int(wanted)]
    if len(found) != 1:
        listing = ", ".join(f"{s.get('name')} (id {s.get('id')}, value {s.get('labelValue', 1)})" for s in segments)
        problem = "several segments match" if found else "no segment"
        raise InputError(f"{problem} {wanted!r}; segments: {listing or 'none'}", path)
    image = _read(path)  # ITK gives the exact geometry; a layered file reads as one component per layer
    layer = found[0].get("layer", 0)
    if "vector" in image.GetPixelIDTypeAsString():
        if layer >= image.GetNumberOfComponentsPerPixel():
            raise InputError(f"segment {wanted!r} is in layer {layer}, which the file does not hold", path)
        image = sitk.VectorIndexSelectionCast(image, layer)
    return sitk.Cast(image == found[0].get("labelValue", 1), sitk.sitkUInt8)


def read_structure_mask(path: str | os.PathLike, selector: str | int) -> sitk.Image:
    """One structure of a label map or a .seg.nrrd as a uint8 0/1 image on the file's own grid.

    For a label map, `selector` is the label value (int or digit string). For a Slicer
    segmentation it is a segment ID, a segment name, or a label value (unique across layers in
    our own files). A missing value or segment is an `InputError` that lists what is there.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError("is a folder, not a label file" if path.is_dir() else "no such file", path)
    check_readable(path)
    if path.name.lower().endswith((".seg.nrrd", ".nrrd", ".nhdr")):
        try:
            is_segmentation = any(k.startswith("Segment0_") for k in nrrd.read_header(str(path)))
        except Exception:
            raise InputError("cannot be read as a NRRD file", path) from None
        if is_segmentation:
            return _segment_mask(path, selector)
    try:
        value = int(selector)
    except (TypeError, ValueError):
        raise InputError(f"is a label map: select a structure by its value, not {selector!r}", path) from None
    image = _read(path)
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        raise InputError("is not a 3D label map", path)
    present = np.unique(sitk.GetArrayViewFromImage(image))
    if value not in present:
        labels = [f"{v:g}" for v in present[present != 0]]
        listed = ", ".join(labels[:40]) + (f" ... ({len(labels)} in all)" if len(labels) > 40 else "") if labels else "none"
        raise InputError(f"has no voxel with label {value}; labels present: {listed}", path)
    return sitk.Cast(image == value, sitk.sitkUInt8)
