"""Pretraining of the foundation network on several partially labelled CT datasets (paper-facts section 5).

A YAML config names the datasets (images, label maps, how each label value maps to a universal id,
which universal ids the dataset annotates), the architecture and the schedule. One step: every
process draws `volumes_per_step` volumes, each by picking a dataset uniformly and then one of its
volumes uniformly (sampling balanced over datasets), and cuts `crops_per_volume` crops from each
(centred on foreground or background, `positive_fraction` positive, as MONAI's
RandCropByPosNegLabel; rot90 and intensity-shift augmentation); the loss is the partial-label soft
Dice (`loss.partial_label_dice_loss`); AdamW (weight decay 1e-5); the learning rate warms up
linearly from lr * `warmup_start_factor` over `warmup_epochs` epochs, then follows a cosine to 0,
both stepped per step. With `hold_lr_until_dice: D` (and validation, below) the learning rate stays
at its peak until a validation where every class reaches Dice D, and only then decays: a cosine that
anneals while small organs are still at zero freezes them there. An epoch is `steps_per_epoch` steps
(default: enough steps for every process together to draw as many volumes as there are).

Volumes are preprocessed once (CTPreprocessing; the remapped label map follows with
`masks_to_model_space`) when first drawn, and kept in RAM as a float32 image and a uint8 map of
universal ids; with `volume_cache: true` also on disk under `out/volume-cache/`, so a resumed run
does not synthesise them again. With `synthesis_workers: N` N worker processes prepare every volume
in the background from the start (validation volumes first) while the training process steps: a
fast accelerator no longer waits on one core's synthesis (a step waits only for a volume it draws
that is not ready yet). The volumes are the same as prepared in the training process.

Randomness is drawn from generators seeded by (seed, step, rank), so a run resumed from a checkpoint
draws exactly what the uninterrupted run would have (resumed with another total number of steps,
the cosine continues from the checkpoint's step toward the new end); the checkpoint (`checkpoint-last.pt`,
written atomically every `checkpoint_every` steps, when stopped and at the end) holds the model,
optimizer and scheduler states, the step, the torch RNG state and the architecture, all loadable
with `torch.load(weights_only=True)`. The final weights alone go to `model.pt` (a plain state dict,
loadable by `model.checkpoint.build_from_checkpoint`). Each step appends one JSON line to `loss.jsonl`.
With `validate_every` (and a dataset's `validation: N`) the run scores its validation volumes every
so many steps (`validation.py`): per-class Dice to `validation.jsonl`, the best weights so far to
`checkpoint-best.pt`. A new run from `init:` weights first scores them (step 0), so `checkpoint-best.pt`
exists only if training beat its starting point. `precision: bf16` runs the forward pass under bfloat16 autocast; `auto` does so
only where the hardware computes bf16 natively (`pretraining_dtype`).

Launched under torchrun (RANK / WORLD_SIZE set, more than one process) the model is wrapped in
DistributedDataParallel (gloo on the CPU, nccl on CUDA); only rank 0 writes files:

    torchrun --nproc_per_node 4 -m FSEFTSegmentLib.pretraining.loop config.yaml
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.distributed as dist

from ..errors import Cancelled, FSEFTError, InputError
from ..inference import native_bf16_cpu
from ..io.files import sha256_file
from ..io.images import read_image
from ..model.checkpoint import ARCHITECTURE_METADATA, build_from_checkpoint, stored_metadata
from ..model.network import Architecture, FoundationSwinUNETR, crop_size_problem
from ..preprocessing import CTPreprocessing
from ..progress import Progress, make_progress
from ..training import CropSampler, _cut, pad_to
from .loss import partial_label_dice_loss
from .synthesis import mirror_left_right, synthesize_ct
from .validation import summary, validate, validation_indices

CHECKPOINT_NAME = "checkpoint-last.pt"
BEST_NAME = "checkpoint-best.pt"  # the weights with the best mean validation Dice so far
VALIDATION_LOG_NAME = "validation.jsonl"
NO_VALIDATION_VOLUMES = "no dataset has validation volumes (a dataset's 'validation: N')"
MODEL_NAME = "model.pt"
LOG_NAME = "loss.jsonl"
VOLUME_CACHE_NAME = "volume-cache"
NONFINITE_BATCH_NAME = "nonfinite-batch.pt"  # the first batch whose gradients were not finite
MAX_NONFINITE_STEPS = 5  # skipped steps in a row before the run stops


# -------------------------------------------------------------------------------------------- config


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
    #: validation volumes (`validation.validation_indices`): held-out pairs, or new syntheses
    validation: int = 0

    @property
    def volumes(self) -> int:
        """The volumes training draws from (held-out validation pairs excluded)."""
        return len(self.labels) * self.synthesize if self.synthesize else len(self.labels) - self.validation

    def sources(self, index: int) -> tuple[str, str | None]:
        """(label map, image) of volume `index`; variant n of map m is volume n * maps + m, no image."""
        return self.labels[index % len(self.labels)], (None if self.synthesize else self.images[index])


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
        import yaml

        path = Path(path).expanduser()
        if not path.is_file():
            raise InputError("no such config file", path)
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise InputError(f"not valid YAML ({str(error).splitlines()[0]})", path) from None
        return cls.from_dict(values, base=path.parent, source=str(path))

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


# ------------------------------------------------------------------------------------------ schedule


def lr_factor(step: int, warmup_steps: int, total_steps: int, start_factor: float = 0.1, decay_from: int | None = None) -> float:
    """Multiplier of the base lr at `step` (0-based): linear warm-up from `start_factor`, 1 until
    `decay_from` (default: the end of the warm-up), then a cosine to 0 at `total_steps`."""
    if step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    start = warmup_steps if decay_from is None else max(decay_from, warmup_steps)
    if step < start:
        return 1.0
    span = max(total_steps - start, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - start, span) / span))


def _step_generator(seed: int, step: int, rank: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + rank) * 7 + stream)


# -------------------------------------------------------------------------------------------- data


@dataclass
class _Volume:
    image: torch.Tensor  # (1, X, Y, Z) float32, padded to the crop
    label: torch.Tensor  # (1, X, Y, Z) uint8 universal ids, padded to the crop
    sampler: CropSampler


class _VolumeCache:
    """Volumes in model space, preprocessed when first drawn and then kept in RAM.

    With a `folder`, each prepared volume is also stored there (our own tensors, read back with
    `weights_only=True`), keyed by everything it depends on, so a resumed run skips the synthesis.
    """

    def __init__(self, config: PretrainConfig, crop: int, folder: Path | None = None):
        self.config = config
        self.crop = crop
        self.folder = folder
        self.preprocessing = CTPreprocessing(config.architecture)
        self.volumes: dict[tuple[int, int], _Volume] = {}
        self.code = _preparing_code() if folder is not None else b""
        self.pending: dict[tuple[int, int], Future] = {}
        self.pool: ProcessPoolExecutor | None = None

    def prepare_in_background(self, workers: int) -> None:
        """Start `workers` processes preparing every validation, then every training volume."""
        keys = [(d, i) for d, spec in enumerate(self.config.datasets) for i in validation_indices(spec)]
        keys += [(d, i) for d, spec in enumerate(self.config.datasets) for i in range(spec.volumes)]
        # spawn, not fork: the parent may already hold a CUDA context or torch's thread pools
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_single_threaded)
        self.pending = {key: self.pool.submit(_prepare_volume, self.config, self.crop, self.folder, *key)
                        for key in keys if key not in self.volumes}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool, self.pending = None, {}

    def get(self, dataset: int, index: int) -> _Volume:
        key = (dataset, index)
        if key not in self.volumes:
            future = self.pending.pop(key, None)
            image, label = future.result() if future is not None else self._stored(self.config.datasets[dataset], index)
            sampler = ClassBalancedSampler(label, image[0]) if self.config.class_balanced else CropSampler(label, image[0])
            self.volumes[key] = _Volume(image, label, sampler)
        return self.volumes[key]

    def _stored(self, spec: DatasetSpec, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.folder is None:
            return self._load(spec, index)
        path = self.folder / f"{spec.name}-{index}-{self._fingerprint(spec, index)}.pt"
        if path.is_file():
            try:
                stored = torch.load(path, map_location="cpu", weights_only=True)
                return stored["image"], stored["label"]
            except Exception:  # a damaged entry is rebuilt
                pass
        image, label = self._load(spec, index)
        self.folder.mkdir(parents=True, exist_ok=True)
        _atomic_save({"image": image, "label": label}, path)
        return image, label

    def _fingerprint(self, spec: DatasetSpec, index: int) -> str:
        """Hash of the inputs and of the code that turns them into a prepared volume."""
        digest = hashlib.sha256()
        for source in filter(None, spec.sources(index)):
            digest.update(_file_digest(Path(source).resolve()).encode())
        digest.update(self.code)
        settings = [self.config.seed, self.crop, self.config.architecture.to_dict(), sorted(spec.label_template.items()),
                    sorted(spec.split_left_right.items()), spec.synthesize, spec.mirror_left_right]
        digest.update(json.dumps(settings, default=str).encode())
        return digest.hexdigest()[:16]

    def _load(self, spec: DatasetSpec, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        label_path, image_path = spec.sources(index)
        label_image = read_image(label_path)
        source = np.rint(sitk.GetArrayViewFromImage(label_image)).astype(np.int64)
        remapped = np.zeros(source.shape, dtype=np.uint8)
        for value, universal in spec.label_template.items():
            remapped[source == value] = universal
        if spec.synthesize:  # variant n of map m is volume n * maps + m, drawn from its own seed
            universal_map = sitk.GetImageFromArray(remapped)
            universal_map.CopyInformation(label_image)
            if spec.mirror_left_right:
                universal_map = mirror_left_right(universal_map)
            seed = int(np.random.SeedSequence([self.config.seed, index, *spec.name.encode()]).generate_state(1)[0])
            image, universal_map = synthesize_ct(universal_map, seed)
            remapped = sitk.GetArrayFromImage(universal_map)
        else:
            image = read_image(image_path)
            if label_image.GetSize() != image.GetSize():
                raise InputError(f"label grid {label_image.GetSize()} differs from its image's {image.GetSize()} ({image_path})", label_path)
        remapped = remapped.astype(np.float32)
        preprocessed = self.preprocessing(image)
        label = self.preprocessing.masks_to_model_space(remapped[None], image, preprocessed)
        if spec.split_left_right:
            left_half = torch.zeros(label.shape, dtype=torch.bool)
            left_half[:, : (label.shape[1] + 1) // 2] = True  # indices < X/2; RAS: axis 0 runs from left to right
            for whole, left in spec.split_left_right.items():
                label[(label == whole) & left_half] = left
        volume, _ = pad_to(preprocessed.as_tensor().float(), self.crop)
        label, _ = pad_to(label, self.crop)
        return volume.contiguous(), label.contiguous()


def _single_threaded() -> None:
    """A synthesis worker uses one core: the pool, not each worker, spreads over the machine."""
    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _prepare_volume(config: PretrainConfig, crop: int, folder: Path | None, dataset: int, index: int):
    """A worker's task: volume `index` of dataset `dataset`, prepared (and stored) as in the training process."""
    return _VolumeCache(config, crop, folder)._stored(config.datasets[dataset], index)


