"""pipelines.engine.data: CacheDataset factory (deterministic head cached, random tail per call), cache memory estimate,
atomic NIfTI writing."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, MapTransform, RandomizableTransform

from pipelines.engine.data import build_dataset, cached_item_bytes, ensure_cache_fits, estimate_cache, save_nifti
from transforms import build_transforms


class _Count(MapTransform):
    """Deterministic: records each call, adds 1."""

    def __init__(self):
        super().__init__(keys="x")
        self.calls = 0

    def __call__(self, data):
        self.calls += 1
        return {"x": data["x"] + 1}


class _RandAdd(RandomizableTransform):
    """Random: adds a uniform number; records each call."""

    def __init__(self):
        super().__init__(prob=1.0)
        self.calls = 0

    def __call__(self, data):
        self.calls += 1
        return {"x": data["x"] + self.R.uniform()}


def test_deterministic_head_cached_random_tail_per_call():
    det, rnd = _Count(), _RandAdd()
    ds = build_dataset([{"x": torch.tensor(float(i))} for i in range(4)], Compose([det, rnd]), cache_rate=1.0)
    assert det.calls == 4 and rnd.calls == 0  # only the deterministic head ran, once per item, at construction
    first, second = ds[2], ds[2]
    assert det.calls == 4 and rnd.calls == 2
    assert 3.0 <= float(first["x"]) < 4.0 and float(first["x"]) != float(second["x"])


def test_cache_rate_and_workers():
    det = _Count()
    ds = build_dataset([{"x": torch.tensor(0.0)}] * 4, Compose([det, _RandAdd()]), cache_rate=0.5, num_workers=0)
    assert ds.cache_num == 2 and det.calls == 2
    ds[3]  # not cached: the whole chain runs
    assert det.calls == 3
    assert ds.num_workers == 1  # 0 must not become os.cpu_count() threads
    for bad in ({"cache_rate": 1.5}, {"num_workers": -1}):
        with pytest.raises(ValueError):
            build_dataset([{"x": torch.tensor(0.0)}], Compose([det]), **bad)
    with pytest.raises(ValueError, match="empty"):
        build_dataset([], Compose([det]))


def test_build_dataset_with_train_transforms_caches_the_windowed_volume(tmp_path):
    image = np.broadcast_to(-200 + 50 * np.arange(6), (20, 18, 6)).astype(np.int16)
    label = np.zeros((20, 18, 6), np.uint8)
    label[5:15, 5:12, 2:4] = 2
    entry = {
        "image": str(save_nifti(image, np.eye(4), tmp_path / "i.nii.gz")),
        "label": str(save_nifti(label, np.eye(4), tmp_path / "l.nii.gz")),
    }
    ds = build_dataset([entry], build_transforms("train", num_slices=3, num_samples=2), cache_rate=1.0)
    cached = ds._cache[0]
    # cache holds the windowed volume, edge-padded by k//2 slices at both ends (before any random crop)
    assert tuple(cached["image"].shape) == (1, 20, 18, 8)
    np.testing.assert_allclose(cached["image"][0, 0, 0].numpy(), [0, 0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.5], atol=1e-6)
    crops = ds[0]
    assert len(crops) == 2 and tuple(crops[0]["image"].shape) == (3, 20, 18)


def test_estimate_cache_with_a_fake_budget():
    datalist = [{"image": f"case{i}.nii.gz"} for i in range(3)]
    # 3 items of 100 bytes, 250 available, headroom 0.8 -> budget 200 -> 2 items fit
    est = estimate_cache(datalist, 1.0, item_bytes=100, available_bytes=250, headroom=0.8)
    assert (est.cache_bytes, est.budget_bytes, est.cached_items) == (300, 200, 3)
    assert not est.fits and "does NOT fit" in est.message()
    assert int(3 * est.max_cache_rate) == 2  # the suggested rate caches exactly what fits
    again = estimate_cache(datalist, est.max_cache_rate, item_bytes=100, available_bytes=250, headroom=0.8)
    assert again.fits and again.cached_items == 2
    with pytest.raises(MemoryError, match="cache_rate"):
        ensure_cache_fits(datalist, 1.0, item_bytes=100, available_bytes=250, headroom=0.8)


def test_estimate_cache_one_of_three_and_uneven_items():
    datalist = [{"image": f"case{i}.nii.gz"} for i in range(3)]
    # budget 150: only the first item fits; a floor to 2 decimals (0.33) would cache none (int(3 * 0.33) == 0)
    est = estimate_cache(datalist, 1.0, item_bytes=100, available_bytes=150, headroom=1.0)
    assert int(3 * est.max_cache_rate) == 1
    # CacheDataset caches the FIRST items: sizes 180, 10, 10 with budget 150 -> none fits, although the mean (67) would
    est = estimate_cache(datalist, 1.0, item_bytes=[180, 10, 10], available_bytes=150, headroom=1.0)
    assert int(3 * est.max_cache_rate) == 0
    assert estimate_cache(datalist, 0.34, item_bytes=[180, 10, 10], available_bytes=150, headroom=1.0).fits is False
    assert estimate_cache(datalist, 1.0, item_bytes=np.int64(40), available_bytes=150, headroom=1.0).fits
    with pytest.raises(ValueError):
        estimate_cache(datalist, 1.0, item_bytes=[1, 2])
    with pytest.raises(ValueError, match="empty"):
        estimate_cache([], 1.0, item_bytes=1)


def test_cached_item_bytes_from_the_header(tmp_path):
    # stored I,P,L (30 axial slices of 2.5 mm, 40 x 50 in-plane of 0.8 mm); RAS shape (50, 40, 30)
    affine = np.array([[0.0, 0, -0.8, 0], [0, -0.8, 0, 0], [-2.5, 0, 0, 0], [0, 0, 0, 1]])
    path = save_nifti(np.zeros((30, 40, 50), np.int16), affine, tmp_path / "ipl.nii.gz")
    assert cached_item_bytes(path) == 50 * 40 * 30 * 8
    # resample z to 5 mm (15 slices), in-plane kept; then resize in-plane to 16 x 16
    assert cached_item_bytes(path, pixdim=(-1, -1, 5.0)) == 50 * 40 * 15 * 8
    assert (
        cached_item_bytes(path, pixdim=(1.6, 1.6, 5.0), in_plane_size=(16, 16), bytes_per_voxel=4) == 16 * 16 * 15 * 4
    )
    with pytest.raises(ValueError, match="nope"):
        cached_item_bytes(tmp_path / "nope.nii.gz")


def test_save_nifti_roundtrip_and_validation(tmp_path):
    affine = np.diag([0.7, 0.7, 2.0, 1.0])
    affine[:3, 3] = (1, 2, 3)
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4) - 10
    path = save_nifti(data, affine, tmp_path / "sub" / "x.nii.gz")
    img = nib.load(str(path))
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    np.testing.assert_allclose(img.affine, affine)
    assert img.get_data_dtype() == np.int16 and int(img.header["qform_code"]) == 1
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.nii.gz"]  # no temporary left
    with pytest.raises(ValueError, match="nii"):
        save_nifti(data, affine, tmp_path / "x.png")
    with pytest.raises(ValueError, match="4x4"):
        save_nifti(data, np.eye(3), tmp_path / "y.nii")


@pytest.mark.parametrize("k", [3, 7])
def test_val_cache_holds_one_volume_not_k_stacked_copies(tmp_path, k):
    image = np.zeros((12, 10, 5), np.int16)
    label = np.zeros((12, 10, 5), np.uint8)
    entry = {
        "image": str(save_nifti(image, np.eye(4), tmp_path / "i.nii.gz")),
        "label": str(save_nifti(label, np.eye(4), tmp_path / "l.nii.gz")),
    }
    ds = build_dataset([entry], build_transforms("val", num_slices=k), cache_rate=1.0)
    cached = ds._cache[0]
    assert tuple(cached["image"].shape) == (1, 12, 10, 5)
    assert cached["image"].numel() * 4 + cached["label"].numel() * 4 == cached_item_bytes(entry["image"])
    out = ds[0]
    assert tuple(out["image"].shape) == (k, 12, 10, 5) and tuple(out["label"].shape) == (1, 12, 10, 5)


def test_a_truncated_case_is_a_clear_error_while_caching(tmp_path):
    """--check_data false on a truncated volume: the caching error names the file (not a raw EOFError traceback)."""
    import pytest

    from pipelines.engine.data import build_dataset
    from pipelines.synthesize import synthesize
    from transforms import build_transforms

    data = tmp_path / "kits"
    synthesize("kits", cases=2, size=32, out=data, seed=0)
    img = data / "case_00001" / "imaging.nii.gz"
    img.write_bytes(img.read_bytes()[:200])  # truncated gzip
    items = [{"image": str(data / f"case_0000{i}" / "imaging.nii.gz"), "label": str(data / f"case_0000{i}" / "segmentation.nii.gz")} for i in (0, 1)]
    with pytest.raises(ValueError, match=r"cannot read .*case_00001.*check_dataset"):
        build_dataset(items, build_transforms("val", spatial_dims=2, num_slices=3, task="kits", in_plane_size=None), cache_rate=1.0, num_workers=0)
