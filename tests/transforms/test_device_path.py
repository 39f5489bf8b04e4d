"""The device-resident 2.5D data path on CPU tensors: the cache, slab sampling (edge replication, class shares),
determinism per seed and epoch, epoch composition, DDP shards, and MONAI's trainer consuming it."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.transforms.wiring import wired_parser
from transforms.device_loader import DeviceBatchLoader, epoch_seed, shard
from transforms.device_path import (
    DeviceSlabLoader,
    build_device_train_loader,
    cache_volumes,
    class_slice_indices,
    resolve_data_path,
)

H = W = 32
DEPTHS = (6, 9, 7, 8, 10)
TUMOR = {0: (2, 3), 1: (6,), 2: (), 3: (0, 1), 4: (9,)}  # tumor slices per volume (volume 2: none)
ORGAN = {0: (4, 5), 1: (2, 3, 4), 2: (1, 2, 3), 3: (4, 5, 6), 4: (3, 4, 5)}  # organ-only slices
PRE = {"spatial_dims": 2, "num_slices": 5, "task": "kits", "in_plane_size": None, "roi_size": None}


def _hu(v: int, z: int) -> float:
    """Image of volume v, slice z: windowed (kidney -200..300 HU -> 0..1) to 0.02 z + 0.2 v (0.2 v: the volume)."""
    return -200.0 + 10.0 * z + 100.0 * v


def _windowed(v: int, z) -> np.ndarray:
    return 0.02 * np.asarray(z) + 0.2 * v


def _label(v: int) -> np.ndarray:
    lab = np.zeros((H, W, DEPTHS[v]), np.uint8)
    for z in ORGAN[v]:
        lab[8:24, 6:22, z] = 1
    for z in TUMOR[v]:
        lab[10:18, 12:20, z] = 1
        lab[12:16, 14:18, z] = 2
    return lab


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("device_cohort")
    affine = np.diag([0.8, 0.8, 3.0, 1.0])  # RAS: axial axis already last
    items = []
    for v, d in enumerate(DEPTHS):
        image = np.broadcast_to(np.array([_hu(v, z) for z in range(d)]), (H, W, d)).astype(np.int16)
        paths = {}
        for key, arr in (("image", image), ("label", _label(v))):
            paths[key] = str(folder / f"case{v}_{key}.nii.gz")
            nib.save(nib.Nifti1Image(arr, affine), paths[key])
        items.append(paths)
    return items


@pytest.fixture(scope="module")
def cache(cohort):
    return cache_volumes(cohort, PRE, device="cpu")


def _loader(cache, **kw) -> DeviceSlabLoader:
    args = dict(batch_size=8, samples_per_volume=4, num_slices=5, tumor_share=0.5, organ_share=0.25, seed=0)
    args.update(kw)
    return DeviceSlabLoader(cache, **args)


def _volume_of(image: torch.Tensor) -> np.ndarray:
    """Volume index encoded in un-augmented slabs (0.2 v + 0.02 z with 0.02 z < 0.2)."""
    return np.floor(image[:, 0, 0, 0].numpy() / 0.2 + 1e-3).astype(int)


def test_cache_holds_compact_volumes_and_class_slices(cohort, cache):
    assert cache.images.shape == (sum(DEPTHS), H, W) and cache.images.dtype == torch.float16
    assert cache.labels.dtype == torch.uint8
    assert cache.depths.tolist() == list(DEPTHS) and cache.starts.tolist() == list(np.cumsum((0,) + DEPTHS[:-1]))
    for v, d in enumerate(DEPTHS):
        rows = cache.images[cache.starts[v] : cache.starts[v] + d, 5, 7].float().numpy()
        np.testing.assert_allclose(rows, _windowed(v, range(d)), atol=1e-3)
        lab = _label(v)
        np.testing.assert_array_equal(
            cache.labels[cache.starts[v] : cache.starts[v] + d].numpy(), lab.transpose(2, 0, 1)
        )
        for c in range(3):
            n = int((lab == c).sum())
            assert int(cache.class_counts[v, c]) == min(n, 10_000)
            got = cache.class_slices[cache.class_offsets[v, c] : cache.class_offsets[v, c] + cache.class_counts[v, c]]
            assert set(got.tolist()) == set(np.nonzero(lab == c)[2].tolist())


def test_class_slice_indices_match_numpy_subsampling():
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 3, size=(7, 5, 6))
    out = class_slice_indices(torch.as_tensor(lab), 3, max_per_class=20)
    for c in range(3):
        flat = np.nonzero(lab.ravel() == c)[0]
        keep = flat[np.round(np.linspace(0, len(flat) - 1, 20)).astype(int)]
        np.testing.assert_array_equal(out[c].numpy(), keep // (5 * 6))  # raster (D, H, W): slice = index // (H W)
    assert class_slice_indices(torch.zeros(3, 2, 2, dtype=torch.uint8), 3)[2].numel() == 0


def test_uint8_cache_decodes_within_half_a_level(cohort):
    c8 = cache_volumes(cohort[:2], PRE, device="cpu", image_dtype="uint8")
    assert c8.images.dtype == torch.uint8
    rows = torch.arange(DEPTHS[0])
    np.testing.assert_allclose(c8.decode(rows)[:, 0, 0].numpy(), _windowed(0, range(DEPTHS[0])), atol=0.5 / 255 + 1e-6)


def test_slabs_replicate_edge_slices_and_take_the_centre_label(cache):
    loader = _loader(cache)
    g = torch.Generator().manual_seed(1)
    vols = torch.arange(len(DEPTHS)).repeat_interleave(40)
    image, label, z = loader.sample(vols, g)
    assert image.shape == (len(vols), 5, H, W) and image.dtype == torch.float32
    assert label.shape == (len(vols), 1, H, W) and label.dtype == torch.float32
    edge_seen = False
    for i, (v, zc) in enumerate(zip(vols.tolist(), z.tolist())):
        d = DEPTHS[v]
        # hand-built slab: channel j is slice clamp(z - 2 + j, 0, d - 1)
        expected = _windowed(v, [min(max(zc - 2 + j, 0), d - 1) for j in range(5)])
        np.testing.assert_allclose(image[i, :, 3, 3].numpy(), expected, atol=1e-3)
        np.testing.assert_array_equal(label[i, 0].numpy(), _label(v)[:, :, zc])
        edge_seen |= zc in (0, 1, d - 2, d - 1)
    assert edge_seen
    # hand example: volume 3 (depth 8), centre slice 0 -> slices [0, 0, 0, 1, 2]
    idx = int(np.nonzero((vols.numpy() == 3) & (z.numpy() == 0))[0][0])
    np.testing.assert_allclose(image[idx, :, 0, 0].numpy(), [0.6, 0.6, 0.6, 0.62, 0.64], atol=1e-3)


def _expected_share(v: int, slices, ratios) -> float:
    """P(centre slice in ``slices``) for volume v, from the label alone (voxel-weighted per class, absent classes 0)."""
    lab = _label(v)
    present = [float((lab == c).any()) for c in range(3)]
    r = np.array(ratios) * present
    r = r / r.sum()
    share = 0.0
    for c in range(3):
        zs = np.nonzero(lab == c)[2]
        if len(zs):
            share += r[c] * np.isin(zs, slices).mean()
    return share


def test_class_shares_over_many_draws(cache):
    loader = _loader(cache, tumor_share=0.5, organ_share=0.25)
    g = torch.Generator().manual_seed(7)
    n = 3000
    for v in (0, 2, 3):  # volume 2 has no tumor: its tumor share goes to background and organ
        _, _, z = loader.sample(torch.full((n,), v), g)
        for slices in (TUMOR[v], ORGAN[v]):
            if not slices:
                continue
            expected = _expected_share(v, slices, [0.25, 0.25, 0.5])
            observed = np.isin(z.numpy(), slices).mean()
            assert abs(observed - expected) < 4 * np.sqrt(expected * (1 - expected) / n) + 1e-9, (
                v,
                slices,
                observed,
                expected,
            )
    _, _, z = loader.sample(torch.full((n,), 2), g)
    assert abs(np.isin(z.numpy(), ORGAN[2]).mean() - _expected_share(2, ORGAN[2], [0.25, 0.25, 0.5])) < 0.04


def test_epoch_visits_every_volume_samples_per_volume_times(cache):
    loader = _loader(cache, augmentation=None)
    assert len(loader) == 3  # 5 volumes, 2 volumes (8 slabs) per step, the last step 1 volume, as the DataLoader
    batches = list(loader)
    assert [b["image"].shape[0] for b in batches] == [8, 8, 4]
    vols = np.concatenate([_volume_of(b["image"]) for b in batches])
    assert np.bincount(vols, minlength=5).tolist() == [4] * 5
    for b in batches:  # the 4 slabs of a volume visit are consecutive
        v = _volume_of(b["image"])
        assert (v.reshape(-1, 4) == v.reshape(-1, 4)[:, :1]).all()
    fixed = _loader(cache, augmentation=None, epoch_length=7)
    assert len(fixed) == 7 and [b["image"].shape[0] for b in fixed] == [8] * 7


def test_same_seed_same_batches_other_seed_or_epoch_differs(cache, cohort):
    a = build_device_train_loader(cohort, PRE, batch_size=8, samples_per_volume=4, device="cpu", seed=3)
    b = build_device_train_loader(cohort, PRE, batch_size=8, samples_per_volume=4, device="cpu", seed=3)
    c = build_device_train_loader(cohort, PRE, batch_size=8, samples_per_volume=4, device="cpu", seed=4)
    epoch1_a, epoch1_b, epoch1_c = list(a), list(b), list(c)
    for x, y in zip(epoch1_a, epoch1_b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    assert not all(torch.equal(x["image"], y["image"]) for x, y in zip(epoch1_a, epoch1_c))
    epoch2_a = list(a)
    assert not all(torch.equal(x["image"], y["image"]) for x, y in zip(epoch1_a, epoch2_a))
    b.set_epoch(2)  # a resumed run replays epoch 2
    for x, y in zip(epoch2_a, list(b)):
        assert torch.equal(x["image"], y["image"])
    labels = torch.cat([x["label"] for x in epoch1_a + epoch2_a])
    assert set(labels.unique().tolist()) <= {0.0, 1.0, 2.0}  # nearest: augmented labels stay classes


def test_ddp_shards_are_disjoint_and_ranks_run_the_same_steps(cohort):
    loaders = [
        build_device_train_loader(
            cohort, PRE, batch_size=4, samples_per_volume=2, device="cpu", seed=0, rank=r, world_size=2
        )
        for r in (0, 1)
    ]
    for r, loader in enumerate(loaders):
        assert loader.cache.names == [item["image"] for item in cohort[r::2]]
        assert len(loader) == 2  # ceil(5 / 2) = 3 volumes per rank and epoch, 2 volumes per step
        loader.augmentation = None
        vols = np.concatenate([_volume_of(b["image"]) for b in loader])
        assert len(vols) == 3 * 2
        assert set(vols.tolist()) <= set(range(r, 5, 2))  # only this rank's volumes
    assert shard(list(range(5)), 1, 2) == ([1, 3], 3)
    with pytest.raises(ValueError, match="sharded"):
        shard([0], 0, 2)
    assert epoch_seed(0, 0, 1) != epoch_seed(0, 1, 1) != epoch_seed(0, 0, 2)


def test_trainer_consumes_the_loader_and_attach_ties_seeds_to_its_epochs(cache):
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer

    net = torch.nn.Conv2d(5, 3, 1)
    loader = _loader(cache, samples_per_volume=2, batch_size=4)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=2,
        train_data_loader=loader,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.01),
        loss_function=lambda pred, y: torch.nn.functional.cross_entropy(pred, y[:, 0].long()),
        decollate=False,
    )
    list(loader)  # the loader's own epoch count is now ahead of the trainer's (as after a resume): attach wins
    loader.attach(trainer)
    seen: list[torch.Tensor] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.batch["image"].clone()))
    trainer.run()
    assert trainer.state.iteration == 2 * len(loader) == len(seen)
    replay = _loader(cache, samples_per_volume=2, batch_size=4)
    fresh = [b["image"] for b in replay] + [b["image"] for b in replay]  # epochs 1 and 2
    assert len(fresh) == len(seen) and all(torch.equal(x, y) for x, y in zip(seen, fresh))


def test_data_path_selection_and_validation(cohort):
    assert resolve_data_path("auto", 2, "cpu") == "device"  # the whole training set cached: the device path
    assert resolve_data_path("auto", 2, "cpu", cache_rate=0.5) == "loader"  # a partial cache keeps the loader
    assert resolve_data_path("auto", 3, "cpu") == "loader"
    assert resolve_data_path("loader", 2, "cpu") == "loader"
    assert resolve_data_path("device", 2, "cpu") == "device"
    with pytest.raises(ValueError, match="auto"):
        resolve_data_path("gpu", 2, "cpu")
    with pytest.raises(ValueError, match="3D"):
        resolve_data_path("device", 3, "cpu")
    with pytest.raises(ValueError, match="num_slices"):
        build_device_train_loader(cohort, PRE, batch_size=8, samples_per_volume=4, num_slices=3, device="cpu")
    with pytest.raises(ValueError, match="image_dtype"):
        cache_volumes(cohort, PRE, device="cpu", image_dtype="int8")
    with pytest.raises(ValueError, match="spatial_dims"):
        cache_volumes(cohort, dict(PRE, spatial_dims=3), device="cpu")
    with pytest.raises(ValueError, match="items_per_batch"):
        DeviceBatchLoader(3, 3, 0)


# ------------------------------------------------------------------------------------- bundle wiring (the YAML the
# base train config receives; the test parses exactly these sections with MONAI's ConfigParser)
WIRING = """
use_device_path: "$transforms.resolve_data_path(@data_path, @spatial_dims, @device, @cache_rate) == 'device'"
train_dataset: "$None if @use_device_path else pipelines.engine.build_dataset(pipelines.engine.load_split(@splits, 'training'), @train_transforms, cache_rate=@cache_rate, num_workers=@num_workers)"
train_loader: "$transforms.build_device_train_loader(pipelines.engine.load_split(@splits, 'training'), @preprocessing, batch_size=@batch_size, samples_per_volume=@samples_per_volume, tumor_share=@tumor_share, device=@device, seed=@seed, num_workers=@num_workers, load_context=pipelines.engine.reading_case) if @use_device_path else monai.data.DataLoader(@train_dataset, batch_size=pipelines.engine.volumes_per_batch(@batch_size, @samples_per_volume), shuffle=@train_sampler is None, sampler=@train_sampler, num_workers=@num_workers)"
data_handlers: "$[@train_loader] if @use_device_path else []"
"""
# multi_gpu_train.yaml: no DistributedSampler over a dataset the device path never builds
WIRING_DDP = """
train_sampler: "$None if @use_device_path else monai.data.DistributedSampler(@train_dataset, even_divisible=True, shuffle=True)"
"""


def _wired_config(cohort, tmp_path, data_path: str, ddp: bool = False):
    knobs = dict(data_path=data_path, spatial_dims=2, num_slices=5, batch_size=8, samples_per_volume=4, tumor_share=0.5)
    knobs["preprocessing"] = dict(PRE, spatial_dims="@spatial_dims", num_slices="@num_slices")
    knobs["train_transforms"] = (
        "$transforms.build_transforms('train', num_samples=@samples_per_volume, tumor_share=@tumor_share, **@preprocessing)"
    )
    return wired_parser(tmp_path, cohort, WIRING, *([WIRING_DDP] if ddp else []), **knobs)


def test_bundle_wiring_builds_the_device_path_without_the_cache_dataset(cohort, tmp_path):
    from monai.data import DataLoader

    device = _wired_config(cohort, tmp_path, "device")
    loader = device.get_parsed_content("train_loader")
    assert isinstance(loader, DeviceSlabLoader) and device.get_parsed_content("train_dataset") is None
    assert device.get_parsed_content("data_handlers") == [loader]
    loader_path = _wired_config(cohort, tmp_path, "loader")
    old = loader_path.get_parsed_content("train_loader")
    assert type(old) is DataLoader and loader_path.get_parsed_content("data_handlers") == []
    assert len(loader) == len(old) == 3  # the same steps per epoch for the same knobs
    batch = next(iter(old))
    assert batch["image"].shape == next(iter(loader))["image"].shape == (8, 5, H, W)
    auto_on_cpu = _wired_config(cohort, tmp_path, "auto")  # cache_rate 1: the device path on CPU too
    assert isinstance(auto_on_cpu.get_parsed_content("train_loader"), DeviceSlabLoader)
    partial = _wired_config(cohort, tmp_path, "auto")
    partial.update({"cache_rate": 0.5})
    assert isinstance(partial.get_parsed_content("train_loader"), DataLoader)
    ddp = _wired_config(cohort, tmp_path, "device", ddp=True)
    assert ddp.get_parsed_content("train_sampler") is None and isinstance(
        ddp.get_parsed_content("train_loader"), DeviceSlabLoader
    )


def test_a_volume_without_indexed_classes_is_refused(cohort):
    cache = cache_volumes(cohort[:2], PRE, device="cpu")
    cache.class_counts[1] = 0  # as if volume 1's labels held only values >= num_classes
    with pytest.raises(ValueError, match="case1_image"):
        _loader(cache)
