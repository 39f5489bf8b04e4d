"""Segmentation losses: focal + Dice (HLFD's ``L_seg``) and TransFuse's structure loss, both with deep supervision.

- ``SegLoss``: MONAI ``DiceFocalLoss`` with softmax over the class logits and one-hot labels (Gorade et al., ISBI 2024,
  Eq. 5 "focal dice loss"). MONAI's ``DiceFocalLoss(softmax=True)`` still applies a *sigmoid* focal term; ours uses
  ``FocalLoss(use_softmax=True)`` inside it, so both terms see the same softmax distribution.
- ``StructureLoss``: Zhang et al., TransFuse (MICCAI 2021) / F3Net's structure loss: boundary weight
  ``w = 1 + 5 |avgpool_31(mask) - mask|``, weighted BCE + weighted IoU, per channel of sigmoid logits.

Both accept a tensor or a deep-supervision tuple/list whose first element is the final map (TransFuse returns
``(final, transformer, f0)``, UNet++ with deep supervision ``(final, head1, ..., head{L-2})``); the tuple's losses are
combined with ``ds_weights``: explicit weights (the bundles pass the network's own ``ds_weights``, sized to its head
count: 0.5 / 0.3 / 0.2 for TransFuse, ``1 / (L - 1)`` each for UNet++), or None for equal weights over however many
outputs arrive.
Maps whose spatial size differs from the label's are resized (bilinear/trilinear) to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceFocalLoss, FocalLoss
from torch import nn

from networks.blocks import resize_to
from networks.transfuse import TRANSFUSE_DS_WEIGHTS

__all__ = ["TRANSFUSE_DS_WEIGHTS", "deep_supervision_loss", "SegLoss", "structure_loss", "StructureLoss"]

def _check_ds_weights(ds_weights: Sequence[float] | None) -> tuple[float, ...] | None:
    if ds_weights is None:
        return None
    if isinstance(ds_weights, (str, bytes)) or not isinstance(ds_weights, Sequence):
        raise TypeError(f"ds_weights must be a sequence of floats or None, got {ds_weights!r}.")
    w = tuple(float(x) for x in ds_weights)
    if not w or any(x < 0 for x in w):
        raise ValueError(f"ds_weights must be a non-empty sequence of weights >= 0, got {ds_weights!r}.")
    return w


def deep_supervision_loss(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    pred: torch.Tensor | Sequence[torch.Tensor],
    target: torch.Tensor,
    ds_weights: Sequence[float] | None,
) -> torch.Tensor:
    """``loss_fn(pred, target)`` for a tensor; ``sum_i w_i loss_fn(pred_i, target)`` for a tuple/list.

    Args:
        loss_fn: ``(pred (B, K, *S), target (B, 1, *S)) -> scalar``.
        pred: logits or a deep-supervision tuple (first = final map).
        target: labels.
        ds_weights: one weight per tuple element, or None for ``1 / n`` each.

    Raises:
        ValueError: a tuple whose length differs from ``ds_weights``, or an empty tuple.
    """
    if isinstance(pred, torch.Tensor):
        return loss_fn(resize_to(pred, target.shape[2:]), target)
    preds = list(pred)
    if not preds:
        raise ValueError("Got an empty deep-supervision tuple.")
    if ds_weights is None:
        ds_weights = [1.0 / len(preds)] * len(preds)
    if len(preds) != len(ds_weights):
        raise ValueError(f"Got {len(preds)} deep-supervision outputs but {len(ds_weights)} ds_weights {tuple(ds_weights)}.")
    return sum(w * loss_fn(resize_to(p, target.shape[2:]), target) for w, p in zip(ds_weights, preds))


class SegLoss(nn.Module):
    """Focal + Dice loss on softmax logits (MONAI ``DiceFocalLoss(softmax=True, to_onehot_y=True)``, softmax focal).

    Args:
        lambda_dice: Dice weight.
        lambda_focal: focal weight.
        gamma: focal gamma.
        include_background: include class 0 in the Dice/focal terms.
        ds_weights: weights of a deep-supervision tuple (first = final map), sized to the network's head count
            (``network.ds_weights``); None: ``1 / n`` each for a tuple of ``n`` outputs.

    Forward:
        pred ``(B, K, *S)`` logits or a tuple of them; target ``(B, 1, *S)`` integer labels -> scalar.

    Raises:
        ValueError: negative or empty ``ds_weights``; a tuple whose length differs from them (at forward).
    """

    def __init__(
        self,
        lambda_dice: float = 1.0,
        lambda_focal: float = 1.0,
        gamma: float = 2.0,
        include_background: bool = True,
        ds_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.ds_weights = _check_ds_weights(ds_weights)
        self.loss = DiceFocalLoss(
            include_background=include_background,
            to_onehot_y=True,
            softmax=True,
            gamma=gamma,
            lambda_dice=lambda_dice,
            lambda_focal=lambda_focal,
        )
        # the labels are one-hot already when the focal term runs (DiceFocalLoss converts them first)
        self.loss.focal = FocalLoss(include_background=include_background, gamma=gamma, use_softmax=True)

    def forward(self, pred: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        return deep_supervision_loss(self.loss, pred, target, self.ds_weights)


_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def structure_loss(logits: torch.Tensor, mask: torch.Tensor, kernel_size: int = 31) -> torch.Tensor:
    """TransFuse structure loss on sigmoid logits.

    Args:
        logits: ``(B, C, *S)``.
        mask: ``(B, C, *S)`` binary targets.
        kernel_size: odd boundary-window size (31).

    Returns:
        ``mean_{b,c} (wBCE + wIoU)``.
    """
    mask = mask.to(logits.dtype)
    dims = tuple(range(2, logits.ndim))
    local = _AVG[logits.ndim - 2](mask, kernel_size=kernel_size, stride=1, padding=kernel_size // 2)
    weit = 1 + 5 * (local - mask).abs()
    wbce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
    wbce = (weit * wbce).sum(dims) / weit.sum(dims)
    prob = torch.sigmoid(logits)
    inter = (prob * mask * weit).sum(dims)
    union = ((prob + mask) * weit).sum(dims)
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return (wbce + wiou).mean()


class StructureLoss(nn.Module):
    """TransFuse's deep-supervised structure loss.

    A one-channel map is compared with ``label > 0``; a ``K``-channel map with the one-hot labels, channel by channel.

    Args:
        kernel_size: boundary-window size (odd, default 31).
        ds_weights: weights of ``(final, transformer, f0)`` (default 0.5 / 0.3 / 0.2).

    Forward:
        pred ``(B, K, *S)`` logits or a tuple of them; target ``(B, 1, *S)`` integer labels -> scalar.

    Raises:
        ValueError: even or non-positive kernel size.
    """

    def __init__(self, kernel_size: int = 31, ds_weights: Sequence[float] = TRANSFUSE_DS_WEIGHTS) -> None:
        super().__init__()
        if int(kernel_size) < 1 or int(kernel_size) % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}.")
        self.kernel_size = int(kernel_size)
        self.ds_weights = _check_ds_weights(ds_weights)

    def _single(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels = target.long().reshape(target.shape[0], *target.shape[2:])
        k = logits.shape[1]
        mask = (labels > 0).unsqueeze(1) if k == 1 else F.one_hot(labels.clamp(0, k - 1), k).movedim(-1, 1)
        return structure_loss(logits, mask, self.kernel_size)

    def forward(self, pred: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        return deep_supervision_loss(self._single, pred, target, self.ds_weights)
