"""The device-resident 2.5D training data path: volumes cached once as compact tensors, slabs sampled and augmented
batched on the device.

Today's loader path (``CacheDataset`` + ``DataLoader``) caches the preprocessed volumes as float32 and, per sample, in
worker processes, crops a slab (``RandCropByLabelClassesd``), stacks it (``StackSlicesd``) and rotates/flips it (MONAI
``RandRotated`` / ``RandFlipd``). Here:

1. :func:`cache_volumes` runs the deterministic preprocessing of :func:`transforms.build_transforms` (orientation,
   optional spacing, HU window, in-plane resize -- or, with a preprocessing plan, padding plus a centre crop to the
   network input: the ``val`` stage up to its :class:`~transforms.CacheBoundary`) ONCE
   per volume and keeps all volumes in one (sum D, H, W) tensor on the device (image float16 or uint8, label uint8),
   with the slice index of each class' voxels (at most ``MAX_INDICES_PER_CLASS`` per class and volume, evenly spaced
   in raster order like ``ClassesToIndicesd``);
2. :class:`DeviceSlabLoader` draws, per step, ``batch_size`` slabs: the volume order of an epoch is a permutation
   (each volume ``samples_per_volume`` times, as today), a class per slab by the ratios of
   :func:`transforms.class_ratios` (absent classes get 0, as MONAI does), a centre slice among that class' voxels,
   the k neighbouring slices gathered with edge replication (the rule of :func:`transforms.stack_slices`); then
   :class:`transforms.device_augment.BatchRotateFlip` augments the whole batch;
3. :func:`build_device_train_loader` is the factory the bundles (and ``pipelines.train_report``) call;
   :func:`resolve_data_path` picks the path for the ``data_path`` knob.

Differences from the loader path, by design: the crop centre is drawn over the unpadded volume (the loader path pads
k // 2 replicated slices first, which gives the edge slices a slightly larger weight); the random streams differ
(one ``torch.Generator`` here, numpy's in MONAI); whole slices only (2.5D bundles train on full slices). 3D training
(``spatial_dims=3``) keeps the loader path.

DDP: rank r caches only the volumes ``datalist[r::world_size]`` on its own device and every rank runs
``ceil(ceil(n / world_size) / volumes_per_batch)`` steps per epoch, the count of today's ``DistributedSampler``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from monai.transforms import Compose, ResizeWithPadOrCropd

from transforms.device_augment import BatchRotateFlip
from transforms.device_loader import (
    DeviceBatchLoader,
    as_plain,
    deterministic_head,
    resolve_device,
    resolve_rank,
    shard,
)
from transforms.pipeline import build_transforms
from transforms.sampling import MAX_INDICES_PER_CLASS, class_ratios
from transforms.stack import check_num_slices

__all__ = [
    "DATA_PATHS",
    "IMAGE_DTYPES",
    "resolve_data_path",
    "class_slice_indices",
    "VolumeCache",
    "cache_volumes",
    "DeviceSlabLoader",
    "build_device_train_loader",
]

logger = logging.getLogger(__name__)

#: values of the bundles' ``data_path`` knob
DATA_PATHS: tuple[str, ...] = ("auto", "loader", "device")
#: cached image dtypes: float16 (about 3 significant digits on [0, 1]), uint8 (256 levels over the output range)
IMAGE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "uint8": torch.uint8, "float32": torch.float32}


def resolve_data_path(
    data_path: str, spatial_dims: int, device: str | torch.device | None, cache_rate: float = 1.0
) -> str:
    """The training data path a run uses: ``"loader"`` (CacheDataset + DataLoader) or ``"device"`` (this module).

    Args:
        data_path: ``"auto"`` (the device path for 2.5D when the whole training set is cached, ``cache_rate`` 1, on
            CUDA and on CPU alike: measured 33x the student's step on 2 CPU cores against 1.1x for the DataLoader;
            else the loader), ``"loader"`` or ``"device"``.
        spatial_dims: 2 (2.5D) or 3 (3D; the device path is 2.5D only).
        device: the training device (checked: CUDA must be available when named).
        cache_rate: the bundles' ``cache_rate`` (below 1 the user asked not to hold every volume: ``auto`` keeps the
            loader).

    Returns:
        ``"loader"`` or ``"device"``.

    Raises:
        ValueError: an unknown ``data_path`` (valid: :data:`DATA_PATHS`), or ``"device"`` with ``spatial_dims=3``.
    """
    if data_path not in DATA_PATHS:
        raise ValueError(f"data_path must be one of {DATA_PATHS}, got {data_path!r}")
    if data_path == "auto":
        resolve_device(device)
        return "device" if int(spatial_dims) == 2 and float(cache_rate) >= 1.0 else "loader"
    if data_path == "device" and int(spatial_dims) != 2:
        raise ValueError("data_path 'device' samples 2.5D slabs (spatial_dims 2); 3D patches use data_path 'loader'")
    return data_path


def class_slice_indices(
    label: torch.Tensor, num_classes: int, max_per_class: int | None = MAX_INDICES_PER_CLASS
) -> list[torch.Tensor]:
    """Slice index of every voxel of each class of a (D, H, W) label, subsampled like ``ClassesToIndicesd``.

    The voxels of class c, in raster order of (D, H, W), are subsampled to ``max_per_class`` evenly spaced ones
    (``round(linspace(0, n - 1, max_per_class))``, MONAI's rule) and each is replaced by its slice index; a uniform
    draw from the list picks a slice with probability proportional to its number of class-c voxels.

    Args:
        label: (D, H, W) integer-valued tensor.
        num_classes: classes 0 .. num_classes - 1 (other values are ignored).
        max_per_class: cap per class (None: every voxel).

    Returns:
        ``num_classes`` 1-D long tensors on the label's device (empty for an absent class).
    """
    depth = label.shape[0]
    counts = torch.stack([(label == c).reshape(depth, -1).sum(1) for c in range(num_classes)])  # (C, D)
    cum = counts.cumsum(1)
    out = []
    for c in range(num_classes):
        n = int(cum[c, -1]) if depth else 0
        if n == 0:
            out.append(torch.zeros(0, dtype=torch.long, device=label.device))
            continue
        if max_per_class is not None and n > int(max_per_class) and n > 1:
            voxel = (
                torch.linspace(0, n - 1, int(max_per_class), dtype=torch.float64, device=label.device).round().long()
            )
        else:
            voxel = torch.arange(n, device=label.device)
        out.append(torch.searchsorted(cum[c], voxel, right=True))
    return out


class _LazyNames:
    """The file names of a batch's volume ids, resolved (one device-to-host copy) only when asked for."""

    def __init__(self, names: Sequence[str], item_ids: torch.Tensor) -> None:
        self.names, self.item_ids = names, item_ids

    def __iter__(self) -> Iterator[str]:
        return iter([self.names[i] for i in dict.fromkeys(self.item_ids.tolist())])


@dataclass
class VolumeCache:
    """Preprocessed volumes stacked along the slice axis, on one device.

    Attributes:
        images: (sum D, H, W) image slices (dtype of :data:`IMAGE_DTYPES`).
        labels: (sum D, H, W) uint8 label slices.
        starts: (n,) long: first row of each volume.
        depths: (n,) long: slices per volume.
        class_slices: 1-D long: volume-local slice indices, per volume and class (see :func:`class_slice_indices`).
        class_offsets: (n, C) long: where each (volume, class) list starts in ``class_slices``.
        class_counts: (n, C) long: its length (0: class absent).
        output_range: the window's output range, used to decode uint8 images.
        names: the image file of each volume.
    """

    images: torch.Tensor
    labels: torch.Tensor
    starts: torch.Tensor
    depths: torch.Tensor
    class_slices: torch.Tensor
    class_offsets: torch.Tensor
    class_counts: torch.Tensor
    output_range: tuple[float, float]
    names: list[str]

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    @property
    def num_classes(self) -> int:
        """Label classes indexed."""
        return int(self.class_counts.shape[1])

    def nbytes(self) -> int:
        """Device memory held by the cache."""
        tensors = (self.images, self.labels, self.class_slices, self.class_offsets, self.class_counts)
        return sum(t.numel() * t.element_size() for t in tensors)

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 image slices at ``rows`` (any shape of row indices; result shape ``rows.shape + (H, W)``)."""
        x = self.images[rows]
        if x.dtype == torch.uint8:
            lo, hi = self.output_range
            return x.float() * ((hi - lo) / 255.0) + lo
        return x.float()


def _prepare(
    item: Mapping[str, Any],
    head: Compose,
    image_dtype: torch.dtype,
    output_range: tuple[float, float],
    num_classes: int,
    max_per_class: int | None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], str]:
    """One datalist item -> compact (D, H, W) image and label on the CPU, and its class slice lists."""
    d = head(dict(item))
    image, label = as_plain(d["image"]), as_plain(d["label"])
    name = str(item.get("image", "?"))
    if image.ndim != 4 or image.shape[0] != 1 or label.shape != image.shape:
        raise ValueError(
            f"{name}: expected (1, H, W, D) image and label after preprocessing, got {tuple(image.shape)} and {tuple(label.shape)}"
        )
    label = label[0].permute(2, 0, 1)
    if label.is_floating_point() and not torch.equal(label, label.round()):
        raise ValueError(f"{name}: the label holds non-integer values; labels are class indices")
    if label.numel() and (label.min() < 0 or label.max() > 255):
        raise ValueError(
            f"{name}: label values must be within [0, 255] to be cached as uint8, got {float(label.min())}..{float(label.max())}"
        )
    label = label.to(torch.uint8).contiguous()
    image = image[0].permute(2, 0, 1)
    if image_dtype == torch.uint8:
        lo, hi = output_range
        image = ((image.float() - lo) * (255.0 / (hi - lo))).round().clamp(0, 255)
    image = image.to(image_dtype).contiguous()
    return image, label, class_slice_indices(label, num_classes, max_per_class), name


def cache_volumes(
    datalist: Sequence[Mapping[str, Any]],
    preprocessing: Mapping[str, Any],
    *,
    device: str | torch.device | None = None,
    image_dtype: str = "float16",
    num_classes: int = 3,
    max_per_class: int | None = MAX_INDICES_PER_CLASS,
    num_workers: int = 0,
    load_context: Callable[[Mapping[str, Any]], contextlib.AbstractContextManager[Any]] | None = None,
) -> VolumeCache:
    """Preprocess every volume once and cache it on ``device`` (see the module docstring).

    Args:
        datalist: ``[{"image": path, "label": path}, ...]``.
        preprocessing: keyword arguments of :func:`transforms.build_transforms` (the bundles' ``preprocessing``
            section); only the deterministic ``val`` part is used. ``roi_size`` is ignored for 2.5D (whole slices).
        device: target device (None: CUDA when available, else CPU).
        image_dtype: ``"float16"`` (default), ``"uint8"`` or ``"float32"``.
        num_classes: label classes to index.
        max_per_class: cap of indexed voxels per class and volume (None: all).
        num_workers: threads loading and preprocessing volumes (0: in this thread).
        load_context: called with each item, a context manager the item is read and preprocessed in (the bundles
            pass ``pipelines.engine.reading_case``: an unreadable case becomes one error naming the file).

    Returns:
        :class:`VolumeCache`.

    Raises:
        ValueError: empty datalist, unknown ``image_dtype``, 3D preprocessing, volumes of different in-plane sizes
            (set ``in_plane_size``), non-integer or out-of-range labels.
    """
    if len(datalist) == 0:
        raise ValueError("datalist is empty: nothing to cache (check the splits file)")
    if image_dtype not in IMAGE_DTYPES:
        raise ValueError(f"image_dtype must be one of {sorted(IMAGE_DTYPES)}, got {image_dtype!r}")
    if int(preprocessing.get("spatial_dims", 2)) != 2:
        raise ValueError("the device path caches 2.5D training volumes (spatial_dims 2); 3D uses the loader path")
    if int(num_workers) < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    pre = dict(preprocessing)
    pre.pop("roi_size", None)
    head = deterministic_head(build_transforms("val", **pre))
    if pre.get("in_plane_mode") == "pad" and pre.get("in_plane_size"):
        # a plan pads to the network input but keeps larger fields of view: one size to batch (centre crop)
        size = [int(pre["in_plane_size"][0]), int(pre["in_plane_size"][1]), -1]
        head = Compose([head, ResizeWithPadOrCropd(keys=["image", "label"], spatial_size=size)])
    out_range = tuple(float(v) for v in pre.get("output_range", (0.0, 1.0)))
    dev = resolve_device(device)
    dtype = IMAGE_DTYPES[image_dtype]
    t0 = time.perf_counter()

    def prepare(item):
        with load_context(item) if load_context is not None else contextlib.nullcontext():
            return _prepare(item, head, dtype, out_range, int(num_classes), max_per_class)

    if int(num_workers) > 1:
        with ThreadPoolExecutor(max_workers=int(num_workers)) as pool:
            prepared = list(pool.map(prepare, datalist))
    else:
        prepared = [prepare(item) for item in datalist]
    shapes = {tuple(p[0].shape[1:]) for p in prepared}
    if len(shapes) > 1:
        raise ValueError(
            f"volumes have different in-plane sizes {sorted(shapes)}; set in_plane_size to batch their slices"
        )
    depths = torch.tensor([p[0].shape[0] for p in prepared], dtype=torch.long)
    starts = torch.cumsum(depths, 0) - depths
    images = torch.empty((int(depths.sum()), *shapes.pop()), dtype=dtype, device=dev)
    labels = torch.empty(images.shape, dtype=torch.uint8, device=dev)
    lists, names = [], []
    for i in range(len(prepared)):
        image, label, cls, name = prepared[i]
        prepared[i] = None  # free the host copy as soon as it is on the device
        s, e = int(starts[i]), int(starts[i] + depths[i])
        images[s:e].copy_(image)
        labels[s:e].copy_(label)
        lists.append(cls)
        names.append(name)
    counts = torch.tensor([[len(c) for c in cls] for cls in lists], dtype=torch.long)
    offsets = (torch.cumsum(counts.flatten(), 0) - counts.flatten()).view_as(counts)
    flat = torch.cat([c for cls in lists for c in cls]) if int(counts.sum()) else torch.zeros(0, dtype=torch.long)
    cache = VolumeCache(
        images=images,
        labels=labels,
        starts=starts.to(dev),
        depths=depths.to(dev),
        class_slices=flat.to(dev),
        class_offsets=offsets.to(dev),
        class_counts=counts.to(dev),
        output_range=(out_range[0], out_range[1]),
        names=names,
    )
    logger.info(
        "cached %d volumes (%d slices of %s, %s) on %s: %.1f MB in %.1f s",
        len(cache), images.shape[0], tuple(images.shape[1:]), image_dtype, dev, cache.nbytes() / 1e6, time.perf_counter() - t0,
    )  # fmt: skip
    return cache


class DeviceSlabLoader(DeviceBatchLoader):
    """Batches of augmented 2.5D slabs drawn from a :class:`VolumeCache`; an iterable MONAI's trainer consumes.

    Yields ``{"image": (B, k, H, W) float32, "label": (B, 1, H, W) float32}`` on the cache's device (channel i =
    slice ``clamp(z - k // 2 + i, 0, D - 1)`` of centre slice z; label = slice z). An epoch visits
    ``volumes_per_epoch`` volumes (successive permutations), each ``samples_per_volume`` times, in batches of
    ``volumes_per_batch`` volumes (``batch_size // samples_per_volume``, at least 1, as
    ``pipelines.engine.volumes_per_batch``).

    Args:
        cache: the cached volumes (this rank's shard).
        batch_size: slabs per step (rounded down to a multiple of ``samples_per_volume``).
        samples_per_volume: slabs per volume visit.
        num_slices: k in (1, 3, 5, 7).
        tumor_share: share of slabs centred on tumor (class 2).
        organ_share: share centred on the organ (class 1); the rest on background.
        augmentation: batched augmentation (None: none).
        volumes_per_epoch: volumes visited per epoch (None: the cache's size).
        epoch_length: steps per epoch (None: from ``volumes_per_epoch``).
        seed: run seed.
        rank: DDP rank (part of the seed).

    Raises:
        ValueError: bad k, counts or shares, or a volume without any voxel of the indexed classes.
    """

    def __init__(
        self,
        cache: VolumeCache,
        *,
        batch_size: int,
        samples_per_volume: int,
        num_slices: int = 3,
        tumor_share: float = 0.5,
        organ_share: float = 0.25,
        augmentation: BatchRotateFlip | None = None,
        volumes_per_epoch: int | None = None,
        epoch_length: int | None = None,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        if int(batch_size) < 1 or int(samples_per_volume) < 1:
            raise ValueError(
                f"batch_size and samples_per_volume must be >= 1, got {batch_size} and {samples_per_volume}"
            )
        self.k = check_num_slices(num_slices)
        self.samples_per_volume = int(samples_per_volume)
        super().__init__(
            len(cache),
            len(cache) if volumes_per_epoch is None else int(volumes_per_epoch),
            max(1, int(batch_size) // self.samples_per_volume),
            epoch_length=epoch_length,
            seed=seed,
            rank=rank,
            device=cache.images.device,
        )
        self.cache = cache
        self.augmentation = augmentation
        ratios = torch.tensor(class_ratios(tumor_share, organ_share, max(3, cache.num_classes)), dtype=torch.float64)
        ratios = ratios[: cache.num_classes].to(self.device)
        present = (cache.class_counts > 0).to(torch.float64)
        if bool((present.sum(1) == 0).any()):
            bad = [cache.names[i] for i in (present.sum(1) == 0).nonzero().flatten().tolist()]
            raise ValueError(f"no voxel of the classes 0..{cache.num_classes - 1} in the labels of {bad}")
        probs = ratios * present
        empty = probs.sum(1) == 0  # every wanted class absent: fall back to the present classes, uniformly
        if bool(empty.any()):
            logger.warning(
                "%d volume(s) hold none of the classes sampled with a positive share; their slabs are centred on any class present",
                int(empty.sum()),
            )
            probs[empty] = present[empty]
        self.class_probs = (probs / probs.sum(1, keepdim=True)).float()
        self.offsets = torch.arange(self.k, device=self.device) - self.k // 2

    def sample(
        self, volume_ids: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw one slab per entry of ``volume_ids`` (before augmentation).

        Args:
            volume_ids: (B,) long volume indices on the device.
            generator: the epoch's generator.

        Returns:
            ``(image (B, k, H, W) float32, label (B, 1, H, W) float32, centre slices (B,) long)``.
        """
        c = self.cache
        cls = torch.multinomial(self.class_probs[volume_ids], 1, generator=generator).squeeze(1)
        count = c.class_counts[volume_ids, cls]
        u = torch.rand(volume_ids.shape[0], generator=generator, device=self.device, dtype=torch.float64)
        pick = torch.minimum((u * count).long(), count - 1)
        z = c.class_slices[c.class_offsets[volume_ids, cls] + pick]
        depth = c.depths[volume_ids]
        zz = torch.minimum((z[:, None] + self.offsets).clamp_min(0), depth[:, None] - 1)
        start = c.starts[volume_ids]
        image = c.decode(start[:, None] + zz)
        label = c.labels[start + z][:, None].float()
        return image, label, z

    def make_batch(self, item_ids: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Slabs of the batch's volumes (each ``samples_per_volume`` times), augmented."""
        image, label, _ = self.sample(item_ids.repeat_interleave(self.samples_per_volume), generator)
        if self.augmentation is not None:
            image, label = self.augmentation(image, label, generator)
        batch: dict[str, Any] = {"image": image, "label": label}
        names = getattr(self, "names", None)
        if names:  # the source files of the batch (read only when a training step fails: one list, no device sync)
            batch["cases"] = _LazyNames(names, item_ids)
        return batch


def build_device_train_loader(
    datalist: Sequence[Mapping[str, Any]],
    preprocessing: Mapping[str, Any],
    *,
    batch_size: int,
    samples_per_volume: int,
    tumor_share: float = 0.5,
    organ_share: float = 0.25,
    num_slices: int | None = None,
    epoch_length: int | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    rotate_degrees: float = 15.0,
    rotate_prob: float = 0.5,
    flip_prob: float = 0.5,
    image_dtype: str = "float16",
    num_classes: int = 3,
    num_workers: int = 0,
    load_context: Callable[[Mapping[str, Any]], contextlib.AbstractContextManager[Any]] | None = None,
) -> DeviceSlabLoader:
    """The device-resident 2.5D training loader (replaces ``train_loader`` of the bundles for ``data_path: device``).

    Same knobs and same steps per epoch as today's ``train_loader`` (``CacheDataset`` of
    ``build_transforms('train', num_samples=samples_per_volume, tumor_share=..., **preprocessing)`` in a
    ``DataLoader`` of ``volumes_per_batch(batch_size, samples_per_volume)`` volumes, or with a ``DistributedSampler``).
    Every training volume of this rank is cached (the bundles' ``cache_rate`` does not apply): 3 bytes per voxel with
    float16 images (2 with uint8), against 8 for the ``CacheDataset``'s float32 image and label; the volumes are
    staged in host memory once while the cache is filled.

    Args:
        datalist: training items ``{"image", "label"}`` of ALL ranks (this rank caches its shard).
        preprocessing: the bundles' ``preprocessing`` section (``build_transforms`` keyword arguments).
        batch_size: slabs per step.
        samples_per_volume: slabs per volume visit (per epoch).
        tumor_share: share of tumor-centred slabs.
        organ_share: share of organ-centred slabs (``build_transforms``' default 0.25).
        num_slices: k (None: ``preprocessing["num_slices"]``, default 3).
        epoch_length: steps per epoch (None: as the loader path).
        device: where the cache lives and batches are built (None: CUDA when available, else CPU).
        seed: run seed (crops and augmentation depend only on it, the rank and the epoch).
        rank: DDP rank (None: the process group's, or 0).
        world_size: DDP world size (None: the process group's, or 1).
        rotate_degrees: max rotation (HLFD: 15).
        rotate_prob: rotation probability.
        flip_prob: flip probability per in-plane axis.
        image_dtype: cached image dtype (``"float16"``, ``"uint8"``, ``"float32"``).
        num_classes: label classes.
        num_workers: threads preprocessing volumes while caching.
        load_context: see :func:`cache_volumes`.

    Returns:
        :class:`DeviceSlabLoader` (iterable with ``len``; ``attach(trainer)`` ties its seeds to the trainer's epochs).

    Raises:
        ValueError: 3D preprocessing, ``num_slices`` differing from ``preprocessing["num_slices"]``, fewer volumes
            than ranks, and the errors of :func:`cache_volumes` / :class:`DeviceSlabLoader`.
    """
    pre_k = preprocessing.get("num_slices")
    if num_slices is not None and pre_k is not None and int(num_slices) != int(pre_k):
        raise ValueError(f"num_slices {num_slices} differs from preprocessing num_slices {pre_k}")
    k = check_num_slices(num_slices if num_slices is not None else (pre_k if pre_k is not None else 3))
    rank, world_size = resolve_rank(rank, world_size)
    local, per_epoch = shard(list(datalist), rank, world_size)
    cache = cache_volumes(
        local,
        dict(preprocessing, num_slices=k),
        device=device,
        image_dtype=image_dtype,
        num_classes=num_classes,
        num_workers=num_workers,
        load_context=load_context,
    )
    loader = DeviceSlabLoader(
        cache,
        batch_size=batch_size,
        samples_per_volume=samples_per_volume,
        num_slices=k,
        tumor_share=tumor_share,
        organ_share=organ_share,
        augmentation=BatchRotateFlip(rotate_degrees, rotate_prob, flip_prob),
        volumes_per_epoch=per_epoch,
        epoch_length=epoch_length,
        seed=seed,
        rank=rank,
    )
    loader.names = [str(item.get("image", "")) for item in local]  # the batch's "cases": a NaN loss names them
    return loader
