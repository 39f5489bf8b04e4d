"""Data-layer utilities for the bundles: CacheDataset factory, cache memory estimate, atomic NIfTI writing."""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from pipelines.engine.atomic import atomic_write

if TYPE_CHECKING:  # monai is imported lazily: the CLIs that only write NIfTI stay fast
    from monai.data import CacheDataset
    from monai.transforms import Compose

__all__ = [
    "save_nifti",
    "build_dataset",
    "CacheEstimate",
    "available_memory_bytes",
    "cached_item_bytes",
    "estimate_cache",
    "ensure_cache_fits",
]

logger = logging.getLogger(__name__)

_AXIS_OF_CODE = {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike, dtype: Any = None) -> Path:
    """Write a NIfTI file atomically (temporary file in the same folder, then rename); gzip output is deterministic.

    Args:
        array: voxel data (X, Y, Z[, ...]).
        affine: 4x4 voxel-to-world (RAS) matrix.
        path: destination ending in ``.nii`` or ``.nii.gz``; parent folders are created.
        dtype: on-disk dtype (default: the array's).

    Returns:
        The destination path.

    Raises:
        ValueError: the path does not end in .nii / .nii.gz, or the affine is not 4x4.
    """
    path = Path(path)
    if not (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
        raise ValueError(f"NIfTI path must end in .nii or .nii.gz, got {path}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape} for {path}")
    data = np.asarray(array) if dtype is None else np.asarray(array).astype(dtype)
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    atomic_write(path, lambda tmp: nib.save(image, tmp), fsync=False)
    return path


def build_dataset(
    datalist: Sequence[Mapping[str, Any]],
    transform: Compose,
    cache_rate: float = 1.0,
    num_workers: int = 0,
    *,
    copy_cache: bool = True,
    progress: bool = False,
) -> CacheDataset:
    """MONAI ``CacheDataset``: the deterministic head of ``transform`` is cached, random transforms run per epoch.

    MONAI caches every transform up to the first random one, so with :func:`transforms.build_transforms` the cache
    holds the loaded, oriented, resampled and windowed volumes and the 2.5D/3D crops and augmentation run afterwards.

    Args:
        datalist: list of ``{"image": path, "label": path}`` dicts (e.g. a split of ``splits.json``).
        transform: a Compose, typically ``build_transforms(stage, ...)``.
        cache_rate: share of items cached in memory, in [0, 1] (see :func:`estimate_cache` for what fits).
        num_workers: worker threads filling the cache (0 or 1: a single thread, items cached one after another).
        copy_cache: deep-copy cached items before the random transforms (keep True unless they never modify data in
            place).
        progress: show a progress bar while caching.

    Returns:
        :class:`pipelines.engine.case_dataset.CaseDataset` (a ``monai.data.CacheDataset``).

    Raises:
        ValueError: empty datalist, ``cache_rate`` outside [0, 1], negative ``num_workers``.
        BundleInputError: a case that cannot be read, while caching or later when an uncached item is loaded (one
            line naming the file, the reader's error and the ``check_dataset`` remedy).
    """
    from pipelines.engine.case_dataset import CaseDataset

    if len(datalist) == 0:
        raise ValueError("datalist is empty: nothing to train or evaluate on (check the splits file)")
    if not 0.0 <= float(cache_rate) <= 1.0:
        raise ValueError(f"cache_rate must be within [0, 1], got {cache_rate}")
    if int(num_workers) < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return CaseDataset(
        data=list(datalist),
        transform=transform,
        cache_rate=float(cache_rate),
        num_workers=max(1, int(num_workers)),  # MONAI reads None (and so a bare 0) as os.cpu_count() threads
        copy_cache=copy_cache,
        progress=progress,
    )


def available_memory_bytes() -> int:
    """Memory this process may still use: the smaller of the kernel's MemAvailable and the cgroup limit headroom."""
    candidates = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            candidates.append(max(0, int(limit) - usage))
        break
    if not candidates:
        pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
        candidates.append(int(pages) * os.sysconf("SC_PAGE_SIZE") if pages else 0)
    return int(min(candidates))


def cached_item_bytes(
    image_path: str | os.PathLike,
    *,
    pixdim: Sequence[float] | None = None,
    in_plane_size: Sequence[int] | None = None,
    in_plane_mode: str = "resize",
    bytes_per_voxel: int = 8,
) -> int:
    """Bytes one cached item takes after the deterministic transforms, from the NIfTI header only (no voxel read).

    Args:
        image_path: image file (NIfTI).
        pixdim: target spacing (x, y, z) in RAS order as given to ``build_transforms`` (non-positive: kept).
        in_plane_size: (h, w) in-plane size, as given to ``build_transforms``.
        in_plane_mode: ``"resize"`` (every slice becomes ``in_plane_size``) or ``"pad"`` (a preprocessing plan's:
            slices padded up to ``in_plane_size``, larger ones kept).
        bytes_per_voxel: image + label bytes per voxel (float32 image + float32 label = 8, MONAI's default).

    Returns:
        Estimated bytes.

    Raises:
        ValueError: the file cannot be read as NIfTI (message names the file).
    """
    try:
        header_image = nib.load(str(image_path))
    except Exception as err:  # noqa: BLE001 - any reader failure becomes a clear message
        raise ValueError(f"{image_path}: cannot read the image header ({err})") from err
    shape = list(header_image.shape[:3])
    zooms = [float(z) for z in header_image.header.get_zooms()[:3]]
    codes = nib.aff2axcodes(header_image.affine)
    ras_shape = [0, 0, 0]
    for axis, code in enumerate(codes[:3]):
        ras_axis = _AXIS_OF_CODE.get(code, axis)
        size = shape[axis]
        if pixdim is not None and float(pixdim[ras_axis]) > 0:
            size = max(1, int(round(size * zooms[axis] / float(pixdim[ras_axis]))))
        ras_shape[ras_axis] = size
    if in_plane_size is not None:
        h, w = int(in_plane_size[0]), int(in_plane_size[1])
        pad = in_plane_mode == "pad"
        ras_shape[0], ras_shape[1] = (max(ras_shape[0], h), max(ras_shape[1], w)) if pad else (h, w)
    return int(math.prod(ras_shape) * bytes_per_voxel)


@dataclass(frozen=True)
class CacheEstimate:
    """Outcome of :func:`estimate_cache` (all sizes in bytes)."""

    num_items: int
    cache_rate: float
    cached_items: int
    mean_item_bytes: float
    cache_bytes: int
    available_bytes: int
    budget_bytes: int
    max_cache_rate: float

    @property
    def fits(self) -> bool:
        """Whether the requested cache fits in the memory budget."""
        return self.cache_bytes <= self.budget_bytes

    def message(self) -> str:
        """One human-readable line: what the cache needs, what is available, which cache_rate would fit."""
        gib = 1024**3
        text = (
            f"cache of {self.cached_items}/{self.num_items} volumes (cache_rate={self.cache_rate:g}) needs about "
            f"{self.cache_bytes / gib:.2f} GiB; budget {self.budget_bytes / gib:.2f} GiB of "
            f"{self.available_bytes / gib:.2f} GiB available"
        )
        if self.fits:
            return text + ": fits"
        return text + f": does NOT fit; use cache_rate <= {self.max_cache_rate:g} (or resample/resize smaller)"


def _rate_caching(items: int, n: int) -> float:
    """A short cache_rate r (2 decimals when possible) for which CacheDataset caches exactly ``int(n * r) == items``."""
    if items >= n:
        return 1.0
    for digits in (2, 3, 4, 6):
        scale = 10**digits
        rate = math.ceil(items / n * scale) / scale
        if int(n * rate) == items:
            return rate
    rate = items / n
    while int(n * rate) < items:  # float rounding: step up to the next representable value
        rate = math.nextafter(rate, 1.0)
    return rate


def estimate_cache(
    datalist: Sequence[Mapping[str, Any]],
    cache_rate: float = 1.0,
    *,
    item_bytes: float | Sequence[float] | None = None,
    pixdim: Sequence[float] | None = None,
    in_plane_size: Sequence[int] | None = None,
    in_plane_mode: str = "resize",
    bytes_per_voxel: int = 8,
    available_bytes: int | None = None,
    headroom: float = 0.7,
) -> CacheEstimate:
    """Estimate whether a CacheDataset over ``datalist`` fits in memory and which ``cache_rate`` would.

    Args:
        datalist: list of ``{"image": path, ...}``.
        cache_rate: requested share of cached items.
        item_bytes: size of one cached item after the deterministic transforms (one number for all, or one per
            item); None: computed from each image header with :func:`cached_item_bytes`.
        pixdim: target spacing used by the transforms (header-based estimate only).
        in_plane_size: in-plane size used by the transforms (header-based estimate only).
        in_plane_mode: ``"resize"`` or ``"pad"`` (:func:`cached_item_bytes`; header-based estimate only).
        bytes_per_voxel: image + label bytes per voxel (header-based estimate only).
        available_bytes: memory available (default: :func:`available_memory_bytes`).
        headroom: share of the available memory the cache may take (the rest: model, batches, workers).

    Returns:
        :class:`CacheEstimate` (``.fits``, ``.max_cache_rate``, ``.message()``).

    Raises:
        ValueError: empty datalist, ``cache_rate`` or ``headroom`` outside (0, 1], item_bytes of the wrong length, or
            an unreadable image header.
    """
    n = len(datalist)
    if n == 0:
        raise ValueError("datalist is empty")
    if not 0.0 <= float(cache_rate) <= 1.0:
        raise ValueError(f"cache_rate must be within [0, 1], got {cache_rate}")
    if not 0.0 < float(headroom) <= 1.0:
        raise ValueError(f"headroom must be within (0, 1], got {headroom}")
    if item_bytes is None:
        sizes = [
            cached_item_bytes(
                item["image"], pixdim=pixdim, in_plane_size=in_plane_size, in_plane_mode=in_plane_mode, bytes_per_voxel=bytes_per_voxel
            )
            for item in datalist
        ]
    elif isinstance(item_bytes, numbers.Real):  # numpy scalars too (np.int64 is not an int)
        sizes = [float(item_bytes)] * n
    else:
        sizes = [float(s) for s in item_bytes]
        if len(sizes) != n:
            raise ValueError(f"item_bytes has {len(sizes)} entries for {n} datalist items")
    # CacheDataset caches the first int(n * cache_rate) items, in datalist order
    cached = min(n, int(n * float(cache_rate)))
    mean = float(np.mean(sizes))
    cache_bytes = int(sum(sizes[:cached]))
    available = int(available_memory_bytes() if available_bytes is None else available_bytes)
    budget = int(available * float(headroom))
    prefix = np.cumsum(sizes)
    fitting = int(np.searchsorted(prefix, budget, side="right"))  # largest m with sum(sizes[:m]) <= budget
    max_rate = _rate_caching(fitting, n)
    estimate = CacheEstimate(n, float(cache_rate), cached, mean, cache_bytes, available, budget, max_rate)
    logger.info(estimate.message())
    return estimate


def ensure_cache_fits(datalist: Sequence[Mapping[str, Any]], cache_rate: float = 1.0, **kwargs: Any) -> CacheEstimate:
    """:func:`estimate_cache`, raising before any training when the cache does not fit.

    Raises:
        MemoryError: the message says how much is needed and which cache_rate would fit.
    """
    estimate = estimate_cache(datalist, cache_rate, **kwargs)
    if not estimate.fits:
        raise MemoryError(estimate.message())
    return estimate
