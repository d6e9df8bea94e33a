"""The 2023 workshop paper's adapter: a randomly initialised residual block with instance norm on the
frozen decoder1 features, before the linear probe.

MONAI's `UnetResBlock` (conv3^3 -> IN -> LeakyReLU -> conv3^3 -> IN, plus the input, -> LeakyReLU;
no bias, IN without affine). Nothing starts at zero, so unlike the 2025 adapters step 0 is not the
zero-shot prediction. Trained with the workshop's schedule.
"""

from monai.networks.blocks import UnetResBlock
from torch import nn

from .base import AdaptationMethod


class WorkshopAdapter(AdaptationMethod):
    name = "adapter-2023"
    description = "2023 workshop adapter: random residual block with instance norm + linear probe"
    black_box = True
    learning_rate = 1e-2
    workshop = True
    max_epochs = 100
    weight_decay = 1e-5

    def head_modules(self, feature_size: int) -> list[nn.Module]:
        return [UnetResBlock(spatial_dims=3, in_channels=feature_size, out_channels=feature_size,
                             kernel_size=3, stride=1, norm_name="instance")]
