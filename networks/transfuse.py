"""TransFuse: a CNN branch and a transformer branch run in parallel and fused by BiFusion modules (2D).

Zhang, Liu, Hu, "TransFuse: Fusing Transformers and CNNs for Medical Image Segmentation", MICCAI 2021.

- CNN branch (Sec. 2.2): ResNet-34 (-S) or Res2Net-50 (-L) without the last stage; g2 (H/4), g1 (H/8), g0 (H/16).
- Transformer branch (Sec. 2.1): patch-16 ViT (DeiT-S with 8 layers for -S, DeiT-B with 10 layers for -L) and a
  progressive-upsampling (PUP) decoder: t0 (H/16, D0), t1 (H/8, D1), t2 (H/4, D2).
- BiFusion (Sec. 2.3, Eq. 2): SE channel attention on t^i, CBAM spatial attention on g^i, Hadamard product of the
  1x1 projections followed by a 3x3 conv, and a residual block over the concatenation -> f^i.
- Up path: Attention-U-Net gates, ``f^_{i+1} = Conv([Up(f^_i), AG(f^{i+1})])`` for i = 0, 1.
- Heads (Sec. 2.4): final (on f^_2), transformer (on t^2) and f^0, each upsampled to the input size.

Where the paper is silent, the official code's choices are followed (PUP and up path use a residual double-conv,
SE reductions 4/2/1, dropout 0.2 on the branch features). The 2.5D CT variant stacks slices as input channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from networks.blocks import ConvNormAct, ScaleUp, check_positive_ints, conv
from networks.contract import FeatureContract, Tap, TapNetwork
from networks.resnet import ResNetEncoder
from networks.vit import VisionTransformerEncoder, to_2tuple
from networks.weights import LoadReport, Source, load_deit_weights, load_resnet_weights

__all__ = [
    "TRANSFUSE_DS_WEIGHTS",
    "TransFuse",
    "transfuse_s",
    "transfuse_l",
    "TRANSFUSE_CONFIGS",
    "FUSIONS",
    "BiFusion",
    "ConcatFusion",
    "AttentionGate",
    "UpBlock",
]

SD = 2  # TransFuse is a 2D network

#: fusion modules: the paper's BiFusion and the TransFuse-Concat ablation (Table 3)
FUSIONS = ("bifusion", "concat")

#: the two configurations of the paper (Sec. 3.2)
TRANSFUSE_CONFIGS: dict[str, dict] = {
    "s": {
        "cnn_block": "basic",
        "cnn_layers": (3, 4, 6),  # ResNet-34 stages 1-3
        "cnn_widths": (64, 128, 256),
        "embed_dim": 384,  # DeiT-S
        "depth": 8,
        "num_heads": 6,
        "decoder_channels": (128, 64),
        "head_channels": 64,
    },
    "l": {
        "cnn_block": "res2net",
        "cnn_layers": (3, 4, 6),  # Res2Net-50 (26w x 4s) stages 1-3
        "cnn_widths": (64, 128, 256),
        "embed_dim": 768,  # DeiT-B
        "depth": 10,
        "num_heads": 12,
        "decoder_channels": (512, 256),
        "head_channels": 256,
    },
}


class ResidualConv(nn.Module):
    """Residual double conv of the official code: ``ReLU(conv3-BN-ReLU-conv3-BN(x) + conv1-BN(x))``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(
            ConvNormAct(SD, in_channels, out_channels, 3), ConvNormAct(SD, out_channels, out_channels, 3, act=False)
        )
        self.identity = ConvNormAct(SD, in_channels, out_channels, 1, act=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.double_conv(x) + self.identity(x))


class BottleneckResidual(nn.Module):
    """The "Residual" block of BiFusion (pre-activation bottleneck, official code): BN-ReLU-conv1 (C/2),
    BN-ReLU-conv3 (C/2), BN-ReLU-conv1 (C) plus a 1x1 skip projection when the widths differ."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = max(1, out_channels // 2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=False),
            conv(SD, in_channels, mid, 1, bias=True),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            conv(SD, mid, mid, 3, bias=True),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            conv(SD, mid, out_channels, 1, bias=True),
        )
        self.skip = None if in_channels == out_channels else conv(SD, in_channels, out_channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + (x if self.skip is None else self.skip(x))


class SqueezeExcitation(nn.Module):
    """SE channel attention (Hu et al., CVPR 2018): ``x * sigmoid(fc2(relu(fc1(mean(x)))))``."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = conv(SD, channels, hidden, 1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = conv(SD, hidden, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(self.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True)))))


