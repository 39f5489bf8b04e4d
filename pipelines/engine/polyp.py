"""Polyp segmentation data and training pieces for the ``transfuse_polyp`` bundle (TransFuse, MICCAI 2021).

The paper (Sec. 3.1): train on Kvasir-SEG and CVC-ClinicDB, images resized to 352x352, no augmentation except
multi-scale training {0.75, 1, 1.25}, Adam lr 1e-4, 30 epochs, batch 16, deep supervision 0.5 / 0.3 / 0.2; evaluation
by per-image mean Dice and mean IoU. Masks are JPEG: foreground is ``mask > 127``.

- :func:`find_pairs` / :func:`write_polyp_splits`: image/mask pairs and a deterministic split (test shares of the
  paper: 100 of 1000 Kvasir images, 62 of 612 ClinicDB images).
- :func:`polyp_transforms`: MONAI pipelines for train / val / infer.
- :class:`MultiScaleIteration`: the ``iteration_update`` of a MONAI ``SupervisedTrainer`` doing one optimiser step
  per scale, as the official TransFuse/PraNet training loop.
- :class:`WriteMaskd`: PNG masks at the input's size, written atomically.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Resized,
    ScaleIntensityRanged,
)

from pipelines.engine.atomic import atomic_write, atomic_write_text
from pipelines.engine.errors import BundleInputError

__all__ = [
    "POLYP_DATASETS",
    "TEST_SHARES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "find_pairs",
    "write_polyp_splits",
    "BinarizeMaskd",
    "LoadPolypd",
    "CheckPolypPaird",
    "polyp_transforms",
    "MultiScaleIteration",
    "WriteMaskd",
    "multiscale_size",
    "discover_images",
    "MasksCsvWriter",
]

logger = logging.getLogger(__name__)

POLYP_DATASETS = ("Kvasir-SEG", "CVC-ClinicDB")
#: test share per dataset in the paper's split (PraNet): 100/1000 Kvasir, 62/612 ClinicDB
TEST_SHARES = {"Kvasir-SEG": 100 / 1000, "CVC-ClinicDB": 62 / 612}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


def find_pairs(root: str | os.PathLike, datasets: Sequence[str] = POLYP_DATASETS) -> dict[str, list[dict[str, str]]]:
    """Image/mask pairs per dataset: ``<root>/<dataset>/images/X`` with ``<root>/<dataset>/masks/X``.

    Args:
        root: folder holding the dataset folders (or one dataset folder with ``images/`` and ``masks/``).
        datasets: dataset folder names to use (those present).

    Returns:
        ``{dataset: [{"image", "label"}, ...]}`` sorted by file name.

    Raises:
        ValueError: no pairs found (the message says which layout is expected), or an image without its mask.
    """
    root = Path(root)
    if (root / "images").is_dir():
        folders = {root.name: root}
    else:
        folders = {d: root / d for d in datasets if (root / d / "images").is_dir()}
    if not folders:
        raise ValueError(
            f"no polyp data in {root}: expected <root>/<dataset>/images/*.jpg and masks/*.jpg "
            f"(datasets {', '.join(datasets)})."
        )
    out: dict[str, list[dict[str, str]]] = {}
    for name, folder in folders.items():
        pairs = []
        for img in sorted((folder / "images").iterdir()):
            if img.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            mask = folder / "masks" / img.name
            if not mask.is_file():
                raise ValueError(f"image {img} has no mask {mask}.")
            pairs.append({"image": str(img), "label": str(mask)})
        if pairs:
            out[name] = pairs
    if not out:
        raise ValueError(f"no image/mask pairs found under {root}.")
    return out


def write_polyp_splits(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    limit: int | None = None,
    datasets: Sequence[str] = POLYP_DATASETS,
) -> str:
    """Write a deterministic ``{"training", "validation", "test", "meta"}`` split of the polyp pairs (atomically).

    Per dataset: shuffle (seed), hold out the paper's test share, then ``val_fraction`` of the rest.

    Args:
        root: see :func:`find_pairs`.
        out: destination JSON.
        val_fraction: validation share of the non-test images, in [0, 1).
        seed: shuffling seed.
        limit: keep at most this many pairs per dataset (quick runs and tests), None for all.
        datasets: dataset folder names.

    Returns:
        the written path.

    Raises:
        ValueError: bad ``val_fraction`` or ``limit``; see :func:`find_pairs`.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be within [0, 1), got {val_fraction}.")
    if limit is not None and int(limit) < 3:
        raise ValueError(f"limit must be >= 3 (one image per split) or None, got {limit}.")
    rng = np.random.default_rng(int(seed))
    split: dict[str, Any] = {"training": [], "validation": [], "test": []}
    counts = {}
    for name, pairs in find_pairs(root, datasets).items():
        order = [pairs[i] for i in rng.permutation(len(pairs))]
        if limit is not None:
            order = order[: int(limit)]
        n = len(order)
        n_test = max(1, int(round(n * TEST_SHARES.get(name, 0.1)))) if n >= 3 else 0
        n_val = max(1, int(round((n - n_test) * float(val_fraction)))) if val_fraction > 0 and n - n_test >= 2 else 0
        test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
        split["test"] += test
        split["validation"] += val
        split["training"] += train
        counts[name] = {"training": len(train), "validation": len(val), "test": len(test)}
    split["meta"] = {"created_by": "pipelines.engine.polyp", "seed": int(seed), "val_fraction": val_fraction, "limit": limit, "counts": counts}
    out = atomic_write_text(out, json.dumps(split, indent=1))  # the temp file is removed if the write fails
    return str(out)


