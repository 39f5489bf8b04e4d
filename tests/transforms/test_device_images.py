"""The device-resident 2D image path (polyp bundle) on CPU tensors: cache, shuffled epochs, seeds, shards, the
multi-scale step consuming its batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Compose, EnsureTyped, RandFlipd, Resize, Resized

from transforms.device_images import DeviceImageLoader, build_device_image_loader, cache_images

N, S = 7, 16


def _items() -> list[dict]:
    """Image i is the constant i / 10 (3 channels, 20x24: resized to S x S); its mask marks a block of i rows."""
    items = []
    for i in range(N):
        mask = np.zeros((1, 20, 24), np.float32)
        mask[:, : 2 * i + 1] = 1.0
        items.append({"image": np.full((3, 20, 24), i / 10, np.float32), "label": mask})
    return items


PIPE = Compose(
    [
        EnsureTyped(keys=["image", "label"], dtype=torch.float32),
        Resized(keys="image", spatial_size=(S, S), mode="bilinear"),
        Resized(keys="label", spatial_size=(S, S), mode="nearest"),
    ]
)


def _ids(batch: dict) -> list[int]:
    return [round(v * 10) for v in batch["image"][:, 0, 0, 0].tolist()]


def test_cache_stacks_preprocessed_items_compactly():
    images, labels = cache_images(_items(), PIPE, device="cpu")
    assert images.shape == (N, 3, S, S) and images.dtype == torch.float16
    assert labels.shape == (N, 1, S, S) and labels.dtype == torch.uint8
    ref = Resize(spatial_size=(S, S), mode="nearest")(torch.as_tensor(_items()[3]["label"]))
    np.testing.assert_array_equal(labels[3].numpy(), np.asarray(ref))
    np.testing.assert_allclose(images[:, 0, 5, 5].float().numpy(), np.arange(N) / 10, atol=1e-3)


def test_epochs_shuffle_every_image_once_and_follow_the_seed():
    images, labels = cache_images(_items(), PIPE, device="cpu")
    loader = DeviceImageLoader(images, labels, batch_size=3, seed=5)
    assert len(loader) == 3
    epoch1 = list(loader)
    assert [b["image"].shape[0] for b in epoch1] == [3, 3, 1]
    assert all(b["image"].dtype == torch.float32 and b["label"].dtype == torch.float32 for b in epoch1)
    ids1 = sum((_ids(b) for b in epoch1), [])
    assert sorted(ids1) == list(range(N))
    for b in epoch1:  # each mask travels with its image
        for j, i in enumerate(_ids(b)):
            assert torch.equal(b["label"][j], labels[i].float())
    ids2 = sum((_ids(b) for b in loader), [])
    assert sorted(ids2) == list(range(N)) and ids2 != ids1
    same = DeviceImageLoader(images, labels, batch_size=3, seed=5)
    assert sum((_ids(b) for b in same), []) == ids1
    other = DeviceImageLoader(images, labels, batch_size=3, seed=6)
    assert sum((_ids(b) for b in other), []) != ids1


def test_ddp_shards_and_equal_step_counts():
    loaders = [
        build_device_image_loader(_items(), PIPE, batch_size=2, device="cpu", rank=r, world_size=3) for r in range(3)
    ]
    for r, loader in enumerate(loaders):
        ids = sum((_ids(b) for b in loader), [])
        assert len(loader) == 2 and len(ids) == 3  # ceil(7 / 3) = 3 images per rank and epoch
        assert set(ids) <= set(range(r, N, 3))


def test_random_pipelines_and_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="deterministic"):
        cache_images(_items(), Compose([PIPE, RandFlipd(keys="image", prob=0.5)]), device="cpu")
    with pytest.raises(ValueError, match="different shapes"):
        cache_images(
            _items()[:1] + [{"image": np.zeros((3, 5, 5), np.float32), "label": np.zeros((1, 5, 5), np.float32)}],
            Compose([EnsureTyped(keys=["image", "label"])]),
            device="cpu",
        )
    with pytest.raises(ValueError, match="float16"):
        cache_images(_items(), PIPE, device="cpu", image_dtype="uint8")
