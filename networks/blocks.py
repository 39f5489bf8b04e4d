"""Small building blocks shared by the ctdistill networks (2D and 3D, MONAI layer factories)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Conv, Pool
from monai.networks.layers.utils import get_norm_layer
from torch import nn
from torch.nn import functional as F

__all__ = [
    "check_spatial_dims",
    "check_positive_ints",
    "conv",
    "norm",
    "ConvNormAct",
    "ScaleUp",
    "interp_mode",
    "max_pool",
    "resize_to",
]

NormType = str | tuple


def check_spatial_dims(spatial_dims: int, valid: Sequence[int] = (2, 3), name: str = "network") -> int:
    """Return ``spatial_dims`` as int or raise ValueError naming the valid values."""
    if int(spatial_dims) not in tuple(valid):
        raise ValueError(f"{name}: spatial_dims must be one of {tuple(valid)}, got {spatial_dims!r}.")
    return int(spatial_dims)


def check_positive_ints(values: Sequence[int], name: str, length: int | None = None) -> tuple[int, ...]:
    """Validate a sequence of positive integers (optionally of a given length) and return it as a tuple.

    Raises:
        TypeError: if ``values`` is not a sequence of integers.
        ValueError: if the length is wrong or a value is < 1.
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of positive integers, got {values!r}.")
    out = tuple(int(v) for v in values)
    if length is not None and len(out) != length:
        raise ValueError(f"{name} needs {length} values, got {len(out)}: {out}.")
    if any(v < 1 for v in out):
        raise ValueError(f"{name} must be positive integers, got {out}.")
    return out


def interp_mode(spatial_dims: int) -> str:
    """``bilinear`` in 2D, ``trilinear`` in 3D."""
    return "bilinear" if spatial_dims == 2 else "trilinear"


def conv(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    bias: bool = False,
) -> nn.Module:
    """A plain ``ConvNd`` with "same" padding for odd kernels."""
    return Conv[Conv.CONV, spatial_dims](
        in_channels, out_channels, kernel_size=kernel_size, stride=stride, padding=kernel_size // 2, bias=bias
    )


def norm(name: NormType, spatial_dims: int, channels: int) -> nn.Module:
    """A MONAI normalisation layer (``"batch"``, ``"instance"``, ``("group", {"num_groups": 8})``, ...)."""
    return get_norm_layer(name, spatial_dims=spatial_dims, channels=channels)


def max_pool(spatial_dims: int, kernel_size: int, stride: int, padding: int = 0) -> nn.Module:
    """``MaxPoolNd``."""
    return Pool[Pool.MAX, spatial_dims](kernel_size=kernel_size, stride=stride, padding=padding)


class ConvNormAct(nn.Sequential):
    """Convolution -> normalisation -> ReLU (the norm and activation are optional).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel size ("same" padding).
        stride: convolution stride.
        norm_name: MONAI norm name, or None for no normalisation (the convolution then has a bias).
        act: apply ReLU.

    Shapes: ``(B, in_channels, *S)`` -> ``(B, out_channels, *S / stride)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        norm_name: NormType | None = "batch",
        act: bool = True,
    ) -> None:
        layers: list[nn.Module] = [
            conv(spatial_dims, in_channels, out_channels, kernel_size, stride, bias=norm_name is None)
        ]
        if norm_name is not None:
            layers.append(norm(norm_name, spatial_dims, out_channels))
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class ScaleUp(nn.Module):
    """Parameter-free (bi/tri)linear upsampling by an integer factor, as a module so it can be hooked.

    Args:
        spatial_dims: 2 or 3.
        scale: integer upsampling factor (1 is the identity).
        align_corners: passed to ``F.interpolate``.
    """

    def __init__(self, spatial_dims: int, scale: int, align_corners: bool = False) -> None:
        super().__init__()
        if int(scale) < 1:
            raise ValueError(f"ScaleUp: scale must be >= 1, got {scale}.")
        self.mode = interp_mode(spatial_dims)
        self.scale = int(scale)
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S)`` -> ``(B, C, *S * scale)``."""
        if self.scale == 1:
            return x
        return F.interpolate(x, scale_factor=self.scale, mode=self.mode, align_corners=self.align_corners)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, mode={self.mode}"


_MODES = {3: "linear", 4: "bilinear", 5: "trilinear"}
_AREA_POOLS = {3: F.adaptive_avg_pool1d, 4: F.adaptive_avg_pool2d, 5: F.adaptive_avg_pool3d}


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize a channel-first map to a spatial size: area (average) pooling along the axes that shrink, then
    (bi/tri)linear interpolation (``align_corners=False``) along the axes that grow.

    Shrinking by area averaging (``adaptive_avg_pool``: output ``i`` is the mean of the input window
    ``[floor(i n_in / n_out), ceil((i + 1) n_in / n_out))``) lets every input position contribute, so every position
    receives gradient; bilinear interpolation without antialiasing would read only the 2 nearest positions per axis
    (in a 4x shrink, 25 % of the positions of a 2D map and none of the others). Growing axes are interpolated
    linearly as before. Axes are independent, so a map that shrinks along one axis and grows along another is pooled
    along the first, then interpolated along the second.

    Args:
        x: ``(B, C, *spatial)`` with 1 to 3 spatial axes.
        size: target spatial size (as many axes as ``x`` has).

    Returns:
        ``(B, C, *size)``; ``x`` itself when it already has that size.

    Raises:
        ValueError: when ``x`` has not 1-3 spatial axes or ``size`` has a different number of axes.
    """
    if x.ndim not in _MODES:
        raise ValueError(f"resize_to expects (B, C, *spatial) with 1-3 spatial axes, got shape {tuple(x.shape)}.")
    size = tuple(int(s) for s in size)
    if len(size) != x.ndim - 2:
        raise ValueError(f"Target size {size} has {len(size)} axes; the map {tuple(x.shape)} has {x.ndim - 2}.")
    if tuple(x.shape[2:]) == size:
        return x
    shrunk = tuple(min(int(n), s) for n, s in zip(x.shape[2:], size))
    if shrunk != tuple(x.shape[2:]):
        x = _AREA_POOLS[x.ndim](x, shrunk)
    if shrunk == size:
        return x
    return F.interpolate(x, size=size, mode=_MODES[x.ndim], align_corners=False)
