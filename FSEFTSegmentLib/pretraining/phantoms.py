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

How: anatomy is laid out in a reference abdomen (millimetres, origin at the body centre, axes as
LPS: half width 145 mm, half depth 115 mm, 240 mm tall) and mapped onto the requested grid by a
per-seed scale, so any field of view gets a whole body. Organs are ellipsoids or tubes along
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

CONTRASTS = ("native", "portal")

#: Metadata keys set on the returned image, so a consumer (or a test) knows how it was drawn.
META_SEED = "FSEFT_phantom_seed"
META_CONTRAST = "FSEFT_phantom_contrast"

# Reference abdomen (mm). The anatomy below is placed in this frame. _REACH: the furthest the skin
# can get from the centre in x and y once `_body` has applied its random factors (taper, depth,
# lobes), used to fit every body into the field of view.
_HALF_WIDTH, _HALF_DEPTH, _HEIGHT = 145.0, 115.0, 240.0
_REACH = (_HALF_WIDTH * 1.04 * 1.06, _HALF_DEPTH * 1.06 * 1.04 * 1.06)

#: HU ranges of the unlabelled body context; one value per tissue is drawn per seed.
TISSUE_HU: dict[str, tuple[float, float]] = {
    "air": (-1000.0, -1000.0),
    "skin": (20.0, 40.0),
    "subcutaneous_fat": (-115.0, -85.0),
    "muscle": (40.0, 60.0),
    "visceral_fat": (-105.0, -75.0),
    "csf": (5.0, 15.0),  # spinal canal
    "disc": (70.0, 100.0),
    "cancellous_bone": (180.0, 280.0),
    "cortical_bone": (450.0, 800.0),
    "bowel_wall": (30.0, 50.0),  # portal phase: + 30 (mucosal enhancement)
    "bowel_content": (-10.0, 30.0),
    "gas": (-950.0, -850.0),
}


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

#: Bone (universal id 23 = channel 22): vertebral bodies and arches (cancellous core, cortical rim)
#: and ribs (cortical). Its mean mixes both, hence the wide range.
BONE_LABEL = 23
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


class _Canvas:
    """The HU and label arrays (z, y, x) plus the reference-frame coordinate of every grid line."""

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray):
        self.x, self.y, self.z = x, y, z
        shape = (z.size, y.size, x.size)
        self.hu = np.full(shape, TISSUE_HU["air"][0], np.float32)
        self.labels = np.zeros(shape, np.uint8)

    def box(self, lo, hi) -> tuple[slice, slice, slice]:
        """Index slices covering the reference-frame box [lo, hi] (x, y, z); empty when outside."""
        # Coordinates increase along each axis (identity direction), so a search finds the range.
        return tuple(
            slice(int(np.searchsorted(axis, low)), int(np.searchsorted(axis, high, side="right")))
            for axis, low, high in ((self.z, lo[2], hi[2]), (self.y, lo[1], hi[1]), (self.x, lo[0], hi[0]))
        )

    def coords(self, sl):
        """Broadcastable (z, y, x) coordinates of a box."""
        return self.z[sl[0], None, None], self.y[None, sl[1], None], self.x[None, None, sl[2]]

    def paint(self, sl, mask, hu: float, label: int | None = None, within: np.ndarray | None = None):
        """Set HU (and label, when given) where `mask` (of the box `sl`) is true."""
        if within is not None:
            mask = mask & within[sl]
        if not mask.any():
            return
        self.hu[sl][mask] = hu
        if label is not None:
            self.labels[sl][mask] = label


def _rotation(rng: np.random.Generator, tilt_deg=(0.0, 0.0), jitter_deg=8.0) -> np.ndarray:
    """Rotation about z then x by the stated tilt plus a random jitter (each axis)."""
    az, ax, ay = np.deg2rad(np.array([*tilt_deg, 0.0]) + rng.uniform(-jitter_deg, jitter_deg, 3))
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    return rz @ rx @ ry


def _ellipsoid(canvas: _Canvas, rng: np.random.Generator, centre, radii, tilt_deg=(0.0, 0.0)):
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


