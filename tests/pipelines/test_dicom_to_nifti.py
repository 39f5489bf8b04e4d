"""pipelines.dicom_to_nifti on synthetic series (written with pydicom) and on the two real series in ../shared."""

from __future__ import annotations

import gzip
import hashlib
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

from pipelines.dicom_to_nifti import DicomSeriesError, convert_dicom, main

PHI = {
    "PatientName": "Doe^Jane",
    "PatientID": "PID-998877",
    "PatientBirthDate": "19700101",
    "InstitutionName": "Saint Example Hospital",
    "ReferringPhysicianName": "House^Gregory",
}
ROWS, COLS = 12, 10
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _pixels(k: int) -> np.ndarray:
    """Stored values of slice k (rows, cols): distinct per row, column and slice."""
    r, c = np.mgrid[0:ROWS, 0:COLS]
    return (100 * k + 10 * r + c).astype(np.uint16)


def _new_dataset(sop_class: str) -> Dataset:
    """A dataset with file meta, the PHI tags and a 16-bit MONOCHROME2 ROWS x COLS image description."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    for key, value in PHI.items():
        setattr(ds, key, value)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = ROWS, COLS
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    return ds


def write_series(
    folder: Path,
    positions: Sequence[Sequence[float]],
    *,
    orientation: Sequence[Sequence[float]] | Sequence[float] = AXIAL,
    spacing: tuple[float, float] = (0.7, 0.8),
    slope: float = 1.0,
    intercept: float = -1024.0,
    modality: str = "CT",
    uid: str | None = None,
    number: int = 3,
    description: str = "Abdomen 2.0",
    syntax: str = ExplicitVRLittleEndian,
    seed: int = 0,
    extra: dict | None = None,
    drop: Sequence[str] = (),
) -> str:
    """One series, slice k at ``positions[k]`` holding ``_pixels(k)``; files in random order with random names."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or generate_uid()
    study = generate_uid()
    rng = random.Random(seed)
    order = list(range(len(positions)))
    rng.shuffle(order)
    for k in order:
        ds = _new_dataset(CTImageStorage)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, uid
        ds.Modality, ds.SeriesNumber, ds.SeriesDescription = modality, number, description
        ds.InstanceNumber = len(positions) - k  # deliberately opposite to the spatial order
        iop = orientation[k] if isinstance(orientation[0], (list, tuple)) else orientation
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in positions[k]]
        ds.PixelSpacing = [f"{spacing[0]}", f"{spacing[1]}"]
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope}", f"{intercept}"
        ds.PixelData = _pixels(k).tobytes()
        for key, value in (extra or {}).items():
            setattr(ds, key, value)
        for key in drop:
            delattr(ds, key)
        if syntax != ExplicitVRLittleEndian:
            ds.compress(syntax)
        name = hashlib.sha1(f"{uid}{k}{seed}".encode()).hexdigest()[:12]  # no extension, unrelated to k
        ds.save_as(folder / name, enforce_file_format=True)
    return uid


def _z_positions(z: Sequence[float], x0: float = -40.0, y0: float = -30.0) -> list[list[float]]:
    return [[x0, y0, float(v)] for v in z]


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    return np.asarray(image.dataobj), image.affine


def test_shuffled_extensionless_series_ordered_by_position(tmp_path):
    z = [12.0, 14.5, 17.0, 19.5]
    write_series(tmp_path / "src", _z_positions(z), spacing=(0.7, 0.8))
    (tmp_path / "src" / "README").write_text("not a DICOM file")
    written = convert_dicom(tmp_path / "src", tmp_path / "out")
    assert (
        len(written) == 1 and written[0].name.startswith("series3_") and written[0].name.endswith(".nii.gz")
    )
    data, affine = _read(written[0])
    assert data.shape == (COLS, ROWS, 4) and data.dtype == np.int16
    for k in range(4):  # array (column, row flipped, slice) with slice k at z[k]
        expected = _pixels(k).astype(np.int32) - 1024
        assert np.array_equal(data[:, :, k], expected[::-1, :].T)
    # hand-computed: x_RAS = -(x0 + c*0.8), y_RAS = -(y0 + r*0.7) with r = ROWS-1-j, z = 12 + 2.5 k
    expected_affine = np.array(
        [[-0.8, 0, 0, 40.0], [0, 0.7, 0, 30.0 - (ROWS - 1) * 0.7], [0, 0, 2.5, 12.0], [0, 0, 0, 1]]
    )
    np.testing.assert_allclose(affine, expected_affine, atol=1e-4)


