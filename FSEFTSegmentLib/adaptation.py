"""The few-shot adaptation workflow: annotated supports in, an adapter artefact out.

Reads each support image with its label (a label map value or a Slicer segment per target
structure), checks what a user can get wrong (empty label, label on another grid, a query that is a
support), brings everything into the model's space, trains the chosen method and saves the adapter
folder atomically. Nothing is written unless training finishes.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import monai
import numpy as np
import SimpleITK as sitk
import torch

from . import __version__
from .errors import InputError
from .io.files import sha256_file
from .io.images import read_image, same_grid
from .io.segmentations import read_structure_mask
from .io.studies import default_id
from .labels import Structure, novel_structure, resolve_structure
from .methods import get_method
from .methods.adapted import AdaptedModel
from .model.network import FoundationSwinUNETR
from .prediction import model_structures
from .preprocessing import CTPreprocessing
from .priors import expected_volume_range
from .progress import Progress
from .training import TrainingCase, TrainingResult, TrainingSettings, adapt, adapt_per_query

LABEL_GRID_TOLERANCE = 1e-3  # mm (origin), relative (spacing), absolute (direction cosines)


@dataclass(frozen=True)
class Target:
    """A structure to adapt to, and how to find it in label files (value or segment; None = by name)."""

    structure: Structure
    selector: str | None = None


@dataclass(frozen=True)
class SupportSpec:
    image: Path
    labels: Path
    selector: str | None = None  # LABELS:VALUE or LABELS:SEGMENT, for a single target structure


def parse_target(text: str) -> Target:
    """`NAME` or `NAME=VALUE|SEGMENT`; a name the foundation model does not know is a novel structure."""
    name, _, selector = text.partition("=")
    name = name.strip()
    if not name:
        raise InputError(f"--structure {text!r}: empty structure name")
    try:
        structure = resolve_structure(name)
    except InputError:
        structure = novel_structure(name)
    return Target(structure, selector.strip() or None)


def parse_support(image: str, labels: str) -> SupportSpec:
    """`LABELS[:VALUE|:SEGMENT]`: the suffix is a selector only when the whole string is not a file."""
    path, selector = labels, None
    if not Path(labels).exists() and ":" in labels:
        head, _, tail = labels.rpartition(":")
        if head and tail and os.sep not in tail and "/" not in tail:
            path, selector = head, tail
    return SupportSpec(Path(image).expanduser(), Path(path).expanduser(), selector)


def target_mask(spec: SupportSpec, target: Target, single: bool) -> sitk.Image:
    """The target's mask in the support's label file, by the most specific selector given."""
    selector = target.selector or (spec.selector if single else None)
    if selector is not None:
        return read_structure_mask(spec.labels, selector)
    candidates = dict.fromkeys([target.structure.name, target.structure.display_name])
    for candidate in candidates:
        try:
            return read_structure_mask(spec.labels, candidate)
        except InputError as error:
            last = error
    raise InputError(f"no segment for '{target.structure.name}' ({last}); name it with LABELS:SEGMENT or --structure NAME=VALUE")


@dataclass
class PreparedSupport:
    case: TrainingCase
    record: dict  # provenance for the adapter metadata
    volumes_ml: list[float]  # per target, on the native grid


def prepare_support(
    spec: SupportSpec, targets: Sequence[Target], preprocessing: CTPreprocessing, image: sitk.Image | None = None, volume=None
) -> PreparedSupport:
    """The support in model space with its provenance; `image` and its preprocessed `volume` may be
    given when already read (the experiment harness reuses them across tasks)."""
    image = read_image(spec.image) if image is None else image
    masks = []
    for target in targets:
        mask = target_mask(spec, target, single=len(targets) == 1)
        if not same_grid(mask, image, spacing_rtol=LABEL_GRID_TOLERANCE, origin_atol=LABEL_GRID_TOLERANCE, direction_atol=LABEL_GRID_TOLERANCE):
            raise InputError(
                f"label grid differs from its image {spec.image.name} (size {mask.GetSize()} vs {image.GetSize()}, "
                f"spacing {tuple(round(s, 3) for s in mask.GetSpacing())} vs {tuple(round(s, 3) for s in image.GetSpacing())})",
                spec.labels,
            )
        array = sitk.GetArrayFromImage(mask)
        if not array.any():
            raise InputError(f"the label for '{target.structure.name}' is empty", spec.labels)
        masks.append(array)
    stacked = np.stack(masks).astype(np.uint8)
    volume = preprocessing(image) if volume is None else volume
    label = preprocessing.masks_to_model_space(stacked, image, volume)
    for target, channel in zip(targets, label):
        if not channel.any():
            raise InputError(f"the label for '{target.structure.name}' vanishes at the model's resolution", spec.labels)
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    record = {
        "id": default_id(spec.image),
        "image": str(spec.image),
        "image_sha256": sha256_file(spec.image),
        "labels": str(spec.labels) + (f":{spec.selector}" if spec.selector else ""),
        "labels_sha256": sha256_file(spec.labels),
    }
    return PreparedSupport(TrainingCase(record["id"], volume, label), record, [float(m.sum()) * voxel_ml for m in stacked])


def pretrained_rows(network: FoundationSwinUNETR, structures: Sequence[Structure]) -> list[int | None]:
    """For each target, the base model's output channel of the same structure (zero-shot start), else None."""
    known = [s.name for s in model_structures(network.architecture)]
    return [known.index(s.name) if s.name in known else None for s in structures]


