"""The foundation network, its strict checkpoint loading, and the model registry and cache.

`load_foundation_model` is the one entry point other code needs: give it a checkpoint path or the
name of a downloaded/imported model and get an eval-mode network whose `forward(x)` gives the head's
logits (one sigmoid per channel) and whose `.architecture` says how inputs must be prepared.
"""

from __future__ import annotations

import os

import torch

from .checkpoint import build_from_checkpoint
from .network import Architecture, FoundationSwinUNETR
from .registry import resolve_model

__all__ = ["Architecture", "FoundationSwinUNETR", "load_foundation_model"]


def load_foundation_model(path_or_registered_name: str | os.PathLike, device: str | torch.device = "cpu") -> FoundationSwinUNETR:
    """Strictly load a checkpoint file or a cached model; shapes come from the file, spacing,
    patch, HU window and class names from the registry (defaults for a bare file)."""
    path, architecture, _ = resolve_model(path_or_registered_name)
    return build_from_checkpoint(path, defaults=architecture).to(device).eval()