@functools.lru_cache(maxsize=None)
def _file_digest(path: Path) -> str:
    """sha256 of a source file's (or DICOM folder's) bytes: the same data keeps its cached volumes
    when it is copied, which changes its path and modification time (a new session's data folder)."""
    return sha256_file(path)


def _preparing_code() -> bytes:
    """The source of the modules that prepare a volume, read once: the code this process runs."""
    from .. import preprocessing
    from . import anatomy, synthesis

    return b"".join(Path(module.__file__).read_bytes() for module in (preprocessing, synthesis, anatomy))


class ClassBalancedSampler(CropSampler):
    """Positive crops centre on a voxel of a structure drawn uniformly among those present."""

    def __init__(self, label: torch.Tensor, image: torch.Tensor | None = None):
        super().__init__(label, image)
        values = label.reshape(-1)[self.foreground]
        self.by_class = [self.foreground[values == value] for value in torch.unique(values)]

    def _foreground_index(self, generator: torch.Generator) -> int:
        members = self.by_class[int(torch.randint(len(self.by_class), (1,), generator=generator))]
        return int(members[torch.randint(len(members), (1,), generator=generator)])


def _draw_batch(config: PretrainConfig, cache: _VolumeCache, crop: int, step: int, rank: int):
    """This process's batch of `step`: images (B, 1, s, s, s), targets (B, C, s, s, s), annotated (B, C)."""
    draw = _step_generator(config.seed, step, rank, 0)
    augment = _step_generator(config.seed, step, rank, 1)
    channels = config.architecture.out_channels
    ids = torch.arange(1, channels + 1, dtype=torch.uint8).view(-1, 1, 1, 1)
    weights = torch.tensor([spec.weight for spec in config.datasets], dtype=torch.float64)
    images, targets, annotated, names = [], [], [], []
    for _ in range(config.volumes_per_step):
        dataset = int(torch.multinomial(weights, 1, generator=draw))
        spec = config.datasets[dataset]
        index = int(torch.randint(spec.volumes, (1,), generator=draw))
        volume = cache.get(dataset, index)
        mask = torch.zeros(channels, dtype=torch.bool)
        mask[[v - 1 for v in spec.annotated]] = True
        names.append(spec.name)
        for start in volume.sampler.sample(crop, config.crops_per_volume, config.positive_fraction, draw):
            image = _cut(volume.image, start, crop)
            target = _cut(volume.label, start, crop) == ids  # (C, s, s, s)
            if float(torch.rand((), generator=augment)) < config.rot90_prob:
                turns = int(torch.randint(1, 4, (1,), generator=augment))
                plane = [(1, 2), (1, 3), (2, 3)][int(torch.randint(3, (1,), generator=augment))]
                image, target = torch.rot90(image, turns, plane), torch.rot90(target, turns, plane)
            if float(torch.rand((), generator=augment)) < config.intensity_shift_prob:
                image = image + (2 * float(torch.rand((), generator=augment)) - 1) * config.intensity_shift
            images.append(image)
            targets.append(target)
            annotated.append(mask)
    return torch.stack(images), torch.stack(targets).float(), torch.stack(annotated), names


