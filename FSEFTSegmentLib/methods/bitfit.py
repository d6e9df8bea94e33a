"""BitFit as the paper ran it: Swin biases of `attn`/`mlp` layers, which by the paper's name rule
(`mlp` or `attn`, and `bias`) also includes the relative-position bias tables (197,730 of 210,690)."""

from .base import AdaptationMethod


class BitFit(AdaptationMethod):
    name = "bitfit"
    description = "Swin attention/MLP biases (+ relative-position bias tables, as the paper)"
    learning_rate = 1e-2

    def trains_backbone_parameter(self, name: str) -> bool:
        return name.startswith("swinViT.") and ("mlp" in name or "attn" in name) and "bias" in name
