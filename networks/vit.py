"""ViT / DeiT encoder used as TransFuse's transformer branch (timm key layout, any token grid).

Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021; Touvron et al., "Training data-efficient image
transformers & distillation through attention" (DeiT), ICML 2021. TransFuse (Zhang et al., MICCAI 2021, Sec. 2.1)
uses patch-16 embeddings, learnable position embeddings, L layers of MSA + MLP and a final layer norm, without a
class token. Module names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``pos_embed``,
``blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``) so DeiT checkpoints map key for key.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from networks.blocks import check_positive_ints

__all__ = ["VisionTransformerEncoder", "resample_pos_embed", "to_2tuple"]


def to_2tuple(size: int | Sequence[int], name: str = "size") -> tuple[int, int]:
    """``352`` -> ``(352, 352)``; ``(256, 320)`` stays. Raises ValueError for anything else."""
    if isinstance(size, int):
        size = (size, size)
    return check_positive_ints(size, name, length=2)  # type: ignore[return-value]


def resample_pos_embed(pos_embed: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int]) -> torch.Tensor:
    """Bicubically resample patch position embeddings from one token grid to another (as timm does).

    Args:
        pos_embed: ``(1, old_h * old_w, D)`` (no class/distillation tokens).
        old_grid: ``(old_h, old_w)``.
        new_grid: ``(new_h, new_w)``.

    Returns:
        ``(1, new_h * new_w, D)``; the input itself when the grids are equal.

    Raises:
        ValueError: if ``pos_embed`` does not hold ``old_h * old_w`` tokens.
    """
    oh, ow = (int(v) for v in old_grid)
    nh, nw = (int(v) for v in new_grid)
    if pos_embed.ndim != 3 or pos_embed.shape[1] != oh * ow:
        raise ValueError(f"pos_embed of shape {tuple(pos_embed.shape)} does not hold a {oh}x{ow} token grid.")
    if (oh, ow) == (nh, nw):
        return pos_embed
    d = pos_embed.shape[-1]
    grid = pos_embed.reshape(1, oh, ow, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(nh, nw), mode="bicubic", align_corners=False).to(pos_embed.dtype)
    return grid.permute(0, 2, 3, 1).reshape(1, nh * nw, d)


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: ``(B, C, H, W)`` -> ``(B, H/p * W/p, D)``."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention (Eq. 1 of TransFuse), fused qkv projection: ``(B, N, D)`` -> ``(B, N, D)``."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, d)))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear: ``(B, N, D)`` -> ``(B, N, D)``."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer layer: ``x + MSA(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformerEncoder(nn.Module):
    """Patch embedding + position embeddings + L transformer layers + layer norm, reshaped to a feature map.

    The position embeddings are learnt on the grid of ``img_size / patch_size`` and bicubically resampled to the
    token grid of every input, so any input size divisible by ``patch_size`` works.

    Args:
        in_channels: input channels.
        img_size: reference size ``(H, W)`` (or an int) defining the learnt position-embedding grid.
        patch_size: patch size (16 in TransFuse).
        embed_dim: token width D0 (384 DeiT-S, 768 DeiT-B).
        depth: number of transformer layers L (8 for TransFuse-S, 10 for -L).
        num_heads: attention heads (6 DeiT-S, 12 DeiT-B).
        mlp_ratio: MLP hidden width / D0.
        drop: dropout in the MLP / projections and after adding the position embeddings.

    Forward: ``(B, in_channels, H, W)`` -> ``t0`` of shape ``(B, embed_dim, H / patch, W / patch)``.

    Raises:
        ValueError: for sizes not divisible by ``patch_size`` or ``embed_dim`` not divisible by ``num_heads``.
    """

    def __init__(
        self,
        in_channels: int,
        img_size: int | Sequence[int] = 352,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 8,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        in_channels, patch_size, embed_dim, depth, num_heads = check_positive_ints(
            (in_channels, patch_size, embed_dim, depth, num_heads),
            "ViT in_channels/patch_size/embed_dim/depth/num_heads",
        )
        img = to_2tuple(img_size, "img_size")
        if any(s % patch_size for s in img):
            raise ValueError(f"img_size {img} must be divisible by the patch size {patch_size}.")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}.")
        self.patch_size, self.embed_dim, self.depth, self.num_heads = patch_size, embed_dim, depth, num_heads
        self.grid = (img[0] // patch_size, img[1] // patch_size)
        self.patch_embed = PatchEmbed(in_channels, embed_dim, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop)
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, drop) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.apply(_init_vit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, D0, H / p, W / p)``."""
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.patch_embed(x) + resample_pos_embed(self.pos_embed, self.grid, (h, w))
        tokens = self.norm(self.blocks(self.pos_drop(tokens)))
        return tokens.transpose(1, 2).reshape(x.shape[0], self.embed_dim, h, w)


def _init_vit(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
