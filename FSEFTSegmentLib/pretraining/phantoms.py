"""Procedural abdominal CT phantoms with labels, generated inside the product from a seed.

Why: pretraining a small bundled foundation model, and the demo/self-test, need CT-like volumes
with ground truth that ship with the code (no patient data, no downloads, no licences). A phantom
is drawn from a seed alone, so the same seed gives bit-identical volumes on every machine.

What: `make_phantom(seed)` returns (image, labels) as SimpleITK images on one grid, LPS with identity
direction (x towards the patient's left, y posterior, z superior; an abdomen CT as Slicer and ITK
read it). The image is float32 HU; the label map is uint8 with universal ids (= model channel + 1,
see `FSEFTSegmentLib.labels`). Every phantom contains exactly these ids (`PHANTOM_LABEL_IDS`):

    1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 6 liver, 7 stomach, 8 aorta,
    9 inferior vena cava, 10 portal and splenic vein, 11 pancreas, 23 bone (spine and ribs)

Everything else (air, skin, fat, muscle wall, psoas and back muscles, spinal canal, discs, bowel
loops and colon with gas) is body context with label 0, as in the real annotated data sets.

How: anatomy is laid out in the reference abdomen of `anatomy` (millimetres, origin at the body
centre, axes as LPS: half width 145 mm, half depth 115 mm, 240 mm tall) and mapped onto the
requested grid by a per-seed scale, so any field of view gets a whole body. Organs are ellipsoids or tubes along
polylines (`ORGANS`), each with per-seed jitter of position, size and orientation and a smooth
low-frequency "wobble" of its surface, so no two phantoms share a shape. Each structure is
evaluated only inside its own bounding box with numpy broadcasting (no loops over voxels), which
keeps a 96 x 96 x 80 phantom well under a second. HU values are drawn per seed from the ranges in
`TISSUE_HU` and `ORGANS`; the contrast phase ("native" or "portal") selects the organ ranges. The
piecewise-constant volume is then blurred slightly (scanner resolution) and correlated noise added.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .anatomy import BONE_LABEL, HEIGHT, REACH, TISSUE_HU, Canvas, body_wall, bowel, skeleton, tube

CONTRASTS = ("native", "portal")

#: Metadata keys set on the returned image, so a consumer (or a test) knows how it was drawn.
META_SEED = "FSEFT_phantom_seed"
META_CONTRAST = "FSEFT_phantom_contrast"

@dataclass(frozen=True)
class Organ:
    """One labelled structure of the phantom.

    `shape` is "ellipsoid" (`centre` + `radii` + `tilt_deg`, rotation about z then x, in degrees) or
    "tube" (`path`: points of a polyline, `radius` per point). Several entries may share a label
    (the liver's two lobes). HU ranges are those the organ's value is drawn from; the measured mean
    over the organ's interior stays in them (noise is zero-mean, blur only touches the border).
    """

    name: str
    label: int  # universal id = model channel + 1
    native: tuple[float, float]
    portal: tuple[float, float]
    shape: str
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0)
    radii: tuple[float, float, float] = (1.0, 1.0, 1.0)
    tilt_deg: tuple[float, float] = (0.0, 0.0)
    path: tuple[tuple[float, float, float], ...] = ()
    radius: tuple[float, ...] = ()


# Painting order matters: later structures win where shapes overlap (the gallbladder lies in its
# fossa under the liver, the kidneys press into the liver and spleen, vessels run through organs).
# Coordinates: reference-abdomen mm, x to the patient's LEFT (liver at x < 0), y posterior, z up.
# fmt: off
ORGANS: tuple[Organ, ...] = (
    Organ("stomach", 7, (15, 40), (35, 70), "ellipsoid", (45, -30, 55), (45, 38, 55), (-25, 10)),
    Organ("liver", 6, (50, 65), (95, 125), "ellipsoid", (-65, 0, 50), (70, 72, 62), (10, 0)),
    Organ("liver", 6, (50, 65), (95, 125), "ellipsoid", (5, -50, 62), (45, 28, 30), (-15, 0)),
    Organ("spleen", 1, (40, 55), (105, 135), "ellipsoid", (95, 50, 55), (24, 48, 45), (-35, 10)),
    Organ("kidney_right", 2, (25, 40), (140, 190), "ellipsoid", (-66, 50, -10), (26, 23, 52), (20, -10)),
    Organ("kidney_left", 3, (25, 40), (140, 190), "ellipsoid", (68, 50, 5), (26, 23, 52), (-20, -10)),
    Organ("gallbladder", 4, (0, 20), (0, 20), "ellipsoid", (-40, -55, 15), (15, 16, 32), (0, 30)),
    Organ("pancreas", 11, (35, 50), (80, 115), "tube",
          path=((-28, -12, -5), (0, -22, 8), (40, -5, 18), (80, 25, 28)), radius=(16, 12, 11, 10)),
    Organ("aorta", 8, (35, 50), (150, 210), "tube",
          path=((14, 20, -130), (16, 18, 0), (12, 18, 130)), radius=(10, 11, 12)),
    Organ("inferior_vena_cava", 9, (35, 50), (110, 160), "tube",
          path=((-22, 18, -130), (-22, 15, 40), (-30, 5, 110)), radius=(11, 12, 11)),
    Organ("portal_and_splenic_vein", 10, (35, 50), (140, 190), "tube",
          path=((80, 38, 42), (40, 8, 24), (5, -3, 12), (-30, -5, 45)), radius=(5, 6, 7, 7)),
)
# fmt: on

#: Bone (`anatomy.BONE_LABEL`) mixes cancellous core and cortical rim, hence the wide range.
BONE_HU = (TISSUE_HU["cancellous_bone"][0], TISSUE_HU["cortical_bone"][1])

#: The universal ids every phantom contains.
PHANTOM_LABEL_IDS: tuple[int, ...] = tuple(sorted({o.label for o in ORGANS} | {BONE_LABEL}))


def hu_range(label: int, contrast: str) -> tuple[float, float]:
    """The HU range a structure's value is drawn from, for a label id and a contrast phase."""
    if label == BONE_LABEL:
        return BONE_HU
    for organ in ORGANS:
        if organ.label == label:
            return organ.portal if contrast == "portal" else organ.native
    raise KeyError(f"label {label} is not in the phantom")


def _rotation(rng: np.random.Generator, tilt_deg=(0.0, 0.0), jitter_deg=8.0) -> np.ndarray:
    """Rotation about z then x by the stated tilt plus a random jitter (each axis)."""
    az, ax, ay = np.deg2rad(np.array([*tilt_deg, 0.0]) + rng.uniform(-jitter_deg, jitter_deg, 3))
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    return rz @ rx @ ry


def _ellipsoid(canvas: Canvas, rng: np.random.Generator, centre, radii, tilt_deg=(0.0, 0.0)):
    """A jittered ellipsoid whose surface is smoothly deformed: returns (box, mask)."""
    centre = np.asarray(centre, float) + rng.normal(0.0, 5.0, 3)
    radii = np.asarray(radii, float) * rng.uniform(0.88, 1.12, 3)
    rotation = _rotation(rng, tilt_deg)
    amp = rng.uniform(0.05, 0.14)
    freqs = rng.normal(0.0, 2.2, (2, 3))
    phases = rng.uniform(0.0, 2 * np.pi, 2)
    reach = radii.max() * (1 + amp)
    sl = canvas.box(centre - reach, centre + reach)
    z, y, x = canvas.coords(sl)
    d = (x - centre[0], y - centre[1], z - centre[2])
    # Local normalised coordinates: the rows of the rotation are the ellipsoid's axes.
    q = [(rotation[0, a] * d[0] + rotation[1, a] * d[1] + rotation[2, a] * d[2]) / radii[a] for a in range(3)]
    r2 = q[0] ** 2 + q[1] ** 2 + q[2] ** 2
    bump = sum(np.sin(f[0] * q[0] + f[1] * q[1] + f[2] * q[2] + p) for f, p in zip(freqs, phases))
    return sl, r2 <= (1.0 + 0.5 * amp * bump) ** 2


def make_phantom(
    seed: int,
    size=(96, 96, 80),
    spacing=(3.0, 3.0, 3.0),
    contrast: str | None = None,
    origin=None,
) -> tuple[sitk.Image, sitk.Image]:
    """A procedural abdominal CT and its label map (universal ids, see the module docstring).

    seed: the only source of randomness (numpy Generator); same seed, same arguments, same bits.
    size, spacing: the grid (x, y, z) in voxels and mm; the body is centred in it and scaled to fit.
    contrast: "native", "portal" (organs and vessels enhance), or None to draw one from the seed.
        The anatomy of a seed does not depend on the phase, so (seed, "native") and (seed, "portal")
        are the same patient scanned twice.
    origin: physical position of the first voxel; default centres the grid on (0, 0, 0).
    Returns (float32 HU image, uint8 labels), LPS, identity direction, the same geometry.
    """
    if contrast not in (None, *CONTRASTS):
        raise ValueError(f"contrast must be None or one of {CONTRASTS}, not {contrast!r}")
    size = tuple(int(n) for n in size)
    spacing = np.asarray(spacing, float)
    extent = (np.asarray(size) - 1) * spacing
    origin = -extent / 2 if origin is None else np.asarray(origin, float)
    rng = np.random.default_rng(seed)

    drawn = CONTRASTS[int(rng.integers(2))]  # drawn always, so the anatomy never depends on `contrast`
    contrast = contrast or drawn
    # Reference frame -> grid: one in-plane scale that fits the body into the field of view (with a
    # margin of air), the height stretched to the grid's z extent, plus a small shift.
    fit = 0.98 * min(extent[0] / (2 * REACH[0]), extent[1] / (2 * REACH[1]))
    scale_xy = fit * rng.uniform(0.85, 1.0)
    scale_z = extent[2] / HEIGHT * rng.uniform(0.95, 1.1)
    shift = np.clip(rng.normal(0.0, 3.0, 3), -1.0, 1.0) * 0.01 * extent  # stays within the margin
    centre = origin + extent / 2 + shift
    scales = (scale_xy, scale_xy, scale_z)
    axes = [(origin[a] + spacing[a] * np.arange(size[a]) - centre[a]) / scales[a] for a in range(3)]
    canvas = Canvas(*(axis.astype(np.float32) for axis in axes))

    hu = {name: rng.uniform(*bounds) for name, bounds in TISSUE_HU.items()}
    if contrast == "portal":
        hu["bowel_wall"] += 30.0
    cavity, body_shape = body_wall(canvas, rng, hu)
    bowel(canvas, rng, hu, cavity)
    organ_hu = {}
    for organ in ORGANS:
        bounds = organ.portal if contrast == "portal" else organ.native
        value = organ_hu.setdefault(organ.label, rng.uniform(*bounds))  # lobes share one value
        if organ.shape == "ellipsoid":
            parts = [_ellipsoid(canvas, rng, organ.centre, organ.radii, organ.tilt_deg)]
        else:
            parts = [(sl, ratio <= 1.0) for sl, ratio in tube(canvas, rng, organ.path, organ.radius)]
        for sl, mask in parts:
            canvas.paint(sl, mask, value, organ.label, within=cavity)
        if organ.name == "stomach" and rng.random() < 0.7:  # gas cap on the anterior side
            (sl, mask), = parts
            _, y, _ = canvas.coords(sl)
            ys = np.broadcast_to(y, mask.shape)[mask]
            cut = np.quantile(ys, rng.uniform(0.05, 0.3)) if ys.size else -np.inf
            canvas.paint(sl, mask & (y < cut), hu["gas"], within=cavity)
    skeleton(canvas, rng, hu, body_shape)

    # Scanner: slight blur (finite resolution), then correlated zero-mean noise.
    blur = rng.uniform(0.5, 0.9)
    noise_sd = rng.uniform(6.0, 18.0)
    noise = ndimage.gaussian_filter(rng.standard_normal(canvas.hu.shape, dtype=np.float32), 0.6)
    noise *= noise_sd / max(float(noise.std()), 1e-6)
    array = ndimage.gaussian_filter(canvas.hu, blur) + noise
    np.maximum(array, -1024.0, out=array)

    image = sitk.GetImageFromArray(array.astype(np.float32, copy=False))
    labels = sitk.GetImageFromArray(canvas.labels)
    for out in (image, labels):
        out.SetSpacing(tuple(float(s) for s in spacing))
        out.SetOrigin(tuple(float(o) for o in origin))
        out.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    image.SetMetaData(META_SEED, str(seed))
    image.SetMetaData(META_CONTRAST, contrast)
    return image, labels


def phantom_dataset(count: int, seed: int = 0, **kwargs) -> Iterator[tuple[sitk.Image, sitk.Image]]:
    """`count` phantoms, lazily: phantom n uses a seed derived from (seed, n), so a data set is
    reproducible from one number and its members are independent of each other. `kwargs` go to
    `make_phantom` (size, spacing, contrast, origin)."""
    children = np.random.SeedSequence(seed).spawn(count)
    for child in children:
        yield make_phantom(int(child.generate_state(1, np.uint64)[0]), **kwargs)
