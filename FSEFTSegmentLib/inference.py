"""Sliding-window prediction: model-space probabilities, then binary masks on the native grid.

The frozen body runs once per window and any number of heads read its features, so several
structures and several black-box adapters cost one backbone pass. An adapter that changes the
backbone (LoRA, BitFit, ..., full) brings its own network: each distinct network runs once per
window for all the heads that read it, and the outputs come back in the order the heads were
given. Windows follow the paper (patch size, overlap 0.25, Gaussian blending of logits,
sigmoid > 0.5 per structure: structures may overlap); windows run on the compute device while
blending happens in CPU memory, so a large study does not need a large GPU. A CUDA out-of-memory
error falls back to the CPU with a warning. With `largest_component`, each mask is first restricted
to the patient's body (`body_mask`: false positives on the table or in the air go), then cut to its
largest component.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference
from scipy import ndimage
from torch import nn

from .errors import InputError
from .methods.adapted import AdaptedModel
from .model.network import Architecture, FoundationSwinUNETR, prefers_channels_last
from .preprocessing import CTPreprocessing
from .progress import Progress, StageTimes


@dataclass
class InferenceSettings:
    sw_batch_size: int | None = None  # None: `windows_per_batch`'s choice for the device
    overlap: float = 0.25
    threshold: float = 0.5
    largest_component: bool = False
    body_mask: bool = True  # with largest_component: keep only what lies inside the patient's body first
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    channels_last: bool | None = None  # channels-last 3D layout; None: where it is faster (`prefers_channels_last`)

    def use_channels_last(self, device: torch.device) -> bool:
        return prefers_channels_last(device) if self.channels_last is None else self.channels_last


def windows_per_batch(device: torch.device, architecture: Architecture, requested: int | None = None) -> int:
    """Windows per forward pass: as requested, else 2 on CUDA, and on the CPU as many as hold the
    activations of one full-size window (feature size 48, 96^3), at most 4. Measured on 2 cores:
    the full-size network gains nothing from a second window (and needs 0.9 GB more), the
    bundled one (12, 64^3) is 1.6x faster with 4 than with 1, and slower again with 8."""
    if requested:
        return requested
    if device.type == "cuda":
        return 2
    return max(1, min(4, (48 * 96**3) // (architecture.feature_size * architecture.patch_size**3)))


def choose_device(name: str = "auto") -> torch.device:
    """`auto` takes CUDA when present; asking for CUDA without one is a user error, not a crash."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was requested but PyTorch sees no CUDA GPU (use --device cpu or auto)")
    return torch.device(name)


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 autocast pays off.

    Elsewhere (an AVX2-only CPU) PyTorch emulates it: a pretraining step measured about 30x slower
    than in float32 on 2 cores of an AMD EPYC."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def device_report() -> dict:
    """What this PyTorch can compute on, JSON-ready (`fseft device`; the Slicer panel shows it).

    Keys: torch (version), build ("CUDA 12.8", "ROCm 6.4" or "CPU-only": the build decides whether
    a GPU can ever be used, whatever the machine holds), cuda_available, gpus (index, name,
    free_bytes and total_bytes from `torch.cuda.mem_get_info`, i.e. as the driver sees them, other
    processes included; None with an `error` when the GPU cannot be queried), cpu_threads (PyTorch's intra-op threads), cpu_count (logical CPUs) and
    native_bf16_cpu.
    """
    if torch.version.cuda:
        build = f"CUDA {torch.version.cuda}"
    elif getattr(torch.version, "hip", None):
        build = f"ROCm {torch.version.hip}"
    else:
        build = "CPU-only"
    available = torch.cuda.is_available()
    gpus = []
    for index in range(torch.cuda.device_count() if available else 0):
        gpu = {"index": index, "name": torch.cuda.get_device_name(index), "free_bytes": None, "total_bytes": None}
        try:
            gpu["free_bytes"], gpu["total_bytes"] = (int(n) for n in torch.cuda.mem_get_info(index))
        except RuntimeError as error:  # a GPU busy in exclusive mode, or in a bad state: say so, list the rest
            gpu["error"] = str(error).splitlines()[0][:200]
        gpus.append(gpu)
    return {
        "torch": torch.__version__,
        "build": build,
        "cuda_available": available,
        "gpus": gpus,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "native_bf16_cpu": native_bf16_cpu(),
    }


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


BODY_HU = -500.0  # air and lung lie below, every soft tissue, fat and bone above


