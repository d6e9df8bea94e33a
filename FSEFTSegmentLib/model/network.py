"""The FSEFT foundation network: MONAI's Swin-UNETR, made exact to the released checkpoint.

Two differences from `monai.networks.nets.SwinUNETR` are needed for the paper's weights:
- patch merging concatenates the 2x2x2 sub-grids in MONAI 0.9.1's order (two sub-grids repeat,
  two never appear); the weights were trained with it and current MONAI's order is off by ~0.1;
- the head is a plain `classifier` Conv3d (the paper's name) and is kept apart from the body, so
  `features()` gives the 48-channel `decoder1` output that black-box adapters consume and the
  frozen body can run once while heads run many times.
A third is for speed only: instance norm keeps a channels-last-3D input channels-last (see
`ChannelsLastInstanceNorm3d`), so the whole network can run in the layout oneDNN convolves fastest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import PatchMergingV2, SwinUNETR
from torch import nn


@dataclass(frozen=True)
class Architecture:
    """What a checkpoint needs besides its tensors: network shape and the space it was trained in."""

    feature_size: int = 48
    out_channels: int = 29
    in_channels: int = 1
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    patch_size: int = 96
    spacing_mm: float = 1.5
    hu_window: tuple[float, float] = (-175.0, 250.0)
    class_names: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_dict(cls, values: dict) -> Architecture:
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        for key in ("depths", "num_heads", "hu_window", "class_names"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)

    def to_dict(self) -> dict:
        return asdict(self)


class PatchMerging091(PatchMergingV2):
    """Patch merging in MONAI 0.9.1's sub-grid order, as (d, h, w) offsets of `x[:, d::2, h::2, w::2]`."""

    ORDER = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"PatchMerging091 expects (B, D, H, W, C), got {tuple(x.shape)}")
        d, h, w = x.shape[1:4]
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in self.ORDER], dim=-1)
        return self.reduction(self.norm(x))


class ChannelsLastInstanceNorm3d(nn.InstanceNorm3d):
    """Instance norm that leaves a channels-last-3D input channels-last; same parameters and result.

    PyTorch's instance norm makes such an input contiguous, so every following convolution
    converts it back: on the CPU those copies cost as much as channels-last saves. Here the
    statistics come from sums per slice (float32) added up in float64, a view of the channels-last
    memory, and one fused multiply-add normalises: within 1e-6 of PyTorch's on unit activations
    (group norm's channels-last kernel, one group per channel, is twice as fast but 5e-4 off,
    enough to flip voxels at the threshold).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)
        if not channels_last or self.track_running_stats:
            return super().forward(x)
        n, c, depth = x.shape[:3]
        slices = x.permute(0, 2, 3, 4, 1).reshape(n, depth, -1, c)  # (N, D, H*W, C): no copy
        count = depth * slices.shape[2]
        mean = slices.sum(2, dtype=torch.float32).double().sum(1) / count
        mean_square = torch.linalg.vector_norm(slices, dim=2, dtype=torch.float32).double().square().sum(1) / count
        scale = torch.rsqrt((mean_square - mean.square()).clamp_min(0) + self.eps)
        shift = -mean * scale
        if self.affine:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        shape = (n, c, 1, 1, 1)
        return torch.addcmul(shift.to(x.dtype).view(shape), x, scale.to(x.dtype).view(shape))


def prefers_channels_last(device: torch.device) -> bool:
    """Whether windows run in channels-last-3D layout on `device`: on the CPU, where oneDNN's 3D
    convolutions take about half the time in it (a full-size prediction 1.22x faster on 2 cores, with
    `ChannelsLastInstanceNorm3d`); not on CUDA, where it has not been measured."""
    return device.type == "cpu"


class FoundationSwinUNETR(SwinUNETR):
    """Swin-UNETR body (`swinViT`, `encoder*`, `decoder*`) plus a separate 1x1x1 `classifier` head."""

    def __init__(self, architecture: Architecture = Architecture()):
        super().__init__(
            in_channels=architecture.in_channels,
            out_channels=architecture.out_channels,
            feature_size=architecture.feature_size,
            depths=architecture.depths,
            num_heads=architecture.num_heads,
            downsample=PatchMerging091,
            normalize=True,
            use_flash_attention=True,  # fused attention when no gradient is needed: 1.4x faster on the CPU
        )
        self.architecture = architecture
        del self.out  # MONAI's UnetOutBlock; replaced by the paper's plain head below
        for module in self.modules():
            if type(module) is nn.InstanceNorm3d:
                module.__class__ = ChannelsLastInstanceNorm3d  # same state, layout-keeping forward
        self.classifier = nn.Conv3d(architecture.feature_size, architecture.out_channels, kernel_size=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The `decoder1` output (feature_size channels at the input's resolution)."""
        self._check_input_size(x.shape[2:])
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._encoder_trains()):
            hidden = self.swinViT(x, self.normalize)
            enc0 = self.encoder1(x)
            enc1 = self.encoder2(hidden[0])
            enc2 = self.encoder3(hidden[1])
            enc3 = self.encoder4(hidden[2])
            dec4 = self.encoder10(hidden[4])
        dec3 = self.decoder5(dec4, hidden[3])
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self.decoder2(dec1, enc1)
        return self.decoder1(dec0, enc0)

    def _encoder_trains(self) -> bool:
        """Whether any encoder parameter needs a gradient; when none does (frozen model, decoder
        fine-tuning), the encoder runs without autograd: less memory, and fused attention."""
        return any(p.requires_grad for name, p in self.named_parameters() if not name.startswith(("decoder", "classifier")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every output channel (one sigmoid each: structures may overlap)."""
        return self.classifier(self.features(x))


def crop_size_problem(crop: int) -> str | None:
    """Why the network cannot train on cubic crops of this size, or None. The encoder halves a crop
    five times; at 32 its deepest stage is one voxel, where instance norm fails."""
    if crop % 32 or crop < 64:
        return f"{crop} must be a multiple of 32, at least 64"
    return None


def head_rows(classifier: nn.Conv3d, channels: list[int]) -> nn.Conv3d:
    """A new 1x1x1 head holding copies of `classifier`'s rows `channels` (zero-shot head)."""
    head = nn.Conv3d(classifier.in_channels, len(channels), kernel_size=1).to(classifier.weight.device)
    with torch.no_grad():
        head.weight.copy_(classifier.weight[channels])
        head.bias.copy_(classifier.bias[channels])
    return head
