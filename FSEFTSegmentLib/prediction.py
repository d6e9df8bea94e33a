"""Batch prediction: one model load, many studies, every study reported, no half-written output.

A study that fails (unreadable file, not 3D, ...) is reported and the batch goes on; the summary
says how many succeeded, and the caller turns failures into a non-zero exit code.

Heads may come from several adapters (see `inference.Head`). When a structure has an expected
volume range (an adapter's size prior), its predicted volume on the native grid is checked
against it: a volume outside is flagged in the `.seg.nrrd` segment tags (`FSEFT.QualityFlag`,
`FSEFT.VolumeML`, `FSEFT.ExpectedVolumeML`), in `<study>.fseft.json`, in the `study_done` event
(`quality`), as a warning, and in the summary.
"""

from __future__ import annotations

import difflib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import SimpleITK as sitk
from torch import nn

from .adapters import adapter_structures, expected_volumes, load_adapters, recorded_base_model
from .errors import FSEFTError, InputError
from .inference import Head, InferenceSettings, SegmentationPredictor
from .io.files import atomic_write, ensure_folder
from .io.images import ct_plausibility, read_image
from .io.segmentations import header_text, write_label_map, write_label_table, write_segmentation
from .io.studies import Study
from .labels import Structure, novel_structure, resolve_structure, resolve_structures, UNIVERSAL_STRUCTURES
from .methods.adapted import AdaptedModel
from .model.network import Architecture, FoundationSwinUNETR, head_rows
from .progress import Progress, StageTimes

OUTPUT_FORMATS = ("seg.nrrd", "nii.gz")