def library_versions() -> dict:
    return {"fseft": __version__, "torch": torch.__version__, "monai": monai.__version__, "python": platform.python_version()}


@dataclass
class AdaptationRun:
    model: AdaptedModel
    result: TrainingResult
    metadata: dict
    query: str | None = None  # the one query of a per-query (transductive) episode


def run_adaptation(
    network: FoundationSwinUNETR,
    base: dict,
    method_name: str,
    targets: Sequence[Target],
    supports: Sequence[SupportSpec],
    queries: Sequence[Path],
    settings: TrainingSettings,
    device: torch.device,
    progress: Progress,
    tune_decoder: bool = False,
    should_stop: Callable[[], bool] | None = None,
    softmax: bool = False,
) -> list[AdaptationRun]:
    """Prepare supports and queries, train, and return the adapted model(s) with their metadata:
    one run, or with the size prior in per-query mode and several queries one run per query
    (the paper's episodes, in query order). `softmax`: the paper's multi-class head (background +
    argmax) instead of one sigmoid per structure."""
    method = get_method(method_name)
    if tune_decoder and not method.combines_with_decoder:
        raise InputError(f"--tune-decoder does not combine with '{method.name}' (it already trains the decoder)")
    if not supports:
        raise InputError("no supports: give at least one --support IMAGE LABELS")
    if not targets:
        raise InputError("no target structure: give --structure NAME")
    names = [t.structure.name for t in targets]
    if len(set(names)) != len(names):
        raise InputError(f"a target structure is given twice: {', '.join(names)}")
    preprocessing = CTPreprocessing(network.architecture)
    prepared = []
    for number, spec in enumerate(supports, 1):
        progress.step((number - 1) / len(supports), f"reading support {number}/{len(supports)}: {spec.image.name}")
        prepared.append(prepare_support(spec, targets, preprocessing))
    support_hashes = {p.record["image_sha256"]: p.record["id"] for p in prepared}
    query_cases = []
    for path in queries:
        image = read_image(path)
        twin = support_hashes.get(sha256_file(Path(path)))
        if twin:
            progress.warning(f"{path}: this query is also a support ({twin}); its prediction is not a fair test")
        query_cases.append(TrainingCase(default_id(path), preprocessing(image), None))
    ids = [case.id for case in query_cases]
    if len(set(ids)) != len(ids):
        raise InputError(f"two queries share the study id {next(i for i in ids if ids.count(i) > 1)!r}; rename one")

    structures = [t.structure for t in targets]
    rows = pretrained_rows(network, structures)

    def build_model() -> AdaptedModel:
        torch.manual_seed(settings.seed)  # new head rows and adapter weights are drawn here
        return AdaptedModel(network, method, rows, tune_decoder, softmax)

    started = time.monotonic()
    cases = [p.case for p in prepared]
    if settings.adapts_per_query(len(query_cases)):
        episodes = adapt_per_query(build_model, cases, query_cases, settings, device, progress, should_stop, names)
        trained = [(model, result, [path], case.id) for (model, result), path, case in zip(episodes, queries, query_cases)]
    else:
        model = build_model()
        result = adapt(model, cases, settings, device, progress, queries=query_cases, should_stop=should_stop, structure_names=names)
        trained = [(model, result, list(queries), None)]
    seconds = round(time.monotonic() - started, 2)
    expected = {
        s.name: list(expected_volume_range([p.volumes_ml[i] for p in prepared], settings.size_prior_gamma))
        for i, s in enumerate(structures)
    }
    runs = []
    for model, result, its_queries, query in trained:
        metadata = {
            "format": 1,
            "base_model": base,
            "method": method.name,
            "tune_decoder": tune_decoder,
            "hyper_parameters": {**asdict(settings), "learning_rate": result.learning_rate, "max_epochs": result.max_epochs,
                                 "weight_decay": result.weight_decay},
            "precision": result.step_precision,  # what the gradient steps ran in
            "feature_cache": result.feature_cache,
            "structures": [
                {"name": s.name, "display_name": s.display_name, "color": list(s.color), "terminology": s.slicerio_terminology(), "pretrained_row": row}
                for s, row in zip(structures, rows)
            ],
            "k": len(prepared),
            "supports": [p.record for p in prepared],
            "queries": [str(q) for q in its_queries],
            "seed": settings.seed,
            "size_prior": result.size_prior,
            "expected_volumes_ml": expected,
            "training_curve": result.curve,
            "epochs": result.epochs,
            "stopped_early": result.stopped_early,
            "training_seconds": round(result.seconds, 2) if query else seconds,
            "trainable_parameters": model.trainable_count(),
            "device": str(device),
            "versions": library_versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        runs.append(AdaptationRun(model, result, metadata, query))
    return runs
