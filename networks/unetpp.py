"""UNet++ (nested U-Net) teacher, 2D and 3D, with deep-supervision heads at every nested decoder level.

Zhou et al., "UNet++: A Nested U-Net Architecture for Medical Image Segmentation", DLMIA 2018. The HLFD paper
(Gorade et al., ISBI 2024) uses it as the teacher with 36.1M parameters: the classic nested U-Net with filters
64-128-256-512-1024 (``features="paper"``), 2D, 3 input channels, 3 classes, is 36.6M here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from networks.blocks import ConvNormAct, NormType, ScaleUp, check_positive_ints, check_spatial_dims, conv, max_pool
from networks.contract import FeatureContract, Tap, TapNetwork

__all__ = ["UNetPlusPlus", "UNETPP_PRESETS", "DoubleConv"]

#: named width presets (filters per level, shallow to deep)
UNETPP_PRESETS: dict[str, tuple[int, ...]] = {
    "paper": (64, 128, 256, 512, 1024),
    "small": (32, 64, 128, 256, 512),
    "tiny": (8, 16, 32, 64, 128),
}


class DoubleConv(nn.Sequential):
    """Two (conv3 -> norm -> ReLU) layers, the VGG block of U-Net / UNet++.

    Shapes: ``(B, in_channels, *S)`` -> ``(B, out_channels, *S)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm_name: NormType = "batch") -> None:
        super().__init__(
            ConvNormAct(spatial_dims, in_channels, out_channels, 3, norm_name=norm_name),
            ConvNormAct(spatial_dims, out_channels, out_channels, 3, norm_name=norm_name),
        )