@dataclass
class BatchResult:
    outputs: dict[str, list[Path]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    flagged: dict[str, list[str]] = field(default_factory=dict)  # study -> structures outside their expected volume


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


def _names(structure: Structure, name: str) -> bool:
    """Whether the user's `name` means `structure` (a known structure's spellings, or a novel one's)."""
    for make in (resolve_structure, novel_structure):
        try:
            if make(name).name == structure.name:
                return True
        except FSEFTError:
            pass
    return False


def plan_outputs(
    network: FoundationSwinUNETR,
    adapters: Sequence[tuple[AdaptedModel, dict]] = (),
    names: Sequence[str] | None = None,
    model_name: str = "the model",
    adapter_names: Sequence[str] | None = None,
) -> tuple[list[Head], list[Structure], dict[str, tuple[float, float]]]:
    """Heads, structures (in output order) and expected volume ranges for a prediction run.

    Without adapters: the base model's classes, all or those `names` selects. With adapters:
    `names` selects among the adapters' structures and, for a name no adapter has, the base
    model's classes; without `names`, every structure of every adapter. One `Head` per output:
    the heads of one adapter (and the base rows) run once per window however they are selected.
    """
    base = model_structures(network.architecture)
    base_names = [s.name for s in base]
    if not adapters:
        if names:
            wanted = resolve_structures(names)
            absent = [s.name for s in wanted if s.name not in base_names]
            if absent:
                raise InputError(f"model {model_name} has no output for {', '.join(absent)}; it segments: {', '.join(base_names)}")
            rows = [base_names.index(s.name) for s in wanted]
        else:
            rows = list(range(len(base)))
        return [Head(head_rows(network.classifier, rows))], [base[r] for r in rows], {}

    labels = list(adapter_names) if adapter_names is not None else [f"adapter {n}" for n in range(1, len(adapters) + 1)]
    offered = []  # (structure, adapter number or None for the base model, channel)
    for number, (_, metadata) in enumerate(adapters):
        offered += [(structure, number, channel) for channel, structure in enumerate(adapter_structures(metadata))]
    if names:
        chosen = []
        for name in names:
            matches = [entry for entry in offered if _names(entry[0], name)]
            if len({entry[1] for entry in matches}) > 1:
                raise InputError(f"'{name}' is segmented by several adapters ({', '.join(labels[entry[1]] for entry in matches)}); apply one of them")
            if matches:
                chosen.append(matches[0])
                continue
            rows = [row for row, structure in enumerate(base) if _names(structure, name)]
            if not rows:
                candidates = [entry[0].name for entry in offered] + base_names
                close = difflib.get_close_matches("_".join(name.lower().replace("-", " ").split()), candidates, n=1, cutoff=0.75)
                raise InputError(
                    f"no output for '{name}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                    + f": the adapters segment {', '.join(entry[0].name for entry in offered)}; model {model_name} segments {', '.join(base_names)}"
                )
            chosen.append((base[rows[0]], None, rows[0]))
    else:
        chosen = offered
    seen: dict[str, int | None] = {}
    for structure, number, _ in chosen:
        if structure.name in seen:
            owners = [labels[n] if n is not None else f"model {model_name}" for n in (seen[structure.name], number)]
            raise InputError(f"structure '{structure.name}' is asked for twice ({' and '.join(owners)}); select one with --structures or apply the adapters separately")
        seen[structure.name] = number

    base_rows = [channel for _, number, channel in chosen if number is None]
    base_head = head_rows(network.classifier, base_rows) if base_rows else None
    heads, expected = [], {}
    for structure, number, channel in chosen:
        if number is None:
            heads.append(Head(base_head, None, (base_rows.index(channel),)))
            continue
        model, metadata = adapters[number]
        heads.append(Head.of(model, (channel,)))
        ranges = expected_volumes(metadata)
        if structure.name in ranges:
            expected[structure.name] = ranges[structure.name]
    return heads, [entry[0] for entry in chosen], expected


def volumes_ml(masks: np.ndarray, image: sitk.Image) -> list[float]:
    """Each mask's volume in mL on the native grid: voxel count x voxel volume (spacing in mm)."""
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    return [int(np.count_nonzero(mask)) * voxel_ml for mask in masks]


def _ml(value: float) -> str:
    return f"{round(value, 2):g}"


def assess_quality(structures: Sequence[Structure], volumes: Sequence[float], expected: Mapping[str, tuple[float, float]]) -> dict[str, dict]:
    """Per structure with an expected range: its volume, the range and the quality flag (None: plausible)."""
    if not expected:
        return {}
    from .priors import quality_flag

    quality = {}
    for structure, volume in zip(structures, volumes):
        if structure.name in expected:
            low, high = (float(v) for v in expected[structure.name])
            quality[structure.name] = {"volume_ml": round(volume, 3), "expected_ml": [low, high], "flag": quality_flag(volume, (low, high))}
    return quality


def quality_tags(structures: Sequence[Structure], quality: Mapping[str, dict]) -> list[dict[str, str] | None]:
    """Segment tags carrying each checked structure's volume, expected range and flag (if any)."""
    tags: list[dict[str, str] | None] = []
    for structure in structures:
        check = quality.get(structure.name)
        if check is None:
            tags.append(None)
            continue
        low, high = check["expected_ml"]
        entry = {"FSEFT.VolumeML": _ml(check["volume_ml"]), "FSEFT.ExpectedVolumeML": f"{_ml(low)}-{_ml(high)}"}
        if check["flag"]:
            entry["FSEFT.QualityFlag"] = header_text(str(check["flag"]))
        tags.append(entry)
    return tags


def write_outputs(
    masks,
    image,
    structures: Sequence[Structure],
    out_dir: Path,
    study_id: str,
    formats,
    quality: Mapping[str, dict] | None = None,
    volumes: Sequence[float] | None = None,
) -> list[Path]:
    """Each requested format, written atomically; the list of files written. With `quality` (see
    `assess_quality`), the .seg.nrrd segments carry it as tags and `<study>.fseft.json` holds it
    (with every structure's volume when `volumes` are given)."""
    ensure_folder(out_dir)
    written: list[Path] = []
    try:
        if "seg.nrrd" in formats:
            path = out_dir / f"{study_id}.seg.nrrd"
            write_segmentation(path, masks, image, structures, segment_tags=quality_tags(structures, quality) if quality else None)
            written.append(path)
        if "nii.gz" in formats:
            path = out_dir / f"{study_id}.nii.gz"
            write_label_map(path, masks, image, structures)
            table = out_dir / f"{study_id}.labels.json"
            write_label_table(table, structures)
            written += [path, table]
        if quality:
            path = out_dir / f"{study_id}.fseft.json"
            document = {"study": study_id, "quality": dict(quality)}
            if volumes is not None:
                document["volumes_ml"] = {s.name: round(v, 3) for s, v in zip(structures, volumes)}
            with atomic_write(path) as tmp:
                tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
            written.append(path)
    except BaseException:  # a study's results are all there or none is: a later format failed
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def predict_studies(
    predictor: SegmentationPredictor,
    heads: Sequence[nn.Module | Head | AdaptedModel],
    structures: Sequence[Structure],
    studies: Sequence[Study],
    out_dir: Path,
    formats: Sequence[str] = ("seg.nrrd",),
    progress: Progress | None = None,
    expected_volumes_ml: Mapping[str, tuple[float, float]] | None = None,
) -> BatchResult:
    """Segment every study with `heads` (their output channels, concatenated in order, = `structures`)
    and write the results. A plain module reads the base network's features; a `Head` or an
    `AdaptedModel` reads its own network's (black-box adapters: the base network, so they share
    its pass). `expected_volumes_ml` (structure name -> (low, high)) turns on the quality flag."""
    progress = progress or predictor.progress
    result = BatchResult()
    ensure_folder(out_dir)  # before any study: a folder that cannot be made is the batch's one error
    progress.emit("start", studies=len(studies), structures=[s.name for s in structures], out=str(out_dir))
    for number, study in enumerate(studies, 1):
        started = time.monotonic()
        progress.step(0.0, f"study {number}/{len(studies)}: reading", study=study.id)
        times = StageTimes()
        try:
            with times.stage("read"):
                image = read_image(study.path)
                warning = ct_plausibility(image)
            if warning:
                progress.warning(f"{study.path}: {warning}", study=study.id)
            masks = predictor.segment(image, heads, study=study.id, times=times)
            volumes = volumes_ml(masks, image)
            quality = assess_quality(structures, volumes, expected_volumes_ml or {})
            with times.stage("write"):
                written = write_outputs(masks, image, structures, out_dir, study.id, formats, quality, volumes)
        except FSEFTError as error:
            result.failures[study.id] = str(error) + (f" (listed in {study.listed_in})" if study.listed_in else "")
        except Exception as error:  # noqa: BLE001 - one broken study must not end the batch
            result.failures[study.id] = f"{study.path}: unexpected {type(error).__name__}: {error}"
        if study.id in result.failures:
            progress.emit("study_failed", study=study.id, message=f"{study.id}: failed: {result.failures[study.id]}")
            continue
        result.outputs[study.id] = written
        seconds = time.monotonic() - started
        flagged = [s for s in structures if quality.get(s.name, {}).get("flag")]
        for structure in flagged:
            progress.warning(f"{study.id}: {structure.display_name}: {quality[structure.name]['flag']}", study=study.id, structure=structure.name)
        if flagged:
            result.flagged[study.id] = [s.name for s in flagged]
        extra = {"quality": quality} if quality else {}
        progress.emit(
            "study_done",
            study=study.id,
            outputs=[str(p) for p in written],
            voxels={s.name: int(np.count_nonzero(m)) for s, m in zip(structures, masks)},
            volumes_ml={s.name: round(v, 3) for s, v in zip(structures, volumes)},
            seconds=round(seconds, 2),
            stage_seconds=dict(times),
            message=f"{study.id}: wrote {', '.join(p.name for p in written)} ({seconds:.1f} s)"
            + (f"; quality flag: {', '.join(s.display_name for s in flagged)}" if flagged else ""),
            **extra,
        )
    succeeded, failed = len(result.outputs), len(result.failures)
    progress.emit(
        "summary",
        succeeded=succeeded,
        failed=failed,
        outputs={k: [str(p) for p in v] for k, v in result.outputs.items()},
        failures=result.failures,
        flagged=result.flagged,
        message=f"{succeeded} of {len(studies)} studies segmented"
        + (f"; {failed} failed: {', '.join(result.failures)}" if failed else "")
        + (f"; volume outside the expected range (quality flag): {_flag_list(result.flagged)}" if result.flagged else "")
        + f"; outputs in {out_dir}",
    )
    return result


def _flag_list(flagged: Mapping[str, list[str]]) -> str:
    return ", ".join(f"{study} ({', '.join(names)})" for study, names in flagged.items())


def predict_with_adapters(
    network_ref: str | None = None,
    adapters: Sequence[str | Path] = (),
    inputs: Sequence[str | Path] = (),
    out: str | Path = "predictions",
    device="auto",
    progress: Progress | None = None,
    structures: Sequence[str] | None = None,
    formats: Sequence[str] = ("seg.nrrd",),
    settings: InferenceSettings | None = None,
) -> BatchResult:
    """Load a base model (`network_ref`, else the one the adapters record, else the registry's
    default, as the CLI does) and any adapter folders (refused if trained on other weights), and
    segment `inputs` (files, DICOM folders, study lists) into `out`: the adapters' structures, or
    those `structures` names (see `plan_outputs`)."""
    import torch

    from .inference import choose_device
    from .io.studies import expand_inputs
    from .model import load_foundation_model
    from .model.registry import model_sha256
    from .registry_file import default_model

    progress = progress or Progress()
    studies = expand_inputs(inputs)
    folders = [Path(folder) for folder in adapters]
    if network_ref is None:
        recorded = recorded_base_model(folders)
        network_ref = default_model() if recorded is None else recorded["name"]
    device = device if isinstance(device, torch.device) else choose_device(device)
    progress.info(f"loading model {network_ref}")
    network = load_foundation_model(network_ref)
    loaded = load_adapters(folders, network, model_sha256(network_ref)) if folders else []
    for folder, (model, metadata) in zip(folders, loaded):
        names = ", ".join(s["name"] for s in metadata["structures"])
        progress.info(f"adapter {folder}: {metadata['method']}{' + decoder' if model.tune_decoder else ''}, {names}")
    heads, chosen, expected = plan_outputs(network, loaded, structures, str(network_ref), [str(f) for f in folders])
    predictor = SegmentationPredictor(network, device, settings or InferenceSettings(), progress)
    passes = len({id(head.network if head.network is not None else network) for head in heads})
    progress.info(
        f"segmenting {len(studies)} stud{'y' if len(studies) == 1 else 'ies'} on {device} ({len(chosen)} structures"
        + (f", {passes} network pass{'es' if passes > 1 else ''} per window)" if folders else ")")
    )
    return predict_studies(predictor, heads, chosen, studies, Path(out), formats, progress, expected)