def _source(value: Any) -> str:
    meta = getattr(value, "meta", None) or {}
    return str(meta.get("filename_or_obj", value if isinstance(value, (str, os.PathLike)) else "?"))


class LoadPolypd(LoadImaged):
    """``LoadImaged`` whose failure (a truncated or corrupt JPEG/PNG) is one line naming the file."""

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        try:
            return super().__call__(data, reader)
        except Exception as err:  # noqa: BLE001 - any reader failure: name the file, keep the reason
            names = [str(data.get(k)) for k in self.keys if k in data]
            raise BundleInputError(
                f"cannot read {' / '.join(names)} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                "re-export or remove the image"
            ) from err


class CheckPolypPaird(MapTransform):
    """Polyp image/mask sanity, after ``EnsureChannelFirstd``: a grayscale image becomes 3 identical channels (RGBA
    drops alpha); a mask whose size differs from its image's is an error naming both (never resized silently).

    Args:
        image_key: the image key.
        label_key: the mask key (absent at inference).
    """

    def __init__(self, image_key: str = "image", label_key: str = "label") -> None:
        super().__init__([image_key], allow_missing_keys=True)
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        channels = int(image.shape[0])
        if channels == 1:
            d[self.image_key] = image.repeat(3, *([1] * (image.ndim - 1)))
        elif channels == 4:
            d[self.image_key] = image[:3]
        elif channels != 3:
            raise BundleInputError(f"{_source(image)} has {channels} channels; polyp images are RGB (3) or grayscale (1).")
        label = d.get(self.label_key)
        if label is not None and tuple(label.shape[1:]) != tuple(image.shape[1:]):
            raise BundleInputError(
                f"mask {_source(label)} is {tuple(label.shape[1:])} but its image {_source(image)} is "
                f"{tuple(image.shape[1:])}; a mask must have its image's size (it is never resized silently)"
            )
        return d


class BinarizeMaskd(MapTransform):
    """JPEG mask (C, H, W) in 0..255 -> (1, H, W) float ``{0, 1}`` with ``mean over channels > threshold``.

    Args:
        keys: mask keys.
        threshold: 127 (JPEG compression leaves values near 0 and 255).
    """

    def __init__(self, keys: str | Sequence[str] = "label", threshold: float = 127.0) -> None:
        super().__init__(keys)
        self.threshold = float(threshold)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for k in self.key_iterator(d):
            m = d[k]
            d[k] = (m.float().mean(dim=0, keepdim=True) > self.threshold).float()
        return d


