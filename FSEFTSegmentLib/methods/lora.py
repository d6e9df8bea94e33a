"""LoRA on the fused qkv projection of every Swin block, as the paper: qkv(x) + B(A(x)).

A: C -> 3r, B: 3r -> 3C, no bias, rank r = 4 per projection (12 in all), no alpha/r scaling, no
dropout; A keeps PyTorch's Linear initialisation and B starts at zero, so step 0 is the base model.
"""

from torch import nn

from .base import AdaptationMethod


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.lora_a = nn.Linear(base.in_features, 3 * rank, bias=False)
        self.lora_b = nn.Linear(3 * rank, base.out_features, bias=False)
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x):
        return self.base(x) + self.lora_b(self.lora_a(x))


class LoRA(AdaptationMethod):
    name = "lora"
    description = "rank-4 LoRA on every Swin qkv projection"
    learning_rate = 1e-3
    rank = 4

    def inject(self, network) -> None:
        for module in network.swinViT.modules():
            if hasattr(module, "qkv") and isinstance(module.qkv, nn.Linear):
                module.qkv = LoRALinear(module.qkv, self.rank)

    def trains_backbone_parameter(self, name: str) -> bool:
        return ".lora_" in name