def body_mask(image: sitk.Image, threshold_hu: float = BODY_HU) -> np.ndarray | None:
    """The patient's body in a CT as a (k, j, i) bool array, or None when no voxel is above `threshold_hu`.

    The largest 26-connected region above `threshold_hu` (the table, clothes and noise in the air
    around the patient are smaller and detached), its holes (lungs, bowel gas) filled slice by slice
    across the image axis nearest the patient's head-feet axis.
    """
    above = sitk.GetArrayViewFromImage(image) > threshold_hu
    if not above.any():
        return None
    body = keep_largest_component(above.astype(np.uint8)).astype(bool)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    axis = 2 - int(np.argmax(np.abs(direction[2])))  # numpy axis of the index axis closest to LPS z
    plane = ndimage.generate_binary_structure(3, 1)
    across = [slice(None)] * 3
    across[axis] = [0, 2]
    plane[tuple(across)] = False  # connectivity within a slice only: holes are filled slice by slice
    return ndimage.binary_fill_holes(body, structure=plane)


@dataclass(frozen=True, eq=False)
class Head:
    """A head and the network whose `features` it reads; `channels` keeps some of its outputs, in that order.

    `network=None` means the predictor's own (base) network. Heads given with the same network
    object share its pass; the same `module` listed twice (e.g. two channel selections) runs once.
    A `softmax` head's outputs are a background class and then one per structure, read by argmax
    (`structure_maps`); its `channels` count structures, background excluded.
    """

    module: nn.Module
    network: FoundationSwinUNETR | None = None
    channels: tuple[int, ...] | None = None
    softmax: bool = False

    @classmethod
    def of(cls, model: AdaptedModel, channels: Sequence[int] | None = None) -> Head:
        """An adapted model's head on its network (the base network itself for black-box adapters)."""
        return cls(model.head, model.network, tuple(channels) if channels is not None else None, model.softmax)


def structure_maps(logits: torch.Tensor, softmax: bool = False, channels: Sequence[int] | None = None) -> torch.Tensor:
    """One map per structure, (S, X, Y, Z), whose values above 0.5 are its mask: the sigmoid
    probabilities, or for a softmax head (background first) where the argmax is that structure."""
    if not softmax:
        return torch.sigmoid(logits.float() if channels is None else logits[list(channels)].float())
    winner = logits.argmax(0)
    kept = range(logits.shape[0] - 1) if channels is None else channels
    return torch.stack([(winner == channel + 1).float() for channel in kept])


def _as_head(head: nn.Module | Head | AdaptedModel) -> Head:
    """A plain module is a head on the base network; an adapted model, its head on its network."""
    if isinstance(head, Head):
        return head
    return Head.of(head) if isinstance(head, AdaptedModel) else Head(head)


def _output_channels(module: nn.Module) -> int:
    """Outputs of a head: its last convolution's channels (a linear probe ends every head)."""
    return [m for m in module.modules() if isinstance(m, nn.Conv3d)][-1].out_channels


