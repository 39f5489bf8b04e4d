"""Training crop samplers: 2.5D slabs of depth k and 3D patches, with a controlled share of tumor-centred crops."""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import ClassesToIndicesd, RandCropByLabelClassesd

__all__ = ["INDICES_POSTFIX", "MAX_INDICES_PER_CLASS", "class_ratios", "build_class_indexer", "build_sampler"]

#: key suffix of the cached per-class voxel indices (``label`` -> ``label_cls_indices``).
INDICES_POSTFIX: str = "_cls_indices"
#: voxel indices kept per class and volume (evenly spaced in raster order): about 240 kB per cached volume instead
#: of 8 bytes per voxel, while every slice that holds the class keeps its share of candidate centres.
MAX_INDICES_PER_CLASS: int = 10_000


def class_ratios(tumor_share: float, organ_share: float, num_classes: int = 3) -> list[float]:
    """Sampling ratios over label classes ``[background, organ, tumor, ...]`` for the crop centres.

    Args:
        tumor_share: share of crops centred on a tumor voxel (label 2); with a depth-k slab the centre slice then
            contains tumor.
        organ_share: share centred on an organ voxel (label 1); the rest is centred on background.
        num_classes: number of label classes (3: 0 background, 1 organ, 2 tumor; extra classes get 0).

    Returns:
        ``num_classes`` ratios summing to 1.

    Raises:
        ValueError: shares outside [0, 1], or summing above 1, or ``num_classes < 3``.
    """
    if num_classes < 3:
        raise ValueError(f"num_classes must be >= 3 (0 background, 1 organ, 2 tumor), got {num_classes}")
    for name, value in (("tumor_share", tumor_share), ("organ_share", organ_share)):
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name} must be within [0, 1], got {value}")
    if tumor_share + organ_share > 1.0 + 1e-9:
        raise ValueError(f"tumor_share + organ_share must be <= 1, got {tumor_share} + {organ_share}")
    background = max(0.0, 1.0 - tumor_share - organ_share)
    return [background, float(organ_share), float(tumor_share)] + [0.0] * (num_classes - 3)


def build_class_indexer(
    num_classes: int = 3, *, label_key: str = "label", max_per_class: int | None = MAX_INDICES_PER_CLASS
) -> ClassesToIndicesd:
    """Per-class voxel indices of the label, computed once before the cache (MONAI ``ClassesToIndicesd``).

    Without it ``RandCropByLabelClassesd`` scans the whole volume on every draw (about 0.6 s for a 512x512x100
    volume, every epoch, for every volume). The indices are stored under ``label_key + INDICES_POSTFIX`` and must
    be computed on the array the sampler crops (after any padding); :func:`build_sampler` reads them with
    ``indices_key``.

    Args:
        num_classes: label classes (0 background, 1 organ, 2 tumor, ...).
        label_key: label to index.
        max_per_class: keep at most this many indices per class, evenly spaced in raster order (None: all; 8 bytes
            per voxel per volume).

    Returns:
        A configured ``ClassesToIndicesd``; adds ``<label_key>_cls_indices``: a list of ``num_classes`` 1-D index
        tensors into the flattened (H, W, D) label.

    Raises:
        ValueError: ``num_classes < 3`` or ``max_per_class < 1``.
    """
    if int(num_classes) < 3:
        raise ValueError(f"num_classes must be >= 3 (0 background, 1 organ, 2 tumor), got {num_classes}")
    if max_per_class is not None and int(max_per_class) < 1:
        raise ValueError(f"max_per_class must be >= 1 or None, got {max_per_class}")
    return ClassesToIndicesd(
        keys=label_key,
        indices_postfix=INDICES_POSTFIX,
        num_classes=int(num_classes),
        max_samples_per_class=None if max_per_class is None else int(max_per_class),
    )


def build_sampler(
    roi_size: Sequence[int],
    num_samples: int,
    *,
    tumor_share: float = 0.5,
    organ_share: float = 0.25,
    num_classes: int = 3,
    keys: Sequence[str] = ("image", "label"),
    label_key: str = "label",
    indices_key: str | None = None,
) -> RandCropByLabelClassesd:
    """Random crops centred on voxels of chosen classes (MONAI ``RandCropByLabelClassesd``).

    For 2.5D training use ``roi_size=(h, w, k)`` (``-1`` keeps the full in-plane size): each crop is a slab of k
    slices whose centre slice is drawn with probability ``tumor_share`` among tumor-containing slices. For 3D use a
    patch ``(h, w, d)``. Cases without tumor voxels silently redistribute the tumor share to the present classes.

    Args:
        roi_size: crop size over the spatial axes (H, W, D); non-positive entries use the image size.
        num_samples: N crops drawn per volume per epoch (the transform returns a list of N dicts).
        tumor_share: see :func:`class_ratios`.
        organ_share: see :func:`class_ratios`.
        num_classes: label classes.
        keys: keys cropped together.
        label_key: label used to pick the centres.
        indices_key: key of per-class indices precomputed by :func:`build_class_indexer` (None: scan the label on
            every draw).

    Returns:
        A configured ``RandCropByLabelClassesd``; input (1, H, W, D) per key, output list of (1, *roi_size).

    Raises:
        ValueError: ``num_samples < 1``, a roi of the wrong length, or bad shares.
    """
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if len(roi_size) != 3:
        raise ValueError(f"roi_size must have 3 entries (h, w, d) over the (H, W, D) axes, got {tuple(roi_size)!r}")
    return RandCropByLabelClassesd(
        keys=list(keys),
        label_key=label_key,
        spatial_size=[int(s) for s in roi_size],
        ratios=class_ratios(tumor_share, organ_share, num_classes),
        num_classes=num_classes,
        num_samples=int(num_samples),
        indices_key=indices_key,
        allow_smaller=False,
        warn=False,
    )
