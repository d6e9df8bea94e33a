"""Full fine-tuning: every parameter of the foundation model (its head replaced by the new one)."""

from .base import AdaptationMethod


class FullFineTuning(AdaptationMethod):
    name = "full"
    description = "every parameter"
    learning_rate = 1e-4
    combines_with_decoder = False

    def trains_backbone_parameter(self, name: str) -> bool:
        return True