def test_world_coordinates_of_an_oblique_series(tmp_path):
    """Every voxel lands where the DICOM standard puts its pixel (C.7.6.2.1.1), converted LPS -> RAS."""
    angle = np.deg2rad(20)
    row_dir = np.array([np.cos(angle), np.sin(angle), 0.0])
    col_dir = np.array([0.0, 0.0, -1.0])  # coronal-ish, tilted
    normal = np.cross(row_dir, col_dir)
    origin = np.array([5.0, -7.0, 30.0])
    positions = [list(origin + normal * 1.5 * k) for k in (3, 0, 2, 1)]  # listed out of order
    write_series(tmp_path / "src", positions, orientation=[*row_dir, *col_dir], spacing=(0.9, 0.6))
    (path,) = convert_dicom(tmp_path / "src", tmp_path / "out")
    data, affine = _read(path)
    assert data.shape == (COLS, ROWS, 4)
    for i, j, k in [(0, 0, 0), (COLS - 1, 0, 3), (3, 7, 2), (9, 11, 1)]:
        r, c = ROWS - 1 - j, i
        slice_index = sorted(range(4), key=lambda n: float(np.dot(positions[n], normal)))[k]
        lps = np.array(positions[slice_index]) + c * 0.6 * row_dir + r * 0.9 * col_dir
        ras = lps * np.array([-1, -1, 1])
        np.testing.assert_allclose((affine @ [i, j, k, 1])[:3], ras, atol=1e-3)
        assert data[i, j, k] == int(_pixels(slice_index)[r, c]) - 1024


def test_gantry_tilt_is_reported_and_the_sheared_affine_keeps_world_coordinates(tmp_path, caplog):
    tilt = 15.0
    # axial slices 2.5 mm apart along z, each shifted 2.5 * tan(15 deg) mm along y (LPS): the gantry-tilt geometry
    positions = [[-40.0, -30.0 + 2.5 * k * np.tan(np.deg2rad(tilt)), 2.5 * k] for k in range(4)]
    write_series(tmp_path / "src", positions)
    with caplog.at_level(logging.WARNING, logger="pipelines.dicom_to_nifti"):
        (path,) = convert_dicom(tmp_path / "src", tmp_path / "out")
    assert any("15.0 degrees off their normal" in r.getMessage() for r in caplog.records)
    data, affine = _read(path)
    for i, j, k in [(0, 0, 0), (9, 11, 3), (4, 5, 2)]:
        r, c = ROWS - 1 - j, i
        lps = np.array(positions[k]) + c * 0.8 * np.array([1.0, 0, 0]) + r * 0.7 * np.array([0, 1.0, 0])
        np.testing.assert_allclose((affine @ [i, j, k, 1])[:3], lps * np.array([-1, -1, 1]), atol=1e-3)
        assert data[i, j, k] == int(_pixels(k)[r, c]) - 1024
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipelines.dicom_to_nifti"):
        convert_dicom(tmp_path / "src", tmp_path / "out_again")
        write_series(tmp_path / "straight", _z_positions([0, 2.5, 5.0]))
        convert_dicom(tmp_path / "straight", tmp_path / "out_straight")
    assert sum("off their normal" in r.getMessage() for r in caplog.records) == 1  # the tilted series only


def test_two_series_one_folder_and_series_selection(tmp_path, capsys):
    src = tmp_path / "src"
    uid_a = write_series(src, _z_positions([0, 2, 4]), number=2, description="A", seed=1)
    uid_b = write_series(src, _z_positions([0, 1, 2, 3, 4]), number=5, description="B/thin", seed=2)
    assert main([str(src), str(tmp_path / "all")]) == 0
    names = sorted(p.name for p in (tmp_path / "all").iterdir())
    assert len(names) == 2 and names[0].startswith("series2_") and names[1].startswith("series5_")
    assert sorted(_read(tmp_path / "all" / n)[0].shape[2] for n in names) == [3, 5]
    printed = capsys.readouterr().out
    assert all(n in printed for n in names)
    (only,) = convert_dicom(src, tmp_path / "one", series_uid=uid_b)
    assert _read(only)[0].shape == (COLS, ROWS, 5) and uid_b not in only.name and uid_a
    (again,) = convert_dicom(src, tmp_path / "hash", series_uid=only.name.split("_")[-1].split(".")[0])
    assert again.name == only.name
    with pytest.raises(ValueError, match="not found.*available"):
        convert_dicom(src, tmp_path / "none", series_uid="1.2.3.4")


