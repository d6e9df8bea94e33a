"""Label-to-image synthesis: CT-like volumes from real label maps (no real images needed).

Why: the bundled model may only be trained on what we may use lawfully, and the public label maps
(BTCV, AMOS in `../shared/data/label-maps`) carry real anatomy without their images. Painting each
labelled organ with a plausible, randomised CT value, adding the body the maps lack and degrading
the result like a scanner gives unlimited, varied training images whose labels are exact.

`synthesize_ct(labels, seed)` takes a label map in universal ids (see `FSEFTSegmentLib.labels`;
remap source values first with a dataset's label template) and returns (image in HU, labels), both
on a new grid. Everything random comes from the seed:

- space: a random affine (rotation, +-25 % scale, shift) and a smooth elastic deformation
  (B-spline), applied when the labels are resampled (nearest neighbour) onto a grid of random
  resolution (in-plane and slice spacing drawn separately), so the model sees thin and thick slices;
- body context the maps lack, laid out around the real organs: skin, subcutaneous and visceral fat,
  muscle wall, psoas and back muscles, spine (placed behind the aorta) and ribs, small bowel and
  colon with walls, fluid and gas, lungs above the diaphragm, pelvic bone and an (unlabelled)
  bladder below, and sometimes the arms beside the body (the wall, bowel and skeleton are the
  phantoms' own, from `anatomy`);
- intensities: each organ's value is drawn between its native and portal-venous value at a
  per-volume contrast phase with a per-organ jitter (or an arterial / CT-angiography phase, bright
  vessels), with a smooth texture; gas and fluid inside the stomach (still labelled stomach) and
  hypodense lesions inside the liver (still labelled liver);
- scanner: partial-volume blur, correlated noise and a low-frequency bias field.

Label-map headers must be checked before use: the BTCV maps are mirrored left-right (see
`mirror_left_right` and `../shared/data/README.md`).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from . import anatomy

#: Universal id -> (native, portal-venous) HU ranges the organ's mean is drawn between.
ORGAN_HU: dict[int, tuple[tuple[float, float], tuple[float, float]]] = {
    1: ((40, 55), (105, 135)),  # spleen
    2: ((25, 40), (140, 190)),  # right kidney
    3: ((25, 40), (140, 190)),  # left kidney
    4: ((0, 20), (0, 25)),  # gallbladder (bile)
    5: ((30, 45), (50, 80)),  # esophagus
    6: ((50, 65), (95, 125)),  # liver
    7: ((25, 45), (45, 80)),  # stomach wall and content (gas painted separately)
    8: ((35, 50), (150, 210)),  # aorta
    9: ((35, 50), (110, 160)),  # inferior vena cava
    10: ((35, 50), (140, 190)),  # portal and splenic vein
    11: ((35, 50), (80, 115)),  # pancreas
    12: ((20, 35), (45, 75)),  # right adrenal gland
    13: ((20, 35), (45, 75)),  # left adrenal gland
    14: ((25, 45), (60, 100)),  # duodenum
    15: ((0, 15), (5, 20)),  # urinary bladder (urine)
    16: ((35, 50), (60, 100)),  # prostate or uterus
}
#: Arterial / CT-angiography phase: the arteries are bright, the veins and organs barely enhanced.
ARTERIAL_HU: dict[int, tuple[float, float]] = {8: (250, 450), 9: (60, 120), 10: (80, 150)}
_VESSELS = (8, 9, 10)


def mirror_left_right(labels: sitk.Image) -> sitk.Image:
    """The same array with the header's first direction column negated (x mirrored): the fix for
    label maps whose anatomy is left-right mirrored with respect to their header (BTCV here)."""
    fixed = sitk.Image(labels)
    direction = np.array(labels.GetDirection()).reshape(3, 3)
    direction[:, 0] *= -1
    fixed.SetDirection(tuple(direction.ravel()))
    return fixed


def _random_grid_transform(labels: sitk.Image, rng: np.random.Generator):
    """(transform from the new grid to the label map, new size, spacing, origin); identity direction."""
    size = np.array(labels.GetSize())
    spacing = np.array(labels.GetSpacing())
    direction = np.array(labels.GetDirection()).reshape(3, 3)
    centre = np.array(labels.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    extent = np.abs(direction @ (size * spacing))  # physical extent along x, y, z

    scale = rng.uniform(0.75, 1.25) * rng.uniform(0.95, 1.05, 3)  # anatomy grows by this factor
    angles = np.deg2rad(rng.uniform(-8, 8, 3) * np.array([1.0, 1.0, 1.5]))  # most about z
    rotation = sitk.Euler3DTransform((0, 0, 0), *angles).GetMatrix()
    affine = sitk.AffineTransform(3)
    affine.SetCenter(centre.tolist())
    affine.SetMatrix((np.array(rotation).reshape(3, 3) @ np.diag(1.0 / scale)).ravel().tolist())
    affine.SetTranslation(rng.normal(0.0, 8.0, 3).tolist())

    in_plane, through = rng.uniform(2.0, 4.0), rng.uniform(2.0, 5.0)
    new_spacing = np.array([in_plane, in_plane, through])
    new_extent = extent * scale
    new_size = np.maximum(np.ceil(new_extent / new_spacing).astype(int), 8)
    origin = centre - (new_size - 1) * new_spacing / 2

    # Elastic: a coarse B-spline over the grid with a few millimetres of random displacement.
    reference = sitk.Image([int(n) for n in new_size], sitk.sitkUInt8)
    reference.SetSpacing(new_spacing.tolist())
    reference.SetOrigin(origin.tolist())
    bspline = sitk.BSplineTransformInitializer(reference, [4, 4, 4])
    parameters = rng.normal(0.0, rng.uniform(2.0, 6.0), len(bspline.GetParameters()))
    bspline.SetParameters(parameters.tolist())
    composite = sitk.CompositeTransform([affine, bspline])
    return composite, reference


def _texture(shape, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Smooth zero-mean unit-SD random field."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return field / max(float(field.std()), 1e-6)


def synthesize_ct(labels: sitk.Image, seed: int, contrast: str | None = None) -> tuple[sitk.Image, sitk.Image]:
    """A synthetic CT (float32 HU) and its label map (uint8 universal ids) from a universal-id map.

    contrast: "native", "portal", "arterial" or None (drawn: a continuous phase between native and
    portal for most volumes, arterial for some). Same labels and seed, same bits.
    """
    rng = np.random.default_rng(seed)
    transform, reference = _random_grid_transform(labels, rng)
    resampled = sitk.Resample(labels, reference, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    organ_labels = sitk.GetArrayFromImage(resampled)  # (z, y, x)
    spacing = np.array(reference.GetSpacing())
    origin = np.array(reference.GetOrigin())
    present = [int(v) for v in np.unique(organ_labels) if v]

    if contrast is None:
        draw = rng.random()
        contrast = "arterial" if draw < 0.15 else "native" if draw < 0.3 else "portal" if draw < 0.55 else "mixed"
    phase = {"native": 0.0, "portal": 1.0, "arterial": 0.15}.get(contrast, None)
    phase = rng.uniform(0.0, 1.0) if phase is None else phase

    canvas, hu = _body_context(organ_labels, spacing, origin, rng, phase)
    shape = organ_labels.shape
    texture = _texture(shape, rng, 1.5 / spacing.mean() * 3)
    for label in present:
        (native, portal) = ORGAN_HU.get(label, ((30.0, 50.0), (60.0, 100.0)))
        organ_phase = float(np.clip(phase + rng.normal(0.0, 0.12), 0.0, 1.0))
        low = native[0] + organ_phase * (portal[0] - native[0])
        high = native[1] + organ_phase * (portal[1] - native[1])
        value = rng.uniform(low, high)
        if contrast == "arterial" and label in ARTERIAL_HU:
            value = rng.uniform(*ARTERIAL_HU[label])
        mask = organ_labels == label
        canvas.hu[mask] = value + rng.uniform(2.0, 8.0) * texture[mask]
    if 7 in present:
        _stomach_content(canvas.hu, organ_labels == 7, rng, hu)
    if 6 in present and rng.random() < 0.35:
        _liver_lesions(canvas.hu, organ_labels == 6, spacing, rng)

    # Scanner: partial-volume blur, correlated noise, a smooth bias field.
    blur_mm = rng.uniform(0.6, 2.0)
    array = ndimage.gaussian_filter(canvas.hu, blur_mm / spacing[::-1])
    noise = _texture(shape, rng, 0.6) * rng.uniform(5.0, 25.0)
    bias = _texture(shape, rng, 60.0 / spacing.mean()) * rng.uniform(0.0, 20.0)
    array = array + noise + bias * (array > -500)
    np.maximum(array, -1024.0, out=array)

    image = sitk.GetImageFromArray(array.astype(np.float32, copy=False))
    image.CopyInformation(reference)
    out_labels = sitk.GetImageFromArray(organ_labels.astype(np.uint8, copy=False))
    out_labels.CopyInformation(reference)
    return image, out_labels


def _body_context(organ_labels: np.ndarray, spacing: np.ndarray, origin: np.ndarray, rng: np.random.Generator, phase: float):
    """A phantom body (skin to spine, bowel, lungs, pelvis, arms) fitted around the real organs."""
    nz, ny, nx = organ_labels.shape
    coords = [origin[a] + spacing[a] * np.arange(n) for a, n in enumerate((nx, ny, nz))]
    organs = organ_labels > 0
    if not organs.any():
        raise ValueError("the label map has no labelled voxel")
    zz, yy, xx = np.nonzero(organs)
    points = np.stack([coords[0][xx], coords[1][yy], coords[2][zz]], 1)

    # The spine sits behind the aorta: put the phantom frame where its aorta (x 14, y 18) lands on
    # the real one; without an aorta, behind the organs' centre.
    aorta = organ_labels == 8
    if aorta.any():
        _, ay, ax = np.nonzero(aorta)
        anchor = np.array([np.median(coords[0][ax]), np.median(coords[1][ay])])
    else:
        anchor = np.array([np.median(points[:, 0]), np.percentile(points[:, 1], 75)])
    kidneys = np.isin(organ_labels, (2, 3))
    z_centre = np.median(coords[2][np.nonzero(kidneys)[0]]) if kidneys.any() else np.median(points[:, 2])

    # One in-plane scale so the phantom's abdominal cavity (about 0.78 of its half axes) holds
    # every organ, plus a random fat margin.
    relative = points[:, :2] - anchor
    guess_centre = np.array([-14.0, -18.0])
    cavity_axes = np.array([anatomy.HALF_WIDTH * 0.76, anatomy.HALF_DEPTH * 0.72])
    needed = np.sqrt((((relative - guess_centre) / cavity_axes) ** 2).sum(1)).max()
    scale_xy = max(needed, 0.75) * rng.uniform(1.0, 1.15)
    centre = anchor - np.array([14.0, 18.0]) * scale_xy

    axes = [(coords[0] - centre[0]) / scale_xy, (coords[1] - centre[1]) / scale_xy, (coords[2] - z_centre)]
    canvas = anatomy.Canvas(*(np.asarray(a, np.float32) for a in axes))
    hu = {name: rng.uniform(*bounds) for name, bounds in anatomy.TISSUE_HU.items()}
    hu["bowel_wall"] += 40.0 * phase
    cavity, body_shape = anatomy.body_wall(canvas, rng, hu)
    body = canvas.hu > -900
    cavity = cavity & ~organs
    lungs = _lungs(canvas, organ_labels, cavity, rng)
    anatomy.bowel(canvas, rng, hu, cavity & ~lungs)
    _pelvis(canvas, rng, hu, cavity, labelled_bladder=bool((organ_labels == 15).any()))
    if rng.random() < 0.4:
        _arms(canvas, rng, hu, body_shape)
    anatomy.skeleton(canvas, rng, hu, body_shape)
    canvas.labels[:] = 0  # context is unlabelled; the real organs carry the labels
    canvas.hu[organs & ~body] = hu["visceral_fat"]
    return canvas, hu


def _lungs(canvas, organ_labels: np.ndarray, cavity: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Air-filled lung above the dome formed by the upper organs (liver, spleen, stomach); returns it."""
    upper = np.isin(organ_labels, (1, 6, 7))
    if not upper.any():
        return np.zeros_like(cavity)
    nz = organ_labels.shape[0]
    top = np.where(upper.any(0), nz - 1 - np.argmax(upper[::-1], axis=0), -1).astype(np.float32)  # (y, x)
    reach = upper.any(0)
    filled = np.where(reach, top, top[reach].max() if reach.any() else nz)
    dome = ndimage.grey_dilation(filled, size=(5, 5))
    dome = ndimage.gaussian_filter(dome, 3.0) + rng.uniform(1.0, 3.0)
    z_index = np.arange(nz, dtype=np.float32)[:, None, None]
    lung = cavity & (z_index > dome[None])
    canvas.hu[lung] = rng.uniform(-900.0, -780.0)
    return lung


