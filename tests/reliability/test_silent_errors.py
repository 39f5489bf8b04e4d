"""Silently wrong results become clear errors (issue 12): undefined or invented voxel spacing, 2D/4D or unreadable
inference inputs, DICOM slices that cannot be read, a single-slice series' invented slice spacing."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from pipelines.check_dataset import main as check_main
from pipelines.dicom_to_nifti import DicomSeriesError, convert_dicom
from pipelines.dicom_to_nifti import main as dicom_main
from pipelines.engine.inference import discover_inputs
from tests.pipelines.test_dicom_to_nifti import _z_positions, write_series
from tests.reliability.conftest import leftovers, one_line, snapshot, write_nifti

#: header faults: (raw pixdim or None, affine, sform code, qform code, a word the message must hold)
HEADERS = {
    "pixdim_zero_no_sform": ((0.0, 0.8, 2.5), np.eye(4), 0, 0, "pixdim"),
    "pixdim_negative_no_sform": ((-0.8, 0.8, 2.5), np.eye(4), 0, 0, "pixdim"),
    "zero_length_axis": (None, np.diag([0.0, 0.8, 2.5, 1.0]), 1, 0, "zero"),
    "anisotropic_0.1x0.1x50": (None, np.diag([0.1, 0.1, 50.0, 1.0]), 1, 1, "anisotropic"),
}


def _bad_header(case: str, path: Path, data: np.ndarray) -> Path:
    pixdim, affine, sform, qform, _ = HEADERS[case]
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_nifti(path, data, affine, pixdim=pixdim, sform_code=sform, qform_code=qform)


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_check_dataset_flags_undefined_or_implausible_spacing(case, tmp_path, ct_volume, capsys):
    root = tmp_path / "kits" / "case_00000"
    image = _bad_header(case, root / "imaging.nii.gz", ct_volume)
    label = np.zeros(ct_volume.shape, np.uint8)
    label[4:8, 4:8, 2:4] = 1
    _bad_header(case, root / "segmentation.nii.gz", label)
    before = snapshot(tmp_path)
    assert check_main([str(tmp_path / "kits")]) == 1
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(f"ERROR {image}:")]
    assert any(HEADERS[case][-1] in ln for ln in lines), lines
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["pixdim_zero_no_sform", "zero_length_axis", "2d", "4d", "fake_nifti"])
def test_inference_refuses_inputs_it_would_get_wrong(case, tmp_path, ct_volume):
    src = tmp_path / "in"
    src.mkdir()
    write_nifti(src / "good.nii.gz", ct_volume, np.diag([0.8, 0.8, 2.5, 1.0]))
    bad = src / "bad.nii.gz"
    if case in HEADERS:
        _bad_header(case, bad, ct_volume)
    elif case == "2d":
        write_nifti(bad, ct_volume[..., 0], np.diag([0.8, 0.8, 1.0, 1.0]))
    elif case == "4d":
        write_nifti(bad, np.stack([ct_volume, ct_volume], axis=-1), np.diag([0.8, 0.8, 2.5, 1.0]))
    else:
        bad.write_bytes(b"not gzip, not NIfTI")
    before = snapshot(src)
    with pytest.raises(ValueError) as err:
        discover_inputs(src, tmp_path / "out")
    assert str(bad) in str(err.value) and one_line(str(err.value)), str(err.value)
    assert snapshot(src) == before
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ------------------------------------------------------------------------------------------------ DICOM


def _series_by_z(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file()]
    return sorted(files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))


@pytest.mark.parametrize("where", ["edge", "middle"])
@pytest.mark.parametrize("damage", ["header_truncated", "meta_truncated", "pixels_truncated"])
def test_dicom_slice_that_cannot_be_read_is_named_never_dropped(where, damage, tmp_path):
    src = tmp_path / "dicom"
    write_series(src, _z_positions([0.0, 2.0, 4.0, 6.0, 8.0]))
    files = _series_by_z(src)
    victim = files[0] if where == "edge" else files[2]
    data = victim.read_bytes()
    victim.write_bytes(data[: {"header_truncated": 300, "meta_truncated": 150, "pixels_truncated": len(data) - 60}[damage]])
    before = snapshot(src)
    out = tmp_path / "nifti"
    with pytest.raises(DicomSeriesError) as err:
        convert_dicom(src, out)
    assert str(victim) in str(err.value) and one_line(str(err.value)), str(err.value)
    assert not list(out.glob("*.nii*")) if out.exists() else True
    assert snapshot(src) == before
    assert not leftovers(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_dicom_slice_without_read_permission_is_named(tmp_path, capsys):
    src = tmp_path / "dicom"
    write_series(src, _z_positions([0.0, 2.0, 4.0]))
    victim = _series_by_z(src)[0]
    victim.chmod(0)
    try:
        assert dicom_main([str(src), str(tmp_path / "out")]) == 1
    finally:
        victim.chmod(0o644)
    assert str(victim) in capsys.readouterr().out


def test_single_slice_series_uses_slice_thickness_and_warns(tmp_path, caplog):
    src = tmp_path / "dicom"
    write_series(src, _z_positions([10.0]), extra={"SliceThickness": "1.6"})
    with caplog.at_level(logging.WARNING, logger="pipelines.dicom_to_nifti"):
        (path,) = convert_dicom(src, tmp_path / "out")
    affine = nib.load(str(path)).affine
    assert np.linalg.norm(affine[:3, 2]) == pytest.approx(1.6)
    assert any("single slice" in r.getMessage() and "1.6 mm" in r.getMessage() for r in caplog.records)