class UNetPlusPlus(TapNetwork):
    """UNet++ with nested dense skip paths and a 1x1 prediction head on every top-row node ``X(0, j)``.

    Node ``X(i, j)`` (module ``conv{i}_{j}``) sits at level ``i`` (stride ``2**i``); ``X(i, 0)`` is the encoder,
    ``X(i, j>0) = DoubleConv([X(i, 0), ..., X(i, j-1), Up(X(i+1, j-1))])``. The heads ``head1 .. head{L-1}``
    predict class logits from ``X(0, 1) .. X(0, L-1)``; all of them run in every forward so they can be tapped.

    Forward contract: returns the final logits ``(B, out_channels, *S)`` (from ``head{L-1}``) in train and eval
    mode. With ``deep_supervision=True`` the training-mode forward returns the tuple
    ``(final, head1, ..., head{L-2})`` (final first, then the intermediate levels shallow to deep); eval mode
    still returns the final logits only.

    Feature contract (L = number of levels, 5 by default):

    - ``early``: ``conv0_0`` (features[0] channels, stride 1)
    - ``mid.k``: ``conv{k+1}_0`` for k = 0..L-3 (stride ``2**(k+1)``)
    - ``late``: ``conv{L-1}_0`` (bottleneck, stride ``2**(L-1)``)
    - ``pred_mid.k``: ``head{k+1}`` for k = 0..L-3 (out_channels, stride 1)
    - ``pred_final``: ``head{L-1}``

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (the slice stack for 2.5D CT).
        out_channels: classes.
        features: filters per level (3 to 6 levels), or a preset name in ``UNETPP_PRESETS`` ("paper", "small", "tiny").
        deep_supervision: return the intermediate heads too in training mode.
        norm: MONAI norm name ("batch", "instance", ("group", {"num_groups": 8}), ...).

    Input size: every spatial size divisible by ``2**(L-1)`` (16 by default), else ValueError with the nearest size.

    Raises:
        ValueError: for a bad spatial_dims, channel count or preset name, or fewer than 3 / more than 6 levels.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 3,
        features: Sequence[int] | str = "paper",
        deep_supervision: bool = False,
        norm: NormType = "batch",
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims, name="UNetPlusPlus")
        self.in_channels, self.out_channels = check_positive_ints((in_channels, out_channels), "in/out_channels")
        if isinstance(features, str):
            if features not in UNETPP_PRESETS:
                raise ValueError(
                    f"UNetPlusPlus: unknown features preset {features!r}; valid: {sorted(UNETPP_PRESETS)}."
                )
            features = UNETPP_PRESETS[features]
        self.features = check_positive_ints(features, "UNetPlusPlus features")
        if not 3 <= len(self.features) <= 6:
            raise ValueError(f"UNetPlusPlus: features needs 3 to 6 levels, got {len(self.features)}: {self.features}.")
        self.deep_supervision = bool(deep_supervision)
        levels = len(self.features)
        self.levels = levels
        self.size_divisor = 2 ** (levels - 1)
        f = self.features
        sd = self.spatial_dims
        self.pool = max_pool(sd, 2, 2)
        self.up = ScaleUp(sd, 2, align_corners=True)
        for i in range(levels):
            self.add_module(f"conv{i}_0", DoubleConv(sd, in_channels if i == 0 else f[i - 1], f[i], norm))
        for j in range(1, levels):
            for i in range(levels - j):
                self.add_module(f"conv{i}_{j}", DoubleConv(sd, f[i] * j + f[i + 1], f[i], norm))
        for j in range(1, levels):
            self.add_module(f"head{j}", conv(sd, f[0], self.out_channels, kernel_size=1, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """``(B, in_channels, *S)`` -> logits ``(B, out_channels, *S)`` (or the deep-supervision tuple, see class)."""
        self.check_input_size(x.shape[2:])
        levels = self.levels
        nodes: dict[tuple[int, int], torch.Tensor] = {}
        h = x
        for i in range(levels):
            h = getattr(self, f"conv{i}_0")(h if i == 0 else self.pool(h))
            nodes[(i, 0)] = h
        # nodes are computed diagonal by diagonal, as in the paper's figure (all inputs are ready)
        for j in range(1, levels):
            for i in range(levels - j):
                inputs = [nodes[(i, k)] for k in range(j)] + [self.up(nodes[(i + 1, j - 1)])]
                nodes[(i, j)] = getattr(self, f"conv{i}_{j}")(torch.cat(inputs, dim=1))
        preds = [getattr(self, f"head{j}")(nodes[(0, j)]) for j in range(1, levels)]
        if self.deep_supervision and self.training:
            return (preds[-1], *preds[:-1])
        return preds[-1]

    @property
    def ds_weights(self) -> tuple[float, ...] | None:
        """Equal weights ``1 / (L - 1)`` for the ``L - 1`` heads with deep supervision (Zhou et al. average the
        losses of all nested outputs), None without (the training forward returns the final map only)."""
        if not self.deep_supervision:
            return None
        n = self.levels - 1
        return tuple(1.0 / n for _ in range(n))

    def supervised_taps(self) -> frozenset[str]:
        """Heads that receive a loss: all ``head1 .. head{L-1}`` with deep supervision, only the final one without.

        Without deep supervision ``head1 .. head{L-2}`` run in every forward but never get a gradient: their
        logits stay at their random initialisation.
        """
        if self.deep_supervision:
            return frozenset(f"head{j}" for j in range(1, self.levels))
        return frozenset({f"head{self.levels - 1}"})

    def feature_contract(self) -> FeatureContract:
        """Taps of this UNet++ (see the class docstring)."""
        f, levels = self.features, self.levels
        return FeatureContract(
            early=Tap("conv0_0", f[0], 1),
            mid=tuple(Tap(f"conv{i}_0", f[i], 2**i) for i in range(1, levels - 1)),
            late=Tap(f"conv{levels - 1}_0", f[-1], 2 ** (levels - 1)),
            pred_mid=tuple(Tap(f"head{j}", self.out_channels, 1) for j in range(1, levels - 1)),
            pred_final=Tap(f"head{levels - 1}", self.out_channels, 1),
        )
