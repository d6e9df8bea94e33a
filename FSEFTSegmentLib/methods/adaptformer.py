"""AdaptFormer: a bottleneck MLP parallel to each Swin block's MLP, on the post-attention stream:
x + MLP(LN2(x)) + s * Up(ReLU(Down(x))), bottleneck 16, s = 0.1; Up starts at zero (step 0 = base)."""

from monai.networks.nets.swin_unetr import SwinTransformerBlock
from torch import nn

from .base import AdaptationMethod


class Bottleneck(nn.Module):
    def __init__(self, channels: int, width: int, scale: float):
        super().__init__()
        self.scale = scale
        self.down = nn.Linear(channels, width)
        self.up = nn.Linear(width, channels)
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.scale * self.up(self.down(x).relu())


class AdaptFormerBlock(SwinTransformerBlock):
    """A Swin block whose MLP branch also carries the parallel bottleneck."""

    def forward_part2(self, x):
        return super().forward_part2(x) + self.adaptformer(x)


class AdaptFormer(AdaptationMethod):
    name = "adaptformer"
    description = "bottleneck-16 adapters parallel to every Swin MLP"
    learning_rate = 1e-2
    width = 16
    scale = 0.1

    def inject(self, network) -> None:
        for block in network.swinViT.modules():
            if isinstance(block, SwinTransformerBlock):
                block.adaptformer = Bottleneck(block.dim, self.width, self.scale)
                block.__class__ = AdaptFormerBlock

    def trains_backbone_parameter(self, name: str) -> bool:
        return ".adaptformer." in name
