"""Batch prediction: one model load, many studies, every study reported, no half-written output.

A study that fails (unreadable file, not 3D, ...) is reported and the batch goes on; the summary
says how many succeeded, and the caller turns failures into a non-zero exit code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from torch import nn

from .errors import FSEFTError
from .inference import SegmentationPredictor
from .io.images import ct_plausibility, read_image
from .io.segmentations import write_label_map, write_label_table, write_segmentation
from .io.studies import Study
from .labels import Structure, novel_structure, resolve_structure, UNIVERSAL_STRUCTURES
from .model.network import Architecture
from .progress import Progress

OUTPUT_FORMATS = ("seg.nrrd", "nii.gz")


@dataclass
class BatchResult:
    outputs: dict[str, list[Path]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


def model_structures(architecture: Architecture) -> list[Structure]:
    """The structures a model's output channels mean: its class names, or the universal template."""
    if architecture.class_names:
        known = []
        for index, name in enumerate(architecture.class_names):
            try:
                known.append(resolve_structure(name))
            except FSEFTError:
                known.append(novel_structure(name))
        return known
    if architecture.out_channels == len(UNIVERSAL_STRUCTURES):
        return list(UNIVERSAL_STRUCTURES)
    return [novel_structure(f"class_{index + 1}") for index in range(architecture.out_channels)]


def write_outputs(masks, image, structures: Sequence[Structure], out_dir: Path, study_id: str, formats) -> list[Path]:
    """Each requested format, written atomically; the list of files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if "seg.nrrd" in formats:
        path = out_dir / f"{study_id}.seg.nrrd"
        write_segmentation(path, masks, image, structures)
        written.append(path)
    if "nii.gz" in formats:
        path = out_dir / f"{study_id}.nii.gz"
        write_label_map(path, masks, image, structures)
        table = out_dir / f"{study_id}.labels.json"
        write_label_table(table, structures)
        written += [path, table]
    return written


def predict_studies(
    predictor: SegmentationPredictor,
    heads: Sequence[nn.Module],
    structures: Sequence[Structure],
    studies: Sequence[Study],
    out_dir: Path,
    formats: Sequence[str] = ("seg.nrrd",),
    progress: Progress | None = None,
) -> BatchResult:
    """Segment every study with `heads` (their output channels = `structures`) and write the results."""
    progress = progress or predictor.progress
    result = BatchResult()
    progress.emit("start", studies=len(studies), structures=[s.name for s in structures], out=str(out_dir))
    for number, study in enumerate(studies, 1):
        started = time.monotonic()
        progress.step(0.0, f"study {number}/{len(studies)}: reading", study=study.id)
        try:
            image = read_image(study.path)
            warning = ct_plausibility(image)
            if warning:
                progress.warning(f"{study.path}: {warning}", study=study.id)
            masks = predictor.segment(image, heads, study=study.id)
            written = write_outputs(masks, image, structures, out_dir, study.id, formats)
        except FSEFTError as error:
            result.failures[study.id] = str(error)
        except Exception as error:  # noqa: BLE001 - one broken study must not end the batch
            result.failures[study.id] = f"{study.path}: unexpected {type(error).__name__}: {error}"
        if study.id in result.failures:
            progress.emit("study_failed", study=study.id, message=f"{study.id}: failed: {result.failures[study.id]}")
            continue
        result.outputs[study.id] = written
        seconds = time.monotonic() - started
        volumes = {s.name: int(m.sum()) for s, m in zip(structures, masks)}
        progress.emit(
            "study_done",
            study=study.id,
            outputs=[str(p) for p in written],
            voxels=volumes,
            seconds=round(seconds, 2),
            message=f"{study.id}: wrote {', '.join(p.name for p in written)} ({seconds:.1f} s)",
        )
    succeeded, failed = len(result.outputs), len(result.failures)
    progress.emit(
        "summary",
        succeeded=succeeded,
        failed=failed,
        outputs={k: [str(p) for p in v] for k, v in result.outputs.items()},
        failures=result.failures,
        message=f"{succeeded} of {len(studies)} studies segmented" + (f"; {failed} failed: {', '.join(result.failures)}" if failed else "") + f"; outputs in {out_dir}",
    )
    return result
