"""Reading CT volumes: NIfTI, NRRD, MetaImage and DICOM series folders, through SimpleITK.

SimpleITK (ITK) is what 3D Slicer itself reads these formats with, so the geometry we see (size,
spacing, origin, direction: oblique and anisotropic included) is exactly the one Slicer shows,
and the masks we write back on that grid overlay the CT voxel for voxel. Nothing here resamples
or reorients. Every way a user's file can be unusable becomes a one-line `InputError` naming
the file; we also catch NIfTI files cut short, which ITK would otherwise read silently as zeros.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .files import check_readable

#: File suffixes `read_image` accepts besides DICOM folders (anything SimpleITK reads also works).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def _itk_reason(error: RuntimeError) -> str:
    """The last informative line of an ITK exception (they span several lines with source paths)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line.strip().startswith("Reason:")]
    reason = lines[-1] if lines else "unknown error"
    for prefix in ("sitk::ERROR:", "ITK ERROR:"):
        reason = reason.split(prefix, 1)[-1].strip()
    return re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", reason)  # drop "MetaImageIO(0x55..): "


def _check_nifti_complete(path: Path, reader: sitk.ImageFileReader) -> None:
    """Raise if a NIfTI file holds fewer voxel bytes than its header announces.

    ITK reads a truncated .nii/.nii.gz without complaint and pads with zeros, which would be
    segmented as if it were real anatomy. The header (read by SimpleITK) gives the expected size;
    for .nii.gz the gzip trailer gives the stored size, and only when the two disagree (a
    truncated file, or a rare multi-member gzip) do we decompress to count exactly.
    """
    try:
        ndim = int(reader.GetMetaData("dim[0]"))
        voxels = math.prod(int(reader.GetMetaData(f"dim[{i}]")) for i in range(1, ndim + 1))
        expected = int(float(reader.GetMetaData("vox_offset"))) + voxels * int(reader.GetMetaData("bitpix")) // 8
    except (RuntimeError, ValueError):
        return  # not the NIfTI header we know: let ITK decide
    if path.name.lower().endswith(".gz"):
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            if int.from_bytes(f.read(4), "little") == expected % 2**32:
                return
        actual = 0
        try:
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    actual += len(chunk)
        except (EOFError, OSError, zlib.error):
            raise InputError("the compressed file is truncated or corrupt (incomplete download or copy?)", path) from None
    else:
        actual = path.stat().st_size
    if actual < expected:
        raise InputError(f"the file is truncated: {actual} bytes of {expected} expected", path)


def _read_file(path: Path) -> sitk.Image:
    check_readable(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        if path.name.lower().endswith((".nii", ".nii.gz")):  # single-file NIfTI (not .hdr/.img pairs)
            _check_nifti_complete(path, reader)
        return reader.Execute()
    except RuntimeError as error:
        raise InputError(f"cannot be read as an image ({_itk_reason(error)})", path) from None


def dicom_series(folder: str | os.PathLike) -> dict[str, list[str]]:
    """Series instance UID -> sorted slice files, for the DICOM files directly in `folder`."""
    reader = sitk.ImageSeriesReader()
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # "No Series were found" is our error to word
    try:
        return {uid: list(reader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in reader.GetGDCMSeriesIDs(str(folder))}
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _read_dicom_folder(folder: Path, series_id: str | None) -> sitk.Image:
    series = dicom_series(folder)
    if not series:
        raise InputError("no DICOM series in this folder (subfolders are not searched)", folder)
    if series_id is None:
        if len(series) > 1:
            listing = ", ".join(f"{uid} ({len(files)} files)" for uid, files in series.items())
            raise InputError(f"{len(series)} DICOM series in this folder, choose one: {listing}", folder)
        series_id = next(iter(series))
    elif series_id not in series:
        raise InputError(f"no DICOM series {series_id} here; present: {', '.join(series)}", folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series[series_id])
    try:
        return reader.Execute()  # GDCM applies RescaleSlope/Intercept: values are HU
    except RuntimeError as error:
        raise InputError(f"DICOM series {series_id} cannot be read ({_itk_reason(error)})", folder) from None


def _as_3d_scalar(image: sitk.Image, path: Path) -> sitk.Image:
    """Reduce harmless extra dimensions (one component, a trailing time axis of 1) or refuse."""
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise InputError(
            f"has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or vector image), not a CT volume", path
        )
    if "vector" in image.GetPixelIDTypeAsString():
        image = sitk.VectorIndexSelectionCast(image, 0)
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = sitk.Extract(image, [*image.GetSize()[:3], 0], [0, 0, 0, 0])
    size = "x".join(map(str, image.GetSize()))
    if image.GetDimension() != 3:
        raise InputError(f"is a {image.GetDimension()}D image ({size}), a 3D CT volume is needed", path)
    if min(image.GetSize()) < 2:
        raise InputError(f"is a single slice ({size}); give the whole volume (for DICOM: the series folder)", path)
    return image


def same_grid(a: sitk.Image, b: sitk.Image, *, spacing_rtol: float = 1e-5, origin_atol: float = 1e-3, direction_atol: float = 1e-5) -> bool:
    """Same voxel grid up to float round-off (NIfTI stores float32); origin tolerance in mm."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=spacing_rtol, atol=1e-6)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=origin_atol)
        and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=direction_atol)
    )


def read_image(path: str | os.PathLike, series_id: str | None = None) -> sitk.Image:
    """Read a CT volume as a 3D float32 SimpleITK image in the file's own geometry.

    `path` is an image file (NIfTI, NRRD, MetaImage, or any format SimpleITK reads) or a folder
    holding one DICOM series (or several, then `series_id` picks one). Values are the file's
    (HU for CT); float32 holds integer HU exactly.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError("no such file or folder", path)
    image = _read_dicom_folder(path, series_id) if path.is_dir() else _read_file(path)
    return sitk.Cast(_as_3d_scalar(image, path), sitk.sitkFloat32)


def ct_plausibility(image: sitk.Image) -> str | None:
    """A one-line warning when the intensities say "not a CT in Hounsfield units", else None.

    Any CT of the trunk holds air (about -1000 HU) around the body, in the lungs or the bowel,
    and fat (about -100 HU); MR, PET and CT exported without its rescale intercept (air at 0)
    have next to nothing below -200. CT values also stay within about [-3100, 4000] HU for
    nearly all voxels (-3024 is a common padding outside the field of view). The model would
    still run on such an input, so this is a warning for the user, not an error.
    """
    values = sitk.GetArrayViewFromImage(image).ravel()
    values = values[:: max(1, values.size // 2_000_000)]  # a sample is plenty for percentiles
    low, high = np.percentile(values, [0.5, 99.5])
    if high - low < 1:
        return f"the image is nearly constant ({low:g}); it does not look like a CT"
    if low < -3100 or high > 4000:
        return f"intensities span {low:.0f} to {high:.0f}, far outside the Hounsfield range of CT"
    below_air = float(np.mean(values < -200))
    if below_air < 0.005:
        return (
            f"only {100 * below_air:.1f}% of voxels are below -200 HU (no air or lung): this does not look "
            "like a CT in Hounsfield units (MR, PET, or CT without its rescale intercept?)"
        )
    return None
