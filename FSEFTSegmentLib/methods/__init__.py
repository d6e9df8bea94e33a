"""Adaptation methods by name; each is a small module behind `AdaptationMethod`."""

from __future__ import annotations

from ..errors import InputError
from .adapter_2023 import WorkshopAdapter
from .adaptformer import AdaptFormer
from .affine_ln import AffineLayerNorm
from .base import AdaptationMethod
from .bitfit import BitFit
from .ft_last import FineTuneLastBlock
from .full import FullFineTuning
from .linear_probe import LinearProbe
from .lora import LoRA
from .spatial_adapter import PointwiseAdapter, SpatialAdapter

#: the 2025 paper's methods, then the 2023 workshop's
METHODS: dict[str, type[AdaptationMethod]] = {
    method.name: method
    for method in (
        LinearProbe, SpatialAdapter, PointwiseAdapter, BitFit, AffineLayerNorm, LoRA, AdaptFormer, FullFineTuning,
        WorkshopAdapter, FineTuneLastBlock,
    )
}


def get_method(name: str) -> AdaptationMethod:
    try:
        return METHODS[name]()
    except KeyError:
        raise InputError(f"unknown method '{name}'; choose from {', '.join(METHODS)}") from None


__all__ = ["METHODS", "AdaptationMethod", "get_method"]
