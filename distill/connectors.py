"""Learnable connectors (1x1 convolutions) that map student features to class logits or to teacher channels.

Connectors belong to the distiller, are optimised together with the student (see ``distill.trainable_parameters``)
and are discarded at export. They are built once, at construction, never per call (the HLFD authors' code built a
new random projection on every call; we do not).
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.layers import Conv
from torch import nn

__all__ = ["conv1x1", "conv1x1_list"]


def conv1x1(spatial_dims: int, in_channels: int, out_channels: int, bias: bool = True) -> nn.Module:
    """A ``1x1`` (``1x1x1`` in 3D) convolution ``in_channels -> out_channels``.

    Raises:
        ValueError: for spatial_dims not in (1, 2, 3) or non-positive channels.
    """
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}.")
    if int(in_channels) < 1 or int(out_channels) < 1:
        raise ValueError(f"Connector channels must be >= 1, got {in_channels} -> {out_channels}.")
    return Conv[Conv.CONV, spatial_dims](int(in_channels), int(out_channels), kernel_size=1, bias=bias)


def conv1x1_list(spatial_dims: int, in_channels: Sequence[int], out_channels: int) -> nn.ModuleList:
    """One ``conv1x1`` per input channel count, all to ``out_channels``."""
    return nn.ModuleList(conv1x1(spatial_dims, c, out_channels) for c in in_channels)
