"""DICOM-SEG output of inference (pipelines.engine.dicom_seg): the real JPEG 2000 series through a bundle run to a
SEG that highdicom reads back, checked against the NIfTI prediction by an independent DICOM-geometry computation,
and received by a pynetdicom storage SCP over a real C-STORE association."""

from __future__ import annotations

import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipelines.engine.dicom_seg import (
    check_dicom_seg,
    find_source_series,
    parse_send,
    seg_path,
    series_frames,
)

SERIES = "ct/totalsegmentator_example/example_ct_dicom"
#: identifiers the test puts into its copy of the series (as a PACS export has them)
PATIENT_NAME = "DOE^JANE"


def _pacs_copy(src: Path, dst: Path) -> tuple[str, str]:
    """Copy the (anonymised, UID-less) example series with the Study/Series/SOP UIDs and a patient name a PACS export
    carries; pixel data untouched (same JPEG 2000 bytes). Returns (study UID, series UID)."""
    import pydicom
    from pydicom.uid import generate_uid

    study, series = generate_uid(), generate_uid()
    dst.mkdir(parents=True)
    for path in sorted(src.iterdir()):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.PatientName, ds.PatientID = PATIENT_NAME, "PID-4711"
        ds.save_as(dst / path.name, enforce_file_format=True)
    return study, series


def _expected_frame(ds, label_map: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The label map sampled at every pixel centre of a DICOM slice, from the DICOM geometry alone (LPS -> RAS)."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    dr, dc = (float(v) for v in ds.PixelSpacing)
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    lps = ipp[None, None] + c[..., None] * dc * iop[None, None, :3] + r[..., None] * dr * iop[None, None, 3:]
    ras = lps * np.array([-1.0, -1.0, 1.0])
    ijk = (np.linalg.inv(affine) @ np.concatenate([ras, np.ones((rows, cols, 1))], axis=-1)[..., None])[..., :3, 0]
    idx = np.rint(ijk).astype(int)
    assert np.abs(ijk - idx).max() < 1e-3, "the NIfTI grid is not the DICOM grid"
    return label_map[idx[..., 0], idx[..., 1], idx[..., 2]]


def _thresholding_student(path: Path, series: Path) -> Path:
    """A tiny 2.5D student checkpoint whose head thresholds one feature (classes at its 40 % / 80 % quantiles on three
    windowed slices of ``series``): a random head predicts one class everywhere, this one all three labels."""
    import pydicom
    import torch

    import networks

    kwargs = {"spatial_dims": 2, "in_channels": 3, "out_channels": 3, "base_width": 8}
    torch.manual_seed(0)
    net = networks.create("resnet18_student", **kwargs).eval()
    files = sorted(series.iterdir())[8:11]
    hu = np.stack([pydicom.dcmread(f).pixel_array * float(pydicom.dcmread(f).RescaleSlope) + float(pydicom.dcmread(f).RescaleIntercept) for f in files])
    x = torch.nn.functional.interpolate(torch.as_tensor(np.clip((hu + 200) / 500, 0, 1), dtype=torch.float32)[None], size=(32, 32))
    seen = {}
    hook = net.head.register_forward_hook(lambda m, i, o: seen.setdefault("features", i[0].detach()))
    with torch.no_grad():
        net(x)
    hook.remove()
    features = seen["features"][0]
    j = int(features.flatten(1).std(dim=1).argmax())
    q40, q80 = (float(v) for v in torch.quantile(features[j].flatten(), torch.tensor([0.4, 0.8])))
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.weight[:, j, 0, 0] = torch.tensor([0.0, 1.0, 2.0])
        net.head.bias.copy_(torch.tensor([0.0, -q40, -q40 - q80]))
    settings = {
        "role": "resnet18_student",
        "network_name": "resnet18_student",
        "network_kwargs": kwargs,
        "preprocessing": {"spatial_dims": 2, "num_slices": 3, "task": "kits", "window": None, "pixdim": None, "in_plane_size": [32, 32], "roi_size": None},
    }
    torch.save({"model": net.state_dict(), "epoch": 1, "settings": settings}, path)
    return path


class _StorageSCP:
    """A pynetdicom storage SCP on localhost (a free port) keeping what it receives."""

    def __init__(self, ae_title: str = "TESTSCP") -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.received: list = []
        self.ae = AE(ae_title=ae_title)
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.lock = threading.Lock()
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]
        self.ae_title = ae_title

    def _store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.lock:
            self.received.append(ds)
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


