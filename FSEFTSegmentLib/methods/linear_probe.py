"""Linear probe: only the 1x1x1 head on the frozen decoder1 features trains (49 parameters per structure)."""

from .base import AdaptationMethod


class LinearProbe(AdaptationMethod):
    name = "linear-probe"
    description = "1x1x1 head on frozen features"
    black_box = True
    learning_rate = 1e-2
