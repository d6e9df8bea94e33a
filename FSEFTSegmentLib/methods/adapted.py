"""The foundation model with a method applied: frozen where the method says, a new head on top.

`AdaptedModel.forward(x) = head(network.features(x))`, where the head is the method's black-box
modules followed by a linear probe with one output per target structure. A structure the
foundation model knows starts from its pretrained head row (zero-shot start); a novel one from
PyTorch's default initialisation.
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
    ):
        super().__init__()
        method.inject(network)
        self.network = network
        self.method = method
        self.tune_decoder = tune_decoder
        feature_size = network.architecture.feature_size
        probe = nn.Conv3d(feature_size, len(pretrained_rows), kernel_size=1)
        with torch.no_grad():
            for row, source in enumerate(pretrained_rows):
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