def polyp_transforms(stage: str, size: int = 352, normalize: bool = True) -> Compose:
    """MONAI pipeline of the polyp bundle.

    - ``train``: image and mask resized to ``size`` (image bilinear, mask nearest); image scaled to [0, 1] and
      ImageNet-normalised (as the official code); mask binarised (> 127). No other augmentation (paper).
    - ``val``: the image is resized to ``size``; the mask stays at its original size, so predictions are inverted
      (``Invertd``) to the mask's size before the per-image metrics, as the official evaluation does.
    - ``infer``: image only, as ``val``.

    Args:
        stage: ``train``, ``val`` or ``infer``.
        size: network input size (divisible by 32 for multi-scale training).
        normalize: ImageNet mean/std normalisation.

    Returns:
        the Compose; images (3, size, size) float32, masks (1, H, W).

    Raises:
        ValueError: unknown stage or a size not divisible by 16.
    """
    if stage not in ("train", "val", "infer"):
        raise ValueError(f"stage must be train, val or infer, got {stage!r}.")
    if int(size) % 16:
        raise ValueError(f"size must be divisible by 16 (TransFuse patches), got {size}.")
    keys = ["image"] if stage == "infer" else ["image", "label"]
    ops: list = [LoadPolypd(keys=keys, image_only=True), EnsureChannelFirstd(keys=keys), CheckPolypPaird()]
    if stage != "infer":
        ops.append(BinarizeMaskd(keys="label"))
    ops.append(ScaleIntensityRanged(keys="image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True))
    if normalize:
        ops.append(NormalizeIntensityd(keys="image", subtrahend=IMAGENET_MEAN, divisor=IMAGENET_STD, channel_wise=True))
    ops.append(Resized(keys="image", spatial_size=(size, size), mode="bilinear"))
    if stage == "train":
        ops.append(Resized(keys="label", spatial_size=(size, size), mode="nearest"))
    ops.append(EnsureTyped(keys=keys, dtype=torch.float32))
    return Compose(ops)


def multiscale_size(base: int, rate: float, multiple: int = 32) -> int:
    """``round(base * rate / multiple) * multiple`` (the official TransFuse/PraNet rule): 352 -> 256, 352, 448."""
    return int(round(base * float(rate) / multiple) * multiple)


class MultiScaleIteration:
    """``iteration_update`` for a MONAI ``SupervisedTrainer``: one optimiser step per training scale.

    For each rate in ``rates`` the batch is resized to :func:`multiscale_size` (images bilinear with aligned
    corners, masks nearest), the network runs, the loss (deep-supervised structure loss) is back-propagated, the
    gradients are clipped (``grad_clip``, 0.5 in the official code; None disables) and the optimiser steps. AMP
    is used when the trainer has it (CUDA only).

    Args:
        rates: scales relative to the base size (TransFuse: 0.75, 1, 1.25).
        grad_clip: max absolute gradient value, or None.

    Returns (per call):
        ``{"image", "label", "pred", "loss"}`` of the last scale, ``loss`` the mean over scales.
    """

    def __init__(self, rates: Sequence[float] = (0.75, 1.0, 1.25), grad_clip: float | None = 0.5) -> None:
        if not rates or any(float(r) <= 0 for r in rates):
            raise ValueError(f"rates must be positive scales, got {rates!r}.")
        self.rates = tuple(float(r) for r in rates)
        self.grad_clip = None if grad_clip is None else float(grad_clip)

    def __call__(self, engine: Any, batchdata: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Run the scales on one batch (signature of MONAI's ``iteration_update``)."""
        images, labels = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)[:2]
        base = int(images.shape[-1])
        engine.network.train()
        losses = []
        pred: Any = None
        x, y = images, labels
        for rate in self.rates:
            size = multiscale_size(base, rate)
            if size != base:
                x = F.interpolate(torch.as_tensor(images), size=(size, size), mode="bilinear", align_corners=True)
                y = F.interpolate(torch.as_tensor(labels), size=(size, size), mode="nearest")
            else:
                x, y = images, labels
            engine.optimizer.zero_grad(set_to_none=True)
            if getattr(engine, "amp", False) and engine.scaler is not None:
                with torch.autocast("cuda", **getattr(engine, "amp_kwargs", {})):
                    pred = engine.inferer(x, engine.network)
                    loss = engine.loss_function(pred, y).mean()
                engine.scaler.scale(loss).backward()
                engine.scaler.unscale_(engine.optimizer)
                if self.grad_clip is not None:
                    torch.nn.utils.clip_grad_value_(engine.network.parameters(), self.grad_clip)
                engine.scaler.step(engine.optimizer)
                engine.scaler.update()
            else:
                pred = engine.inferer(x, engine.network)
                loss = engine.loss_function(pred, y).mean()
                loss.backward()
                if self.grad_clip is not None:
                    torch.nn.utils.clip_grad_value_(engine.network.parameters(), self.grad_clip)
                engine.optimizer.step()
            losses.append(loss.detach())
        return {"image": x, "label": y, "pred": pred, "loss": torch.stack(losses).mean()}


class WriteMaskd(MapTransform):
    """Write each predicted mask (1, H, W) probabilities at the input's size as an 8-bit PNG (0/255), atomically.

    Args:
        keys: prediction key.
        output_dir: destination folder; files are ``<image stem>.png``.
        threshold: probability threshold (0.5).
        image_key: key whose metadata names the input.
    """

    def __init__(self, keys: str | Sequence[str] = "pred", output_dir: str = ".", threshold: float = 0.5, image_key: str = "image") -> None:
        super().__init__(keys)
        self.output_dir, self.threshold, self.image_key = Path(output_dir), float(threshold), image_key
        self.rows: list[list[Any]] = []

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from PIL import Image

        d = dict(data)
        for k in self.key_iterator(d):
            meta = getattr(d.get(self.image_key), "meta", None) or getattr(d[k], "meta", {})
            src = Path(str(meta.get("filename_or_obj", "image")))
            arr = torch.as_tensor(d[k]).detach().cpu().numpy()[0] > self.threshold
            # MONAI's PIL reader puts width first: transpose back to (H, W)
            img = Image.fromarray((arr.T * 255).astype(np.uint8))
            target = self.output_dir / f"{src.stem}.png"
            if target.resolve() == src.resolve():
                raise ValueError(f"refusing to overwrite the input {src}.")
            atomic_write(target, lambda tmp, img=img: img.save(tmp, format="PNG"))
            self.rows.append([src.stem, float(arr.mean()), str(target)])
        return d


def discover_images(input_dir: str | os.PathLike, output_dir: str | os.PathLike) -> list[dict[str, str]]:
    """RGB images (jpg/png/tif/bmp) directly in ``input_dir``, refusing an output that would overwrite one.

    Raises:
        ValueError: missing folder, no image, or ``output_dir`` equal to ``input_dir`` with PNG inputs.
    """
    src, out = Path(input_dir), Path(output_dir)
    if not src.is_dir():
        raise ValueError(f"input_dir {src} is not a folder of images; pass --input_dir <folder>.")
    images = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"no image ({', '.join(_IMAGE_SUFFIXES)}) in {src}.")
    inputs = {p.resolve() for p in images}
    for p in images:
        target = (out / f"{p.stem}.png").resolve()
        if target in inputs:
            raise ValueError(f"writing {target} would overwrite the input {p}; choose another --output_dir.")
    return [{"image": str(p)} for p in images]


class MasksCsvWriter:
    """Write ``masks.csv`` (``case, foreground_fraction, output``) from a :class:`WriteMaskd` at COMPLETED."""

    def __init__(self, writer: WriteMaskd, path: str) -> None:
        self.writer, self.path = writer, path

    def attach(self, engine: Any) -> None:
        """Write on COMPLETED."""
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        """Write the rows recorded so far, sorted by case."""
        from pipelines.engine.metrics import write_csv_atomic

        write_csv_atomic(self.path, ("case", "foreground_fraction", "output"), sorted(self.writer.rows))
