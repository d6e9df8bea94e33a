"""Adaptation methods by name; each is a small module behind `AdaptationMethod`."""

from __future__ import annotations

from ..errors import InputError
from .adaptformer import AdaptFormer
from .affine_ln import AffineLayerNorm
from .base import AdaptationMethod
from .bitfit import BitFit
from .full import FullFineTuning
from .linear_probe import LinearProbe
from .lora import LoRA
from .spatial_adapter import PointwiseAdapter, SpatialAdapter

METHODS: dict[str, type[AdaptationMethod]] = {
    method.name: method
    for method in (LinearProbe, SpatialAdapter, PointwiseAdapter, BitFit, AffineLayerNorm, LoRA, AdaptFormer, FullFineTuning)
}


def get_method(name: str) -> AdaptationMethod:
    try:
        return METHODS[name]()
    except KeyError:
        raise InputError(f"unknown method '{name}'; choose from {', '.join(METHODS)}") from None


__all__ = ["METHODS", "AdaptationMethod", "get_method"]
