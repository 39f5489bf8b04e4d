"""The inferers of the bundles: whole-volume (2.5D slice-by-slice or 3D sliding window) and training-time."""

from __future__ import annotations

from collections.abc import Sequence

from monai.inferers import Inferer, SimpleInferer, SliceInferer, SlidingWindowInferer

__all__ = ["make_inferer", "simple_inferer"]


def make_inferer(spatial_dims: int, roi_size: Sequence[int] | None = None, sw_batch_size: int = 8, overlap: float = 0.25) -> Inferer:
    """Whole-volume inferer: 2.5D ``SliceInferer`` over the last (axial) axis, or 3D ``SlidingWindowInferer``.

    Args:
        spatial_dims: 2 (the network sees (k, H, W) slices; every slice of the volume is predicted) or 3.
        roi_size: 3D window (h, w, d); ignored in 2.5D (whole slices).
        sw_batch_size: slices / windows per forward.
        overlap: 3D window overlap.

    Returns:
        the inferer; input (B, C, H, W, D) -> logits (B, classes, H, W, D).

    Raises:
        ValueError: spatial_dims not 2 or 3.
    """
    if spatial_dims == 2:
        return SliceInferer(roi_size=(-1, -1), spatial_dim=2, sw_batch_size=sw_batch_size, progress=False)
    if spatial_dims == 3:
        if roi_size is None or len(roi_size) != 3:
            raise ValueError(f"3D inference needs roi_size (h, w, d), got {roi_size!r}.")
        return SlidingWindowInferer(roi_size=tuple(roi_size), sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian")
    raise ValueError(f"spatial_dims must be 2 (2.5D) or 3, got {spatial_dims!r}.")


def simple_inferer() -> Inferer:
    """The training-time inferer (patches/slices go straight through the network)."""
    return SimpleInferer()
