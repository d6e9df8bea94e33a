"""Residual convolutional adapters on the frozen decoder1 features, before the linear probe.

conv(F->F) -> ReLU -> conv(F->F), no bias, no normalisation, added to its input; the last
convolution starts at zero so step 0 reproduces the zero-shot prediction exactly.
"""

from torch import nn

from .base import AdaptationMethod


class ResidualAdapter(nn.Module):
    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        padding = kernel_size // 2
        self.conv1 = nn.Conv3d(channels, channels, kernel_size, padding=padding, bias=False)
        self.conv2 = nn.Conv3d(channels, channels, kernel_size, padding=padding, bias=False)
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x):
        return x + self.conv2(self.conv1(x).relu())


class SpatialAdapter(AdaptationMethod):
    name = "spatial-adapter"
    description = "3x3x3 residual conv adapter + linear probe"
    black_box = True
    learning_rate = 1e-4
    kernel_size = 3

    def head_modules(self, feature_size: int) -> list[nn.Module]:
        return [ResidualAdapter(feature_size, self.kernel_size)]


class PointwiseAdapter(SpatialAdapter):
    name = "adapter-1x1"
    description = "1x1x1 residual conv adapter + linear probe"
    kernel_size = 1
