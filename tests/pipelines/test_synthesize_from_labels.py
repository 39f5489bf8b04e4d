"""pipelines.synthesize --from-labels: CT built around real label maps, oriented by the affine, labels unchanged."""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipelines.check_dataset import check_dataset
from pipelines.datalist import find_cases
from pipelines.synthesize import main, synthesize_from_labels

SXY, SZ = 5.0, 8.0  # mm, like a coarse KiTS19 scan
SHAPE_IPL = (16, 80, 80)  # KiTS19 stores the axial axis first: (I, P, L)


def _ipl_affine(sxy: float = SXY, sz: float = SZ) -> np.ndarray:
    """KiTS19-style affine: array axis 0 -> inferior, 1 -> posterior, 2 -> left (axcodes I,P,L), origin 0."""
    return np.array([[0, 0, -sxy, 0], [0, -sxy, 0, 0], [-sz, 0, 0, 0], [0, 0, 0, 1.0]])


def _world(affine: np.ndarray, shape) -> tuple[np.ndarray, ...]:
    idx = np.indices(shape).reshape(3, -1).astype(np.float64)
    world = affine[:3, :3] @ idx + affine[:3, 3:4]
    return tuple(w.reshape(shape) for w in world)


def _kidney_label(shape=SHAPE_IPL, affine=None, kidneys=(-1, 1), tumor=True) -> tuple[np.ndarray, np.ndarray]:
    """Label map drawn in world (RAS) mm on an I,P,L grid: kidneys 65 mm either side of the midline, 60 mm
    posterior of the field-of-view centre; a 16 mm tumor bulging from the patient's right (+x) kidney."""
    affine = _ipl_affine() if affine is None else affine
    x, y, z = _world(affine, shape)
    cx, cy, cz = ((w.min() + w.max()) / 2 for w in (x, y, z))
    label = np.zeros(shape, dtype=np.uint8)
    for side in kidneys:
        inside = ((x - cx - side * 65) / 30) ** 2 + ((y - cy + 60) / 24) ** 2 + ((z - cz) / 50) ** 2 < 1.0
        label[inside] = 1
    if tumor:
        label[(x - cx - 85) ** 2 + (y - cy + 60) ** 2 + (z - cz - 5) ** 2 < 16**2] = 2
    return label, affine