@pytest.mark.slow
def test_dicom_series_to_dicom_seg_through_inference(shared_data, tmp_path):
    """The done-when test of issue 18: DICOM series -> inference -> SEG (read back by highdicom; frames = the NIfTI
    prediction on every source slice, by an independent geometry computation; references the source series and frame
    of reference; segment codes; C-STOREd to an SCP). No patient name in the logs or in volumes.csv."""
    import highdicom as hd
    import pydicom

    from tests.reliability.conftest import run_bundle

    study_uid, series_uid = _pacs_copy(shared_data / SERIES, tmp_path / "in" / "ct")
    ckpt = _thresholding_student(tmp_path / "student.pt", tmp_path / "in" / "ct")
    scp = _StorageSCP()
    out = tmp_path / "out"
    try:
        proc = run_bundle(
            "inferring", "bundles/resnet18_student/configs/inference.yaml", "--input_dir", str(tmp_path / "in"),
            "--output_dir", str(out), "--checkpoint", str(ckpt), "--output_format", "both",
            "--send", f"127.0.0.1:{scp.port} {scp.ae_title}", timeout=300,
        )  # fmt: skip
    finally:
        scp.close()
    [nifti] = sorted(out.glob("*.nii.gz"))
    seg_file = seg_path(nifti)
    assert seg_file.is_file() and nifti.with_name(nifti.name.replace(".nii.gz", ".ctbl")).is_file()
    pred_img = nib.load(nifti)
    pred = np.asarray(pred_img.dataobj)
    assert {0, 1, 2} <= set(np.unique(pred).tolist()), "a one-class prediction would not check the frames"

    seg = hd.seg.segread(seg_file)
    sources = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((tmp_path / "in" / "ct").iterdir()))}
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [series_uid]
    assert {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == set(sources)
    first = next(iter(sources.values()))
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID and seg.StudyInstanceUID == study_uid
    assert str(seg.PatientName) == PATIENT_NAME and "InstitutionName" not in seg and "PatientAge" not in seg
    # frames: the SEG's label per source instance equals the NIfTI prediction sampled on that instance's pixels
    uids = sorted(sources)
    got = seg.get_pixels_by_source_instance(uids, combine_segments=True, dtype=np.uint8)
    for k, uid in enumerate(uids):
        np.testing.assert_array_equal(got[k], _expected_frame(sources[uid], pred, pred_img.affine), err_msg=f"instance {k}")
    # segment coding: SNOMED CT kidney / neoplasm of kidney, and the algorithm named with its version
    by_number = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert by_number[1].SegmentLabel == "kidney" and by_number[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "64033007"
    assert by_number[2].SegmentLabel == "kidney tumor" and by_number[2].SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
    assert by_number[2].AnatomicRegionSequence[0].CodeValue == "64033007"
    assert {s.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator for s in seg.SegmentSequence} == {"SCT"}
    algorithm = by_number[1].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "ctdistill resnet18_student" and "weights" in algorithm.AlgorithmVersion
    # the SCP received the SEG over a real association
    assert [str(ds.SOPInstanceUID) for ds in scp.received] == [str(seg.SOPInstanceUID)]
    assert scp.received[0].FrameOfReferenceUID == seg.FrameOfReferenceUID
    # nothing identifying in the logs or the CSV
    assert PATIENT_NAME not in proc.stdout + proc.stderr and "DOE" not in (out / "volumes.csv").read_text()


def test_series_frames_undo_axis_order_and_flips():
    """A label volume stored with permuted / flipped axes maps onto the series layout (hand-built 3x4x2 case)."""
    rows, cols, n = 4, 3, 2
    layout = np.arange(cols * rows * n).reshape(cols, rows, n)  # the converter's (column, row flipped, slice)
    series_affine = np.diag([0.5, 0.7, 2.0, 1.0])
    # the same voxels with the first two axes swapped and the slice axis flipped
    other = np.flip(layout.transpose(1, 0, 2), axis=2)
    m = np.zeros((4, 4))
    m[0, 1] = m[1, 0] = 1.0
    m[2, 2], m[2, 3], m[3, 3] = -1.0, n - 1, 1.0  # other index -> layout index
    affine = series_affine @ m
    from pipelines.engine.dicom_seg import _grid_map

    mapping = _grid_map(series_affine, (cols, rows, n), affine, other.shape)
    assert mapping == [(1, False), (0, False), (2, True)]
    frames = series_frames(other, mapping)
    for k in range(n):  # frame k pixel [r, c] = layout[c, rows - 1 - r, k]
        for r in range(rows):
            for c in range(cols):
                assert frames[k, r, c] == layout[c, rows - 1 - r, k]
    assert _grid_map(series_affine, (cols, rows, n), series_affine @ np.diag([1, 1, 1.5, 1]), layout.shape) is None


def test_nifti_input_needs_a_dicom_reference(shared_data, tmp_path):
    """NIfTI inputs: dicom-seg is refused with the remedy; a reference folder whose series does not match is refused
    naming the grids; the matching series is found by geometry (a real conversion of the shared series)."""
    from pipelines.dicom_to_nifti import convert_dicom

    src = shared_data / SERIES
    [nifti] = convert_dicom(src, tmp_path / "nii")
    inputs = [{"image": str(nifti)}]
    with pytest.raises(ValueError, match="--dicom_reference <folder of that series>"):
        check_dicom_seg(inputs, "dicom-seg")
    with pytest.raises(ValueError, match="is for DICOM-SEG output"):
        check_dicom_seg(inputs, "nifti", send="localhost:104 PACS")
    with pytest.raises(ValueError, match="not one of nifti, dicom-seg, both"):
        check_dicom_seg(inputs, "dicom")
    assert check_dicom_seg(inputs, "both", dicom_reference=str(src))
    image = nib.load(nifti)
    series, mapping = find_source_series(src, image.shape, image.affine)
    assert mapping == [(0, False), (1, False), (2, False)] and len(series.paths) == 20
    shifted = image.affine.copy()
    shifted[:3, 3] += 5.0
    with pytest.raises(ValueError, match=r"no DICOM series in .* lies on the voxel grid .* shape \(512, 512, 20\)"):
        find_source_series(src, image.shape, shifted)


@pytest.mark.parametrize("bad", ["localhost 104 PACS", "localhost:0 PACS", "localhost:104", "h:104 A_TITLE_LONGER_THAN_16"])
def test_send_knob_is_validated(bad):
    with pytest.raises(ValueError, match="HOST:PORT AE_TITLE"):
        parse_send(bad)
    assert parse_send("pacs.local:11112 ORTHANC") == ("pacs.local", 11112, "ORTHANC") and parse_send("null") is None


def test_anonymised_series_gets_derived_uids_with_a_warning(shared_data, tmp_path, caplog):
    """The shared series has no Study/Series/SOP UIDs in its data sets (anonymised): the SEG takes the SOP UIDs from
    the file meta, derives the study/series UIDs (the same on every write) and says a PACS cannot link it."""
    import logging

    import highdicom as hd

    from pipelines.engine.dicom_seg import DicomSegWriter, _scan

    src = shared_data / SERIES
    [series] = _scan(src)
    labels = np.zeros(series.shape, np.uint8)
    labels[100:200, 150:300, 5:9] = 1
    labels[120:140, 160:180, 6:8] = 2
    writer = DicomSegWriter("lits", "ctdistill test", "0 weights 0")
    with caplog.at_level(logging.WARNING, logger="pipelines.engine.dicom_seg"):
        first = hd.seg.segread(writer(labels, series.affine, tmp_path / "a" / "case.nii.gz", dicom_dir=str(src)))
        second = hd.seg.segread(writer(labels, series.affine, tmp_path / "b" / "case.nii.gz", dicom_dir=str(src)))
    assert "cannot link" in caplog.text
    assert first.ReferencedSeriesSequence[0].SeriesInstanceUID == second.ReferencedSeriesSequence[0].SeriesInstanceUID
    assert first.SOPInstanceUID != second.SOPInstanceUID  # each SEG is its own instance
    assert [s.SegmentLabel for s in first.SegmentSequence] == ["liver", "liver tumor"]
    assert int(first.NumberOfFrames) == 4 + 2  # organ on 4 slices, tumor on 2: empty frames are left out