class SegmentationPredictor:
    """Runs one network (and heads on its features) over whole studies."""

    def __init__(
        self,
        network: FoundationSwinUNETR,
        device: torch.device,
        settings: InferenceSettings | None = None,
        progress: Progress | None = None,
    ):
        settings = settings or InferenceSettings()
        self.network = network.eval().to(device)
        self.device = device
        self.settings = settings
        self.progress = progress or Progress()
        if settings.precision == "bf16" and device.type == "cpu" and not native_bf16_cpu():
            self.progress.warning("--precision bf16 on a CPU without native bfloat16 (AVX512-BF16 or AMX) is emulated "
                                  "and much slower than fp32 here; use --precision auto")
        self.preprocessing = CTPreprocessing(network.architecture)

    def _heads(self, heads: Sequence[nn.Module | Head | AdaptedModel]) -> list[Head]:
        """Every head as a `Head` with its network, the modules on the compute device and in eval mode."""
        resolved = []
        layout = torch.channels_last_3d if self.settings.use_channels_last(self.device) else torch.contiguous_format
        for head in map(_as_head, heads):
            network = self.network if head.network is None else head.network
            if network.architecture != self.network.architecture:
                raise ValueError("every head's network must share the base network's architecture (same preprocessing and windows)")
            network.eval().to(self.device, memory_format=layout)
            resolved.append(Head(head.module.to(self.device, memory_format=layout).eval(), network, head.channels, head.softmax))
        return resolved

    def _window_fn(self, heads: Sequence[Head], on_window: Callable[[int], None]):
        groups: dict[int, list[int]] = {}  # network -> indices of its heads, networks in first-use order
        for index, head in enumerate(heads):
            groups.setdefault(id(head.network), []).append(index)

        channels_last = self.settings.use_channels_last(self.device)

        def run(windows: torch.Tensor) -> torch.Tensor:
            if channels_last:
                windows = windows.contiguous(memory_format=torch.channels_last_3d)
            parts: list[torch.Tensor | None] = [None] * len(heads)
            for indices in groups.values():  # one network at a time: one feature map in memory
                features = heads[indices[0]].network.features(windows)
                computed: dict[int, torch.Tensor] = {}
                for index in indices:
                    head = heads[index]
                    first_use = id(head.module) not in computed
                    if first_use:
                        computed[id(head.module)] = head.module(features)
                    output = computed[id(head.module)]
                    if head.softmax:  # the argmax needs every class: the whole output, once per module
                        parts[index] = output if first_use else output[:, :0]
                    else:
                        parts[index] = output if head.channels is None else output[:, list(head.channels)]
                del features, computed
            logits = torch.cat(parts, dim=1).float().contiguous()  # MONAI blends into a contiguous buffer
            on_window(windows.shape[0])
            return logits

        return run

    def logits(self, volume: torch.Tensor, heads: Sequence[nn.Module | Head | AdaptedModel], study: str = "") -> torch.Tensor:
        """Blended logits (C, X, Y, Z) on the CPU for a preprocessed (1, X, Y, Z) volume: the heads'
        output channels concatenated in the order given (a plain module reads the base network),
        except that a softmax head's module gives all its outputs, once (`maps` reads them)."""
        roi = self.network.architecture.patch_size
        total = window_count(volume.shape[1:], roi, self.settings.overlap)
        done = 0

        def on_window(count: int) -> None:
            nonlocal done
            done += count
            self.progress.step(done / total, f"window {done}/{total}", study=study)

        dtype = autocast_dtype(self.device, self.settings.precision)
        cast = torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext()
        heads = self._heads(heads)
        with torch.inference_mode(), cast:
            blended = sliding_window_inference(
                volume[None].as_tensor() if hasattr(volume, "as_tensor") else volume[None],
                roi_size=(roi,) * 3,
                sw_batch_size=windows_per_batch(self.device, self.network.architecture, self.settings.sw_batch_size),
                predictor=self._window_fn(heads, on_window),
                overlap=self.settings.overlap,
                mode="gaussian",
                sw_device=self.device,
                device=torch.device("cpu"),
            )
        return blended[0].float()

    def maps(self, logits: torch.Tensor, heads: Sequence[nn.Module | Head | AdaptedModel]) -> torch.Tensor:
        """`logits`' structure maps (S, X, Y, Z) in the heads' order (see `structure_maps`)."""
        heads = [_as_head(head) for head in heads]
        if not any(head.softmax for head in heads):  # one logits channel per structure
            return structure_maps(logits)
        blocks, start, first_block = [], 0, {}
        for head in heads:
            if head.softmax and id(head.module) in first_block:
                blocks.append(first_block[id(head.module)])
                continue
            width = len(head.channels) if head.channels is not None and not head.softmax else _output_channels(head.module)
            blocks.append((start, width))
            first_block[id(head.module)] = blocks[-1]
            start += width
        return torch.cat([
            structure_maps(logits[first : first + width], head.softmax, head.channels if head.softmax else None)
            for head, (first, width) in zip(heads, blocks)
        ])

    def segment(
        self, image: sitk.Image, heads: Sequence[nn.Module | Head | AdaptedModel], study: str = "", times: StageTimes | None = None
    ) -> np.ndarray:
        """Binary masks (C, k, j, i) uint8 on `image`'s own grid, one per head output channel, in
        order; `times` (if given) gets the seconds of each stage."""
        times = StageTimes() if times is None else times
        with times.stage("preprocess"):
            volume = self.preprocessing(image)
        with times.stage("network"):
            try:
                logits = self.logits(volume, heads, study)
            except torch.cuda.OutOfMemoryError:
                self.progress.warning(f"CUDA ran out of memory on {study or 'this study'}; continuing on the CPU", study=study)
                torch.cuda.empty_cache()
                self.network.to("cpu")
                self.device = torch.device("cpu")
                logits = self.logits(volume, heads, study)
        maps = self.maps(logits, heads)
        masks = np.empty((maps.shape[0],) + tuple(reversed(image.GetSize())), dtype=np.uint8)
        with times.stage("to native grid"):
            for channel in range(maps.shape[0]):
                masks[channel] = self.preprocessing.to_native_mask(maps[channel], volume, image, self.settings.threshold)
        if self.settings.largest_component:
            with times.stage("body mask + largest component"):
                body = body_mask(image) if self.settings.body_mask else None
                for channel in range(maps.shape[0]):
                    if body is not None:
                        masks[channel] &= body
                    masks[channel] = keep_largest_component(masks[channel])
        return masks
