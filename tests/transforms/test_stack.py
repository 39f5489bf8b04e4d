"""StackSlicesd: 2.5D neighbours-as-channels with edge replication, on volumes and on training crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from transforms import StackSlicesd, stack_slices

H, W, D = 4, 5, 6
AFFINE = torch.tensor([[0.8, 0, 0, -10.0], [0, 0.8, 0, -20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]], dtype=torch.float64)


def _z_volume(depth: int = D) -> MetaTensor:
    """(1, H, W, D) whose slice z holds the value z everywhere."""
    vol = torch.arange(depth, dtype=torch.float32).reshape(1, 1, 1, depth).expand(1, H, W, depth).clone()
    return MetaTensor(vol, affine=AFFINE.clone(), meta={"filename_or_obj": "v.nii.gz"})


@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_volume_mode_channels_hold_clipped_neighbours(k):
    vol = _z_volume()
    label = MetaTensor(torch.ones(1, H, W, D), affine=AFFINE.clone())
    out = StackSlicesd(keys="image", num_slices=k, mode="volume")({"image": vol, "label": label})
    img = out["image"]
    assert tuple(img.shape) == (k, H, W, D)
    for i in range(k):
        for z in range(D):
            expected = min(max(z - k // 2 + i, 0), D - 1)
            assert torch.all(img[i, :, :, z] == expected), (k, i, z)
    assert tuple(out["label"].shape) == (1, H, W, D)  # left alone for the SliceInferer
    assert isinstance(img, MetaTensor)
    torch.testing.assert_close(img.affine, AFFINE)
    assert img.meta["filename_or_obj"] == "v.nii.gz"


def test_stack_slices_on_a_random_volume_against_numpy():
    rng = np.random.default_rng(1)
    vol = rng.normal(size=(1, 3, 2, 4)).astype(np.float32)
    out = stack_slices(torch.from_numpy(vol), 5).numpy()
    padded = np.concatenate([vol[..., :1]] * 2 + [vol] + [vol[..., -1:]] * 2, axis=-1)  # edge replication
    for i in range(5):
        np.testing.assert_array_equal(out[i], padded[0, ..., i : i + 4])
    assert out.shape == (5, 3, 2, 4)


@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_crop_mode_channels_and_centre_label(k):
    crop = _z_volume(k)
    crop[0, 1, 2, :] = torch.arange(k, dtype=torch.float32) + 100  # a voxel that differs per slice
    label = MetaTensor(torch.zeros(1, H, W, k), affine=AFFINE.clone())
    for z in range(k):
        label[0, 0, 0, z] = z  # label slice z identifiable by its value at (0, 0)
    out = StackSlicesd(keys="image", num_slices=k, mode="crop")({"image": crop, "label": label})
    img, lab = out["image"], out["label"]
    assert tuple(img.shape) == (k, H, W) and tuple(lab.shape) == (1, H, W)
    for i in range(k):
        assert img[i, 0, 0] == i and img[i, 1, 2] == 100 + i
    assert lab[0, 0, 0] == k // 2 and lab.sum() == k // 2
    # affine origin moved to the centre slice (2.5 mm per slice here), spacing and meta kept
    expected = AFFINE.clone()
    expected[2, 3] = -30.0 + 2.5 * (k // 2)
    torch.testing.assert_close(img.affine, expected)
    torch.testing.assert_close(lab.affine, expected)
    assert img.meta["filename_or_obj"] == "v.nii.gz"


@pytest.mark.parametrize("k", [0, 2, 4, 9, -1, 3.5, True])
def test_bad_num_slices(k):
    with pytest.raises(ValueError, match="num_slices"):
        StackSlicesd(keys="image", num_slices=k)


def test_bad_mode_and_shapes():
    with pytest.raises(ValueError, match="mode"):
        StackSlicesd(keys="image", mode="slab")
    with pytest.raises(ValueError, match="shape"):
        StackSlicesd(keys="image", num_slices=3)({"image": torch.zeros(2, H, W, D)})
    with pytest.raises(ValueError, match=r"\(1, H, W, 3\)"):
        StackSlicesd(keys="image", num_slices=3, mode="crop")({"image": torch.zeros(1, H, W, 5)})