def _save(label: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(label, affine), str(path))
    return path


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {
        p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    return np.asarray(image.dataobj), image.affine


@pytest.fixture(scope="module")
def labels(tmp_path_factory) -> Path:
    """Two KiTS19-layout cases: both kidneys + tumor (case_00000), right kidney only + tumor (case_00003)."""
    root = tmp_path_factory.mktemp("labels")
    _save(*_kidney_label(), root / "case_00000" / "segmentation.nii.gz")
    _save(*_kidney_label(kidneys=(1,)), root / "case_00003" / "segmentation.nii.gz")
    return root


@pytest.fixture(scope="module")
def native(labels, tmp_path_factory) -> Path:
    """The cohort on the source grid (no resampling)."""
    out = tmp_path_factory.mktemp("native") / "out"
    synthesize_from_labels(labels, out, size=None, z_spacing=0, seed=5)
    return out


def test_layout_dataset_json_and_checks_pass(native):
    expected = [f"case_0000{i}/{name}" for i in (0, 3) for name in ("imaging.nii.gz", "segmentation.nii.gz")]
    assert _files(native) == expected + ["dataset.json"]
    meta = json.loads((native / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "kidney": 1, "tumor": 2} and meta["numTraining"] == 2
    assert meta["training"][1] == {"image": "case_00003/imaging.nii.gz", "label": "case_00003/segmentation.nii.gz"}
    details = meta["synthetic"]["cases"]["case_00003/imaging.nii.gz"]
    assert details["source"] == "case_00003/segmentation.nii.gz" and details["source_axcodes"] == "IPL"
    assert "in_progress" not in meta["synthetic"]
    layout, cases = find_cases(native)
    assert layout == "kits19" and [c["case"] for c in cases] == ["case_00000", "case_00003"]
    assert all(c["labelled"] for c in cases)
    assert [p for p in check_dataset(native) if p.severity == "error"] == []


def test_native_grid_keeps_the_label_oriented_by_the_affine(labels, native):
    for case in ("case_00000", "case_00003"):
        source = nib.load(str(labels / case / "segmentation.nii.gz"))
        canonical = nib.as_closest_canonical(source)  # nibabel's own reorientation, as the reference
        label, affine = _load(native / case / "segmentation.nii.gz")
        image = nib.load(str(native / case / "imaging.nii.gz"))
        assert nib.aff2axcodes(affine) == ("R", "A", "S")
        assert label.dtype == np.uint8 and image.get_data_dtype() == np.int16 and image.shape == label.shape
        np.testing.assert_array_equal(label, np.asarray(canonical.dataobj))
        np.testing.assert_allclose(affine, canonical.affine, atol=1e-6)
        np.testing.assert_allclose(image.affine, affine, atol=1e-6)
        # the tumor sits at the same place in the world, on the patient's right of the field-of-view centre
        src = np.asarray(source.dataobj)
        world_in = np.array([w[src == 2].mean() for w in _world(source.affine, src.shape)])
        world_out = np.array([w[label == 2].mean() for w in _world(affine, label.shape)])
        np.testing.assert_allclose(world_out, world_in, atol=1e-6)
        x_in = _world(source.affine, src.shape)[0]
        assert world_out[0] > (x_in.min() + x_in.max()) / 2 + 50


def test_resampled_grid_samples_the_input_at_every_output_centre(tmp_path):
    # 96 x 96 at 4 mm -> 32 x 32 at 12 mm; 12 slices at 10 mm -> 4 at 30 mm: output centres fall on input centres
    affine = _ipl_affine(4.0, 10.0)
    source, _ = _kidney_label((12, 96, 96), affine)
    _save(source, affine, tmp_path / "labels" / "case_00000" / "segmentation.nii.gz")
    synthesize_from_labels(tmp_path / "labels", tmp_path / "out", size=32, z_spacing=30.0, seed=1)
    label, out_affine = _load(tmp_path / "out" / "case_00000" / "segmentation.nii.gz")
    assert label.shape == (32, 32, 4)
    np.testing.assert_allclose(np.linalg.norm(out_affine[:3, :3], axis=0), [12.0, 12.0, 30.0])
    grid = np.vstack([np.indices(label.shape).reshape(3, -1), np.ones(label.size)])
    continuous = (np.linalg.inv(affine) @ out_affine @ grid)[:3]
    nearest = np.rint(continuous).astype(int)
    np.testing.assert_allclose(continuous, nearest, atol=1e-4)
    np.testing.assert_array_equal(label.ravel(), source[nearest[0], nearest[1], nearest[2]])
    # same field of view in-plane: the outer voxel edges coincide
    edges_in = [np.sort(w.ravel()[[0, -1]]) for w in _world(affine, source.shape)]
    edges_out = [np.sort(w.ravel()[[0, -1]]) for w in _world(out_affine, label.shape)]
    for axis, (half_in, half_out) in enumerate(zip((2.0, 2.0), (6.0, 6.0))):
        np.testing.assert_allclose(edges_out[axis] + [-half_out, half_out], edges_in[axis] + [-half_in, half_in])


def _surface(mask: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with an in-plane 4-neighbour in ``outside``."""
    hit = np.zeros_like(mask)
    for axis in (0, 1):
        for step in (1, -1):
            hit |= np.roll(outside, step, axis=axis)
    return mask & hit


def _ring(mask: np.ndarray) -> np.ndarray:
    """Voxels outside ``mask`` with an in-plane 4-neighbour in it."""
    return _surface(~mask, mask)


def _check_anatomy(hu: np.ndarray, label: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CT-like intensities around the labelled kidneys, checked against the documented model (HU_MODEL); returns
    the world x (mm) of every voxel and the spine mask below the kidneys' centroid."""
    kidney, tumor, fg = label == 1, label == 2, label > 0
    cortex = np.median(hu[_surface(kidney, label == 0)])
    assert 140 <= cortex <= 210, cortex  # enhancing cortex 150-200 HU on the kidney surface
    assert 60 <= np.median(hu[kidney]) <= 210  # cortex and medulla (70-110 HU)
    lesion = np.median(hu[tumor])
    assert 15 <= lesion <= 125, lesion  # tumor 20-120 HU
    assert cortex - lesion >= 25, (cortex, lesion)  # hypo-enhancing against the cortex
    assert np.median(hu[_ring(fg)]) <= -50  # perirenal fat (~-90 HU) around the kidneys
    corners = np.concatenate([hu[:2, :2].ravel(), hu[-2:, -2:].ravel()])
    assert np.median(corners) <= -950  # air outside the body
    assert hu.min() >= -1024 and hu.max() <= 3071
    # the spine (>= 400 HU, below the ribs) lies on the kidneys' midline, posterior to the kidneys' centroid
    x, y, z = _world(affine, label.shape)
    below = z[0, 0, :] <= z[fg].mean()
    bone = (hu >= 400) & below[None, None, :]
    assert (bone.sum(axis=(0, 1))[below] >= 3).all()
    assert np.median(y[bone]) < y[fg].mean() - 10
    return x, bone


def test_ct_like_intensities_around_the_real_kidneys(native):
    label, affine = _load(native / "case_00000" / "segmentation.nii.gz")
    hu = np.asarray(nib.load(str(native / "case_00000" / "imaging.nii.gz")).dataobj).astype(np.float64)
    x, bone = _check_anatomy(hu, label, affine)
    xs = x[label > 0]
    kidneys_midline = 0.5 * (xs[xs < xs.mean()].mean() + xs[xs >= xs.mean()].mean())
    assert abs(np.median(x[bone]) - kidneys_midline) <= 15
    # one kidney only: still a CT-like case around it
    label, affine = _load(native / "case_00003" / "segmentation.nii.gz")
    hu = np.asarray(nib.load(str(native / "case_00003" / "imaging.nii.gz")).dataobj).astype(np.float64)
    _check_anatomy(hu, label, affine)


def test_same_seed_same_bytes_other_seed_other_image(labels, native, tmp_path):
    again = tmp_path / "again"
    synthesize_from_labels(labels, again, size=None, z_spacing=0, seed=5)
    assert _files(again) == _files(native)
    for name in _files(native):
        assert (again / name).read_bytes() == (native / name).read_bytes(), name
    other = tmp_path / "other"
    synthesize_from_labels(labels, other, cases=1, size=None, z_spacing=0, seed=6)
    case = "case_00000"
    assert (other / case / "segmentation.nii.gz").read_bytes() == (native / case / "segmentation.nii.gz").read_bytes()
    a, _ = _load(other / case / "imaging.nii.gz")
    b, _ = _load(native / case / "imaging.nii.gz")
    assert not np.array_equal(a, b)


def test_bad_inputs_are_refused_with_the_file_named(tmp_path):
    with pytest.raises(ValueError, match="nowhere.*does not exist"):
        synthesize_from_labels(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no label files found in .*empty"):
        synthesize_from_labels(tmp_path / "empty", tmp_path / "out")
    bad, affine = _kidney_label()
    bad[0, 0, 0] = 3
    _save(bad, affine, tmp_path / "values" / "case_00000" / "segmentation.nii.gz")
    with pytest.raises(ValueError, match=r"case_00000/segmentation.nii.gz: label values outside \{0, 1, 2\}: 3 "):
        synthesize_from_labels(tmp_path / "values", tmp_path / "out")
    fractional = bad.astype(np.float32)
    fractional[0, 0, 0] = 1.5
    _save(fractional, affine, tmp_path / "float" / "case_00001" / "segmentation.nii.gz")
    with pytest.raises(ValueError, match=r"case_00001/segmentation.nii.gz: label values outside \{0, 1, 2\}: 1.5 "):
        synthesize_from_labels(tmp_path / "float", tmp_path / "out")
    _save(np.zeros((8, 8), np.uint8), np.eye(4), tmp_path / "flat2d" / "a.nii.gz")
    with pytest.raises(ValueError, match="a.nii.gz: label map has 2 dimensions"):
        synthesize_from_labels(tmp_path / "flat2d", tmp_path / "out")
    _save(np.zeros((8, 8, 4, 2), np.uint8), np.eye(4), tmp_path / "flat4d" / "b.nii.gz")
    with pytest.raises(ValueError, match="b.nii.gz: label map has 4 dimensions"):
        synthesize_from_labels(tmp_path / "flat4d", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written for a bad input


def test_output_folder_rules_and_input_untouched(labels, tmp_path):
    before = _snapshot(labels)
    with pytest.raises(ValueError, match="inside the label folder"):
        synthesize_from_labels(labels, labels / "synthetic")
    with pytest.raises(ValueError, match="inside the label folder"):
        synthesize_from_labels(labels, labels)
    with pytest.raises(ValueError, match="only 2 label files"):
        synthesize_from_labels(labels, tmp_path / "x", cases=3)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="did not write .*notes.txt"):
        synthesize_from_labels(labels, foreign, cases=1)
    real = tmp_path / "real_kits"  # a real dataset's case folder, without a synthesize dataset.json
    _save(*_kidney_label(), real / "case_00000" / "segmentation.nii.gz")
    with pytest.raises(ValueError, match="did not write"):
        synthesize_from_labels(labels, real, cases=1)
    out = tmp_path / "out"
    synthesize_from_labels(labels, out, size=32, seed=0)
    synthesize_from_labels(labels, out, size=32, seed=0)  # rerun into its own output: fine
    with pytest.raises(ValueError, match="earlier synthesize run .*case_00003"):
        synthesize_from_labels(labels, out, cases=1, size=32)  # would leave case_00003 behind
    with pytest.raises(SystemExit):
        main(["--from-labels", str(labels), "--task", "lits", "--out", str(tmp_path / "lits")])
    assert _snapshot(labels) == before


def test_cli_from_labels(labels, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "pipelines.synthesize", "--from-labels", str(labels), "--cases", "1"]
    result = subprocess.run(
        cmd + ["--size", "40", "--z-spacing", "16", "--out", str(out)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("wrote 1 kits cases from the labels of"), result.stdout
    label, affine = _load(out / "case_00000" / "segmentation.nii.gz")
    assert label.shape == (40, 40, 8)  # 16 slices x 8 mm = 128 mm -> 8 x 16 mm
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [10.0, 10.0, 16.0])


def _nearest_candidates_match(out_label: np.ndarray, out_affine: np.ndarray, source: nib.Nifti1Image) -> np.ndarray:
    """Whether each output voxel holds the source voxel nearest its centre (either one when it lies on a border)."""
    data = np.asanyarray(source.dataobj)
    grid = np.vstack([np.indices(out_label.shape).reshape(3, -1), np.ones(out_label.size)])
    continuous = (np.linalg.inv(source.affine) @ out_affine @ grid)[:3]
    ok = np.zeros(out_label.size, dtype=bool)
    for offsets in itertools.product((-1e-3, 1e-3), repeat=3):  # float32 affines on disk
        idx = np.floor(continuous + 0.5 + np.array(offsets)[:, None]).astype(int)
        idx = np.clip(idx, 0, np.array(data.shape)[:, None] - 1)
        ok |= data[idx[0], idx[1], idx[2]] == out_label.ravel()
    return ok


def test_real_kits19_labels(shared_data, tmp_path):
    labels = shared_data / "kits19_labels"
    if not (labels / "case_00000" / "segmentation.nii.gz").is_file():
        pytest.skip(f"real KiTS19 labels not found at {labels}; research data is not in the repo")
    out = tmp_path / "kits"
    synthesize_from_labels(labels, out, cases=2, size=64, z_spacing=3.0, seed=0)
    assert [p for p in check_dataset(out) if p.severity == "error"] == []
    for case in ("case_00000", "case_00001"):
        source = nib.load(str(labels / case / "segmentation.nii.gz"))
        assert nib.aff2axcodes(source.affine) == ("I", "P", "L")
        label, affine = _load(out / case / "segmentation.nii.gz")
        assert nib.aff2axcodes(affine) == ("R", "A", "S") and label.shape[:2] == (64, 64)
        np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0)[2], 3.0)
        assert _nearest_candidates_match(label, affine, source).all()
        src = np.asanyarray(source.dataobj)
        voxel_in, voxel_out = abs(np.linalg.det(source.affine[:3, :3])), abs(np.linalg.det(affine[:3, :3]))
        for value, tolerance in ((1, 0.1), (2, 0.3)):
            ml_in, ml_out = (src == value).sum() * voxel_in / 1e3, (label == value).sum() * voxel_out / 1e3
            assert abs(ml_out - ml_in) <= tolerance * ml_in, (case, value, ml_in, ml_out)
        hu = np.asarray(nib.load(str(out / case / "imaging.nii.gz")).dataobj).astype(np.float64)
        _check_anatomy(hu, label, affine)