def _pelvis(canvas, rng: np.random.Generator, hu: dict[str, float], cavity: np.ndarray, labelled_bladder: bool = False) -> None:
    """Iliac wings and, for a map without a bladder of its own, an unlabelled fluid-filled bladder
    low in the frame (reference z < -110). A map that labels the bladder (AMOS) gets none: around
    its real bladder the fake one taught that a bladder is background. The draws are the same
    either way, so maps without a bladder synthesise as before."""
    z, y, x = canvas.coords((slice(None),) * 3)
    crest = -95.0 + rng.uniform(-25, 15)  # iliac crest height in the phantom frame
    band = (z < crest) & (z > crest - 70.0)
    for side in (-1.0, 1.0):
        flare = 1.0 + 0.004 * (z - crest)  # the wings narrow downwards
        shell = np.abs(np.hypot((x - side * 70.0) / (45.0 * flare), (y - 35.0) / 32.0) - 1.0) < 0.07
        canvas.hu[shell & band & (y > -25.0) & cavity] = hu["cortical_bone"] * 0.6
    if rng.random() < 0.6:
        radius = rng.uniform(25.0, 45.0)
        bladder = ((x / radius) ** 2 + ((y + 40.0) / (radius * 0.8)) ** 2 + ((z + 150.0) / radius) ** 2) <= 1.0
        urine = rng.uniform(0.0, 20.0)
        if not labelled_bladder:
            canvas.hu[bladder & cavity] = urine


