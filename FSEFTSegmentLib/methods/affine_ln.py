"""Affine-LN: the scale and shift of every Swin LayerNorm (norm1, norm2, patch-merging norm)."""

from .base import AdaptationMethod


class AffineLayerNorm(AdaptationMethod):
    name = "affine-ln"
    description = "Swin LayerNorm scales and shifts"
    learning_rate = 1e-2

    def trains_backbone_parameter(self, name: str) -> bool:
        return name.startswith("swinViT.") and "norm" in name
