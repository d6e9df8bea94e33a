"""The foundation model with a method applied: frozen where the method says, a new head on top.

`AdaptedModel.forward(x) = head(network.features(x))`, where the head is the method's black-box
modules followed by a linear probe with one output per target structure. A structure the
foundation model knows starts from its pretrained head row (zero-shot start); a novel one from
PyTorch's default initialisation.

Two kinds of head (paper-facts §6-7): `sigmoid` (default), one independent output per structure
(structures may overlap: one binary task each, as TotalSegmentator's); `softmax`, the paper's
multi-class head (FLARE'22) with a background row first (Xavier weight, zero bias), trained with a
softmax Dice over every channel and read by argmax.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..model.network import FoundationSwinUNETR
from .base import AdaptationMethod


class AdaptedModel(nn.Module):
    def __init__(
        self,
        network: FoundationSwinUNETR,
        method: AdaptationMethod,
        pretrained_rows: Sequence[int | None],
        tune_decoder: bool = False,
        softmax: bool = False,
    ):
        super().__init__()
        method.inject(network)
        self.network = network
        self.method = method
        self.tune_decoder = tune_decoder
        self.softmax = softmax
        feature_size = network.architecture.feature_size
        first = 1 if softmax else 0  # the softmax head's background row comes first
        probe = nn.Conv3d(feature_size, first + len(pretrained_rows), kernel_size=1)
        with torch.no_grad():
            if softmax:
                nn.init.xavier_uniform_(probe.weight[:1])
                probe.bias[0] = 0.0
            for row, source in enumerate(pretrained_rows, first):
                if source is not None:
                    probe.weight[row] = network.classifier.weight[source]
                    probe.bias[row] = network.classifier.bias[source]
        self.head = nn.Sequential(*method.head_modules(feature_size), probe)
        for name, parameter in network.named_parameters():
            parameter.requires_grad_(self._trains(name))

    def _trains(self, name: str) -> bool:
        if name.startswith("classifier."):
            return False  # replaced by the new head
        return self.method.trains_backbone_parameter(name) or (self.tune_decoder and name.startswith("decoder"))

    @property
    def structure_count(self) -> int:
        return self.head[-1].out_channels - (1 if self.softmax else 0)

    @property
    def backbone_frozen(self) -> bool:
        """True when no backbone parameter trains: features can be computed once and cached."""
        return not any(p.requires_grad for p in self.network.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.network.features(x))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Exactly the tensors training changes (what an adapter artefact stores), in the standard
        layout even when the network runs channels-last (`model.network.prefers_channels_last`)."""
        return {name: p.detach().contiguous() for name, p in self.named_parameters() if p.requires_grad}

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