def _arms(canvas, rng: np.random.Generator, hu: dict[str, float], body_shape) -> None:
    """Arms down beside the body: fat, muscle and a cortical humerus."""
    a = float(np.mean(body_shape[0]))
    _, y, x = canvas.coords((slice(None),) * 3)
    radius = rng.uniform(35.0, 50.0)
    for side in (-1.0, 1.0):
        cx = side * (a + radius + rng.uniform(5.0, 30.0))
        r = np.hypot(x - cx, y - rng.uniform(-10.0, 30.0))
        r = np.broadcast_to(r, canvas.hu.shape)
        canvas.hu[r < radius] = hu["subcutaneous_fat"]
        canvas.hu[r < radius * 0.75] = hu["muscle"]
        canvas.hu[r < 11.0] = hu["cortical_bone"]
        canvas.hu[r < 6.0] = hu["cancellous_bone"]


def _stomach_content(array: np.ndarray, stomach: np.ndarray, rng: np.random.Generator, hu: dict[str, float]) -> None:
    """Gas on the anterior (low y index = anterior in LPS) side and fluid or food below it."""
    ys = np.nonzero(stomach)[1]
    if rng.random() < 0.7:
        cut = np.quantile(ys, rng.uniform(0.05, 0.45))
        gas = stomach & (np.arange(stomach.shape[1])[None, :, None] < cut)
        array[gas] = hu["gas"]
    if rng.random() < 0.5:
        inner = ndimage.binary_erosion(stomach, iterations=2) & (array > -500)
        array[inner] = rng.uniform(-10.0, 30.0)


def _liver_lesions(array: np.ndarray, liver: np.ndarray, spacing: np.ndarray, rng: np.random.Generator) -> None:
    """A few hypodense round lesions inside the liver (they stay labelled liver)."""
    points = np.argwhere(liver)
    zyx_spacing = spacing[::-1]
    grid = np.indices(liver.shape, sparse=True)
    for _ in range(int(rng.integers(1, 5))):
        centre = points[rng.integers(len(points))]
        radius_mm = rng.uniform(5.0, 20.0)
        distance = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, zyx_spacing))
        lesion = liver & (distance <= radius_mm**2)
        array[lesion] -= rng.uniform(30.0, 70.0)
