"""Compare a predicted segmentation with a reference: Dice, surface Dice, HD95 and volumes.

`fseft evaluate --pred P --ref R [--structure NAME=VALUE ...] [--scoring native|paper]` is a thin
face over `evaluate`.

Two scorings, because the product's numbers and the paper's answer different questions:

* native (default): on the reference's grid, where the user's masks live.
* paper: as the paper scores, to compare with its tables: in the model's working space of the CT
  the prediction was made on (`CTPreprocessing` of `--image` for `--model`'s spacing and HU window:
  RAS, isotropic, cropped to the voxels above the window's floor), both masks moved there with
  nearest neighbour (what falls outside the crop is not scored, as in the paper), the
  reference cut to its largest 26-connected component when one structure is scored (a binary task),
  and Dice as `paper_dice`. The other metrics and the volumes are then measured in that space.

Metrics (MONAI, distances in mm from the grid's spacing, so anisotropic voxels count at their
true size):

* Dice, native: the standard 2|P∩G| / (|P| + |G|). Paper: 2|P∩G| / (|P| + |G| + 1), +1 in the
  denominator only, which pulls every score slightly below 1 (a perfect n-voxel prediction gets
  2n / (2n + 1)) and gives 0 when both masks are empty.
* surface Dice (normalized surface distance, Nikolov et al.): the fraction of both surfaces
  lying within `tolerance_mm` of the other surface (MONAI `compute_surface_dice`).
* HD95: the 95th percentile of surface-to-surface distances, the larger of the two
  directions (MONAI `compute_hausdorff_distance`, percentile=95), in mm.
* volumes: voxel counts times the voxel volume of the grid scored on (the reference's or the
  model space's), in ml.

Empty masks, where MONAI answers nan: both empty -> Dice 1 (paper scoring: 0, its formula),
surface Dice 1, HD95 0 (the prediction is exactly right: nothing there); one empty -> Dice 0,
surface Dice 0, HD95 inf (no surface to measure to). inf is printed as "inf", written to JSON as
null and to CSV as "inf". Every row, in the JSON and the CSV, names its `scoring`.

Grids: a prediction on another grid (size, spacing, origin or direction differing beyond float
round-off) is resampled onto the reference grid with nearest neighbour, with a warning; one that
does not overlap the reference physically at all is refused. In paper scoring each mask goes from
its own grid to the model space (one resampling each); one that misses the image is refused.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .io.files import atomic_write
from .io.images import same_grid
from .io.segmentations import read_structure_mask
from .labels import resolve_structure
from .progress import Progress

if TYPE_CHECKING:
    from .model.network import Architecture

Selector = tuple[str, str, str]  # (structure name, prediction selector, reference selector)


@dataclass
class StructureScore:
    name: str
    dice: float
    surface_dice: float
    hd95_mm: float
    pred_voxels: int
    ref_voxels: int
    pred_volume_ml: float
    ref_volume_ml: float
    scoring: str = "native"  # which Dice and which space: see the module docstring


# ----------------------------------------------------------------------------- selectors


def _is_seg(path: str | os.PathLike) -> bool:
    """A Slicer segmentation: `.seg.nrrd`, or any NRRD whose header has segment fields (as the reader decides)."""
    name = os.fspath(path).lower()
    if name.endswith(".seg.nrrd"):
        return True
    if not name.endswith((".nrrd", ".nhdr")):
        return False
    import nrrd

    try:
        return any(key.startswith("Segment0_") for key in nrrd.read_header(os.fspath(path)))
    except Exception:  # noqa: BLE001 - unreadable: the reader will say so
        return False


def _as_selector(text: str) -> int | str:
    """A digit string is a label value (int); anything else a segment name."""
    return int(text) if text.isdigit() else text


def parse_structure_selectors(specs: Sequence[str]) -> list[Selector]:
    """Turn `--structure` options into (name, prediction selector, reference selector).

    The rule:

    * `NAME=VALUE` (e.g. `liver=5`): the reference is selected by VALUE; the prediction by the
      segment named NAME (a `.seg.nrrd`, also trying the structure's canonical and display names),
      falling back to VALUE if it has no such segment or is a label map.
      Returned as (NAME, NAME, VALUE); the fallback happens in `evaluate`.
    * `NAME=PRED:REF` (e.g. `liver=1:5`, `liver=Liver:5`): explicit, when the two files number or
      name the structure differently. PRED/REF are a label value (digits) or a segment name; no
      fallback.
    * `NAME` alone: the segment NAME in both files (both must be `.seg.nrrd`).

    A label-map file can only be selected by a value; a name there is refused in `evaluate`.
    """
    selectors: list[Selector] = []
    for spec in specs:
        name, eq, value = (part.strip() for part in spec.partition("="))
        pred, colon, ref = (part.strip() for part in value.partition(":"))
        if not name or (eq and not value) or (colon and not (pred and ref)):
            raise InputError(f"--structure {spec!r}: expected NAME=VALUE, NAME=PRED:REF or NAME (e.g. liver=5)")
        if any(name == s[0] for s in selectors):
            raise InputError(f"--structure {spec!r}: structure {name!r} given twice")
        selectors.append((name, pred, ref) if colon else (name, name, value or name))
    return selectors


def default_selectors(pred_path: str | os.PathLike, ref_path: str | os.PathLike) -> list[Selector]:
    """With no `--structure`: every segment of a `.seg.nrrd` prediction that names a known structure
    (reported under its canonical name).

    Only a `.seg.nrrd` reference can then be matched (by the same segment name): a label map's
    values say nothing about names, and guessing them would score the wrong organ silently.
    """
    if not _is_seg(pred_path):
        raise InputError("a label-map prediction needs --structure NAME=VALUE for each structure", pred_path)
    import slicerio

    try:
        names = [s["name"] for s in slicerio.read_segmentation(os.fspath(pred_path), skip_voxels=True)["segments"]]
    except Exception as error:  # noqa: BLE001 - any reading failure is the file's fault
        raise InputError(f"cannot read segmentation ({error})", pred_path) from error
    selectors = []
    for name in names:
        try:
            structure = resolve_structure(name)
        except (InputError, LookupError, ValueError):
            continue
        selectors.append((structure.name, name, name))
    if not selectors:
        raise InputError("no segment names a known structure; give --structure NAME=VALUE", pred_path)
    if not _is_seg(ref_path):
        first = selectors[0][0]
        raise InputError(f"the reference is a label map: give each structure's value with --structure NAME=VALUE (e.g. {first}=5)", ref_path)
    return selectors


def _ref_mask(path: str | os.PathLike, name: str, selector: str) -> sitk.Image:
    if not selector.isdigit() and not _is_seg(path):
        raise InputError(f"a label map is selected by value: give --structure {name}=VALUE", path)
    return read_structure_mask(path, _as_selector(selector))


def _pred_mask(path: str | os.PathLike, name: str, pred: str, ref: str, progress: Progress) -> sitk.Image:
    """Read the prediction's mask, applying the NAME=VALUE fallback described in the parser."""
    implicit = pred == name and ref != name
    candidates = [pred]
    if implicit:
        try:
            structure = resolve_structure(name)
            candidates += [structure.name, structure.display_name]
        except (InputError, LookupError, ValueError):
            pass
        candidates.append(ref)
    if not _is_seg(path):
        candidates = [c for c in candidates if c.isdigit()]
        if not candidates:
            raise InputError(f"a label map is selected by value: give --structure {name}=VALUE or {name}=PRED:REF", path)
    candidates = list(dict.fromkeys(candidates))
    last: InputError | None = None
    for candidate in candidates:
        try:
            mask = read_structure_mask(path, _as_selector(candidate))
        except InputError as error:
            last = error
            continue
        if implicit and _is_seg(path) and candidate == ref:
            progress.warning(f"{os.fspath(path)}: no segment named '{name}'; using label value {ref}")
        return mask
    if len(candidates) == 1:
        raise last  # type: ignore[misc]
    raise InputError(f"no segment or label for '{name}' (tried {', '.join(candidates)})", path) from last


# ----------------------------------------------------------------------------- geometry


def _physical_box(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned physical bounds of the image's voxels (outer faces, not centres)."""
    corners = itertools.product(*[(-0.5, n - 0.5) for n in image.GetSize()])
    points = np.array([image.TransformContinuousIndexToPhysicalPoint(c) for c in corners])
    return points.min(axis=0), points.max(axis=0)


def _overlap(a: sitk.Image, b: sitk.Image) -> bool:
    (alo, ahi), (blo, bhi) = _physical_box(a), _physical_box(b)
    return not (np.any(ahi <= blo) or np.any(bhi <= alo))


def match_grid(pred: sitk.Image, ref: sitk.Image, pred_path: str | os.PathLike = "") -> tuple[sitk.Image, str | None]:
    """The prediction on the reference grid, and a note when it had to be resampled."""
    if pred.GetDimension() != ref.GetDimension():
        raise InputError(f"prediction is {pred.GetDimension()}D, reference {ref.GetDimension()}D", pred_path or None)
    if same_grid(pred, ref):
        return pred, None
    if not _overlap(pred, ref):
        raise InputError("prediction and reference do not overlap in space (different scans?)", pred_path or None)
    resampled = sitk.Resample(pred, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    note = (
        f"prediction grid {pred.GetSize()} @ {tuple(round(s, 3) for s in pred.GetSpacing())} mm differs from the "
        f"reference {ref.GetSize()} @ {tuple(round(s, 3) for s in ref.GetSpacing())} mm: resampled (nearest neighbour)"
    )
    return resampled, note


# ----------------------------------------------------------------------------- metrics


def _crop_to_union(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays cut to the union's bounding box plus one voxel: same metrics, far less memory."""
    union = pred | ref
    slices = []
    for axis in range(union.ndim):
        hits = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        slices.append(slice(max(hits[0] - 1, 0), hits[-1] + 2))
    return pred[tuple(slices)], ref[tuple(slices)]


def dice(predicted: np.ndarray, reference: np.ndarray) -> float:
    """Dice as `score_masks` defines it (both empty: 1), without its surface distances, which cost
    a second per mask: for the demo's and the pretraining validation's many masks."""
    total = int(np.count_nonzero(predicted)) + int(np.count_nonzero(reference))
    return 2.0 * int(np.count_nonzero(predicted & reference)) / total if total else 1.0


def paper_dice(predicted: np.ndarray, reference: np.ndarray) -> float:
    """The paper's Dice, 2|P∩G| / (|P| + |G| + 1) (+1 in the denominator only): both empty give 0."""
    total = int(np.count_nonzero(predicted)) + int(np.count_nonzero(reference))
    return 2.0 * int(np.count_nonzero(predicted & reference)) / (total + 1)


def score_masks(name: str, pred: sitk.Image, ref: sitk.Image, tolerance_mm: float = 2.0) -> StructureScore:
    """Metrics of two binary masks on the same grid (the reference's spacing is used)."""
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
    import torch

    p = sitk.GetArrayViewFromImage(pred) > 0
    r = sitk.GetArrayViewFromImage(ref) > 0
    voxel_ml = float(np.prod(ref.GetSpacing())) / 1000.0
    n_pred, n_ref = int(p.sum()), int(r.sum())
    score = StructureScore(name, 1.0, 1.0, 0.0, n_pred, n_ref, n_pred * voxel_ml, n_ref * voxel_ml)
    if n_pred == 0 or n_ref == 0:
        if n_pred or n_ref:
            score.dice, score.surface_dice, score.hd95_mm = 0.0, 0.0, math.inf
        return score
    p, r = _crop_to_union(p, r)
    y_pred, y = (torch.from_numpy(np.ascontiguousarray(a))[None, None].float() for a in (p, r))
    spacing = tuple(ref.GetSpacing())[::-1]  # numpy axes are (z, y, x)
    with warnings.catch_warnings():  # MONAI deprecation chatter, not the user's business
        warnings.simplefilter("ignore")
        score.dice = float(compute_dice(y_pred, y, include_background=True))
        score.surface_dice = float(
            compute_surface_dice(y_pred, y, class_thresholds=[tolerance_mm], include_background=True, spacing=spacing)
        )
        score.hd95_mm = float(compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=spacing))
    return score


# ----------------------------------------------------------------------------- scoring

SCORINGS = ("native", "paper")


def model_architecture(model: str | os.PathLike) -> Architecture:
    """A model's working space without reading its weights: a registered model's from the registry,
    a checkpoint file's from its metadata (else the defaults), as `load_foundation_model` takes them."""
    from .model.registry import load_registry, resolve_model

    if not Path(model).expanduser().is_file():
        registry = load_registry()
        if os.fspath(model) in registry:
            return registry[os.fspath(model)].architecture
    return resolve_model(model)[1]


@dataclass(frozen=True)
class Scoring:
    """Which scoring `evaluate` applies (see the module docstring); paper scoring needs the CT the
    prediction was made on and the model whose working space it scores in."""

    name: str = "native"
    image: Path | None = None
    model: str = ""
    architecture: Architecture | None = None

    @classmethod
    def from_options(cls, name: str, image: str | os.PathLike | None = None, model: str | os.PathLike | None = None) -> Scoring:
        """`--scoring`, `--image` and `--model` checked together; the model defaults to the registry's default."""
        if name not in SCORINGS:
            raise InputError(f"unknown scoring {name!r}; choose from {', '.join(SCORINGS)}")
        if name == "native":
            if image is not None or model is not None:
                raise InputError("--image and --model go with --scoring paper")
            return cls()
        if image is None:
            raise InputError("--scoring paper needs --image, the CT the prediction was made on")
        from .registry_file import default_model

        model = os.fspath(model or default_model())
        return cls(name, Path(image), model, model_architecture(model))

    def largest_component(self, structures: int) -> bool:
        """The paper cuts the reference to its largest component in binary tasks only."""
        return self.name == "paper" and structures == 1

    def note(self, structures: int) -> str | None:
        """The line above the table naming the paper's scoring (native output stays as it always was)."""
        if self.name == "native":
            return None
        reference = "reference largest component" if self.largest_component(structures) else f"reference whole: {structures} structures"
        return f"scoring: paper (model space {self.architecture.spacing_mm:g} mm of {self.model}, +1 in the denominator, {reference})"

    def meta(self, structures: int) -> dict[str, Any]:
        """What the JSON report records of the scoring."""
        if self.name == "native":
            return {"scoring": "native"}
        return {"scoring": "paper", "image": str(self.image), "model": self.model, "spacing_mm": self.architecture.spacing_mm,
                "hu_window": list(self.architecture.hu_window), "reference_largest_component": self.largest_component(structures)}


class _ModelSpace:
    """Paper scoring's CT, preprocessed once, and the masks scored on its model-space grid."""

    def __init__(self, scoring: Scoring):
        from .io.images import read_image
        from .preprocessing import CTPreprocessing

        self.image = read_image(scoring.image)
        self.preprocessing = CTPreprocessing(scoring.architecture)
        self.volume = self.preprocessing(self.image)
        self.spacing = (float(scoring.architecture.spacing_mm),) * 3

    def _move(self, mask: sitk.Image, path: str | os.PathLike) -> np.ndarray:
        """A native mask on the model-space grid (X, Y, Z), nearest neighbour from its own grid."""
        if not _overlap(mask, self.image):
            raise InputError("does not overlap the --image in space (different scans?)", path)
        array = (sitk.GetArrayViewFromImage(mask) > 0).astype(np.uint8)[None]
        return self.preprocessing.masks_to_model_space(array, mask, self.volume)[0].numpy()

    def score(self, name: str, pred: sitk.Image, ref: sitk.Image, paths: tuple, tolerance_mm: float, largest_component: bool) -> StructureScore:
        from .inference import keep_largest_component

        p, r = self._move(pred, paths[0]), self._move(ref, paths[1])
        if largest_component:
            r = keep_largest_component(r)
        images = [sitk.GetImageFromArray(a) for a in (p, r)]
        for image in images:
            image.SetSpacing(self.spacing)
        score = score_masks(name, *images, tolerance_mm)
        score.dice, score.scoring = paper_dice(p > 0, r > 0), "paper"
        return score


def evaluate(
    pred_path: str | os.PathLike,
    ref_path: str | os.PathLike,
    selectors: Sequence[Selector],
    tolerance_mm: float = 2.0,
    progress: Progress | None = None,
    scoring: Scoring = Scoring(),
) -> list[StructureScore]:
    """Score each selected structure of the prediction against the reference.

    `selectors` come from `parse_structure_selectors`; empty means `default_selectors`. Warnings
    (resampling, a name fallback) go to `progress.warning`, i.e. always reach the user.
    """
    progress = progress or Progress()
    if not tolerance_mm > 0:
        raise InputError(f"surface Dice tolerance must be positive, got {tolerance_mm} mm")
    for path in (pred_path, ref_path):
        if not os.path.isfile(path):
            raise InputError("file not found", path)
    selectors = list(selectors) or default_selectors(pred_path, ref_path)
    space = _ModelSpace(scoring) if scoring.name == "paper" else None
    scores, warned = [], False
    for name, pred_selector, ref_selector in selectors:
        ref = _ref_mask(ref_path, name, ref_selector)
        pred = _pred_mask(pred_path, name, pred_selector, ref_selector, progress)
        if space is not None:
            scores.append(space.score(name, pred, ref, (pred_path, ref_path), tolerance_mm, scoring.largest_component(len(selectors))))
            continue
        pred, note = match_grid(pred, ref, pred_path)
        if note and not warned:
            progress.warning(note)
            warned = True
        scores.append(score_masks(name, pred, ref, tolerance_mm))
    return scores


# ----------------------------------------------------------------------------- output


def _fmt(value: float, digits: int) -> str:
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def scores_table(scores: Sequence[StructureScore], note: str | None = None) -> str:
    """An aligned text table for the screen (no trailing newline), below `note` when there is one."""
    header = ("structure", "Dice", "surfDice", "HD95 mm", "pred ml", "ref ml", "pred vox", "ref vox")
    rows = [
        (s.name, _fmt(s.dice, 4), _fmt(s.surface_dice, 4), _fmt(s.hd95_mm, 2), _fmt(s.pred_volume_ml, 2),
         _fmt(s.ref_volume_ml, 2), str(s.pred_voxels), str(s.ref_voxels))
        for s in scores
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in [header, *rows]]
    return "\n".join([note, *lines] if note else lines)


def _json_safe(score: StructureScore) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(score).items()}


def write_scores_json(path: str | os.PathLike, scores: Sequence[StructureScore], meta: dict[str, Any] | None = None) -> None:
    """`{"meta": {...}, "structures": [{...}, ...]}`, inf as null (strict JSON), written atomically."""
    text = json.dumps({"meta": meta or {}, "structures": [_json_safe(s) for s in scores]}, indent=2, allow_nan=False, default=str)
    with atomic_write(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")


def write_scores_csv(path: str | os.PathLike, scores: Sequence[StructureScore]) -> None:
    """One row per structure, the `StructureScore` fields as columns (inf as "inf"), written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([f.name for f in fields(StructureScore)])
    writer.writerows([getattr(s, f.name) for f in fields(StructureScore)] for s in scores)
    with atomic_write(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")
