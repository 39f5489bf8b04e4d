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
