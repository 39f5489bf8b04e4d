"""Issue 19, identifier leaks: no free-text DICOM field (SeriesDescription, names, IDs) reaches a file name, a case
id, ``volumes.csv`` or a log line of ``dicom_to_nifti`` or DICOM inference: series number plus a hash only."""

from __future__ import annotations

import logging
from pathlib import Path

from pipelines.dicom_to_nifti import main as dicom_main
from pipelines.engine.inference import discover_inputs, output_path
from tests.pipelines.test_dicom_to_nifti import PHI, _z_positions, write_series

#: the issue's SeriesDescription: a patient's name and MRN typed into a free-text field
DESCRIPTION = "ABD CT DOE JANE MRN4455667"
#: pieces that must never appear (any case), from the description and the patient tags
SECRETS = ("doe", "jane", "mrn4455667", "4455667", "pid-998877", "house", "saint")


def _leaks(text: str) -> list[str]:
    low = text.lower()
    return [s for s in SECRETS if s in low]


def test_dicom_to_nifti_names_and_logs_carry_no_free_text_field(tmp_path, caplog, capsys):
    src = tmp_path / "src"
    write_series(src, _z_positions([0, 2, 4]), number=7, description=DESCRIPTION, modality="OT DOE JANE")
    caplog.set_level(logging.DEBUG)
    assert dicom_main([str(src), str(tmp_path / "out"), "--verbose"]) == 0
    names = [p.name for p in (tmp_path / "out").iterdir()]
    assert len(names) == 1 and names[0].startswith("series7_")
    printed = capsys.readouterr()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert _leaks(" ".join(names)) == [] and _leaks(printed.out + printed.err) == [] and _leaks(logged) == [], (names, logged)


def test_dicom_inference_case_ids_carry_no_free_text_field(tmp_path, caplog):
    """DICOM inference converts the series first: its image names (the case ids of ``volumes.csv``) and the label
    maps it will write hold the series number and a hash only."""
    src = tmp_path / "in" / "patient"
    write_series(src, _z_positions([0, 2, 4]), number=4, description=DESCRIPTION)
    caplog.set_level(logging.DEBUG)
    found = discover_inputs(tmp_path / "in", tmp_path / "out")
    assert len(found) == 1
    image = Path(found[0]["image"])
    written = output_path(tmp_path / "out", image)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert image.name.startswith("series4_") and _leaks(str(image)) == [] and _leaks(str(written)) == []
    assert _leaks(logged) == [], logged
    assert set(PHI)  # the series carries the patient tags too (written by the helper)
