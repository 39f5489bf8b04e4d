"""The device-resident 2D image path (polyp bundle) on CPU tensors: cache, shuffled epochs, seeds, shards, the
multi-scale step consuming its batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Compose, EnsureTyped, RandFlipd, Resize, Resized

from tests.transforms.wiring import wired_parser
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


# ---------------------------------------------------------------------- the polyp bundle's wiring (YAML for the lead)
POLYP_WIRING = """
use_device_path: "$transforms.resolve_data_path(@data_path, 2, @device, @cache_rate) == 'device'"
train_dataset: "$None if @use_device_path else pipelines.engine.build_dataset(pipelines.engine.load_split(@splits, 'training'), @train_transforms, cache_rate=@cache_rate, num_workers=@num_workers)"
train_loader: "$transforms.build_device_image_loader(pipelines.engine.load_split(@splits, 'training'), @train_transforms, batch_size=@batch_size, device=@device, seed=@seed, num_workers=@num_workers) if @use_device_path else monai.data.DataLoader(@train_dataset, batch_size=@batch_size, shuffle=@train_sampler is None, sampler=@train_sampler, num_workers=@num_workers)"
data_handlers: "$[@train_loader] if @use_device_path else []"
"""


def test_polyp_wiring_and_multiscale_training_on_device_batches(tmp_path):
    from monai.data import DataLoader
    from monai.engines import SupervisedTrainer
    from PIL import Image

    from pipelines.engine import MultiScaleIteration

    items = []
    for i in range(5):
        img, mask = tmp_path / f"{i}.jpg", tmp_path / f"{i}_m.png"
        Image.fromarray(np.full((40, 48, 3), 40 * i, np.uint8)).save(img)
        m = np.zeros((40, 48), np.uint8)
        m[5:20, 10 : 10 + 5 * i] = 255
        Image.fromarray(m).save(mask)
        items.append({"image": str(img), "label": str(mask)})
    loaders = {}
    for data_path in ("device", "loader"):
        train_transforms = "$pipelines.engine.polyp_transforms('train', 32)"
        parser = wired_parser(
            tmp_path, items, POLYP_WIRING, data_path=data_path, batch_size=2, train_transforms=train_transforms
        )
        loaders[data_path] = parser.get_parsed_content("train_loader")
    device, old = loaders["device"], loaders["loader"]
    assert isinstance(device, DeviceImageLoader) and type(old) is DataLoader
    assert len(device) == len(old) == 3
    # the cached tensors equal the loader path's preprocessing (float16 rounding)
    ref = next(iter(DataLoader(old.dataset, batch_size=5, shuffle=False)))
    np.testing.assert_allclose(device.images.float().numpy(), ref["image"].numpy(), atol=2e-3)
    np.testing.assert_array_equal(device.labels.float().numpy(), ref["label"].numpy())

    net = torch.nn.Conv2d(3, 1, 3, padding=1)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=device,
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-3),
        loss_function=torch.nn.BCEWithLogitsLoss(),
        iteration_update=MultiScaleIteration(rates=(0.75, 1.0, 1.25), grad_clip=0.5),
        decollate=False,
    )
    device.attach(trainer)
    trainer.run()
    assert trainer.state.iteration == 3 and torch.isfinite(trainer.state.output["loss"])
