"""Stage pipelines (train / val / infer) for 2.5D and 3D CT segmentation: the one factory the bundles consume."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from monai.transforms import (
    BorderPadd,
    Compose,
    DeleteItemsd,
    EnsureChannelFirstd,
    LoadImaged,
    Orientationd,
    Resized,
    Spacingd,
    SpatialPadd,
)

from transforms.augment import build_augmentation
from transforms.sampling import INDICES_POSTFIX, build_class_indexer, build_sampler
from transforms.stack import StackSlicesd, check_num_slices
from transforms.window import TASK_WINDOWS, HUWindowd, resolve_window

__all__ = ["STAGES", "IN_PLANE_MODES", "DEFAULT_ROI_3D", "CacheBoundary", "build_transforms"]

STAGES: tuple[str, ...] = ("train", "val", "infer")
#: how slices reach ``in_plane_size``: resized (the old path, distorts the aspect ratio) or padded (the plan's path:
#: millimetres kept; larger slices are cropped for training and predicted with an in-plane sliding window)
IN_PLANE_MODES: tuple[str, ...] = ("resize", "pad")
#: 3D training patch used when ``roi_size`` is not given.
DEFAULT_ROI_3D: tuple[int, int, int] = (96, 96, 32)


class CacheBoundary:
    """Identity that ends what ``CacheDataset`` caches: MONAI caches a Compose up to the first random transform OR
    the first callable that is not a ``monai.transforms.Transform`` -- this class is deliberately not one.

    Used before the 2.5D whole-volume slice stacking, whose output is k copies of the volume: caching it would take
    k times the image memory (and break :func:`pipelines.engine.data.estimate_cache`'s bytes-per-voxel assumption), while
    stacking after the cache costs one gather per item.
    """

    def __call__(self, data):
        """Return ``data`` unchanged."""
        return data

    def __repr__(self) -> str:
        return "CacheBoundary()"


def build_transforms(
    stage: str,
    *,
    spatial_dims: int = 2,
    num_slices: int = 3,
    task: str = "kits",
    window: str | Sequence[float] | None = None,
    output_range: Sequence[float] = (0.0, 1.0),
    pixdim: Sequence[float] | None = None,
    in_plane_size: Sequence[int] | None = None,
    in_plane_mode: str = "resize",
    plan: Mapping[str, Any] | None = None,
    roi_size: Sequence[int] | None = None,
    num_samples: int = 4,
    tumor_share: float = 0.5,
    organ_share: float = 0.25,
    num_classes: int = 3,
    rotate_degrees: float = 15.0,
    rotate_prob: float = 0.5,
    flip_prob: float = 0.5,
    noise_prob: float = 0.0,
    noise_std: float = 0.0,
    with_label: bool | None = None,
    image_key: str = "image",
    label_key: str = "label",
) -> Compose:
    """Build the MONAI pipeline for one stage, in 2.5D (``spatial_dims=2``) or 3D (``spatial_dims=3``).

    Input: dicts ``{"image": path, "label": path}`` (NIfTI or anything ``LoadImaged`` reads; CT in HU).

    Deterministic part (the same for every stage, and what ``CacheDataset`` caches: it stops at the first random
    transform, or at :class:`CacheBoundary`): ``LoadImaged -> EnsureChannelFirstd -> Orientationd("RAS") ->
    [Spacingd(pixdim)] -> HUWindowd -> [Resized to in_plane_size, or with in_plane_mode="pad" (a preprocessing plan)
    SpatialPadd up to it in 2.5D]`` (+ for training only: edge-replicating pad of
    k//2 slices at both ends in 2.5D, a pad up to the crop size, and the per-class voxel indices the crop sampler
    draws centres from, so no epoch re-scans a volume). The cache thus holds one (1, H, W, D) image and
    label per case at every stage (2.5D val/infer stack the slices after the cache). After orientation the axial axis
    is the LAST one, whatever the file stored (KiTS19 NIfTI is I,P,L: axial first).

    Stage outputs (C = channels; H, W, D after the deterministic part):

    - ``train``, 2.5D: a LIST of ``num_samples`` dicts per volume (MONAI ``list_data_collate`` flattens it):
      image (k, h, w), label (1, h, w) = the crop's centre slice. Crops are slabs of k slices whose centre slice
      is centred on a tumor voxel with probability ``tumor_share`` (organ: ``organ_share``, rest background);
      then random in-plane rotation + flips (HLFD augmentation; labels nearest; no noise by default).
    - ``train``, 3D: list of ``num_samples`` patches, image (1, h, w, d), label (1, h, w, d), same sampling and
      augmentation.
    - ``val``: whole volume; 2.5D image (k, H, W, D) (neighbours as channels, edge slices replicated: feed a
      ``SliceInferer(spatial_dim=2)`` over the last axis), 3D image (1, H, W, D); label (1, H, W, D).
    - ``infer``: as ``val`` without the label (unless ``with_label=True``).

    Val/infer outputs are MetaTensors whose ``applied_operations`` record Orientationd / Spacingd / Resized, so
    ``monai.transforms.Invertd(keys="pred", transform=<this Compose>, orig_keys="image")`` maps a prediction
    (C, H, W, D) back to the original file geometry (the intensity window and the slice stacking are not spatial
    and are skipped by the inversion).

    Args:
        stage: ``"train"``, ``"val"`` or ``"infer"``.
        spatial_dims: 2 (2.5D slices, k neighbours as channels) or 3 (3D patches).
        num_slices: k in (1, 3, 5, 7), 2.5D only (ignored for 3D).
        task: ``"kits"`` (kidney window -200..300 HU) or ``"lits"`` (liver window -40..160 HU).
        window: overrides the task's window: a preset name (``"kidney"``, ``"liver"``) or ``(lo, hi)`` in HU.
        output_range: windowed intensity range, default (0, 1).
        pixdim: target voxel spacing (x, y, z) in mm for ``Spacingd``; non-positive entries keep that axis'
            spacing (e.g. ``(0.8, 0.8, -1)``); None: no resampling.
        in_plane_size: (h, w) the network input: every axial slice is resized to it (``in_plane_mode="resize"``)
            or padded to at least it (``"pad"``); depth kept. None: slices kept as they are.
        in_plane_mode: ``"resize"`` (the old path) or ``"pad"`` (a preprocessing plan's: the voxel size in mm is
            kept; 2.5D training crops ``in_plane_size`` slabs from the padded volume, val/infer volumes larger than
            it are predicted with an in-plane sliding window; 3D pads nothing, its patches do). See
            ``pipelines.engine.plan``.
        plan: the preprocessing plan these arguments were derived from (``pipelines.engine.apply_plan``); carried
            for provenance only, never read here.
        roi_size: training crop. 2.5D: in-plane (h, w), None = the whole slice (volumes of different in-plane
            sizes then need ``in_plane_size`` to be batched). 3D: patch (h, w, d), default ``DEFAULT_ROI_3D``.
        num_samples: N crops drawn per volume per epoch (train).
        tumor_share: share of crops centred on tumor (train); see ``transforms.sampling.class_ratios``.
        organ_share: share of crops centred on the organ (train).
        num_classes: label classes (3: background, organ, tumor).
        rotate_degrees: max in-plane rotation (train); 0 disables.
        rotate_prob: rotation probability (train).
        flip_prob: flip probability per in-plane axis (train).
        noise_prob: Gaussian noise probability (train), 0 by default as in HLFD.
        noise_std: Gaussian noise std in output units.
        with_label: load and transform the label; default True for train/val, False for infer. Train requires it.
        image_key: image key.
        label_key: label key.

    Returns:
        ``monai.transforms.Compose``.

    Raises:
        ValueError: unknown stage (valid: ``STAGES``), spatial_dims not 2/3, bad k, unknown task/window (message lists
            the presets), roi/size of the wrong length, train without label, bad sampling shares or probabilities.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 (2.5D) or 3 (3D), got {spatial_dims!r}")
    if window is None:
        if task not in TASK_WINDOWS:
            raise ValueError(f"task must be one of {sorted(TASK_WINDOWS)} (or pass window=...), got {task!r}")
        window = TASK_WINDOWS[task]
    resolve_window(window)  # validate early, same error as HUWindowd
    k = check_num_slices(num_slices) if spatial_dims == 2 else 1
    if with_label is None:
        with_label = stage != "infer"
    if stage == "train" and not with_label:
        raise ValueError("stage='train' needs labels (with_label=True)")
    if pixdim is not None and len(pixdim) != 3:
        raise ValueError(f"pixdim must be 3 spacings (x, y, z) in mm, got {tuple(pixdim)!r}")
    if in_plane_size is not None and (len(in_plane_size) != 2 or min(in_plane_size) < 1):
        raise ValueError(f"in_plane_size must be two positive ints (h, w), got {tuple(in_plane_size)!r}")
    if in_plane_mode not in IN_PLANE_MODES:
        raise ValueError(f"in_plane_mode must be one of {IN_PLANE_MODES}, got {in_plane_mode!r}")
    pad_mode = in_plane_mode == "pad" and in_plane_size is not None

    keys = [image_key, label_key] if with_label else [image_key]
    modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
    ops: list = [
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if pixdim is not None:
        ops.append(Spacingd(keys=keys, pixdim=[float(p) for p in pixdim], mode=modes))
    ops.append(HUWindowd(keys=image_key, window=window, output_range=output_range))
    if in_plane_size is not None:
        size = [int(in_plane_size[0]), int(in_plane_size[1]), -1]
        if not pad_mode:
            ops.append(Resized(keys=keys, spatial_size=size, mode=["trilinear", "nearest"][: len(keys)]))
        elif spatial_dims == 2:  # millimetres kept: pad up to the network input (inverted like any padding)
            ops.append(SpatialPadd(keys=keys, spatial_size=size, mode="constant"))

    if stage == "train":
        if spatial_dims == 2:
            if roi_size is not None and len(roi_size) != 2:
                raise ValueError(f"2.5D roi_size is in-plane (h, w), got {tuple(roi_size)!r}")
            if roi_size is None and pad_mode:  # padded volumes differ in size: train on network-input crops
                roi_size = in_plane_size
            roi = [-1, -1, k] if roi_size is None else [int(roi_size[0]), int(roi_size[1]), k]
            if k > 1:  # edge slices can be crop centres, with the same replication StackSlicesd uses at inference
                ops.append(BorderPadd(keys=keys, spatial_border=[0, 0, 0, 0, k // 2, k // 2], mode="replicate"))
        else:
            roi = list(DEFAULT_ROI_3D if roi_size is None else roi_size)
            if len(roi) != 3:
                raise ValueError(f"3D roi_size is a patch (h, w, d), got {tuple(roi)!r}")
        ops.append(SpatialPadd(keys=keys, spatial_size=roi, mode="constant"))
        # class indices are computed once, on the padded array the sampler crops, and cached with it
        indices_key = label_key + INDICES_POSTFIX
        ops.append(build_class_indexer(num_classes, label_key=label_key))
        ops.append(
            build_sampler(
                roi,
                num_samples,
                tumor_share=tumor_share,
                organ_share=organ_share,
                num_classes=num_classes,
                keys=keys,
                label_key=label_key,
                indices_key=indices_key,
            )
        )
        ops.append(DeleteItemsd(keys=indices_key))  # volume-level indices are meaningless on a crop (and do not collate)
        if spatial_dims == 2:
            ops.append(StackSlicesd(keys=image_key, num_slices=k, mode="crop", label_key=label_key))
        ops.append(
            build_augmentation(
                spatial_dims,
                rotate_degrees=rotate_degrees,
                rotate_prob=rotate_prob,
                flip_prob=flip_prob,
                noise_std=noise_std,
                noise_prob=noise_prob,
                image_key=image_key,
                label_key=label_key,
            )
        )
    elif spatial_dims == 2:
        ops.append(CacheBoundary())  # cache (1, H, W, D), not its k stacked copies
        ops.append(StackSlicesd(keys=image_key, num_slices=k, mode="volume"))
    return Compose(ops)
