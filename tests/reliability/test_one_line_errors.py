"""Issue 19, raw tracebacks and misleading messages: each bad input is one clear line naming the file or knob,
before long work, with the inputs unchanged."""

from __future__ import annotations

from tests.reliability.conftest import snapshot


def test_dicom_pixel_spacing_zero_is_one_line_naming_the_series(tmp_path, capsys):
    from pipelines.dicom_to_nifti import main as dicom_main
    from tests.pipelines.test_dicom_to_nifti import _z_positions, write_series

    src = tmp_path / "src"
    write_series(src, _z_positions([0, 2, 4]), spacing=(0.0, 0.0), number=6)
    before = snapshot(src)
    assert dicom_main([str(src), str(tmp_path / "out")]) != 0
    printed = capsys.readouterr()
    text = (printed.out + printed.err).strip()
    assert "PixelSpacing" in text and "series6_" in text and "Traceback" not in text and "LinAlgError" not in text
    assert not list(tmp_path.glob("out/*.nii.gz"))
    assert snapshot(src) == before


def test_rgb_nifti_is_a_clear_error_in_check_dataset(tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    from pipelines.check_dataset import main as check_main

    case = tmp_path / "kits" / "case_00000"
    case.mkdir(parents=True)
    rgb = np.zeros((16, 16, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(case / "imaging.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8), np.uint8), np.eye(4)), str(case / "segmentation.nii.gz"))
    assert check_main([str(tmp_path / "kits")]) == 1
    printed = capsys.readouterr()
    assert "Traceback" not in printed.err and "UFunc" not in printed.out + printed.err
    assert any(line.startswith("ERROR") and "RGB" in line and "imaging.nii.gz" in line for line in printed.out.splitlines())
