"""pipelines.synthesize: deterministic procedural CT cohorts in the KiTS19 and LiTS layouts, plausible HU per tissue."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from pipelines.synthesize import main, synthesize

SIZE = 48


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    out = tmp_path_factory.mktemp("kits")
    synthesize("kits", cases=3, size=SIZE, out=out, seed=7)
    return out


@pytest.fixture(scope="module")
def lits(tmp_path_factory):
    out = tmp_path_factory.mktemp("lits")
    synthesize("lits", cases=3, size=SIZE, out=out, seed=7)
    return out


def _pairs(root, task):
    if task == "kits":
        return [
            (root / f"case_{i:05d}" / "imaging.nii.gz", root / f"case_{i:05d}" / "segmentation.nii.gz")
            for i in range(3)
        ]
    return [(root / f"volume-{i}.nii", root / f"segmentation-{i}.nii") for i in range(3)]


def test_kits_layout_and_dataset_json(kits):
    assert _files(kits) == ["case_00000/imaging.nii.gz", "case_00000/segmentation.nii.gz", "case_00001/imaging.nii.gz",
                            "case_00001/segmentation.nii.gz", "case_00002/imaging.nii.gz", "case_00002/segmentation.nii.gz",
                            "dataset.json"]  # fmt: skip
    meta = json.loads((kits / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "kidney": 1, "tumor": 2}
    assert meta["numTraining"] == 3 and meta["channel_names"] == {"0": "CT"}
    assert meta["training"][1] == {"image": "case_00001/imaging.nii.gz", "label": "case_00001/segmentation.nii.gz"}


def test_lits_layout_and_dataset_json(lits):
    assert _files(lits) == ["dataset.json"] + [
        f"{kind}-{i}.nii" for kind in ("segmentation", "volume") for i in range(3)
    ]
    meta = json.loads((lits / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "liver": 1, "tumor": 2}
    assert [t["image"] for t in meta["training"]] == ["volume-0.nii", "volume-1.nii", "volume-2.nii"]


@pytest.mark.parametrize("task", ["kits", "lits"])
def test_volumes_affine_spacing_and_labels(task, kits, lits):
    root = kits if task == "kits" else lits
    for image_path, label_path in _pairs(root, task):
        image, label = nib.load(str(image_path)), nib.load(str(label_path))
        assert image.get_data_dtype() == np.int16
        assert image.shape == label.shape and image.shape[:2] == (SIZE, SIZE)
        np.testing.assert_allclose(image.affine, label.affine)
        affine = image.affine
        assert nib.aff2axcodes(affine) == ("R", "A", "S") and np.linalg.det(affine[:3, :3]) > 0
        assert int(image.header["sform_code"]) > 0 and int(image.header["qform_code"]) > 0
        zooms = np.array(image.header.get_zooms()[:3])
        np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), zooms, rtol=1e-5)
        assert zooms[0] == pytest.approx(zooms[1]) and 1.5 <= zooms[2] / zooms[0] <= 2.5  # anisotropic slices
        assert 300 <= zooms[0] * SIZE <= 450  # an abdominal field of view
        lab = np.asarray(label.dataobj)
        assert set(np.unique(lab)) == {0, 1, 2}  # tumor present in every case


def _body_fat(hu: np.ndarray) -> np.ndarray:
    """HU of the outermost voxel inside the anterior skin line along the central column, every slice (the
    subcutaneous fat is 12-25 mm thick, thicker than a voxel at these sizes)."""
    column = hu[hu.shape[0] // 2, :, :]  # (y, z); anterior = high y in RAS
    values = []
    for z in range(column.shape[1]):
        inside = np.nonzero(column[:, z] > -500)[0]
        if inside.size:
            skin = inside.max()
            values.append(column[skin, z])
    return np.array(values)


@pytest.mark.parametrize("task", ["kits", "lits"])
def test_plausible_hu_per_tissue(task, kits, lits):
    root = kits if task == "kits" else lits
    for image_path, label_path in _pairs(root, task):
        hu = np.asarray(nib.load(str(image_path)).dataobj).astype(np.float64)
        lab = np.asarray(nib.load(str(label_path)).dataobj)
        organ, tumor = np.median(hu[lab == 1]), np.median(hu[lab == 2])
        if task == "kits":
            assert 130 <= organ <= 210, organ  # enhancing cortex (150-200) dominates the kidney
        else:
            assert 40 <= organ <= 80, organ  # liver ~60
        assert 15 <= tumor <= 125, tumor  # heterogeneous, partly necrotic, 20-120 HU
        corners = np.concatenate([hu[:3, :3].ravel(), hu[-3:, -3:].ravel()])
        assert np.median(corners) <= -950  # air outside the body
        fat = np.median(_body_fat(hu))
        assert -140 <= fat <= -60, fat  # subcutaneous fat ~ -100
        per_slice_bone = (hu >= 400).sum(axis=(0, 1))
        assert per_slice_bone.min() >= 5  # the spine runs through every slice
        assert hu.min() >= -1024 and hu.max() <= 3071
        if task == "lits":  # CT-like noise, sigma 10-20 HU: robust sigma of neighbour differences in the flat liver
            both = (lab[1:] == 1) & (lab[:-1] == 1)
            diffs = (hu[1:] - hu[:-1])[both]
            sigma = 1.4826 * np.median(np.abs(diffs - np.median(diffs))) / np.sqrt(2)
            assert 8 <= sigma <= 23, sigma


def test_same_seed_same_bytes_different_seed_differs(tmp_path, kits):
    again = tmp_path / "again"
    synthesize("kits", cases=3, size=SIZE, out=again, seed=7)
    assert _files(again) == _files(kits)
    for name in _files(kits):
        assert (again / name).read_bytes() == (kits / name).read_bytes(), name
    other = tmp_path / "other"
    synthesize("kits", cases=1, size=SIZE, out=other, seed=8)
    a = np.asarray(nib.load(str(other / "case_00000" / "imaging.nii.gz")).dataobj)
    b = np.asarray(nib.load(str(kits / "case_00000" / "imaging.nii.gz")).dataobj)
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="task"):
        synthesize("brats", cases=1, size=SIZE, out=tmp_path)
    with pytest.raises(ValueError, match="cases"):
        synthesize("kits", cases=0, size=SIZE, out=tmp_path)
    with pytest.raises(ValueError, match="size"):
        synthesize("kits", cases=1, size=16, out=tmp_path)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="file.txt"):
        synthesize("kits", cases=1, size=SIZE, out=a_file)
    with pytest.raises(SystemExit):
        main(["--task", "kits", "--cases", "0", "--out", str(tmp_path / "x")])


def test_cli_module(tmp_path):
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "pipelines.synthesize",
        "--task",
        "lits",
        "--cases",
        "1",
        "--size",
        "32",
        "--out",
        str(out),
    ]
    result = subprocess.run(cmd + ["--seed", "1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (out / "volume-0.nii").exists() and (out / "segmentation-0.nii").exists() and (out / "dataset.json").exists()