# ---------------------------------------------------------------------------------------- training


def pretraining_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The forward pass's autocast dtype (None: float32) for a config's `precision` on `device`."""
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else native_bf16_cpu()
    if precision == "bf16" or (precision == "auto" and native):
        return torch.bfloat16
    return None


def _atomic_save(obj: Any, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def _load_init(network: FoundationSwinUNETR, path: str, progress: Progress) -> None:
    from ..model.checkpoint import read_tensors

    tensors = read_tensors(path)
    own = network.state_dict()
    matching = {k: v for k, v in tensors.items() if k in own and own[k].shape == v.shape}
    if not matching:
        raise InputError("no tensor of the initial weights fits the network", path)
    network.load_state_dict(matching, strict=False)
    progress.info(f"initialised {len(matching)} of {len(own)} tensors from {path}")


def pretrain(config: PretrainConfig, progress: Progress, should_stop: Callable[[], bool] | None = None) -> dict:
    """Run (or resume) pretraining; returns {steps, last_loss, out, checkpoint, model}.

    `should_stop()` is polled (on rank 0) before every step; when it answers true a checkpoint is
    written and `Cancelled` is raised; running again with `resume` continues the same schedule.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world > 1
    initialised_here = False
    if distributed and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        initialised_here = True
    rank = dist.get_rank() if distributed else 0
    try:
        return _pretrain(config, progress if rank == 0 else Progress(), should_stop, rank, world, distributed)
    finally:
        if initialised_here:
            dist.destroy_process_group()


