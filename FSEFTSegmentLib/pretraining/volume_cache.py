"""Pretraining volumes in model space: prepared once, kept in RAM (and on disk with `volume_cache: true`).

With `synthesis_workers: N`, N spawned worker processes prepare (synthesise) every volume in the
background while the training process steps. Kept apart from the loop because validation reads the
same volumes and must not import the loop.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import InputError
from ..io.files import sha256_file
from ..io.images import read_image
from ..preprocessing import CTPreprocessing
from ..training import CropSampler, pad_to
from .config import DatasetSpec, PretrainConfig, validation_indices
from .synthesis import mirror_left_right, synthesize_ct


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


def _atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary sibling, then rename: a killed run never leaves a torn volume or checkpoint."""
    temporary = path.with_name(path.name + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)
