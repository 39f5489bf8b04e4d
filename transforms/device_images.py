"""Device-resident training path for 2D image datasets (the polyp bundle): every image and mask preprocessed once and
kept as one tensor on the device; batches are shuffled index gathers (no DataLoader, no workers).

The polyp training pipeline (``pipelines.engine.polyp_transforms('train', size)``: load, binarise the mask, scale,
ImageNet-normalise, resize to ``size``) is fully deterministic, so its output is what is cached; the multi-scale
training resize of ``MultiScaleIteration`` then runs batched on the device where the batch already lives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from monai.transforms import Compose

from transforms.device_loader import (
    DeviceBatchLoader,
    as_plain,
    deterministic_head,
    resolve_device,
    resolve_rank,
    shard,
)

__all__ = ["IMAGE_CACHE_DTYPES", "cache_images", "DeviceImageLoader", "build_device_image_loader"]

logger = logging.getLogger(__name__)

#: cached image dtypes (normalised images are not in [0, 1]: no uint8)
IMAGE_CACHE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "float32": torch.float32}


def cache_images(
    datalist: Sequence[Mapping[str, Any]],
    transform: Compose,
    *,
    device: str | torch.device | None = None,
    image_dtype: str = "float16",
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a deterministic 2D pipeline on every item once and stack the results on ``device``.

    Args:
        datalist: ``[{"image": path, "label": path}, ...]``.
        transform: pipeline producing ``image`` (C, H, W) and ``label`` (1, H, W) of one size for every item; it must
            hold no random transform (those are not batched here).
        device: target device (None: CUDA when available, else CPU).
        image_dtype: ``"float16"`` (default) or ``"float32"``.
        num_workers: threads running the pipeline (0: in this thread).

    Returns:
        ``(images (N, C, H, W) image_dtype, labels (N, 1, H, W) uint8)`` on ``device``.

    Raises:
        ValueError: empty datalist, unknown dtype, a random transform in ``transform``, items of different shapes, or
            labels that are not integers in [0, 255].
    """
    if len(datalist) == 0:
        raise ValueError("datalist is empty: nothing to cache (check the splits file)")
    if image_dtype not in IMAGE_CACHE_DTYPES:
        raise ValueError(f"image_dtype must be one of {sorted(IMAGE_CACHE_DTYPES)}, got {image_dtype!r}")
    head = deterministic_head(transform)
    if len(head.transforms) != len(transform.transforms):
        rest = transform.transforms[len(head.transforms)]
        raise ValueError(f"the pipeline must be deterministic to be cached whole; it has {type(rest).__name__}")
    dtype = IMAGE_CACHE_DTYPES[image_dtype]
    dev = resolve_device(device)
    t0 = time.perf_counter()

    def prepare(item: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        d = head(dict(item))
        image, label = as_plain(d["image"]), as_plain(d["label"])
        if image.ndim != 3 or label.ndim != 3 or label.shape[0] != 1 or label.shape[1:] != image.shape[1:]:
            raise ValueError(
                f"{item.get('image', '?')}: expected image (C, H, W) and label (1, H, W), got {tuple(image.shape)} and {tuple(label.shape)}"
            )
        if not torch.equal(label, label.round()) or label.min() < 0 or label.max() > 255:
            raise ValueError(f"{item.get('image', '?')}: labels must be integers in [0, 255] to be cached as uint8")
        return image.to(dtype), label.to(torch.uint8)

    if int(num_workers) > 1:
        with ThreadPoolExecutor(max_workers=int(num_workers)) as pool:
            prepared = list(pool.map(prepare, datalist))
    else:
        prepared = [prepare(item) for item in datalist]
    shapes = {(tuple(i.shape), tuple(m.shape)) for i, m in prepared}
    if len(shapes) > 1:
        raise ValueError(f"items have different shapes after preprocessing: {sorted(shapes)}")
    images = torch.empty((len(prepared), *prepared[0][0].shape), dtype=dtype, device=dev)
    labels = torch.empty((len(prepared), *prepared[0][1].shape), dtype=torch.uint8, device=dev)
    for i in range(len(prepared)):
        images[i].copy_(prepared[i][0])
        labels[i].copy_(prepared[i][1])
        prepared[i] = None  # free the host copy
    nbytes = images.numel() * images.element_size() + labels.numel()
    logger.info(
        "cached %d images %s (%s) on %s: %.1f MB in %.1f s",
        len(images), tuple(images.shape[1:]), image_dtype, dev, nbytes / 1e6, time.perf_counter() - t0,
    )  # fmt: skip
    return images, labels


class DeviceImageLoader(DeviceBatchLoader):
    """Shuffled batches ``{"image": (B, C, H, W) float32, "label": (B, 1, H, W) float32}`` of cached images.

    An epoch visits ``items_per_epoch`` images (successive permutations) in batches of ``batch_size``, the last one
    smaller, as a shuffling ``DataLoader`` without ``drop_last``.

    Args:
        images: (N, C, H, W) cached images.
        labels: (N, 1, H, W) cached masks.
        batch_size: images per step.
        items_per_epoch: images visited per epoch (None: N).
        epoch_length: steps per epoch (None: from ``items_per_epoch``).
        seed: run seed.
        rank: DDP rank (part of the seed).

    Raises:
        ValueError: mismatched images and labels, or bad counts.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        items_per_epoch: int | None = None,
        epoch_length: int | None = None,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        if images.shape[0] != labels.shape[0] or images.device != labels.device:
            raise ValueError(
                f"images {tuple(images.shape)} on {images.device} and labels {tuple(labels.shape)} on {labels.device} do not match"
            )
        n = int(images.shape[0])
        super().__init__(
            n,
            n if items_per_epoch is None else int(items_per_epoch),
            int(batch_size),
            epoch_length=epoch_length,
            seed=seed,
            rank=rank,
            device=images.device,
        )
        self.images, self.labels = images, labels

    def make_batch(self, item_ids: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Gather the batch's images and masks as float32."""
        return {"image": self.images[item_ids].float(), "label": self.labels[item_ids].float()}


def build_device_image_loader(
    datalist: Sequence[Mapping[str, Any]],
    transform: Compose,
    *,
    batch_size: int,
    epoch_length: int | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    image_dtype: str = "float16",
    num_workers: int = 0,
) -> DeviceImageLoader:
    """The polyp bundle's device-resident ``train_loader``: same batches per epoch as its ``DataLoader``
    (``batch_size`` images, shuffled; with DDP, rank r caches ``datalist[r::world_size]`` and runs
    ``ceil(ceil(N / world_size) / batch_size)`` steps, as ``DistributedSampler(even_divisible=True)``).

    Args:
        datalist: training items of ALL ranks.
        transform: the deterministic training pipeline (``pipelines.engine.polyp_transforms('train', size)``).
        batch_size: images per step.
        epoch_length: steps per epoch (None: as the DataLoader).
        device: where images live and batches are built (None: CUDA when available, else CPU).
        seed: run seed.
        rank: DDP rank (None: the process group's, or 0).
        world_size: DDP world size (None: the process group's, or 1).
        image_dtype: ``"float16"`` or ``"float32"``.
        num_workers: threads preprocessing images while caching.

    Returns:
        :class:`DeviceImageLoader`.

    Raises:
        ValueError: see :func:`cache_images` and :func:`transforms.device_loader.shard`.
    """
    rank, world_size = resolve_rank(rank, world_size)
    local, per_epoch = shard(list(datalist), rank, world_size)
    images, labels = cache_images(local, transform, device=device, image_dtype=image_dtype, num_workers=num_workers)
    return DeviceImageLoader(
        images,
        labels,
        batch_size=batch_size,
        items_per_epoch=per_epoch,
        epoch_length=epoch_length,
        seed=seed,
        rank=rank,
    )
