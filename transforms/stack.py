"""2.5D input: neighbouring axial slices stacked as channels."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

__all__ = ["VALID_NUM_SLICES", "STACK_MODES", "check_num_slices", "stack_slices", "StackSlicesd"]

VALID_NUM_SLICES: tuple[int, ...] = (1, 3, 5, 7)
STACK_MODES: tuple[str, ...] = ("volume", "crop")


def check_num_slices(num_slices: int) -> int:
    """Validate the 2.5D context size k.

    Raises:
        ValueError: ``num_slices`` not in :data:`VALID_NUM_SLICES`.
    """
    if isinstance(num_slices, bool) or int(num_slices) != num_slices or int(num_slices) not in VALID_NUM_SLICES:
        raise ValueError(f"num_slices must be one of {VALID_NUM_SLICES} (odd, centre slice in the middle), got {num_slices!r}")
    return int(num_slices)


def _like(data: torch.Tensor, ref: torch.Tensor, affine: torch.Tensor | None = None) -> torch.Tensor:
    """Wrap ``data`` as a MetaTensor carrying ``ref``'s meta and applied operations (optionally a new affine)."""
    if not isinstance(ref, MetaTensor):
        return data
    meta = dict(ref.meta)
    out = MetaTensor(data, meta=meta, applied_operations=list(ref.applied_operations))
    if affine is not None:
        out.affine = affine
    return out


def stack_slices(volume: torch.Tensor, num_slices: int) -> torch.Tensor:
    """Stack each axial slice with its neighbours as channels, replicating the edge slices.

    Channel ``i`` at slice ``z`` holds input slice ``clamp(z - k // 2 + i, 0, D - 1)``.

    Args:
        volume: (1, H, W, D) tensor, axial axis last.
        num_slices: k in (1, 3, 5, 7).

    Returns:
        (k, H, W, D) tensor (MetaTensor meta and applied operations kept when the input is one).

    Raises:
        ValueError: bad k, or not a single-channel 3D volume.
    """
    k = check_num_slices(num_slices)
    if volume.ndim != 4 or volume.shape[0] != 1:
        raise ValueError(f"stack_slices expects a (1, H, W, D) volume, got shape {tuple(volume.shape)}")
    depth = volume.shape[-1]
    z = torch.arange(depth, device=volume.device)
    src = volume.as_tensor()[0] if isinstance(volume, MetaTensor) else volume[0]
    out = torch.stack([src[..., (z + (i - k // 2)).clamp(0, depth - 1)] for i in range(k)], dim=0)
    return _like(out, volume)


class StackSlicesd(MapTransform):
    """2.5D neighbours-as-channels, on a whole volume or on a training crop of depth k.

    - ``mode="volume"`` (val/infer): image (1, H, W, D) -> (k, H, W, D) with edge replication (see
      :func:`stack_slices`); the label is left as (1, H, W, D) for a SliceInferer over the last axis.
    - ``mode="crop"`` (train): image crop (1, H, W, k) -> (k, H, W) (channel i = crop slice i); the label crop
      (1, H, W, k) -> its centre slice (1, H, W). The affine is moved to the centre slice.

    Args:
        keys: image keys to stack (default ``"image"``).
        num_slices: k in (1, 3, 5, 7).
        mode: ``"volume"`` or ``"crop"``.
        label_key: label key reduced to its centre slice in crop mode (ignored in volume mode; absent is fine).
        allow_missing_keys: do not raise when an image key is absent.

    Raises:
        ValueError: bad k or mode (in ``__init__``); wrong input shape (at call time).
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        num_slices: int = 3,
        mode: str = "volume",
        label_key: str | None = "label",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_slices = check_num_slices(num_slices)
        if mode not in STACK_MODES:
            raise ValueError(f"mode must be one of {STACK_MODES}, got {mode!r}")
        self.mode = mode
        self.label_key = label_key

    def _crop_to_channels(self, crop: torch.Tensor, key: Hashable, keep_all: bool) -> torch.Tensor:
        k = self.num_slices
        if crop.ndim != 4 or crop.shape[0] != 1 or crop.shape[-1] != k:
            raise ValueError(f"StackSlicesd(mode='crop') expects {key!r} of shape (1, H, W, {k}), got {tuple(crop.shape)}")
        raw = crop.as_tensor() if isinstance(crop, MetaTensor) else crop
        data = raw[0].permute(2, 0, 1).contiguous() if keep_all else raw[:, :, :, k // 2].contiguous()
        affine = None
        if isinstance(crop, MetaTensor):
            affine = crop.affine.clone()
            affine[:3, 3] = affine[:3, 3] + affine[:3, 2] * (k // 2)  # origin at the centre slice
        return _like(data, crop, affine)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            if self.mode == "volume":
                d[key] = stack_slices(d[key], self.num_slices)
            else:
                d[key] = self._crop_to_channels(d[key], key, keep_all=True)
        if self.mode == "crop" and self.label_key is not None and self.label_key in d:
            d[self.label_key] = self._crop_to_channels(d[self.label_key], self.label_key, keep_all=False)
        return d