def test_gap_is_an_error_naming_the_positions(tmp_path, capsys):
    write_series(tmp_path / "src", _z_positions([0, 2, 4, 8, 10]))  # slice at 6 missing
    with pytest.raises(DicomSeriesError, match=r"4\.000->8\.000 \(4\.000 mm\)"):
        convert_dicom(tmp_path / "src", tmp_path / "out")
    assert main([str(tmp_path / "src"), str(tmp_path / "out")]) == 1
    assert "gap or uneven slice spacing" in capsys.readouterr().out
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_mixed_orientation_is_an_error(tmp_path):
    sagittal = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    write_series(tmp_path / "src", _z_positions([0, 2, 4, 6]), orientation=[AXIAL, AXIAL, sagittal, AXIAL])
    with pytest.raises(DicomSeriesError, match="mixed ImageOrientationPatient.*x3.*x1"):
        convert_dicom(tmp_path / "src", tmp_path / "out")


def test_non_ct_is_a_warning_and_rescale_gives_float(tmp_path, caplog):
    write_series(tmp_path / "src", _z_positions([0, 3, 6]), modality="MR", slope=0.5, intercept=-10.0)
    with caplog.at_level(logging.WARNING, logger="pipelines.dicom_to_nifti"):
        (path,) = convert_dicom(tmp_path / "src", tmp_path / "out")
    assert any("Modality is 'MR', not CT" in r.getMessage() for r in caplog.records)
    data, _ = _read(path)
    assert data.dtype == np.float32
    assert np.allclose(data[:, :, 1], (_pixels(1) * 0.5 - 10.0)[::-1, :].T)


@pytest.mark.filterwarnings("ignore:The number of bytes of compressed pixel data")
def test_compressed_transfer_syntax_is_decoded(tmp_path):
    write_series(tmp_path / "src", _z_positions([0, 2, 4]), syntax=RLELossless)
    first = next((tmp_path / "src").iterdir())
    assert pydicom.dcmread(first).file_meta.TransferSyntaxUID == RLELossless
    (path,) = convert_dicom(tmp_path / "src", tmp_path / "out")
    assert np.array_equal(_read(path)[0][:, :, 2], (_pixels(2).astype(np.int32) - 1024)[::-1, :].T)


def test_no_patient_data_in_outputs_or_logs(tmp_path, caplog, capsys):
    write_series(tmp_path / "src", _z_positions([0, 2, 4]))
    with caplog.at_level(logging.DEBUG):
        assert main([str(tmp_path / "src"), str(tmp_path / "out"), "--verbose"]) == 0
    (path,) = (tmp_path / "out").iterdir()
    payload = gzip.decompress(path.read_bytes()) + path.name.encode()
    text = caplog.text + capsys.readouterr().out
    for value in PHI.values():
        for fragment in {value, value.split("^")[0]}:
            assert fragment.encode() not in payload and fragment not in text, fragment


def test_sources_are_never_written(tmp_path):
    src = tmp_path / "src"
    write_series(src, _z_positions([0, 2, 4]))
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in src.iterdir()}
    with pytest.raises(ValueError, match="inside the DICOM source"):
        convert_dicom(src, src / "nifti")
    with pytest.raises(ValueError, match="inside the DICOM source"):
        convert_dicom(src, src)
    convert_dicom(src, tmp_path / "out")
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in src.iterdir()} == before
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp")] == []


