"""The frozen `decoder1` features of one whole volume, computed once and kept as fp16.

Black-box methods train and predict on these instead of running the backbone: `training` builds one
per support (and query), the experiment runner shares them across every run of a case. Kept apart
from the training loop because it is storage (RAM or an unlinked temporary file), not training.
"""

from __future__ import annotations

import math
import tempfile
from contextlib import nullcontext
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices

from .errors import Cancelled
from .inference import autocast_dtype, windows_per_batch
from .model.network import FoundationSwinUNETR, prefers_channels_last


class FeatureCache:
    """The frozen `decoder1` features of one whole volume, computed once.

    Windows follow prediction exactly (MONAI's window grid and Gaussian importance map, patch-size
    windows, the same overlap): each window's features are weighted, accumulated and normalised.
    Only a band one window deep is accumulated in fp32; finished rows go straight to the fp16
    store, (X, Y, Z, F) so a crop is one contiguous read, in RAM or, above `spill_bytes`, in a
    temporary file that is already unlinked (POSIX) or deleted on close (Windows), so nothing is
    left behind even if the process dies.
    """

    def __init__(
        self,
        network: FoundationSwinUNETR,
        volume: torch.Tensor,
        device: torch.device,
        *,
        overlap: float = 0.25,
        sw_batch_size: int | None = None,
        precision: str = "auto",
        spill_bytes: int = 2 * 1024**3,
        spill_dir: str | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_window: Callable[[int, int], None] | None = None,
    ):
        roi = network.architecture.patch_size
        self.shape = tuple(int(n) for n in volume.shape[-3:])
        if any(n < roi for n in self.shape):
            raise ValueError(f"volume {self.shape} is smaller than the window {roi}: pad it first")
        self.channels = network.architecture.feature_size
        #: where the unpadded volume lies in the cache: (offset, shape); `cache_features` sets it
        self.valid: tuple[tuple[int, ...], tuple[int, ...]] = ((0, 0, 0), self.shape)
        self.nbytes = math.prod(self.shape) * self.channels * 2
        self._file = None
        if self.nbytes > spill_bytes:
            self._file = tempfile.TemporaryFile(prefix="fseft-features-", suffix=".f16", dir=spill_dir)
            self.data = np.memmap(self._file, dtype=np.float16, mode="w+", shape=(*self.shape, self.channels))
        else:
            self.data = np.empty((*self.shape, self.channels), dtype=np.float16)
        try:
            self._fill(network, volume, device, roi, overlap, sw_batch_size, precision, should_stop, on_window)
        except BaseException:
            self.close()
            raise

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def _fill(self, network, volume, device, roi, overlap, sw_batch_size, precision, should_stop, on_window) -> None:
        volume = volume.as_tensor() if hasattr(volume, "as_tensor") else volume
        volume = volume.reshape(1, 1, *self.shape).float()
        interval = [roi if n == roi else max(int(roi * (1 - overlap)), 1) for n in self.shape]
        windows = sorted(dense_patch_slices(self.shape, (roi,) * 3, interval), key=lambda s: int(s[0].start))
        weight = compute_importance_map((roi,) * 3, mode="gaussian", sigma_scale=0.125, device="cpu", dtype=torch.float32)
        _, width, depth = self.shape
        accumulated = torch.zeros((self.channels, roi, width, depth), dtype=torch.float32)
        weights = torch.zeros((roi, width, depth), dtype=torch.float32)
        base = 0  # volume row of accumulated[:, 0]

        def flush(upto: int) -> None:
            nonlocal base
            rows = upto - base
            if rows <= 0:
                return
            finished = accumulated[:, :rows] / weights[:rows]
            self.data[base:upto] = finished.permute(1, 2, 3, 0).to(torch.float16).numpy()
            accumulated[:, : roi - rows] = accumulated[:, rows:].clone()
            accumulated[:, roi - rows :] = 0
            weights[: roi - rows] = weights[rows:].clone()
            weights[roi - rows :] = 0
            base = upto

        dtype = autocast_dtype(device, precision)
        cast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
        layout = torch.channels_last_3d if prefers_channels_last(device) else torch.contiguous_format
        network.eval().to(memory_format=layout)
        sw_batch_size = windows_per_batch(device, network.architecture, sw_batch_size)
        done = 0
        for first in range(0, len(windows), sw_batch_size):
            if should_stop is not None and should_stop():
                raise Cancelled("adaptation cancelled; nothing was saved")
            batch = windows[first : first + sw_batch_size]
            inputs = torch.cat([volume[(slice(None), slice(None), *window)] for window in batch]).to(device, memory_format=layout)
            with torch.inference_mode(), cast:
                features = network.features(inputs).float().cpu()
            for window, window_features in zip(batch, features):
                sx, sy, sz = window
                if int(sx.start) > base:
                    flush(int(sx.start))
                local = slice(int(sx.start) - base, int(sx.stop) - base)
                accumulated[:, local, sy, sz] += window_features * weight
                weights[local, sy, sz] += weight
            done += len(batch)
            if on_window is not None:
                on_window(done, len(windows))
        flush(self.shape[0])

    def crop(self, start: Sequence[int], size: int) -> torch.Tensor:
        """Features of the crop at `start`: (1, F, s, s, s) float32 in channels-last-3D layout."""
        x, y, z = (int(v) for v in start)
        block = torch.from_numpy(np.ascontiguousarray(self.data[x : x + size, y : y + size, z : z + size]))
        return block.float().permute(3, 0, 1, 2).unsqueeze(0)

    def crops(self, starts: Sequence[Sequence[int]], size: int) -> torch.Tensor:
        """Several crops as one (n, F, s, s, s) float32 batch in channels-last-3D layout, each
        converted from fp16 straight into its place (no intermediate copies)."""
        batch = torch.empty((len(starts), size, size, size, self.channels), dtype=torch.float32)
        for index, (x, y, z) in enumerate(starts):
            batch[index] = torch.from_numpy(self.data[x : x + size, y : y + size, z : z + size])
        return batch.permute(0, 4, 1, 2, 3)

    def pooled(self, factor: int = 2, rows: int = 32) -> torch.Tensor:
        """The whole feature volume average-pooled by `factor` (partial cells at the far edges
        average what they cover): (1, F, ceil(X/f), ceil(Y/f), ceil(Z/f)) fp16."""
        step = rows * factor
        parts = []
        for x in range(0, self.shape[0], step):
            block = torch.from_numpy(np.ascontiguousarray(self.data[x : x + step])).float().permute(3, 0, 1, 2)[None]
            parts.append(F.avg_pool3d(block, factor, ceil_mode=True).to(torch.float16))
        return torch.cat(parts, dim=2)

    def close(self) -> None:
        self.data = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