def _pretrain(config, progress, should_stop, rank, world, distributed) -> dict:
    started = time.monotonic()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if distributed else 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    crop = config.crop
    volumes = sum(spec.volumes for spec in config.datasets)
    per_epoch = config.steps_per_epoch or max(1, volumes // (config.volumes_per_step * world))
    total = config.steps or config.epochs * per_epoch
    warmup = round(config.warmup_epochs * per_epoch)
    out = Path(config.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)
    network = FoundationSwinUNETR(config.architecture)
    if config.init:
        _load_init(network, config.init, progress)
    network.to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    decay_start: int | None = None  # with hold_lr_until_dice: the step whose validation ended the hold

    def factor(at: int) -> float:
        decay_from = (total if decay_start is None else decay_start) if config.hold_lr_until_dice else None
        return lr_factor(at, warmup, total, config.warmup_start_factor, decay_from)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    step = 0
    checkpoint_path = out / CHECKPOINT_NAME
    if config.resume and checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        step = int(state["step"])
        decay_start = state.get("decay_start")
        progress.info(f"resuming from step {step} of {total} ({checkpoint_path})")
        # The lr follows this config's schedule from here: a run resized on resume continues its
        # cosine from this step toward the new end (a warm restart when extended), and a hold
        # switched on or off takes effect, without starting over.
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base_lr * factor(step)
        if state.get("total_steps") != total:
            progress.info(f"the schedule changes from {state.get('total_steps')} to {total} steps at step {step}")
    model = network
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)
    log_path, validation_path = out / LOG_NAME, out / VALIDATION_LOG_NAME
    if rank == 0:
        _trim_log(log_path, step)
        _trim_log(validation_path, step)
    best = max((record["mean"] for record in _read_log(validation_path)), default=-1.0)

    def weights() -> dict:
        """What `load_run_checkpoint` needs: enough to export or validate, not to resume."""
        return {"model": network.state_dict(), "step": step, "total_steps": total, "architecture": config.architecture.to_dict()}

    def save_checkpoint() -> None:
        if rank != 0:
            return
        _atomic_save(
            {**weights(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "seed": config.seed,
             "torch_rng": torch.get_rng_state(), "decay_start": decay_start},
            checkpoint_path,
        )

    progress.emit(
        "start", steps=total, message=f"pretraining {total} steps ({per_epoch} a epoch, warm-up {warmup}) "
        f"on {len(config.datasets)} dataset(s), {volumes} volume(s), {world} process(es), {device.type}"
    )
    dtype = pretraining_dtype(config.precision, device)
    if dtype is not None and device.type == "cpu" and not native_bf16_cpu():
        progress.warning("precision bf16 on a CPU without native bfloat16 (AVX512-BF16 or AMX): steps run about 30x "
                         "slower than in float32 here; use precision: auto or fp32")
    cache = _VolumeCache(config, crop, out / VOLUME_CACHE_NAME if config.volume_cache else None)

    def scored(at: int, label: str, **extra) -> dict:
        """Validate the network now, log it to validation.jsonl and the progress stream."""
        result = validate(network, config, cache, device)
        with open(validation_path, "a", encoding="utf-8") as log:
            log.write(json.dumps({"step": at, **extra, **result}) + "\n")
        progress.info(f"{label}: {summary(result)}")
        return result

    if config.synthesis_workers:
        cache.prepare_in_background(config.synthesis_workers)
        progress.info(f"{config.synthesis_workers} worker process(es) prepare the volumes in the background")
    try:
        if rank == 0 and config.init and config.validate_every and step == 0 and not _read_log(validation_path):
            # the starting weights' score: checkpoint-best.pt then appears only if training beats them
            best = scored(0, "initial weights", init=config.init)["mean"]
        model.train()
        last_loss = float("nan")
        nonfinite_in_a_row = 0
        while step < total:
            stop = bool(should_stop()) if (should_stop is not None and rank == 0) else False
            if distributed:
                flag = torch.tensor([1.0 if stop else 0.0], device=device)
                dist.broadcast(flag, 0)
                stop = bool(flag.item())
            if stop:
                save_checkpoint()
                raise Cancelled(f"pretraining stopped at step {step} of {total}; the checkpoint {checkpoint_path} resumes it")
            step_started = time.monotonic()
            images, targets, annotated, names = _draw_batch(config, cache, crop, step, rank)
            lr_now = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                logits = model(images.to(device))
            loss = partial_label_dice_loss(logits.float(), targets.to(device), annotated.to(device),
                                           bce_weight=config.bce_weight, absent_class_dice=config.absent_class_dice)
            loss.backward()
            # One non-finite gradient would make every weight NaN for good (seen once in a CPU run, cause
            # not found): that step is skipped, its batch kept for a look, and several in a row stop the run.
            # Under DDP the gradients are all-reduced, so every process takes the same decision.
            gradients = [p.grad for p in network.parameters() if p.grad is not None]
            finite = bool(torch.isfinite(torch.nn.utils.get_total_norm(gradients)))
            if finite:
                optimizer.step()
                nonfinite_in_a_row = 0
            else:
                nonfinite_in_a_row += 1
                progress.warning(f"step {step + 1}: non-finite gradients; the step is skipped (no update)")
                if rank == 0 and not (out / NONFINITE_BATCH_NAME).exists():
                    _atomic_save({"step": step + 1, "images": images, "targets": targets, "annotated": annotated,
                                  "datasets": names}, out / NONFINITE_BATCH_NAME)
                if nonfinite_in_a_row >= MAX_NONFINITE_STEPS:
                    save_checkpoint()
                    raise FSEFTError(f"{MAX_NONFINITE_STEPS} steps in a row had non-finite gradients (from step "
                                     f"{step + 2 - MAX_NONFINITE_STEPS}); the first such batch is in {out / NONFINITE_BATCH_NAME}")
            with warnings.catch_warnings():  # a skipped first step: the schedule moves on all the same, on purpose
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step\\(\\)` before", UserWarning)
                scheduler.step()
            step += 1
            reported = loss.detach()
            if distributed:
                dist.all_reduce(reported)
                reported = reported / world
            last_loss = float(reported)
            if rank == 0:
                with open(log_path, "a", encoding="utf-8") as log:
                    record = {"step": step, "epoch": (step - 1) // per_epoch + 1, "loss": round(last_loss, 6), "lr": lr_now,
                              "datasets": names, "seconds": round(time.monotonic() - step_started, 3), **({} if finite else {"skipped": True})}
                    log.write(json.dumps(record) + "\n")
            progress.step(step / total, f"step {step}/{total}: loss {last_loss:.4f}, lr {lr_now:.2e}")
            if step % config.checkpoint_every == 0 and step < total:
                save_checkpoint()
            if config.validate_every and (step % config.validate_every == 0 or step == total):
                if rank == 0:
                    result = scored(step, f"step {step}")
                    if result["mean"] > best:
                        best = result["mean"]
                        _atomic_save({**weights(), "validation": result}, out / BEST_NAME)
                    if config.hold_lr_until_dice and decay_start is None and step < total and _all_reach(result, config.hold_lr_until_dice):
                        decay_start = step  # the cosine starts at its peak: no jump in the lr
                        progress.info(f"step {step}: every class reached Dice {config.hold_lr_until_dice}: "
                                      f"the learning rate now decays (cosine to step {total})")
                if distributed:  # every process follows rank 0's decision (and waits for its validation)
                    shared = torch.tensor([-1 if decay_start is None else decay_start], device=device)
                    dist.broadcast(shared, 0)
                    decay_start = None if int(shared) < 0 else int(shared)
        save_checkpoint()
        if rank == 0:
            _atomic_save(network.state_dict(), out / MODEL_NAME)
        if distributed:
            dist.barrier()
        progress.info(f"pretraining done: {total} steps, last loss {last_loss:.4f}, {time.monotonic() - started:.0f} s; weights in {out / MODEL_NAME}")
        if config.hold_lr_until_dice and decay_start is None:
            progress.info(f"the learning rate never decayed: some class stayed below Dice {config.hold_lr_until_dice} "
                          f"(validation.jsonl); lengthen `epochs` to continue")
        return {"steps": step, "last_loss": last_loss, "out": str(out), "checkpoint": str(checkpoint_path), "model": str(out / MODEL_NAME)}
    finally:
        cache.close()


def _all_reach(result: dict, dice: float) -> bool:
    return bool(result["dice"]) and min(result["dice"].values()) >= dice


def _read_log(path: Path) -> list[dict]:
    """The records of a JSON-lines log (a torn last line, from a killed run, is skipped)."""
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines past the resumed step (written after the last checkpoint by a stopped run)."""
    if not path.is_file():
        return
    kept = [json.dumps(record) for record in _read_log(path) if record["step"] <= step]
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(temporary, path)


def load_run_checkpoint(config: PretrainConfig, checkpoint: str | os.PathLike | None = None) -> dict:
    """A checkpoint of the run (default: its latest), pickle-free; clear errors for a missing or foreign file."""
    path = Path(checkpoint) if checkpoint else Path(config.out) / CHECKPOINT_NAME
    if not path.is_file():
        raise InputError("no such checkpoint" if checkpoint else "no checkpoint yet; run the pretraining first", path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InputError(f"not a readable checkpoint ({type(error).__name__})", path) from None
    if not isinstance(state, dict) or not {"model", "step", "total_steps", "architecture"} <= set(state):
        raise InputError("not a pretraining checkpoint (it needs model, step, total_steps, architecture)", path)
    return state


def validate_checkpoint(config: PretrainConfig, checkpoint: str | os.PathLike | None = None) -> dict:
    """The per-class validation Dice of a checkpoint (default: the run's latest) or of exported
    weights (`.safetensors`, e.g. a shipped model, to compare it with a new run), with its step."""
    if not any(spec.validation for spec in config.datasets):
        raise InputError(NO_VALIDATION_VOLUMES, config.source)
    if checkpoint and Path(checkpoint).suffix == ".safetensors":
        network = build_from_checkpoint(checkpoint, config.architecture)
        step = _exported_step(checkpoint)
    else:
        state = load_run_checkpoint(config, checkpoint)
        network = FoundationSwinUNETR(Architecture.from_dict(state["architecture"]))
        network.load_state_dict(state["model"])
        step = int(state["step"])
    if network.architecture != config.architecture:
        raise InputError("the weights' architecture differs from the config's", checkpoint or config.source)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cache = _VolumeCache(config, config.crop, Path(config.out) / VOLUME_CACHE_NAME if config.volume_cache else None)
    return {"step": step, **validate(network.to(device), config, cache, device)}


def _exported_step(path: str | os.PathLike) -> int | None:
    """The step `export_model` recorded in a safetensors file ("3201 of 3400"), if any."""
    steps = stored_metadata(path).get("fseft.steps", "")
    return int(steps.split()[0]) if steps[:1].isdigit() else None


def _steps_in_all(path: str | os.PathLike) -> int | None:
    """Every pretraining step behind exported weights: the run's own plus those of its `init` weights."""
    if Path(path).suffix != ".safetensors":
        return None
    step = _exported_step(path)
    return None if step is None else step + int(stored_metadata(path).get("fseft.steps_before", "0"))


def export_model(config: PretrainConfig, target: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> dict:
    """Write a checkpoint's weights (default: the run's latest) as a shippable safetensors file:
    tensors plus metadata (the architecture with the universal class names, the step reached, the
    config, the validation Dice when the checkpoint has one). Atomic."""
    from safetensors.torch import save_file

    from ..io.files import atomic_write
    from ..labels import UNIVERSAL_STRUCTURES

    state = load_run_checkpoint(config, checkpoint)
    architecture = Architecture.from_dict(state["architecture"])
    names = tuple(structure.name for structure in UNIVERSAL_STRUCTURES[: architecture.out_channels])
    architecture = Architecture.from_dict({**architecture.to_dict(), "class_names": names})
    # Weights as float32; the relative-position index buffers (int64, a third of the bytes) as int16,
    # which holds them exactly and loads back into the int64 buffers.
    tensors = {
        key: (value.to(torch.int16) if key.endswith("relative_position_index") else value.float()).contiguous()
        for key, value in state["model"].items()
    }
    metadata = {
        ARCHITECTURE_METADATA: json.dumps(architecture.to_dict()),
        "fseft.steps": f"{state['step']} of {state['total_steps']}",
        "fseft.config": Path(config.source).name if config.source else "",
        "fseft.training_data": "synthetic images only" if all(spec.synthesize for spec in config.datasets) else "see config",
    }
    before = _steps_in_all(config.init) if config.init else None
    if before:  # a run continued from exported weights (`init`): the steps that made them
        metadata["fseft.steps_before"] = str(before)
    if "validation" in state:
        metadata["fseft.validation_dice"] = json.dumps(state["validation"]["dice"])
    with atomic_write(target) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    return {"path": str(target), "steps": int(state["step"]), "total_steps": int(state["total_steps"])}


def pretrain_until_signalled(config: PretrainConfig, progress: Progress) -> dict:
    """`pretrain` for a terminal or a scheduler: Ctrl-C or SIGTERM (as torchrun and batch schedulers
    send) finishes the current step and checkpoints it (`Cancelled`), so no step is lost; a second
    signal stops at once."""
    stop_requested = threading.Event()

    def request_stop(signum, frame):
        if stop_requested.is_set():
            raise KeyboardInterrupt
        stop_requested.set()
        print("stopping after this step and writing a checkpoint (again to stop at once)", file=sys.stderr, flush=True)

    handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = {number: signal.signal(number, request_stop) for number in handled}
    try:
        return pretrain(config, progress, should_stop=stop_requested.is_set)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def main_pretrain(config_path: str, progress_kind: str = "bar") -> int:
    """The torchrun entry point: run or resume pretraining; returns the exit code."""
    try:
        pretrain_until_signalled(PretrainConfig.from_yaml(config_path), make_progress(progress_kind))
    except FSEFTError as error:
        print(str(error), file=sys.stderr, flush=True)
        return error.exit_code
    except KeyboardInterrupt:
        print("pretraining interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr, flush=True)
        return Cancelled.exit_code
    return 0


if __name__ == "__main__":  # torchrun --nproc_per_node N -m FSEFTSegmentLib.pretraining.loop config.yaml
    if len(sys.argv) != 2:
        print("usage: python -m FSEFTSegmentLib.pretraining.loop CONFIG.yaml", file=sys.stderr)
        sys.exit(2)
    sys.exit(main_pretrain(sys.argv[1], os.environ.get("FSEFT_PROGRESS", "bar")))