def test_localizers_and_secondary_captures_are_skipped(tmp_path, caplog):
    src = tmp_path / "study"
    sagittal, coronal = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0), (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    write_series(src / "scout", _z_positions([0, 0, 0]), orientation=[AXIAL, sagittal, coronal], number=1, seed=1,
                 extra={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})  # fmt: skip
    write_series(
        src / "dose", _z_positions([0]), number=999, seed=2, drop=("ImagePositionPatient", "ImageOrientationPatient")
    )
    write_series(src / "ct", _z_positions([0, 2, 4]), number=3, seed=3)
    with caplog.at_level(logging.WARNING, logger="pipelines.dicom_to_nifti"):
        (path,) = convert_dicom(src, tmp_path / "out")
    assert path.name.startswith("series3_") and _read(path)[0].shape == (COLS, ROWS, 3)
    reasons = [r.getMessage() for r in caplog.records]
    assert (
        sum("localizer (scout) image" in m for m in reasons) == 3
        and sum("secondary capture" in m for m in reasons) == 1
    )


def write_enhanced(
    path: Path,
    positions: Sequence[Sequence[float]],
    *,
    frame_order: Sequence[int],
    orientation: Sequence[float] = AXIAL,
    spacing: tuple[float, float] = (0.7, 0.8),
    slope: float = 1.0,
    intercept: float = -1024.0,
    per_frame_rescale: Sequence[tuple[float, float]] | None = None,
    with_positions: bool = True,
) -> None:
    """One enhanced CT file: frame f holds slice ``frame_order[f]`` (``_pixels`` of it) at that slice's position."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = _new_dataset(EnhancedCTImageStorage)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.SeriesNumber, ds.SeriesDescription = "CT", 5, "Enhanced"
    ds.NumberOfFrames = len(frame_order)

    def item(**sequences):
        group = Dataset()
        for name, attrs in sequences.items():
            inner = Dataset()
            for key, value in attrs.items():
                setattr(inner, key, value)
            setattr(group, name, [inner])
        return group

    ds.SharedFunctionalGroupsSequence = [
        item(
            PlaneOrientationSequence={"ImageOrientationPatient": [f"{v:.6f}" for v in orientation]},
            PixelMeasuresSequence={"PixelSpacing": [f"{spacing[0]}", f"{spacing[1]}"], "SliceThickness": "2.5"},
            PixelValueTransformationSequence={"RescaleSlope": f"{slope}", "RescaleIntercept": f"{intercept}", "RescaleType": "HU"},
        )
    ]
    per_frame = []
    for k in frame_order:
        groups = {"PlanePositionSequence": {"ImagePositionPatient": [f"{v:.4f}" for v in positions[k]]}} if with_positions else {}
        if per_frame_rescale is not None:
            s, i = per_frame_rescale[k]
            groups["PixelValueTransformationSequence"] = {"RescaleSlope": f"{s}", "RescaleIntercept": f"{i}"}
        per_frame.append(item(**groups))
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = np.stack([_pixels(k) for k in frame_order]).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_enhanced_multi_frame_equals_the_single_frame_series(tmp_path):
    """Frames stored out of spatial order in one enhanced file give the same voxels and affine as the same slices
    written as a classic single-frame series."""
    z = [12.0, 14.5, 17.0, 19.5, 22.0]
    write_series(tmp_path / "classic", _z_positions(z), spacing=(0.7, 0.8))
    write_enhanced(tmp_path / "enhanced" / "IM0001", _z_positions(z), frame_order=[3, 0, 4, 1, 2], spacing=(0.7, 0.8))
    (classic,) = convert_dicom(tmp_path / "classic", tmp_path / "out_classic")
    (enhanced,) = convert_dicom(tmp_path / "enhanced", tmp_path / "out_enhanced")
    a, affine_a = _read(classic)
    b, affine_b = _read(enhanced)
    assert b.shape == (COLS, ROWS, 5) and b.dtype == np.int16
    assert np.array_equal(a, b)
    np.testing.assert_allclose(affine_b, affine_a, atol=1e-6)
    assert not any(v.encode() in gzip.decompress(enhanced.read_bytes()) for v in PHI.values())


def test_enhanced_per_frame_rescale_and_missing_positions(tmp_path, caplog):
    z = [0.0, 3.0, 6.0]
    rescale = [(1.0, -1024.0), (2.0, -1000.0), (1.0, -1024.0)]
    write_enhanced(tmp_path / "src" / "mf", _z_positions(z), frame_order=[2, 1, 0], per_frame_rescale=rescale)
    (path,) = convert_dicom(tmp_path / "src", tmp_path / "out")
    data, _ = _read(path)
    for k, (slope, intercept) in enumerate(rescale):
        assert np.array_equal(data[:, :, k], (_pixels(k).astype(np.int32) * int(slope) + int(intercept))[::-1, :].T)
    write_enhanced(tmp_path / "nopos" / "mf", _z_positions(z), frame_order=[0, 1, 2], with_positions=False)
    with caplog.at_level(logging.WARNING, logger="pipelines.dicom_to_nifti"), pytest.raises(ValueError, match="no DICOM image series"):
        convert_dicom(tmp_path / "nopos", tmp_path / "out2")
    assert any("frame 1 of 3" in r.getMessage() for r in caplog.records)


def test_no_dicom_found(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="no DICOM image series found"):
        convert_dicom(tmp_path / "src", tmp_path / "out")


# ---- real series (../shared/data/ct) ----


@pytest.fixture(scope="module")
def real(shared_data, tmp_path_factory) -> dict[str, Path]:
    """Each real series converted once: {"ts": TotalSegmentator example (JPEG 2000), "ircadb": 3D-IRCADb patient 1}."""
    ct = shared_data / "ct"
    out = tmp_path_factory.mktemp("real")
    converted = {}
    for key, folder in (
        ("ts", ct / "totalsegmentator_example" / "example_ct_dicom"),
        ("ircadb", ct / "ircadb_patient1_dicom"),
    ):
        if not folder.is_dir():
            pytest.skip(f"{folder} not found")
        (converted[key],) = convert_dicom(folder, out / key)
    return converted


def test_totalsegmentator_series_matches_reference_geometry(real, shared_data):
    ref = nib.load(str(shared_data / "ct" / "totalsegmentator_example" / "example_seg_dicom.nii.gz"))
    image = nib.load(str(real["ts"]))
    assert image.shape == ref.shape == (512, 512, 20)
    np.testing.assert_allclose(image.header.get_zooms()[:3], (0.9765625, 0.9765625, 2.0), atol=1e-3)
    assert np.abs(image.affine - ref.affine).max() < 1e-3
    hu = np.asarray(image.dataobj)
    assert hu.dtype == np.int16 and -1100 <= hu.min() and hu.max() <= 3500
    # orientation against the reference segmentation: its liver (label 5) is homogeneous soft tissue in our volume,
    # not in a left-right or anterior-posterior mirror of it
    liver = np.asarray(ref.dataobj) == 5

    def spread(volume: np.ndarray) -> float:
        values = volume[liver].astype(np.float64)
        return float(np.abs(values - np.median(values)).mean())

    assert 0 < np.median(hu[liver]) < 150 and spread(hu) < 30
    assert spread(hu[::-1]) > 3 * spread(hu) and spread(hu[:, ::-1]) > 3 * spread(hu)


def test_totalsegmentator_voxels_match_pydicom(real, shared_data):
    """Independent read of the most superior slice (JPEG 2000): pixel (r, c) -> voxel (c, rows-1-r, last)."""
    folder = shared_data / "ct" / "totalsegmentator_example" / "example_ct_dicom"
    top = max((pydicom.dcmread(p) for p in folder.iterdir()), key=lambda d: float(d.ImagePositionPatient[2]))
    expected = top.pixel_array.astype(np.int32) * int(top.RescaleSlope) + int(top.RescaleIntercept)
    hu = np.asarray(nib.load(str(real["ts"])).dataobj)
    assert np.array_equal(hu[:, :, -1], expected[::-1, :].T)


def test_ircadb_series(real):
    image = nib.load(str(real["ircadb"]))
    assert image.shape == (512, 512, 129)
    np.testing.assert_allclose(image.header.get_zooms()[:3], (0.57, 0.57, 1.6), atol=1e-3)
    hu = np.asarray(image.dataobj)
    assert -1100 <= hu.min() < -500 and 200 < hu.max() <= 3500
    payload = gzip.decompress(real["ircadb"].read_bytes())
    assert b"liver_01" not in payload and b"IRCAD" not in payload and b"20090527" not in payload
