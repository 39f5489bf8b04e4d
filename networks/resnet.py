"""ResNet (basic blocks) and Res2Net (Bottle2neck) encoders, 2D and 3D, with torchvision / official key layouts.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (ResNet-18/34: basic blocks 2-2-2-2 / 3-4-6-3).
Gao et al., "Res2Net: A New Multi-scale Backbone Architecture", TPAMI 2019 (Res2Net-50 26w x 4s: 3-4-6-3).

Module names follow torchvision's ``resnet*`` (``conv1, bn1, relu, maxpool, layer1..layer4``, blocks with
``conv1, bn1, conv2, bn2, downsample.0/1``) and the official Res2Net code (``convs.i, bns.i, conv3, bn3``), so
their state dicts load key for key (see ``networks.weights``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from networks.blocks import NormType, check_positive_ints, check_spatial_dims, conv, max_pool, norm

__all__ = ["BasicBlock", "Bottle2neck", "ResNetEncoder", "RESNET_LAYERS"]

#: blocks per stage of the standard depths
RESNET_LAYERS: dict[str, tuple[str, tuple[int, ...]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "res2net50": ("res2net", (3, 4, 6, 3)),
}


def _downsample(sd: int, cin: int, cout: int, stride: int, norm_name: NormType) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(conv(sd, cin, cout, 1, stride), norm(norm_name, sd, cout))


class BasicBlock(nn.Module):
    """ResNet basic block: conv3-norm-ReLU-conv3-norm + shortcut, ReLU.

    Shapes: ``(B, inplanes, *S)`` -> ``(B, planes, *S / stride)``.
    """

    expansion = 1

    def __init__(
        self, spatial_dims: int, inplanes: int, planes: int, stride: int = 1, norm_name: NormType = "batch"
    ) -> None:
        super().__init__()
        self.conv1 = conv(spatial_dims, inplanes, planes, 3, stride)
        self.bn1 = norm(norm_name, spatial_dims, planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(spatial_dims, planes, planes, 3)
        self.bn2 = norm(norm_name, spatial_dims, planes)
        self.downsample = _downsample(spatial_dims, inplanes, planes, stride, norm_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottle2neck(nn.Module):
    """Res2Net bottleneck (official layout): 1x1 to ``width*scale``, hierarchical 3x3 convs over ``scale`` splits,
    1x1 to ``planes*4``, + shortcut. The first block of a stage (``stype="stage"``) does not chain the splits
    and average-pools the last one.

    Shapes: ``(B, inplanes, *S)`` -> ``(B, planes * 4, *S / stride)``.
    """

    expansion = 4

    def __init__(
        self,
        spatial_dims: int,
        inplanes: int,
        planes: int,
        stride: int = 1,
        norm_name: NormType = "batch",
        stype: str = "normal",
        base_width: int = 26,
        scale: int = 4,
    ) -> None:
        super().__init__()
        sd = spatial_dims
        width = int(math.floor(planes * (base_width / 64.0)))
        if width < 1 or scale < 2:
            raise ValueError(
                f"Bottle2neck: width {width} (planes {planes}, base_width {base_width}) and scale {scale} must be >= 1 and >= 2."
            )
        self.width, self.scale, self.stype = width, scale, stype
        self.nums = scale - 1
        self.conv1 = conv(sd, inplanes, width * scale, 1)
        self.bn1 = norm(norm_name, sd, width * scale)
        self.convs = nn.ModuleList([conv(sd, width, width, 3, stride) for _ in range(self.nums)])
        self.bns = nn.ModuleList([norm(norm_name, sd, width) for _ in range(self.nums)])
        self.pool = nn.AvgPool2d(3, stride, 1) if sd == 2 else nn.AvgPool3d(3, stride, 1)
        self.conv3 = conv(sd, width * scale, planes * self.expansion, 1)
        self.bn3 = norm(norm_name, sd, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(sd, inplanes, planes * self.expansion, stride, norm_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        spx = torch.split(out, self.width, dim=1)
        outs = []
        sp = spx[0]
        for i in range(self.nums):
            sp = spx[i] if (i == 0 or self.stype == "stage") else sp + spx[i]
            sp = self.relu(self.bns[i](self.convs[i](sp)))
            outs.append(sp)
        outs.append(self.pool(spx[self.nums]) if self.stype == "stage" else spx[self.nums])
        out = self.bn3(self.conv3(torch.cat(outs, dim=1)))
        return self.relu(out + identity)


class ResNetEncoder(nn.Module):
    """ResNet / Res2Net encoder: stem (7x7 conv stride 2, norm, ReLU, 3x3 max-pool stride 2) and ``len(layers)`` stages.

    Stage ``k`` (module ``layer{k+1}``) has stride ``2**(k+2)``; the first stage keeps the stem's stride 4.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        block: ``"basic"`` (ResNet-18/34) or ``"res2net"`` (Bottle2neck, 26w x 4s).
        layers: blocks per stage (1 to 4 stages; e.g. (2, 2, 2, 2) for ResNet-18, (3, 4, 6) for TransFuse's
            ResNet-34 without its last stage).
        widths: planes per stage (64, 128, 256, 512 in the standard nets); the stem has ``widths[0]`` channels.
        norm_name: MONAI norm name.

    Forward: ``(B, in_channels, *S)`` -> list ``[stem (stride 2), layer1 (stride 4), layer2 (8), ...]``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        block: str = "basic",
        layers: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        norm_name: NormType = "batch",
    ) -> None:
        super().__init__()
        sd = check_spatial_dims(spatial_dims, name="ResNetEncoder")
        if block not in ("basic", "res2net"):
            raise ValueError(f"ResNetEncoder: block must be 'basic' or 'res2net', got {block!r}.")
        layers = check_positive_ints(layers, "ResNetEncoder layers")
        widths = check_positive_ints(widths, "ResNetEncoder widths", length=len(layers))
        if not 1 <= len(layers) <= 4:
            raise ValueError(f"ResNetEncoder: 1 to 4 stages, got {len(layers)}.")
        self.spatial_dims, self.block, self.layers = sd, block, layers
        expansion = 1 if block == "basic" else Bottle2neck.expansion
        self.stem_channels = widths[0]
        self.stage_channels = tuple(w * expansion for w in widths)
        self.conv1 = conv(sd, in_channels, widths[0], 7, 2)
        self.bn1 = norm(norm_name, sd, widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = max_pool(sd, 3, 2, 1)
        inplanes = widths[0]
        for k, (n, planes) in enumerate(zip(layers, widths)):
            stride = 1 if k == 0 else 2
            blocks = []
            for b in range(n):
                if block == "basic":
                    blocks.append(BasicBlock(sd, inplanes, planes, stride if b == 0 else 1, norm_name))
                else:
                    stype = "stage" if b == 0 else "normal"
                    blocks.append(Bottle2neck(sd, inplanes, planes, stride if b == 0 else 1, norm_name, stype))
                inplanes = planes * expansion
            self.add_module(f"layer{k + 1}", nn.Sequential(*blocks))

    @property
    def num_stages(self) -> int:
        return len(self.layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, C, *S)`` -> ``[stem (B, widths[0], *S/2), layer1 (*S/4), ..., layer{n} (*S/2**(n+1))]``."""
        h = self.relu(self.bn1(self.conv1(x)))
        feats = [h]
        h = self.maxpool(h)
        for k in range(self.num_stages):
            h = getattr(self, f"layer{k + 1}")(h)
            feats.append(h)
        return feats
