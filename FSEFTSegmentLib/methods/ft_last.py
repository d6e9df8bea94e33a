"""FT-Last, from the 2023 workshop paper: fine-tunes the last decoder block (`decoder1`) and the new
head; the rest of the network stays frozen. Trained with the workshop's schedule."""

from .base import AdaptationMethod


class FineTuneLastBlock(AdaptationMethod):
    name = "ft-last"
    description = "2023 workshop: fine-tune the last decoder block (decoder1) + head"
    learning_rate = 1e-2
    combines_with_decoder = False  # trains part of the decoder already
    workshop = True
    max_epochs = 100
    weight_decay = 1e-5

    def trains_backbone_parameter(self, name: str) -> bool:
        return name.startswith("decoder1.")