class SpatialAttention(nn.Module):
    """CBAM spatial attention (Woo et al., ECCV 2018): ``x * sigmoid(BN(conv7([max_c(x), mean_c(x)])))``."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.spatial = ConvNormAct(SD, 2, 1, kernel_size, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


class BiFusion(nn.Module):
    """BiFusion module (TransFuse Eq. 2) fusing a CNN feature g and a transformer feature t of the same size.

    ``t^ = SE(t)``, ``g^ = SpatialAttn(g)``, ``b^ = Conv3x3(W1 t * W2 g)``, ``f = Residual([b^, t^, g^])``.

    Args:
        cnn_channels: channels of g (C_i).
        trans_channels: channels of t (D_i).
        reduction: SE reduction ratio.
        inter_channels: width L_i of the bilinear (Hadamard) interaction.
        out_channels: channels of f.
        dropout: Dropout2d on the output.

    Forward: ``g (B, C_i, h, w), t (B, D_i, h, w)`` -> ``f (B, out_channels, h, w)``.
    """

    def __init__(
        self,
        cnn_channels: int,
        trans_channels: int,
        reduction: int,
        inter_channels: int,
        out_channels: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.channel_attn = SqueezeExcitation(trans_channels, reduction)
        self.spatial_attn = SpatialAttention()
        self.w_g = ConvNormAct(SD, cnn_channels, inter_channels, 1, act=False)
        self.w_t = ConvNormAct(SD, trans_channels, inter_channels, 1, act=False)
        self.w = ConvNormAct(SD, inter_channels, inter_channels, 3)
        self.residual = BottleneckResidual(cnn_channels + trans_channels + inter_channels, out_channels)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        bp = self.w(self.w_g(g) * self.w_t(t))
        return self.dropout(self.residual(torch.cat([self.spatial_attn(g), self.channel_attn(t), bp], dim=1)))


class ConcatFusion(nn.Module):
    """TransFuse-Concat ablation (Table 3): ``f = Residual([g, t])``.

    Forward: ``g (B, C_i, h, w), t (B, D_i, h, w)`` -> ``f (B, out_channels, h, w)``.
    """

    def __init__(self, cnn_channels: int, trans_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.residual = BottleneckResidual(cnn_channels + trans_channels, out_channels)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.residual(torch.cat([g, t], dim=1)))


class AttentionGate(nn.Module):
    """Additive attention gate of Attention U-Net (Oktay et al., 2018): ``x * sigmoid(BN(psi(ReLU(Wg g + Wx x))))``.

    Forward: gating ``g (B, F_g, h, w)``, skip ``x (B, F_l, h, w)`` -> ``(B, F_l, h, w)``.
    """

    def __init__(self, gate_channels: int, skip_channels: int, inter_channels: int) -> None:
        super().__init__()
        self.w_g = ConvNormAct(SD, gate_channels, inter_channels, 1, act=False)
        self.w_x = ConvNormAct(SD, skip_channels, inter_channels, 1, act=False)
        self.psi = ConvNormAct(SD, inter_channels, 1, 1, act=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.psi(self.relu(self.w_g(g) + self.w_x(x))))


class UpBlock(nn.Module):
    """x2 bilinear upsampling, optional attention-gated skip concatenation, residual double conv.

    Used by the PUP decoder (no skip) and the up path (``f^_{i+1} = Conv([Up(f^_i), AG(f^{i+1})])``).

    Forward: ``x (B, in_channels, h, w)[, skip (B, skip_channels, 2h, 2w)]`` -> ``(B, out_channels, 2h, 2w)``.
    """

    def __init__(self, in_channels: int, out_channels: int, skip_channels: int = 0) -> None:
        super().__init__()
        self.up = ScaleUp(SD, 2, align_corners=True)
        self.gate = AttentionGate(in_channels, skip_channels, out_channels) if skip_channels else None
        self.conv = ResidualConv(in_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        if self.gate is not None:
            if skip is None:
                raise ValueError("UpBlock built with a skip connection needs the skip tensor.")
            x = torch.cat([self.gate(x, skip), x], dim=1)
        return self.conv(x)


class SegHead(nn.Sequential):
    """Prediction head: conv layers to ``num_classes`` maps, then bilinear upsampling by ``scale`` to the input size.

    ``reduce=True`` starts with a 1x1 conv-BN-ReLU (the f^0 head of the official code).
    """

    def __init__(self, in_channels: int, hidden: int, num_classes: int, scale: int, reduce: bool = False) -> None:
        layers: list[nn.Module] = []
        if reduce:
            layers.append(ConvNormAct(SD, in_channels, hidden, 1))
            in_channels = hidden
        layers += [
            ConvNormAct(SD, in_channels, hidden, 3),
            conv(SD, hidden, num_classes, 3, bias=True),
            ScaleUp(SD, scale, align_corners=False),
        ]
        super().__init__(*layers)


#: TransFuse deep-supervision weights for its training outputs (final head, transformer head, f0 head)
TRANSFUSE_DS_WEIGHTS: tuple[float, float, float] = (0.5, 0.3, 0.2)


class TransFuse(TapNetwork):
    """TransFuse (2D): parallel CNN and ViT branches, BiFusion at H/16, H/8, H/4, gated up path, three heads.

    Forward contract:

    - eval mode: the final logits ``(B, out_channels, H, W)``.
    - training mode: ``(final, transformer, f0)``, all ``(B, out_channels, H, W)``: the heads on f^_2 (final),
      t^2 and f^0, for the paper's deep supervision ``0.5 L(final) + 0.3 L(f0) + 0.2 L(transformer)`` (Sec. 2.4 /
      3.1; alpha, beta, gamma = 0.5, 0.3, 0.2).

    Feature contract (C = CNN stage channels (C2, C1, C0), D0 = embed_dim):

    - ``early``: ``cnn.layer1`` (g2: C2, stride 4)
    - ``mid.0``: ``cnn.layer2`` (g1: C1, stride 8); ``mid.1``: ``cnn.layer3`` (g0: C0, stride 16);
      ``mid.2``: ``transformer`` (t0: D0, stride 16)
    - ``late``: ``fuse0`` (f0: C0, stride 16), where the two branches meet
    - ``pred_mid.0``: ``head_transformer``; ``pred_mid.1``: ``head_f0`` (out_channels, stride 1)
    - ``pred_final``: ``head`` (out_channels, stride 1)

    Other stable paths: ``pup1`` (t1), ``pup2`` (t2), ``fuse1`` (f1), ``fuse2`` (f2), ``up1`` (f^_1), ``up2`` (f^_2).

    Args:
        spatial_dims: must be 2 (2.5D CT stacks the slices as channels).
        in_channels: input channels.
        out_channels: classes.
        img_size: reference size for the learnt position-embedding grid (int or (H, W), divisible by 16); any
            input divisible by 16 is accepted at run time (the embeddings are resampled).
        fusion: ``"bifusion"`` or ``"concat"`` (TransFuse-Concat ablation).
        parallel_streams: on CUDA inputs, run the transformer branch on a side CUDA stream concurrently with the
            CNN branch (the paper's 98.7 vs 84.5 FPS); CPU inputs take the sequential path, with identical results.
        dropout: Dropout2d on the branch features (and half of it after each fusion), 0.2 in the official code.
        cnn_block, cnn_layers, cnn_widths: CNN branch (``"basic"``/``"res2net"``, blocks and planes of stages 1-3).
        embed_dim, depth, num_heads, mlp_ratio: transformer branch.
        decoder_channels: (D1, D2) of the PUP decoder.
        head_channels: hidden width of the heads.
        se_reductions: SE reduction of the fusions at H/16, H/8, H/4.

    Raises:
        ValueError: for spatial_dims != 2, an unknown fusion, a bad width list or img_size, and (in forward) an
            input size not divisible by 16 (the message names the nearest valid size).
    """

    size_divisor = 16

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 1,
        img_size: int | Sequence[int] = 352,
        fusion: str = "bifusion",
        parallel_streams: bool = False,
        dropout: float = 0.2,
        cnn_block: str = "basic",
        cnn_layers: Sequence[int] = (3, 4, 6),
        cnn_widths: Sequence[int] = (64, 128, 256),
        embed_dim: int = 384,
        depth: int = 8,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        decoder_channels: Sequence[int] = (128, 64),
        head_channels: int = 64,
        se_reductions: Sequence[int] = (4, 2, 1),
    ) -> None:
        super().__init__()
        if int(spatial_dims) != 2:
            raise ValueError(
                f"TransFuse is 2D: spatial_dims must be 2, got {spatial_dims!r} (2.5D CT stacks slices as channels)."
            )
        if fusion not in FUSIONS:
            raise ValueError(f"TransFuse: unknown fusion {fusion!r}; valid: {', '.join(FUSIONS)}.")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"TransFuse: dropout must be in [0, 1), got {dropout}.")
        self.spatial_dims = 2
        self.in_channels, self.out_channels, head_channels = check_positive_ints(
            (in_channels, out_channels, head_channels), "TransFuse in/out/head channels"
        )
        self.img_size = to_2tuple(img_size, "img_size")
        self.check_input_size(self.img_size)
        self.fusion, self.parallel_streams, self.dropout = fusion, bool(parallel_streams), float(dropout)
        cnn_layers = check_positive_ints(cnn_layers, "TransFuse cnn_layers", length=3)
        d1, d2 = check_positive_ints(decoder_channels, "TransFuse decoder_channels", length=2)
        r0, r1, r2 = check_positive_ints(se_reductions, "TransFuse se_reductions", length=3)

        self.cnn = ResNetEncoder(SD, self.in_channels, cnn_block, cnn_layers, cnn_widths)
        c2, c1, c0 = self.cnn.stage_channels
        self.cnn_channels = (c2, c1, c0)
        self.transformer = VisionTransformerEncoder(
            self.in_channels, self.img_size, 16, embed_dim, depth, num_heads, mlp_ratio
        )
        d0 = self.transformer.embed_dim
        self.trans_channels = (d2, d1, d0)
        self.pup1 = UpBlock(d0, d1)
        self.pup2 = UpBlock(d1, d2)
        self.drop = nn.Dropout2d(self.dropout)
        for i, (c, d, r) in enumerate(((c0, d0, r0), (c1, d1, r1), (c2, d2, r2))):
            if fusion == "bifusion":
                module: nn.Module = BiFusion(c, d, r, c, c, self.dropout / 2)
            else:
                module = ConcatFusion(c, d, c, self.dropout / 2)
            self.add_module(f"fuse{i}", module)
        self.up1 = UpBlock(c0, c1, skip_channels=c1)
        self.up2 = UpBlock(c1, c2, skip_channels=c2)
        self.head = SegHead(c2, head_channels, self.out_channels, 4)
        self.head_transformer = SegHead(d2, head_channels, self.out_channels, 4)
        self.head_f0 = SegHead(c0, head_channels, self.out_channels, 16, reduce=True)

    # -- branches -------------------------------------------------------------------------------------------
    def _transformer_branch(self, x: torch.Tensor) -> list[torch.Tensor]:
        t0 = self.drop(self.transformer(x))
        t1 = self.drop(self.pup1(t0))
        t2 = self.drop(self.pup2(t1))
        return [t0, t1, t2]

    def _cnn_branch(self, x: torch.Tensor) -> list[torch.Tensor]:
        _, g2, g1, g0 = self.cnn(x)
        return [self.drop(g0), self.drop(g1), self.drop(g2)]

    def _run_branches(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Both branches; on CUDA with ``parallel_streams`` the transformer runs on a side stream."""
        if not (self.parallel_streams and x.is_cuda):
            return self._cnn_branch(x), self._transformer_branch(x)
        main = torch.cuda.current_stream(x.device)
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(main)  # x (and the weights) are ready on the side stream
        with torch.cuda.stream(side):
            x.record_stream(side)  # x is used on the side stream: keep its memory until that work is done
            t_feats = self._transformer_branch(x)
        g_feats = self._cnn_branch(x)
        main.wait_stream(side)  # the fusion (on the main stream) needs the transformer features
        for t in t_feats:
            t.record_stream(main)  # allocated on the side stream, consumed on the main stream
        return g_feats, t_feats

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, in_channels, H, W)`` with H, W divisible by 16 -> final logits, or ``(final, transformer, f0)`` in
        training mode (see the class docstring)."""
        self.check_input_size(x.shape[2:])
        (g0, g1, g2), (t0, t1, t2) = self._run_branches(x)
        f0 = self.fuse0(g0, t0)
        f1 = self.fuse1(g1, t1)
        f2 = self.fuse2(g2, t2)
        final = self.head(self.up2(self.up1(f0, f1), f2))
        if not self.training:
            # the auxiliary heads still run so that they can be tapped (pred_mid) in eval mode
            self.head_transformer(t2)
            self.head_f0(f0)
            return final
        return final, self.head_transformer(t2), self.head_f0(f0)

    def load_pretrained(self, cnn: Source | None = None, vit: Source | None = None) -> dict[str, LoadReport]:
        """Load local pretrained weights into the branches (nothing is downloaded).

        Args:
            cnn: torchvision ResNet-34 (-S) or official Res2Net-50 (-L) state dict / file; ``layer4`` and ``fc``
                are dropped, the first conv is adapted to ``in_channels``.
            vit: timm DeiT checkpoint / state dict; class tokens, heads and blocks beyond ``depth`` are dropped,
                position embeddings resampled, the patch embedding adapted to ``in_channels``.

        Returns:
            ``{"cnn": LoadReport, "vit": LoadReport}`` for the sources given.

        Raises:
            FileNotFoundError, ValueError: missing, unreadable or incompatible file (named in the message).
        """
        reports: dict[str, LoadReport] = {}
        if cnn is not None:
            reports["cnn"] = load_resnet_weights(self.cnn, cnn)
        if vit is not None:
            reports["vit"] = load_deit_weights(self.transformer, vit)
        return reports

    @property
    def ds_weights(self) -> tuple[float, ...]:
        """Deep-supervision weights of ``(final, transformer, f0)``: ``TRANSFUSE_DS_WEIGHTS`` (0.5 / 0.3 / 0.2)."""
        return TRANSFUSE_DS_WEIGHTS

    def feature_contract(self) -> FeatureContract:
        """Taps of TransFuse (see the class docstring)."""
        c2, c1, c0 = self.cnn_channels
        n = self.out_channels
        return FeatureContract(
            early=Tap("cnn.layer1", c2, 4),
            mid=(Tap("cnn.layer2", c1, 8), Tap("cnn.layer3", c0, 16), Tap("transformer", self.trans_channels[2], 16)),
            late=Tap("fuse0", c0, 16),
            pred_mid=(Tap("head_transformer", n, 1), Tap("head_f0", n, 1)),
            pred_final=Tap("head", n, 1),
        )


def _build(variant: str, kwargs: dict) -> TransFuse:
    config = dict(TRANSFUSE_CONFIGS[variant])
    config.update(kwargs)
    return TransFuse(**config)


def transfuse_s(**kwargs) -> TransFuse:
    """TransFuse-S: ResNet-34 stages 1-3 + DeiT-S with 8 layers (26.3M parameters in the paper at 3 -> 1 channels).

    Keyword arguments override ``TRANSFUSE_CONFIGS["s"]`` and the ``TransFuse`` defaults.
    """
    return _build("s", kwargs)


def transfuse_l(**kwargs) -> TransFuse:
    """TransFuse-L: Res2Net-50 (26w x 4s) stages 1-3 + DeiT-B with 10 layers, as the paper describes.

    Keyword arguments override ``TRANSFUSE_CONFIGS["l"]`` and the ``TransFuse`` defaults.
    """
    return _build("l", kwargs)
