"""The reference abdomen both pretraining image sources draw in: a canvas and the unlabelled body.

Why one module: the procedural phantoms (`phantoms`) and the label-to-image synthesis (`synthesis`)
paint the same body context (skin, fat, muscle wall, psoas and back muscles, bowel loops, spine and
ribs) around their organs, so the two sources show the network the same surroundings.

The frame is in millimetres with its origin at the body centre and axes as LPS (x towards the
patient's left, y posterior, z superior). A `Canvas` holds the HU and label arrays (z, y, x) and the
frame coordinate of every grid line; every drawing function paints only inside the bounding box of
its shape, with numpy broadcasting.
"""

from __future__ import annotations

import numpy as np

# Reference abdomen (mm). REACH: the furthest the skin can get from the centre in x and y once
# `body_wall` has applied its random factors (taper, depth, lobes), used to fit every body into the
# field of view.
HALF_WIDTH, HALF_DEPTH, HEIGHT = 145.0, 115.0, 240.0
REACH = (HALF_WIDTH * 1.04 * 1.06, HALF_DEPTH * 1.06 * 1.04 * 1.06)

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

#: Bone (universal id 23 = channel 22), the only structure of the body context with a label:
#: vertebral bodies and arches (cancellous core, cortical rim) and ribs (cortical).
BONE_LABEL = 23


class Canvas:
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


def tube(canvas: Canvas, rng: np.random.Generator, path, radius, jitter=4.0):
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


def body_wall(canvas: Canvas, rng: np.random.Generator, hu: dict[str, float]):
    """Skin, subcutaneous fat, muscle wall and visceral fat.

    Returns the cavity inside the muscle wall (organs and bowel are clipped to it) and the body
    outline parameters (a, b, fat, muscle, lobes) the ribs follow."""
    z, y, x = canvas.coords((slice(None),) * 3)
    angle = np.arctan2(y, x)
    lobes = 1.0 + sum(rng.uniform(0.0, 0.02) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4))
    taper = 1.0 + rng.uniform(-0.04, 0.04) * (z / (HEIGHT / 2))  # wider or narrower upwards
    a = HALF_WIDTH * rng.uniform(0.92, 1.0) * taper
    # The back is deeper than the belly (spine and back muscles) and its fat and wall thinner, so
    # the retroperitoneum keeps room for the kidneys.
    posterior = y > 0
    b = np.where(posterior, rng.uniform(1.0, 1.06), rng.uniform(0.88, 1.0)) * HALF_DEPTH * taper
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


def bowel(canvas: Canvas, rng: np.random.Generator, hu: dict[str, float], cavity: np.ndarray):
    """Small-bowel loops and the colon frame: wall, fluid content and gas on the anterior side."""
    loops = [((-95, 5, -120), (-95, 5, 10), (-60, -70, 18), (60, -70, 22), (100, 10, 15), (100, 10, -120))]
    for _ in range(rng.integers(5, 9)):  # small bowel: short random polylines, lower anterior abdomen
        loops.append(tuple(tuple(p) for p in rng.uniform((-80, -85, -115), (80, 5, -5), (3, 3))))
    for n, path in enumerate(loops):
        radius = 20.0 if n == 0 else rng.uniform(9.0, 15.0)
        gas_level = rng.uniform(-0.6, 0.4) if rng.random() < 0.6 else None  # fraction of radius
        lumen = ((radius - 3.5) / radius) ** 2
        centre_y = np.mean([p[1] for p in path])
        for sl, ratio in tube(canvas, rng, path, [radius] * len(path)):
            canvas.paint(sl, ratio <= 1.0, hu["bowel_wall"], within=cavity)
            canvas.paint(sl, ratio <= lumen, hu["bowel_content"], within=cavity)
            if gas_level is not None:  # gas rises to the anterior (low y) side of a supine patient
                _, y, _ = canvas.coords(sl)
                canvas.paint(sl, (ratio <= lumen) & (y < centre_y + gas_level * radius), hu["gas"], within=cavity)


def skeleton(canvas: Canvas, rng: np.random.Generator, hu: dict[str, float], body_shape) -> None:
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
