"""build_transforms: orientation to RAS (axial last), stage outputs, 2.5D train crops, Invertd to the file geometry,
and the real KiTS19 labels (I,P,L on disk) coming out with the axial axis last."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from transforms import build_transforms

# ---------------------------------------------------------------------------------------------------------- helpers


def _save(array: np.ndarray, affine: np.ndarray, path) -> str:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


def _world(affine, index) -> np.ndarray:
    return (np.asarray(affine, dtype=np.float64) @ np.array([*index, 1.0]))[:3]


#: KiTS19-style affine: array axes (I, P, L) -- axial axis first, like the real files.
IPL = np.array([[0.0, 0.0, -0.7, 10.0], [0.0, -0.8, 0.0, 20.0], [-2.5, 0.0, 0.0, 30.0], [0, 0, 0, 1]])
IPL_SHAPE = (6, 8, 10)  # (z, y, x) on disk


@pytest.fixture(scope="module")
def ipl_case(tmp_path_factory):
    """Image + label stored I,P,L with a marker voxel at raw index (1, 2, 3)."""
    folder = tmp_path_factory.mktemp("ipl")
    image = np.full(IPL_SHAPE, -1000, np.int16)
    image[1, 2, 3] = 300
    label = np.zeros(IPL_SHAPE, np.uint8)
    label[1, 2, 3] = 2
    label[4, 5, 6] = 1
    return {"image": _save(image, IPL, folder / "imaging.nii.gz"), "label": _save(label, IPL, folder / "seg.nii.gz")}


@pytest.fixture(scope="module")
def ras_case(tmp_path_factory):
    """A tiny RAS case, HU = -200 + 20 z (kidney window -> 0.04 z), tumor in slices 3-4, organ in slices 5-8."""
    folder = tmp_path_factory.mktemp("ras")
    shape = (40, 36, 12)
    affine = np.diag([0.9, 0.9, 3.0, 1.0])
    affine[:3, 3] = (-18.0, -16.0, -15.0)
    z = np.arange(shape[2])
    image = np.broadcast_to(-200 + 20 * z, shape).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    label[8:30, 8:28, 5:9] = 1
    label[15:22, 12:20, 3:5] = 2
    return {
        "image": _save(image, affine, folder / "imaging.nii.gz"),
        "label": _save(label, affine, folder / "segmentation.nii.gz"),
        "shape": shape,
        "affine": affine,
        "label_array": label,
    }


def _files(case):
    return {"image": case["image"], "label": case["label"]}


# ------------------------------------------------------------------------------------------------------ orientation


def test_ipl_volume_comes_out_ras_axial_last_marker_in_place(ipl_case):
    raw = nib.load(ipl_case["label"])
    marker_world = _world(raw.affine, (1, 2, 3))
    out = build_transforms("val", spatial_dims=3)(dict(ipl_case))
    for key in ("image", "label"):
        t = out[key]
        assert tuple(t.shape) == (1, 10, 8, 6)  # (x, y, z): axial axis last
        assert nib.aff2axcodes(t.affine.numpy()) == ("R", "A", "S")
        np.testing.assert_allclose(np.abs(np.diag(t.affine.numpy())[:3]), [0.7, 0.8, 2.5])
    # by hand: each axis flipped, so raw (z=1, y=2, x=3) -> RAS (9-3, 7-2, 5-1)
    lab = out["label"][0].numpy()
    assert lab[6, 5, 4] == 2 and lab[3, 2, 1] == 1 and (lab > 0).sum() == 2
    np.testing.assert_allclose(_world(out["label"].affine, (6, 5, 4)), marker_world, atol=1e-5)
    img = out["image"][0].numpy()
    assert np.argmax(img) == np.ravel_multi_index((6, 5, 4), img.shape) and img[6, 5, 4] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------------ stage outputs


def test_val_and_infer_2p5d_shapes_resize_and_stacking(ras_case):
    pre = {"spatial_dims": 2, "num_slices": 3, "in_plane_size": (24, 20)}
    out = build_transforms("val", **pre)(_files(ras_case))
    assert set(out) == {"image", "label"}
    assert tuple(out["image"].shape) == (3, 24, 20, 12) and out["image"].dtype == torch.float32
    assert tuple(out["label"].shape) == (1, 24, 20, 12)
    assert set(np.unique(out["label"].numpy())) == {0.0, 1.0, 2.0}
    img = out["image"].numpy()
    for i in range(3):
        for z in range(12):
            np.testing.assert_allclose(img[i, :, :, z], 0.04 * min(max(z - 1 + i, 0), 11), atol=1e-5)
    inf = build_transforms("infer", **pre)({"image": ras_case["image"]})
    assert set(inf) == {"image"} and tuple(inf["image"].shape) == (3, 24, 20, 12)
    assert [op["class"] for op in inf["image"].applied_operations] == ["Orientation", "Resize"]


def test_val_3d_and_liver_window(ras_case):
    out = build_transforms("val", spatial_dims=3, task="lits")(_files(ras_case))
    assert tuple(out["image"].shape) == (1, 40, 36, 12) and tuple(out["label"].shape) == (1, 40, 36, 12)
    # liver window (-40, 160): slice z holds -200 + 20 z -> clip((20 z - 160) / 200, 0, 1)
    expected = np.clip((20 * np.arange(12) - 160) / 200, 0, 1)
    np.testing.assert_allclose(out["image"][0, 0, 0].numpy(), expected, atol=1e-5)
    assert out["image"].dtype == torch.float32 and out["label"].dtype == torch.float32
    inf = build_transforms("infer", spatial_dims=3, in_plane_size=(20, 18))({"image": ras_case["image"]})
    assert set(inf) == {"image"} and tuple(inf["image"].shape) == (1, 20, 18, 12)
    with_label = build_transforms("infer", spatial_dims=3, with_label=True)(_files(ras_case))
    assert tuple(with_label["label"].shape) == (1, 40, 36, 12)


def test_spacing_resample_inverts_and_matches_the_cache_estimate(ras_case):
    from pipelines.engine.data import cached_item_bytes

    tr = build_transforms("val", spatial_dims=2, pixdim=(1.8, 1.8, -1))  # in-plane 0.9 -> 1.8 mm, z kept
    out = tr(_files(ras_case))
    assert tuple(out["image"].shape) == (3, 20, 18, 12) and tuple(out["label"].shape) == (1, 20, 18, 12)
    np.testing.assert_allclose(np.diag(out["image"].affine.numpy())[:3], [1.8, 1.8, 3.0])
    assert cached_item_bytes(ras_case["image"], pixdim=(1.8, 1.8, -1)) == 20 * 18 * 12 * 8
    inv = _invert(tr, out, "image")
    assert tuple(inv.shape) == (1, *ras_case["shape"])
    np.testing.assert_allclose(inv.affine.numpy(), ras_case["affine"], atol=1e-5)
    assert (inv[0].numpy() == ras_case["label_array"]).mean() > 0.95


def test_train_2p5d_crops_are_neighbour_slabs_with_centre_label(ras_case):
    k, n = 3, 40
    tr = build_transforms(
        "train", spatial_dims=2, num_slices=k, in_plane_size=(24, 24), num_samples=n, rotate_prob=0.0, flip_prob=0.0
    )
    tr.set_random_state(seed=0)
    crops = tr(_files(ras_case))
    assert isinstance(crops, list) and len(crops) == n
    label = ras_case["label_array"]
    centres = []
    for crop in crops:
        assert set(crop) == {"image", "label"}
        assert tuple(crop["image"].shape) == (k, 24, 24) and crop["image"].dtype == torch.float32
        assert tuple(crop["label"].shape) == (1, 24, 24)
        c = int(round(float(crop["image"][1, 0, 0]) / 0.04))
        centres.append(c)
        for i in range(k):  # neighbours, edge replicated like StackSlicesd at inference
            assert float(crop["image"][i, 0, 0]) == pytest.approx(0.04 * min(max(c - 1 + i, 0), 11), abs=1e-5)
        # the label is the centre slice: organ / tumor presence matches the original slice c
        present = set(np.unique(crop["label"].numpy()).astype(int))
        assert present == set(np.unique(label[..., c]).astype(int))
    assert 0 <= min(centres) and max(centres) <= 11
    assert np.isin(centres, (3, 4)).mean() >= 0.3  # tumor share 0.5 (+ some background on those slices)


def test_train_cache_holds_the_class_indices_so_no_draw_rescans_the_volume(ras_case):
    from monai.data import CacheDataset

    tr = build_transforms("train", spatial_dims=2, num_slices=3, in_plane_size=(24, 24), num_samples=4)
    ds = CacheDataset([_files(ras_case)], transform=tr, cache_rate=1.0, num_workers=0, progress=False)
    cached = ds._cache[0]
    assert "label_cls_indices" in cached
    padded = cached["label"][0].numpy().ravel()
    for c, idx in enumerate(cached["label_cls_indices"]):
        assert len(idx) > 0 and (padded[np.asarray(idx)] == c).all()
    assert all(set(crop) == {"image", "label"} for crop in ds[0])


def test_train_2p5d_augmented_labels_stay_integer(ras_case):
    tr = build_transforms("train", spatial_dims=2, num_slices=5, num_samples=6, rotate_prob=1.0, flip_prob=0.5)
    tr.set_random_state(seed=1)
    for crop in tr(_files(ras_case)):
        assert tuple(crop["image"].shape) == (5, 40, 36) and tuple(crop["label"].shape) == (1, 40, 36)
        assert set(np.unique(crop["label"].numpy())) <= {0.0, 1.0, 2.0}
        assert isinstance(crop["image"], MetaTensor)


def test_train_3d_patches(ras_case):
    tr = build_transforms("train", spatial_dims=3, roi_size=(16, 16, 8), num_samples=3)
    tr.set_random_state(seed=2)
    crops = tr(_files(ras_case))
    assert len(crops) == 3
    for crop in crops:
        assert tuple(crop["image"].shape) == (1, 16, 16, 8) and tuple(crop["label"].shape) == (1, 16, 16, 8)
        assert crop["image"].dtype == torch.float32
        assert float(crop["image"].min()) >= 0.0 and float(crop["image"].max()) <= 1.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="stage"):
        build_transforms("test")
    with pytest.raises(ValueError, match="spatial_dims"):
        build_transforms("val", spatial_dims=1)
    with pytest.raises(ValueError, match="kits"):
        build_transforms("val", task="brats")
    with pytest.raises(ValueError, match="liver"):
        build_transforms("val", window="bone")
    with pytest.raises(ValueError, match="num_slices"):
        build_transforms("val", num_slices=4)
    with pytest.raises(ValueError, match="label"):
        build_transforms("train", with_label=False)
    with pytest.raises(ValueError, match="roi_size"):
        build_transforms("train", spatial_dims=2, roi_size=(8, 8, 3))
    with pytest.raises(ValueError, match="in_plane_size"):
        build_transforms("val", in_plane_size=(0, 8))


# --------------------------------------------------------------------------------------------------------- Invertd


def _invert(transform: Compose, data: dict, orig_key: str) -> MetaTensor:
    data = dict(data)
    data["pred"] = data["label"].clone() if "label" in data else MetaTensor(data["image"][:1].clone())
    return Invertd(keys="pred", transform=transform, orig_keys=orig_key, nearest_interp=True)(data)["pred"]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_invert_val_output_to_the_file_geometry(ipl_case, spatial_dims):
    tr = build_transforms("val", spatial_dims=spatial_dims)
    out = tr(dict(ipl_case))
    assert out["image"].applied_operations and out["label"].applied_operations
    raw = nib.load(ipl_case["label"])
    inv = _invert(tr, out, "image")
    assert tuple(inv.shape) == (1, *IPL_SHAPE)
    np.testing.assert_allclose(inv.affine.numpy(), raw.affine, atol=1e-5)
    np.testing.assert_array_equal(inv[0].numpy(), np.asarray(raw.dataobj))  # orientation inversion is exact


def test_invert_resized_infer_output(ras_case):
    tr = build_transforms("infer", spatial_dims=2, in_plane_size=(24, 20))
    out = tr({"image": ras_case["image"]})
    out["label"] = build_transforms("val", spatial_dims=3, in_plane_size=(24, 20))(_files(ras_case))["label"]
    inv = Invertd(keys="label", transform=tr, orig_keys="image", nearest_interp=True)(out)["label"]
    assert tuple(inv.shape) == (1, *ras_case["shape"])
    np.testing.assert_allclose(inv.affine.numpy(), ras_case["affine"], atol=1e-5)
    assert (inv[0].numpy() == ras_case["label_array"]).mean() > 0.95  # nearest down/up: edges may move a voxel


# -------------------------------------------------------------------------------------------------------- real data

REAL_CASES = ("case_00021", "case_00010")  # the two smallest label volumes (38 and 50 axial slices)


@pytest.mark.parametrize("case", REAL_CASES)
def test_real_kits19_labels_load_axial_last(shared_data, case):
    path = shared_data / "kits19_labels" / case / "segmentation.nii.gz"
    if not path.exists():
        pytest.skip(f"{path} not found")
    raw = nib.load(str(path))
    assert nib.aff2axcodes(raw.affine) == ("I", "P", "L")  # the reason for Orientationd
    n_axial = raw.shape[0]
    load = Compose(build_transforms("infer", spatial_dims=3).transforms[:3])  # Load, ChannelFirst, Orientation
    out = load({"image": str(path)})["image"]
    assert tuple(out.shape) == (1, raw.shape[2], raw.shape[1], n_axial)
    assert nib.aff2axcodes(out.affine.numpy()) == ("R", "A", "S")
    # the last axis is the I-S axis of the file: its spacing is the file's axis-0 spacing
    assert float(np.linalg.norm(out.affine.numpy()[:3, 2])) == pytest.approx(raw.header.get_zooms()[0])
    # the kidney/tumor centroid stays at the same world position
    raw_idx = np.argwhere(np.asarray(raw.dataobj) > 0).mean(axis=0)
    out_idx = np.argwhere(out[0].numpy() > 0).mean(axis=0)
    np.testing.assert_allclose(_world(out.affine, out_idx), _world(raw.affine, raw_idx), atol=1e-3)
