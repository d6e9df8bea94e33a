"""The pretraining config: `PretrainConfig` and its datasets, read from YAML and checked key by key.

Kept apart from the loop so the data side (`volume_cache`, `validation`) can use the config without
importing the training loop, and so every bad key is refused, naming it, before any work starts.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io.files import read_yaml
from ..model.network import Architecture, crop_size_problem

NO_VALIDATION_VOLUMES = "no dataset has validation volumes (a dataset's 'validation: N')"


@dataclass
class DatasetSpec:
    name: str
    images: list[str]
    labels: list[str]
    label_template: dict[int, int]  # source label value -> universal id (1-based)
    annotated: tuple[int, ...]  # universal ids this dataset annotates
    #: universal id -> id of its left counterpart: a single kidney/lung label is split, voxels with
    #: model-space (RAS) axis-0 index < X/2 becoming the left organ (paper-facts section 5)
    split_left_right: dict[int, int] = field(default_factory=dict)
    #: label-map-only datasets: images are synthesised (`synthesis.synthesize_ct`), `synthesize`
    #: distinct variants per map (0: the dataset has images)
    synthesize: int = 0
    mirror_left_right: bool = False  # the maps' headers are left-right mirrored (BTCV)
    weight: float = 1.0  # relative sampling weight (1 for every dataset: balanced, as the paper)
    #: validation volumes (`validation_indices`): held-out pairs, or new syntheses
    validation: int = 0

    @property
    def volumes(self) -> int:
        """The volumes training draws from (held-out validation pairs excluded)."""
        return len(self.labels) * self.synthesize if self.synthesize else len(self.labels) - self.validation

    def sources(self, index: int) -> tuple[str, str | None]:
        """(label map, image) of volume `index`; variant n of map m is volume n * maps + m, no image."""
        return self.labels[index % len(self.labels)], (None if self.synthesize else self.images[index])


def validation_indices(spec: DatasetSpec) -> list[int]:
    """Volume indices (as `DatasetSpec.sources` reads them) of the dataset's validation volumes (see `validation`)."""
    if not spec.validation:
        return []
    maps = len(spec.labels)
    if not spec.synthesize:
        return list(range(maps - spec.validation, maps))
    return [spec.synthesize * maps + j * maps // spec.validation for j in range(spec.validation)]


@dataclass
class PretrainConfig:
    datasets: list[DatasetSpec]
    architecture: Architecture = field(default_factory=Architecture)
    crop_size: int | None = None  # None: the architecture's patch size
    volumes_per_step: int = 2  # per process
    crops_per_volume: int = 3
    positive_fraction: float = 0.8  # pos:neg 4:1
    lr: float = 1e-4
    weight_decay: float = 1e-5
    warmup_epochs: float = 10
    warmup_start_factor: float = 0.1
    epochs: int = 1000
    steps_per_epoch: int | None = None  # None: volumes / (volumes_per_step * processes), at least 1
    steps: int | None = None  # total steps; None: epochs * steps_per_epoch
    seed: int = 0
    out: str = "pretraining"
    checkpoint_every: int = 100
    validate_every: int = 0  # steps between validations (0: never); needs a dataset with `validation`
    intensity_shift: float = 0.1
    intensity_shift_prob: float = 0.2
    rot90_prob: float = 0.1
    #: positive crops centre on a structure drawn uniformly among those present (MONAI's
    #: RandCropByLabelClasses), so small organs are seen as often as the liver
    class_balanced: bool = False
    bce_weight: float = 0.0  # adds this times the masked binary cross-entropy to the Dice loss
    #: false: a class's Dice counts only where the crop holds it (absence is left to the
    #: cross-entropy), so rare small classes are not driven to zero before they are found (loss.py)
    absent_class_dice: bool = True
    #: > 0: no lr decay until every validated class reaches this Dice (then the cosine runs from that
    #: step to the end); needs `validate_every`
    hold_lr_until_dice: float = 0.0
    init: str | None = None  # optional starting weights (e.g. MONAI's self-supervised Swin-UNETR)
    resume: bool = True  # continue from out/checkpoint-last.pt when it exists
    volume_cache: bool = False  # keep prepared volumes in out/volume-cache/ (a resumed run skips synthesis)
    #: worker processes preparing (synthesising) every volume in the background (per training
    #: process); 0: each volume is prepared in the training process when first drawn
    synthesis_workers: int = 0
    #: "bf16": the forward pass under bfloat16 autocast (weights, gradients and the loss stay float32).
    #: 1.4x faster steps on a CPU with AMX/AVX512-BF16 (measured on 2 cores), faster on recent GPUs
    #: "auto": bf16 where the hardware computes it natively (a CUDA GPU with bf16, a CPU with
    #: AVX512-BF16 or AMX), fp32 elsewhere
    precision: str = "fp32"
    source: str | None = None  # the YAML file, for messages

    @property
    def crop(self) -> int:
        return self.crop_size or self.architecture.patch_size

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> PretrainConfig:
        path = Path(path).expanduser()
        return cls.from_dict(read_yaml(path), base=path.parent, source=str(path))

    @classmethod
    def from_dict(cls, values: Any, base: str | os.PathLike = ".", source: str | None = None) -> PretrainConfig:
        def fail(key: str, message: str):
            raise InputError(f"'{key}': {message}", source)

        if not isinstance(values, dict):
            raise InputError("the config must be a mapping of keys to values", source)
        base = Path(base)
        known = {f.name for f in fields(cls)} - {"source"}
        unknown = sorted(set(values) - known)
        if unknown:
            fail(unknown[0], f"unknown key (known: {', '.join(sorted(known))})")
        architecture_values = values.get("architecture") or {}
        if not isinstance(architecture_values, dict):
            fail("architecture", "must be a mapping (feature_size, out_channels, patch_size, ...)")
        bad = sorted(set(architecture_values) - set(Architecture.__dataclass_fields__))
        if bad:
            fail(f"architecture.{bad[0]}", "unknown architecture field")
        try:
            architecture = Architecture.from_dict(architecture_values)
        except (TypeError, ValueError) as error:
            fail("architecture", str(error))
        datasets = values.get("datasets")
        if not isinstance(datasets, list) or not datasets:
            fail("datasets", "must be a non-empty list of datasets")
        specs = [_dataset_spec(entry, f"datasets[{number}]", base, architecture, fail) for number, entry in enumerate(datasets)]
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            fail("datasets", "dataset names must be unique")

        settings: dict[str, Any] = {}
        for key in known - {"datasets", "architecture"}:
            if key not in values or values[key] is None:
                continue
            value = values[key]
            if key == "precision":
                if value not in ("auto", "fp32", "bf16"):
                    fail(key, f"must be auto, fp32 or bf16, got {value!r}")
            elif key in ("out", "init"):
                if not isinstance(value, str):
                    fail(key, "must be a path")
                value = os.path.normpath(base / Path(value).expanduser())  # absolute paths stay as they are
            elif key in ("resume", "class_balanced", "volume_cache", "absent_class_dice"):
                if not isinstance(value, bool):
                    fail(key, "must be true or false")
            elif key in ("lr", "weight_decay", "warmup_epochs", "warmup_start_factor", "positive_fraction",
                         "intensity_shift", "intensity_shift_prob", "rot90_prob", "bce_weight", "hold_lr_until_dice"):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    try:
                        value = float(value)  # YAML reads 1e-4 (no dot) as a string
                    except (TypeError, ValueError):
                        fail(key, f"must be a number, got {value!r}")
                value = float(value)
                if value < 0:
                    fail(key, "must not be negative")
                if key in ("positive_fraction", "intensity_shift_prob", "rot90_prob", "warmup_start_factor",
                           "hold_lr_until_dice") and value > 1:
                    fail(key, "must be between 0 and 1")
            else:  # integers
                if isinstance(value, bool) or not isinstance(value, int):
                    fail(key, f"must be an integer, got {value!r}")
                if key not in ("seed", "validate_every", "synthesis_workers") and value < 1:
                    fail(key, "must be at least 1")
                if value < 0:
                    fail(key, "must not be negative")
            settings[key] = value
        config = cls(datasets=specs, architecture=architecture, source=source, **settings)
        if config.validate_every and not any(spec.validation for spec in specs):
            fail("validate_every", NO_VALIDATION_VOLUMES)
        if config.hold_lr_until_dice and not config.validate_every:
            fail("hold_lr_until_dice", "needs validate_every: the hold ends on a validation")
        if not config.absent_class_dice and not config.bce_weight:
            fail("absent_class_dice", "false needs bce_weight > 0: nothing else would penalise a class where it is absent")
        if "out" not in settings:
            config.out = str(base / cls.out)
        if problem := crop_size_problem(config.crop):
            fail("crop_size" if config.crop_size else "architecture.patch_size", problem)
        return config


def _dataset_spec(entry: Any, key: str, base: Path, architecture: Architecture, fail) -> DatasetSpec:
    if not isinstance(entry, dict):
        fail(key, "must be a mapping with name, images, labels, label_template, annotated")
    unknown = sorted(set(entry) - {"name", "images", "labels", "label_template", "annotated", "split_left_right",
                                   "synthesize", "mirror_left_right", "weight", "validation"})
    if unknown:
        fail(f"{key}.{unknown[0]}", "unknown key")
    synthesize = entry.get("synthesize", 0)
    if isinstance(synthesize, bool) or not isinstance(synthesize, int) or synthesize < 0:
        fail(f"{key}.synthesize", "must be the number of synthetic variants per label map (0: real images)")
    for required in ("name", "labels", "label_template") + (() if synthesize else ("images",)):
        if entry.get(required) in (None, "", [], {}):
            fail(f"{key}.{required}", "is missing")
    if synthesize and entry.get("images"):
        fail(f"{key}.images", "a synthesised dataset has label maps only")
    mirror = entry.get("mirror_left_right", False)
    if not isinstance(mirror, bool):
        fail(f"{key}.mirror_left_right", "must be true or false")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
        fail(f"{key}.weight", "must be a positive number")
    name = str(entry["name"])
    labels = _paths(entry["labels"], f"{key}.labels", base, fail)
    images = [] if synthesize else _paths(entry["images"], f"{key}.images", base, fail)
    if not synthesize and len(images) != len(labels):
        fail(f"{key}.labels", f"{len(labels)} label file(s) for {len(images)} image(s); they pair in sorted order")
    validation = entry.get("validation", 0)
    if isinstance(validation, bool) or not isinstance(validation, int) or validation < 0:
        fail(f"{key}.validation", "must be the number of validation volumes (0: none)")
    if synthesize and validation > len(labels):
        fail(f"{key}.validation", f"at most one synthetic validation volume per label map ({len(labels)})")
    if not synthesize and validation >= len(labels):
        fail(f"{key}.validation", f"holds out {validation} of {len(labels)} volume(s): none would be left to train on")
    channels = architecture.out_channels
    template_key = f"{key}.label_template"
    template = _integer_mapping(entry["label_template"], template_key, "must map source label values to universal ids", fail)
    for source, universal in template.items():
        if source <= 0:
            fail(template_key, f"source value {source}: background (0) cannot be mapped")
        if not 1 <= universal <= channels:
            fail(template_key, f"universal id {universal} is outside 1..{channels}")
    split_key = f"{key}.split_left_right"
    split = _integer_mapping(entry.get("split_left_right") or {}, split_key, "must map a universal id to the id of its left counterpart", fail)
    for whole, left in split.items():
        if whole not in template.values():
            fail(split_key, f"universal id {whole} is not produced by label_template")
        if not 1 <= left <= channels:
            fail(split_key, f"universal id {left} is outside 1..{channels}")
    produced = set(template.values()) | set(split.values())
    annotated_values = entry.get("annotated")
    if annotated_values is None:
        annotated = tuple(sorted(produced))
    else:
        if not isinstance(annotated_values, list) or not annotated_values:
            fail(f"{key}.annotated", "must be a non-empty list of universal ids")
        try:
            annotated = tuple(sorted({int(v) for v in annotated_values}))
        except (TypeError, ValueError):
            fail(f"{key}.annotated", "must be a list of integers")
        outside = [v for v in annotated if not 1 <= v <= architecture.out_channels]
        if outside:
            fail(f"{key}.annotated", f"universal id {outside[0]} is outside 1..{architecture.out_channels}")
        missing = sorted(produced - set(annotated))
        if missing:
            fail(f"{key}.annotated", f"universal id {missing[0]} is produced by label_template or split_left_right but not annotated")
    return DatasetSpec(name, images, labels, template, annotated, split, synthesize, mirror, float(weight), validation)


def _integer_mapping(values: Any, key: str, not_a_mapping: str, fail) -> dict[int, int]:
    """A YAML mapping of integers to integers (keys may come as strings), or `fail(key, ...)`."""
    if not isinstance(values, dict):
        fail(key, not_a_mapping)
    mapping: dict[int, int] = {}
    for source, target in values.items():
        try:
            mapping[int(source)] = int(target)
        except (TypeError, ValueError):
            fail(key, f"'{source}: {target}' is not 'integer: integer'")
    return mapping


def _paths(value: Any, key: str, base: Path, fail) -> list[str]:
    """A list of files, or one glob pattern (relative to the config's folder), sorted."""
    if isinstance(value, str):
        pattern = str(Path(value).expanduser() if Path(value).expanduser().is_absolute() else base / value)
        found = sorted(glob.glob(pattern))
        if not found:
            fail(key, f"the pattern '{value}' matches no file")
        return found
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        fail(key, "must be a list of paths or one glob pattern")
    paths = [str(Path(v).expanduser() if Path(v).expanduser().is_absolute() else base / v) for v in value]
    for path in paths:
        if not os.path.exists(path):
            fail(key, f"no such file: {path}")
    return paths
