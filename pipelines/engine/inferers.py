"""The inferers of the bundles: whole-volume (2.5D batched slices or 3D sliding window) and training-time."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, SimpleInferer, SlidingWindowInferer, sliding_window_inference
from monai.utils import convert_to_dst_type

from transforms.stack import check_num_slices

__all__ = ["SliceBatchInferer", "slab_indices", "make_inferer", "simple_inferer"]


def slab_indices(depth: int, num_slices: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Input slice of every (axial slice, channel) pair of the 2.5D stacking, edge slices replicated.

    Entry ``[z, i]`` is ``clamp(z - k // 2 + i, 0, depth - 1)``: the rule of :func:`transforms.stack_slices`.

    Args:
        depth: slices of the volume (>= 1).
        num_slices: k in (1, 3, 5, 7).
        device: where the index tensor lives.

    Returns:
        ``(depth, k)`` long tensor.

    Raises:
        ValueError: bad k or ``depth < 1``.
    """
    k = check_num_slices(num_slices)
    if int(depth) < 1:
        raise ValueError(f"depth must be >= 1, got {depth}.")
    z = torch.arange(int(depth), device=device)
    return (z[:, None] + torch.arange(k, device=device) - k // 2).clamp(0, int(depth) - 1)


class SliceBatchInferer(Inferer):
    """2.5D whole-volume inference: all axial slices of the batch through the network, ``sw_batch_size`` at a time.

    Replaces MONAI's ``SliceInferer(roi_size=(-1, -1), spatial_dim=2)``, whose sliding-window machinery crops,
    concatenates and re-assembles every slice in Python (with an importance map and a count map). Here the
    slices of a chunk are one index gather on the device, one network call, and one indexed write into the
    preallocated output; the Python loop runs over chunks only. The result equals the per-slice one.

    Input, either
    - stacked ``(B, k, H, W, D)`` (the bundles' ``val``/``infer`` transforms stack the k neighbours as channels), or
    - unstacked ``(B, 1, H, W, D)`` with ``num_slices=k > 1``: the slabs are gathered here, per chunk, with edge
      replication (:func:`slab_indices`), so the k-fold stacked volume is never materialised.

    Output: ``(B, classes, H', W', D)`` (``H', W'`` as the network returns them), a ``MetaTensor`` carrying the
    input's meta when the input is one (as ``SliceInferer``).

    Slices larger than ``roi_size`` (a preprocessing plan pads to the network input but never shrinks a larger field
    of view) are predicted with an in-plane sliding window of ``roi_size`` (Gaussian-weighted, ``overlap``); slices
    that fit go through the network whole, as before.

    Args:
        sw_batch_size: slices per network call (>= 1).
        num_slices: k for unstacked single-channel input (None or 1: the input channels are the network's).
        roi_size: in-plane network input (h, w); None: whole slices always.
        overlap: in-plane sliding-window overlap.

    Raises:
        ValueError: ``sw_batch_size < 1`` or a bad ``num_slices`` (construction); input that is not 5D or empty, or
            an unstacked input with more than one channel (call).
        TypeError: a network output that is not a tensor (call).
    """

    def __init__(
        self, sw_batch_size: int = 16, num_slices: int | None = None, roi_size: Sequence[int] | None = None, overlap: float = 0.25
    ) -> None:
        super().__init__()
        if int(sw_batch_size) < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}.")
        if roi_size is not None and (len(roi_size) != 2 or min(int(v) for v in roi_size) < 1):
            raise ValueError(f"roi_size is the in-plane network input (h, w), got {tuple(roi_size)!r}.")
        self.sw_batch_size = int(sw_batch_size)
        self.num_slices = None if num_slices is None else check_num_slices(num_slices)
        self.roi_size = None if roi_size is None else (int(roi_size[0]), int(roi_size[1]))
        self.overlap = float(overlap)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Predict every slice of ``inputs`` (see the class); extra arguments go to the network."""
        if inputs.ndim != 5:
            raise ValueError(f"SliceBatchInferer expects (B, C, H, W, D) volumes, got shape {tuple(inputs.shape)}.")
        x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        b, c, _, _, depth = x.shape
        if b * depth == 0:
            raise ValueError(f"SliceBatchInferer got an empty batch or volume, shape {tuple(inputs.shape)}.")
        gather = self.num_slices is not None and self.num_slices > 1
        if gather and c != 1:
            raise ValueError(
                f"num_slices={self.num_slices} gathers slabs from a single-channel volume; got {c} channels "
                "(already stacked input: num_slices=None)."
            )
        slabs = slab_indices(depth, self.num_slices, x.device) if gather else None
        windowed = self.roi_size is not None and (x.shape[2] > self.roi_size[0] or x.shape[3] > self.roi_size[1])
        flat = torch.arange(b * depth, device=x.device)
        out: torch.Tensor | None = None
        for chunk in flat.split(self.sw_batch_size):
            vol, z = chunk // depth, chunk % depth
            if gather:
                # advanced indices split by slices: their broadcast shape (n, k) comes first -> (n, k, H, W)
                batch = x[vol[:, None], 0, :, :, slabs[z]]
            else:
                batch = x[vol, :, :, :, z]  # (n, C, H, W)
            if windowed:
                pred = sliding_window_inference(
                    batch, self.roi_size, self.sw_batch_size, lambda t: network(t, *args, **kwargs), self.overlap, mode="gaussian"
                )
            else:
                pred = network(batch, *args, **kwargs)
            if not isinstance(pred, torch.Tensor):
                raise TypeError(
                    f"SliceBatchInferer needs a network returning one tensor (eval mode), got {type(pred).__name__}."
                )
            pred = pred.as_tensor() if isinstance(pred, MetaTensor) else pred
            if out is None:
                out = pred.new_empty((b, pred.shape[1], *pred.shape[2:], depth))
            out[vol, :, :, :, z] = pred
        return convert_to_dst_type(out, inputs, dtype=out.dtype)[0] if isinstance(inputs, MetaTensor) else out


def make_inferer(
    spatial_dims: int,
    roi_size: Sequence[int] | None = None,
    sw_batch_size: int = 8,
    overlap: float = 0.25,
    in_plane_size: Sequence[int] | None = None,
) -> Inferer:
    """Whole-volume inferer: 2.5D :class:`SliceBatchInferer` over the last (axial) axis, or 3D ``SlidingWindowInferer``.

    Args:
        spatial_dims: 2 (the network sees (k, H, W) slices; every slice of the volume is predicted) or 3.
        roi_size: 3D window (h, w, d); ignored in 2.5D.
        sw_batch_size: slices / windows per forward.
        overlap: window overlap (3D, and the 2.5D in-plane window).
        in_plane_size: 2.5D network input (h, w) (the preprocessing's ``in_plane_size``): larger slices are
            predicted with an in-plane sliding window; None: whole slices. Ignored in 3D.

    Returns:
        the inferer; input (B, C, H, W, D) -> logits (B, classes, H, W, D).

    Raises:
        ValueError: spatial_dims not 2 or 3.
    """
    if spatial_dims == 2:
        return SliceBatchInferer(sw_batch_size=sw_batch_size, roi_size=in_plane_size, overlap=overlap)
    if spatial_dims == 3:
        if roi_size is None or len(roi_size) != 3:
            raise ValueError(f"3D inference needs roi_size (h, w, d), got {roi_size!r}.")
        return SlidingWindowInferer(roi_size=tuple(roi_size), sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian")
    raise ValueError(f"spatial_dims must be 2 (2.5D) or 3, got {spatial_dims!r}.")


def simple_inferer() -> Inferer:
    """The training-time inferer (patches/slices go straight through the network)."""
    return SimpleInferer()
