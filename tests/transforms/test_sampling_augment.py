"""2.5D / 3D training sampling (N crops, tumor share) and the HLFD augmentation (rotation + flips, no noise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import RandFlipd, RandGaussianNoised, RandRotated

from transforms import build_augmentation, build_class_indexer, build_sampler, class_ratios

H, W, D = 16, 16, 20
TUMOR_SLICES = (5, 6)


def _labelled_volume():
    """Image slice z holds z; label: organ block in slices 10-14, tumor in slices 5-6 only."""
    image = torch.arange(D, dtype=torch.float32).reshape(1, 1, 1, D).expand(1, H, W, D).clone()
    label = torch.zeros(1, H, W, D)
    label[0, 4:12, 4:12, 10:15] = 1
    label[0, 6:9, 6:9, TUMOR_SLICES[0] : TUMOR_SLICES[-1] + 1] = 2
    return {"image": MetaTensor(image), "label": MetaTensor(label)}


def test_class_ratios():
    assert class_ratios(0.5, 0.25) == [0.25, 0.25, 0.5]
    assert class_ratios(0.6, 0.4, num_classes=4) == pytest.approx([0.0, 0.4, 0.6, 0.0])
    for bad in ((1.2, 0.0), (-0.1, 0.2), (0.7, 0.5)):
        with pytest.raises(ValueError):
            class_ratios(*bad)


def test_sampler_draws_n_slabs_of_depth_k_with_the_tumor_share():
    k, n = 3, 600
    sampler = build_sampler((-1, -1, k), n, tumor_share=0.5, organ_share=0.25)
    sampler.set_random_state(seed=0)
    crops = sampler(_labelled_volume())
    assert len(crops) == n
    centres = []
    for crop in crops:
        assert tuple(crop["image"].shape) == (1, H, W, k) and tuple(crop["label"].shape) == (1, H, W, k)
        slab = crop["image"][0, 0, 0].tolist()
        assert slab == [slab[0] + i for i in range(k)]  # contiguous slices
        centres.append(int(slab[k // 2]))
        # the label slab is the same slices as the image slab
        assert torch.equal(crop["label"][0, ..., k // 2], _labelled_volume()["label"][0, ..., centres[-1]])
    centres = np.array(centres)
    # expected share of centres on a tumor slice, computed independently: tumor-centred crops (0.5) plus the
    # background-centred ones (0.25) that land on a tumor slice (the centre is clamped to [k//2, D-1-k//2]).
    lab = _labelled_volume()["label"][0].numpy()
    bg_z = np.nonzero(lab == 0)[2].clip(k // 2, D - 1 - k // 2)
    expected = 0.5 + 0.25 * np.isin(bg_z, TUMOR_SLICES).mean()
    observed = np.isin(centres, TUMOR_SLICES).mean()
    assert abs(observed - expected) < 0.06, (observed, expected)
    organ = np.isin(centres, range(10, 15)).mean()
    expected_organ = 0.25 + 0.25 * np.isin(bg_z, range(10, 15)).mean()
    assert abs(organ - expected_organ) < 0.06, (organ, expected_organ)


def test_sampler_tumor_share_one_only_tumor_slices():
    sampler = build_sampler((8, 8, 5), 50, tumor_share=1.0, organ_share=0.0)
    sampler.set_random_state(seed=1)
    for crop in sampler(_labelled_volume()):
        assert tuple(crop["image"].shape) == (1, 8, 8, 5)
        assert (crop["label"][0, ..., 2] == 2).any()


def test_class_indexer_keeps_evenly_spread_indices_of_each_class():
    data = build_class_indexer(3, max_per_class=40)(_labelled_volume())
    lab = _labelled_volume()["label"][0].numpy()
    flat = lab.ravel()
    indices = data["label_cls_indices"]
    assert len(indices) == 3
    for c, idx in enumerate(indices):
        idx = np.asarray(idx)
        assert 0 < len(idx) <= 40
        assert (flat[idx] == c).all()  # every kept index points at a voxel of its class
    # tumor (3*3*2 = 18 voxels < 40) is kept whole; organ (8*8*5 = 320) subsampled over all five organ slices
    assert len(indices[2]) == 18
    organ_z = np.unravel_index(np.asarray(indices[1]), lab.shape)[2]
    assert set(organ_z.tolist()) == set(range(10, 15))
    with pytest.raises(ValueError, match="max_per_class"):
        build_class_indexer(3, max_per_class=0)


def test_sampler_with_cached_indices_centres_on_the_indexed_classes():
    data = build_class_indexer(3, max_per_class=40)(_labelled_volume())
    sampler = build_sampler((8, 8, 3), 60, tumor_share=1.0, organ_share=0.0, indices_key="label_cls_indices")
    sampler.set_random_state(seed=2)
    for crop in sampler(data):
        assert (crop["label"][0, ..., 1] == 2).any()  # centre slice holds tumor


def test_sampler_validation():
    with pytest.raises(ValueError, match="num_samples"):
        build_sampler((-1, -1, 3), 0)
    with pytest.raises(ValueError, match="roi_size"):
        build_sampler((8, 8), 2)


def test_augmentation_has_rotation_and_flips_and_no_noise_by_default():
    ops = build_augmentation(2).transforms
    assert any(isinstance(op, RandRotated) for op in ops)
    assert sorted(op.flipper.spatial_axis for op in ops if isinstance(op, RandFlipd)) == [0, 1]
    assert not any(isinstance(op, RandGaussianNoised) for op in ops)
    noisy = build_augmentation(2, noise_prob=1.0, noise_std=0.1).transforms
    assert any(isinstance(op, RandGaussianNoised) for op in noisy)
    for bad in ({"spatial_dims": 4}, {"rotate_degrees": -1}, {"flip_prob": 1.5}):
        with pytest.raises(ValueError):
            build_augmentation(**{"spatial_dims": 2, **bad})


def test_rotation_keeps_labels_integer_and_image_interpolated():
    rng = np.random.default_rng(2)
    label = np.zeros((1, 32, 32), np.float32)
    label[0, 8:24, 10:20] = 1
    label[0, 12:18, 12:16] = 2
    image = rng.normal(size=(3, 32, 32)).astype(np.float32)
    aug = build_augmentation(2, rotate_degrees=30, rotate_prob=1.0, flip_prob=0.0)
    aug.set_random_state(seed=3)
    changed = 0
    for _ in range(5):
        out = aug({"image": MetaTensor(torch.from_numpy(image)), "label": MetaTensor(torch.from_numpy(label))})
        lab = out["label"].numpy()
        assert set(np.unique(lab)) <= {0.0, 1.0, 2.0}
        assert out["image"].shape == (3, 32, 32) and lab.shape == (1, 32, 32)
        changed += int(not np.array_equal(lab, label))
        assert not np.allclose(out["image"].numpy(), np.round(out["image"].numpy()))  # bilinear, not nearest
    assert changed >= 4


def test_flip_prob_one_flips_both_axes_exactly():
    rng = np.random.default_rng(4)
    image = rng.normal(size=(3, 6, 7)).astype(np.float32)
    label = rng.integers(0, 3, size=(1, 6, 7)).astype(np.float32)
    aug = build_augmentation(2, rotate_degrees=0, flip_prob=1.0)
    out = aug({"image": MetaTensor(torch.from_numpy(image)), "label": MetaTensor(torch.from_numpy(label))})
    np.testing.assert_array_equal(out["image"].numpy(), image[:, ::-1, ::-1])
    np.testing.assert_array_equal(out["label"].numpy(), label[:, ::-1, ::-1])


def test_3d_rotation_is_in_the_axial_plane():
    # a label that depends on z only is unchanged by any rotation about the axial (last) axis
    label = torch.arange(8, dtype=torch.float32).remainder(3).reshape(1, 1, 1, 8).expand(1, 16, 16, 8).clone()
    image = label.clone()
    aug = build_augmentation(3, rotate_degrees=30, rotate_prob=1.0, flip_prob=0.0)
    aug.set_random_state(seed=5)
    out = aug({"image": MetaTensor(image), "label": MetaTensor(label)})
    torch.testing.assert_close(out["label"].as_tensor(), label)
    torch.testing.assert_close(out["image"].as_tensor(), image, atol=1e-4, rtol=0)


@pytest.mark.parametrize("present", [(0, 1), (0,)])
def test_sampler_without_tumor_voxels_still_draws(present):
    data = _labelled_volume()
    data["label"][data["label"] == 2] = 1 if 1 in present else 0
    if present == (0,):
        data["label"].zero_()
    sampler = build_sampler((-1, -1, 3), 200, tumor_share=0.5, organ_share=0.25)
    sampler.set_random_state(seed=6)
    crops = sampler(data)
    assert len(crops) == 200 and all(tuple(c["image"].shape) == (1, H, W, 3) for c in crops)
    if present == (0, 1):  # the tumor share is redistributed: background and organ centres, 1:1
        lab = data["label"][0].numpy()
        bg_z = np.nonzero(lab == 0)[2].clip(1, D - 2)
        organ_slices = [5, 6, *range(10, 15)]
        expected = 0.5 + 0.5 * np.isin(bg_z, organ_slices).mean()
        centres = np.array([int(c["image"][0, 0, 0, 1]) for c in crops])
        assert abs(np.isin(centres, organ_slices).mean() - expected) < 0.08
