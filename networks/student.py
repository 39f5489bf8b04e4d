"""ResNet18 student: a ResNet-18 encoder (basic blocks 2-2-2-2) and a light U-shaped decoder, 2D and 3D.

The HLFD paper (Gorade et al., ISBI 2024) distils a UNet++ teacher into a ResNet18 student of 11.6M parameters;
with the default widths this network has 11.7M parameters at 2D, 3 input channels (the encoder is torchvision's
ResNet-18 without its classifier, 11.2M; the decoder adds ~0.57M). Auxiliary prediction heads used for
distillation are not part of it: they belong to the distillation connectors, which read the taps below.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from networks.blocks import ConvNormAct, NormType, ScaleUp, check_positive_ints, check_spatial_dims, conv
from networks.contract import FeatureContract, Tap, TapNetwork
from networks.resnet import ResNetEncoder
from networks.weights import LoadReport, load_resnet_weights

__all__ = ["ResNet18Student", "DEFAULT_DECODER_CHANNELS"]

#: decoder channels at strides 16, 8, 4, 2, 1 for the standard widths (scaled with ``widths[0] / 64`` otherwise)
DEFAULT_DECODER_CHANNELS = (64, 48, 32, 16, 16)


class ResNet18Student(TapNetwork):
    """ResNet-18 encoder + light decoder giving full-resolution logits.

    Decoder: ``decoder.k`` for k = 0..3 upsamples the previous map x2 (bilinear/trilinear), concatenates the
    encoder skip (layer3, layer2, layer1, stem) and applies conv3-norm-ReLU; ``decoder.4`` upsamples to full
    resolution and applies conv3-norm-ReLU; ``head`` is a 1x1 convolution to the classes.

    Forward contract: logits ``(B, out_channels, *S)`` in train and eval mode (a single tensor).

    Feature contract:

    - ``early``: ``encoder.relu`` (stem after conv1/bn1/ReLU, widths[0] channels, stride 2)
    - ``mid.0, mid.1, mid.2``: ``encoder.layer1`` (widths[0], stride 4), ``encoder.layer2`` (widths[1], 8),
      ``encoder.layer3`` (widths[2], 16)
    - ``late``: ``encoder.layer4`` (widths[3], stride 32)
    - ``pred_final``: ``head`` (out_channels, stride 1); no ``pred_mid``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (the slice stack for 2.5D CT).
        out_channels: classes.
        widths: encoder planes per stage (default ResNet-18: 64, 128, 256, 512).
        base_width: if given, ``widths = base_width * (1, 2, 4, 8)`` (for tiny test models).
        decoder_channels: 5 decoder widths (strides 16, 8, 4, 2, 1); default ``DEFAULT_DECODER_CHANNELS``
            scaled by ``widths[0] / 64``.
        norm: MONAI norm name.

    Input size: every spatial size divisible by 32, else ValueError with the nearest valid size.

    Raises:
        ValueError: for a bad spatial_dims, channel count or width list.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 3,
        widths: Sequence[int] = (64, 128, 256, 512),
        base_width: int | None = None,
        decoder_channels: Sequence[int] | None = None,
        norm: NormType = "batch",
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims, name="ResNet18Student")
        self.in_channels, self.out_channels = check_positive_ints((in_channels, out_channels), "in/out_channels")
        if base_width is not None:
            widths = tuple(int(base_width) * m for m in (1, 2, 4, 8))
        self.widths = check_positive_ints(widths, "ResNet18Student widths", length=4)
        if decoder_channels is None:
            decoder_channels = tuple(max(4, round(c * self.widths[0] / 64)) for c in DEFAULT_DECODER_CHANNELS)
        self.decoder_channels = check_positive_ints(decoder_channels, "ResNet18Student decoder_channels", length=5)
        self.size_divisor = 32
        sd, w, dc = self.spatial_dims, self.widths, self.decoder_channels
        self.encoder = ResNetEncoder(sd, in_channels, "basic", (2, 2, 2, 2), w, norm)
        skips = (w[2], w[1], w[0], w[0], 0)  # layer3, layer2, layer1, stem, none
        prev = w[3]
        blocks = []
        for k in range(5):
            blocks.append(ConvNormAct(sd, prev + skips[k], dc[k], 3, norm_name=norm))
            prev = dc[k]
        self.decoder = nn.ModuleList(blocks)
        self.up = ScaleUp(sd, 2, align_corners=False)
        self.head = conv(sd, dc[-1], self.out_channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, *S)`` -> logits ``(B, out_channels, *S)``."""
        self.check_input_size(x.shape[2:])
        stem, l1, l2, l3, l4 = self.encoder(x)
        h = l4
        for block, skip in zip(self.decoder, (l3, l2, l1, stem, None)):
            h = self.up(h)
            h = block(h if skip is None else torch.cat([h, skip], dim=1))
        return self.head(h)

    def load_pretrained(self, source: str | Path | Mapping[str, torch.Tensor]) -> LoadReport:
        """Load a local torchvision ResNet-18 state dict into the encoder (first conv adapted to ``in_channels``).

        Returns:
            the ``networks.weights.LoadReport`` (``fc.*`` is reported as unexpected).

        Raises:
            FileNotFoundError, ValueError: missing, unreadable or incompatible file (named in the message).
        """
        return load_resnet_weights(self.encoder, source)

    def feature_contract(self) -> FeatureContract:
        """Taps of the student (see the class docstring)."""
        w = self.widths
        return FeatureContract(
            early=Tap("encoder.relu", w[0], 2),
            mid=(Tap("encoder.layer1", w[0], 4), Tap("encoder.layer2", w[1], 8), Tap("encoder.layer3", w[2], 16)),
            late=Tap("encoder.layer4", w[3], 32),
            pred_final=Tap("head", self.out_channels, 1),
        )
