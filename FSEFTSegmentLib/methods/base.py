"""The one interface every adaptation method implements (in the spirit of Hugging Face PEFT's tuners).

A method says three things and nothing else: which modules it adds after the frozen `decoder1`
features (black-box adapters, before the linear probe), which modules it injects into the backbone
(LoRA, AdaptFormer), and which backbone parameters it trains. Everything downstream — the training
loop, parameter counting, saving and loading adapters — works from that and never branches on the
method's name.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from ..model.network import FoundationSwinUNETR


class AdaptationMethod:
    name: ClassVar[str]
    description: ClassVar[str]
    #: trains only modules after the frozen decoder1 features: needs no gradient (nor weights access)
    #: through the backbone, so frozen features can be computed once and cached
    black_box: ClassVar[bool] = False
    #: the paper's learning rates, decoder frozen / decoder fine-tuned (--tune-decoder)
    learning_rate: ClassVar[float]
    learning_rate_with_decoder: ClassVar[float] = 1e-4
    #: whether --tune-decoder may be added (full fine-tuning already trains the decoder)
    combines_with_decoder: ClassVar[bool] = True
    #: a method of the 2023 workshop paper, trained with the workshop's schedule (below)
    workshop: ClassVar[bool] = False
    #: the method's own schedule defaults; None and 0 are the paper's 2025 recipe (at most 200
    #: epochs, AdamW without weight decay), the workshop's was 100 epochs with weight decay 1e-5
    max_epochs: ClassVar[int | None] = None
    weight_decay: ClassVar[float] = 0.0

    def head_modules(self, feature_size: int) -> list[nn.Module]:
        """Modules between the decoder1 features and the linear probe (black-box adapters)."""
        return []

    def inject(self, network: FoundationSwinUNETR) -> None:
        """Add this method's modules inside the backbone, in place (after the base weights are loaded)."""

    def trains_backbone_parameter(self, name: str) -> bool:
        """Whether the backbone parameter `name` (after `inject`) is trained by this method."""
        return False