def _tube(canvas: _Canvas, rng: np.random.Generator, path, radius, jitter=4.0):
    """A tube along a jittered polyline, radius interpolated and gently varying.

    Returns [(box, squared distance / squared radius)] per segment: <= 1 inside; a smaller
    threshold gives a concentric inner tube (a bowel lumen inside its wall)."""
    points = np.asarray(path, float) + rng.normal(0.0, jitter, (len(path), 3))
    radii = np.asarray(radius, float) * rng.uniform(0.85, 1.15, len(radius))
    waves, phase = rng.uniform(1.0, 3.0), rng.uniform(0.0, 2 * np.pi)
    parts = []
    for a, b, ra, rb in zip(points[:-1], points[1:], radii[:-1], radii[1:]):
        reach = max(ra, rb) * 1.15
        sl = canvas.box(np.minimum(a, b) - reach, np.maximum(a, b) + reach)
        z, y, x = canvas.coords(sl)
        ab = b - a
        t = np.clip(((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / (ab @ ab), 0.0, 1.0)
        dist2 = (x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2
        r = (ra + t * (rb - ra)) * (1.0 + 0.1 * np.sin(2 * np.pi * waves * t + phase))
        parts.append((sl, dist2 / r**2))
    return parts


def _body(canvas: _Canvas, rng: np.random.Generator, hu: dict[str, float]):
    """Skin, subcutaneous fat, muscle wall and visceral fat.

    Returns the cavity inside the muscle wall (organs and bowel are clipped to it) and the body
    outline parameters (a, b, fat, muscle, lobes) the ribs follow."""
    z, y, x = canvas.coords((slice(None),) * 3)
    angle = np.arctan2(y, x)
    lobes = 1.0 + sum(rng.uniform(0.0, 0.02) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4))
    taper = 1.0 + rng.uniform(-0.04, 0.04) * (z / (_HEIGHT / 2))  # wider or narrower upwards
    a = _HALF_WIDTH * rng.uniform(0.92, 1.0) * taper
    # The back is deeper than the belly (spine and back muscles) and its fat and wall thinner, so
    # the retroperitoneum keeps room for the kidneys.
    posterior = y > 0
    b = np.where(posterior, rng.uniform(1.0, 1.06), rng.uniform(0.88, 1.0)) * _HALF_DEPTH * taper
    fat, muscle = rng.uniform(8.0, 24.0), rng.uniform(8.0, 14.0)

    def inside(inset):
        return (x / (a - inset)) ** 2 + (y / (b - np.where(posterior, 0.5, 1.0) * inset)) ** 2 <= lobes**2

    body, below_skin = inside(0.0), inside(2.5)
    wall, cavity = inside(2.5 + fat), inside(2.5 + fat + muscle)
    canvas.hu[body] = hu["skin"]
    canvas.hu[below_skin] = hu["subcutaneous_fat"]
    canvas.hu[wall] = hu["muscle"]
    canvas.hu[cavity] = hu["visceral_fat"]
    # Psoas (widening downwards) and the back muscles beside the spine.
    for side in (-1.0, 1.0):
        psoas_r = np.clip(6.0 + 0.12 * (60.0 - z), 0.0, 24.0)
        psoas = (x - side * 34.0) ** 2 + ((y - 42.0) / 0.9) ** 2 <= psoas_r**2
        back = ((x - side * 36.0) / 26.0) ** 2 + ((y - 90.0) / 17.0) ** 2 <= 1.0
        canvas.hu[(psoas | back) & body] = hu["muscle"]
    return cavity, (a, b, fat, muscle, lobes)


def _bowel(canvas: _Canvas, rng: np.random.Generator, hu: dict[str, float], cavity: np.ndarray):
    """Small-bowel loops and the colon frame: wall, fluid content and gas on the anterior side."""
    loops = [((-95, 5, -120), (-95, 5, 10), (-60, -70, 18), (60, -70, 22), (100, 10, 15), (100, 10, -120))]
    for _ in range(rng.integers(5, 9)):  # small bowel: short random polylines, lower anterior abdomen
        loops.append(tuple(tuple(p) for p in rng.uniform((-80, -85, -115), (80, 5, -5), (3, 3))))
    for n, path in enumerate(loops):
        radius = 20.0 if n == 0 else rng.uniform(9.0, 15.0)
        gas_level = rng.uniform(-0.6, 0.4) if rng.random() < 0.6 else None  # fraction of radius
        lumen = ((radius - 3.5) / radius) ** 2
        centre_y = np.mean([p[1] for p in path])
        for sl, ratio in _tube(canvas, rng, path, [radius] * len(path)):
            canvas.paint(sl, ratio <= 1.0, hu["bowel_wall"], within=cavity)
            canvas.paint(sl, ratio <= lumen, hu["bowel_content"], within=cavity)
            if gas_level is not None:  # gas rises to the anterior (low y) side of a supine patient
                _, y, _ = canvas.coords(sl)
                canvas.paint(sl, (ratio <= lumen) & (y < centre_y + gas_level * radius), hu["gas"], within=cavity)


def _skeleton(canvas: _Canvas, rng: np.random.Generator, hu: dict[str, float], body_shape) -> None:
    """Vertebrae (bodies, discs, arches around the canal) and ribs; bone is painted last, on top."""
    z, y, x = canvas.coords((slice(None),) * 3)
    cx, cy = rng.normal(0.0, 2.0), 45.0 + rng.normal(0.0, 3.0)
    rx, ry = rng.uniform(18.0, 24.0), rng.uniform(15.0, 19.0)
    period, disc_mm, phase = rng.uniform(28.0, 34.0), rng.uniform(6.0, 9.0), rng.uniform(0.0, 40.0)
    level = np.mod(z + phase, period) < period - disc_mm  # (nz, 1, 1): bone level or disc
    r2 = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
    canal_y = cy + ry + 12.0
    canal = (x - cx) ** 2 + (y - canal_y) ** 2 <= 9.0**2
    spinous = (np.abs(x - cx) < 4.0) & (y > canal_y) & (y < canal_y + 32.0)
    arch = ((x - cx) ** 2 + (y - canal_y) ** 2 <= 15.0**2) | spinous
    canvas.hu[(r2 <= 1.0) & ~level] = hu["disc"]
    canvas.hu[np.broadcast_to(canal, canvas.hu.shape)] = hu["csf"]
    core = (r2 <= 0.72) & level
    rim = ((r2 <= 1.0) & ~core | arch & ~canal) & level
    canvas.hu[core], canvas.labels[core] = hu["cancellous_bone"], BONE_LABEL
    canvas.hu[rim], canvas.labels[rim] = hu["cortical_bone"], BONE_LABEL
    # Ribs: cortical bands in the muscle wall of the upper abdomen, sloping down anteriorly, open
    # in front (costal margin).
    a, b, fat, muscle, lobes = body_shape
    inset = 2.5 + fat + 0.5 * muscle
    rho = np.sqrt((x / (a - inset)) ** 2 + (y / (b - np.where(y > 0, 0.5, 1.0) * inset)) ** 2) / lobes
    height = z - 0.3 * y - rng.uniform(-60.0, -30.0)  # 0 at the lowest rib's posterior-lateral end
    rib_period = rng.uniform(24.0, 30.0)
    band = np.abs(np.mod(height, rib_period) - rib_period / 2) < 5.0
    ribs = (np.abs(rho - 1.0) * (a - inset) < 4.0) & band & (height > 0) & ((y > -0.55 * b) | (np.abs(x) > 60.0))
    canvas.hu[ribs], canvas.labels[ribs] = hu["cortical_bone"], BONE_LABEL


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
    fit = 0.98 * min(extent[0] / (2 * _REACH[0]), extent[1] / (2 * _REACH[1]))
    scale_xy = fit * rng.uniform(0.85, 1.0)
    scale_z = extent[2] / _HEIGHT * rng.uniform(0.95, 1.1)
    shift = np.clip(rng.normal(0.0, 3.0, 3), -1.0, 1.0) * 0.01 * extent  # stays within the margin
    centre = origin + extent / 2 + shift
    scales = (scale_xy, scale_xy, scale_z)
    axes = [(origin[a] + spacing[a] * np.arange(size[a]) - centre[a]) / scales[a] for a in range(3)]
    canvas = _Canvas(*(axis.astype(np.float32) for axis in axes))

    hu = {name: rng.uniform(*bounds) for name, bounds in TISSUE_HU.items()}
    if contrast == "portal":
        hu["bowel_wall"] += 30.0
    cavity, body_shape = _body(canvas, rng, hu)
    _bowel(canvas, rng, hu, cavity)
    organ_hu = {}
    for organ in ORGANS:
        bounds = organ.portal if contrast == "portal" else organ.native
        value = organ_hu.setdefault(organ.label, rng.uniform(*bounds))  # lobes share one value
        if organ.shape == "ellipsoid":
            parts = [_ellipsoid(canvas, rng, organ.centre, organ.radii, organ.tilt_deg)]
        else:
            parts = [(sl, ratio <= 1.0) for sl, ratio in _tube(canvas, rng, organ.path, organ.radius)]
        for sl, mask in parts:
            canvas.paint(sl, mask, value, organ.label, within=cavity)
        if organ.name == "stomach" and rng.random() < 0.7:  # gas cap on the anterior side
            (sl, mask), = parts
            _, y, _ = canvas.coords(sl)
            ys = np.broadcast_to(y, mask.shape)[mask]
            cut = np.quantile(ys, rng.uniform(0.05, 0.3)) if ys.size else -np.inf
            canvas.paint(sl, mask & (y < cut), hu["gas"], within=cavity)
    _skeleton(canvas, rng, hu, body_shape)

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
