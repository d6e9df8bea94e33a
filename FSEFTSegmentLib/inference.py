"""Sliding-window prediction: model-space probabilities, then binary masks on the native grid.

The frozen body runs once per window and any number of 1x1x1 heads read its features, so several
structures (and later several adapters) cost one backbone pass. Windows follow the paper (patch
size, overlap 0.25, Gaussian blending of logits, sigmoid > 0.5 per structure: structures may
overlap); windows run on the compute device while blending happens in CPU memory, so a large
study does not need a large GPU. A CUDA out-of-memory error falls back to the CPU with a warning.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from .errors import InputError
from .model.network import FoundationSwinUNETR
from .preprocessing import CTPreprocessing
from .progress import Progress


@dataclass
class InferenceSettings:
    sw_batch_size: int = 2
    overlap: float = 0.25
    threshold: float = 0.5
    largest_component: bool = False
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    channels_last: bool = False  # channels-last 3D memory layout for the convolutions


def choose_device(name: str = "auto") -> torch.device:
    """`auto` takes CUDA when present; asking for CUDA without one is a user error, not a crash."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was requested but PyTorch sees no CUDA GPU (use --device cpu or auto)")
    return torch.device(name)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """Mixed precision on CUDA by default (bf16 where supported); full precision on the CPU unless asked."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def window_count(shape: Sequence[int], roi: int, overlap: float) -> int:
    """How many windows MONAI's sliding window visits (its scan-interval rule), for progress."""
    total = 1
    for size in shape:
        size = max(size, roi)
        interval = roi if size == roi else max(int(roi * (1 - overlap)), 1)
        total *= math.ceil((size - roi) / interval) + 1
    return total


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 26-connected component of a binary (k, j, i) mask, via SimpleITK."""
    if not mask.any():
        return mask
    components = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(mask), True), sortByObjectSize=True)
    return (sitk.GetArrayViewFromImage(components) == 1).astype(np.uint8)


class SegmentationPredictor:
    """Runs one network (and heads on its features) over whole studies."""

    def __init__(
        self,
        network: FoundationSwinUNETR,
        device: torch.device,
        settings: InferenceSettings = InferenceSettings(),
        progress: Progress | None = None,
    ):
        self.network = network.eval().to(device)
        if settings.channels_last:
            self.network.to(memory_format=torch.channels_last_3d)
        self.device = device
        self.settings = settings
        self.progress = progress or Progress()
        self.preprocessing = CTPreprocessing(network.architecture)

    def _window_fn(self, heads: Sequence[nn.Module], on_window: Callable[[int], None]):
        def run(windows: torch.Tensor) -> torch.Tensor:
            if self.settings.channels_last:
                windows = windows.contiguous(memory_format=torch.channels_last_3d)
            features = self.network.features(windows)
            logits = torch.cat([head(features) for head in heads], dim=1).float()
            on_window(windows.shape[0])
            return logits

        return run

    def logits(self, volume: torch.Tensor, heads: Sequence[nn.Module], study: str = "") -> torch.Tensor:
        """Blended logits (C, X, Y, Z) on the CPU for a preprocessed (1, X, Y, Z) volume."""
        roi = self.network.architecture.patch_size
        total = window_count(volume.shape[1:], roi, self.settings.overlap)
        done = 0

        def on_window(count: int) -> None:
            nonlocal done
            done += count
            self.progress.step(done / total, f"window {done}/{total}", study=study)

        dtype = autocast_dtype(self.device, self.settings.precision)
        cast = torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext()
        heads = [head.to(self.device).eval() for head in heads]
        with torch.inference_mode(), cast:
            blended = sliding_window_inference(
                volume[None].as_tensor() if hasattr(volume, "as_tensor") else volume[None],
                roi_size=(roi,) * 3,
                sw_batch_size=self.settings.sw_batch_size,
                predictor=self._window_fn(heads, on_window),
                overlap=self.settings.overlap,
                mode="gaussian",
                sw_device=self.device,
                device=torch.device("cpu"),
            )
        return blended[0].float()

    def segment(self, image: sitk.Image, heads: Sequence[nn.Module], study: str = "") -> np.ndarray:
        """Binary masks (C, k, j, i) uint8 on `image`'s own grid, one per head output channel."""
        volume = self.preprocessing(image)
        try:
            logits = self.logits(volume, heads, study)
        except torch.cuda.OutOfMemoryError:
            self.progress.warning(f"CUDA ran out of memory on {study or 'this study'}; continuing on the CPU", study=study)
            torch.cuda.empty_cache()
            self.network.to("cpu")
            self.device = torch.device("cpu")
            logits = self.logits(volume, heads, study)
        masks = np.empty((logits.shape[0],) + tuple(reversed(image.GetSize())), dtype=np.uint8)
        for channel in range(logits.shape[0]):
            probability = self.preprocessing.to_native(torch.sigmoid(logits[channel]), volume, image)
            masks[channel] = probability > self.settings.threshold
            if self.settings.largest_component:
                masks[channel] = keep_largest_component(masks[channel])
        return masks
