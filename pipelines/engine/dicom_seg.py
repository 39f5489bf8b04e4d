"""DICOM Segmentation (SEG) objects of inference label maps, for PACS, and their C-STORE to a DICOM node.

Inference (``--output_format dicom-seg|both``) writes ``<case>.seg.dcm`` beside (or instead of) ``<case>.nii.gz``:
a binary DICOM-SEG (``highdicom.seg.Segmentation``) whose frames are the label map on the source series' own grid,
one frame per source slice that holds a segment. It

- references the source series (Referenced Series Sequence with every source SOP instance, per-frame Derivation
  Image / Source Image items) and shares its Frame of Reference UID, so a viewer overlays it on the images;
- copies from the source only the Patient and General Study modules PACS needs to file it (highdicom copies
  patient name/ID/birth date/sex and the study UID/date/time/ID/accession number/referring physician; nothing else:
  no institution, no series description, no free text);
- codes its segments with SNOMED CT: organ = category "Anatomical Structure" (91723000), type Kidney (64033007) or
  Liver (10200004); tumor = category "Morphologically Abnormal Structure" (49755003), type Neoplasm (108369006) with
  the organ as anatomic region; labels from :mod:`pipelines.engine.labels` ("kidney", "kidney tumor");
- names the algorithm: family "Artificial Intelligence" (DCM 123110), name ``ctdistill <role>``, version the package
  version and the first 12 hex digits of the weights' SHA-256.

The source series of a DICOM input is the one the input folder's conversion came from; a NIfTI input needs one
(``--dicom_reference DIR``). Either way the series is found by geometry: the series of the folder whose voxel grid
(:func:`pipelines.dicom_to_nifti.series_affine`) is the label map's, up to axis order and flips; none matching is
an error naming the folder and the grids found. Logs name files and the series' 8-character hash only.

``--send "HOST:PORT AE_TITLE"`` stores each SEG to a DICOM node (``pynetdicom`` C-STORE, calling AE ``CTDISTILL``);
a refused association or a failure status stops the run naming the node (the file stays written).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "OUTPUT_FORMATS",
    "SEG_SUFFIX",
    "CALLING_AE",
    "SourceSeries",
    "seg_path",
    "parse_send",
    "check_output_format",
    "find_source_series",
    "series_frames",
    "segment_descriptions",
    "write_dicom_seg",
    "send_dicom",
    "DicomSegWriter",
    "dicom_seg_writer",
    "check_dicom_seg",
]

logger = logging.getLogger(__name__)

#: values of the inference knob ``--output_format``
OUTPUT_FORMATS: tuple[str, ...] = ("nifti", "dicom-seg", "both")
#: ``<case>.nii.gz`` -> ``<case>.seg.dcm``
SEG_SUFFIX = ".seg.dcm"
#: the calling AE title of ``--send``
CALLING_AE = "CTDISTILL"
#: tolerance, in voxels, when matching the label map's grid with a series' grid
_GRID_TOL = 0.05
#: the Patient Study module (age, size, weight, history, ...): not copied into the SEG
_PATIENT_STUDY = (
    "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence", "PatientAge", "PatientSize", "PatientWeight",
    "PatientBodyMassIndex", "MeasuredAPDimension", "MeasuredLateralDimension", "MedicalAlerts", "Allergies",
    "SmokingStatus", "PregnancyStatus", "LastMenstrualDate", "PatientState", "AdditionalPatientHistory", "Occupation",
    "PatientSexNeutered", "ReasonForVisit", "ReasonForVisitCodeSequence", "AdmissionID", "IssuerOfAdmissionIDSequence",
    "ServiceEpisodeID", "ServiceEpisodeDescription", "IssuerOfServiceEpisodeIDSequence",
)  # fmt: skip
_SEND = re.compile(r"^\s*(?P<host>[^\s:]+):(?P<port>\d+)\s+(?P<ae>\S{1,16})\s*$")


@dataclass
class SourceSeries:
    """A DICOM series as the converter lays it out (``pipelines.dicom_to_nifti``).

    Attributes:
        paths: the files, ordered along the slice normal (``[k]`` is ``volume[:, :, k]``).
        affine: RAS affine of the layout (column, row flipped, slice).
        shape: (Columns, Rows, slices).
        short_id: 8 hex characters of a hash of the series UID (safe to log).
    """

    paths: list[Path]
    affine: np.ndarray
    shape: tuple[int, int, int]
    short_id: str


def seg_path(label_map: str | os.PathLike) -> Path:
    """Where the DICOM-SEG of a label map goes: ``<dir>/<case>.nii.gz`` -> ``<dir>/<case>.seg.dcm``."""
    p = Path(label_map)
    stem = p.name[: -len(".nii.gz")] if p.name.endswith(".nii.gz") else p.stem
    return p.with_name(stem + SEG_SUFFIX)


def check_output_format(output_format: str) -> str:
    """Validate ``--output_format``.

    Returns:
        the format, lower case.

    Raises:
        ValueError: a value not in :data:`OUTPUT_FORMATS`.
    """
    value = str(output_format).strip().lower()
    if value not in OUTPUT_FORMATS:
        raise ValueError(f"--output_format {output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}.")
    return value


def parse_send(send: Any) -> tuple[str, int, str] | None:
    """Parse ``--send "HOST:PORT AE_TITLE"``.

    Args:
        send: the knob value; None / "null" / "" for no sending.

    Returns:
        ``(host, port, called AE title)`` or None.

    Raises:
        ValueError: a value of another form, or a port outside 1..65535.
    """
    from pipelines.engine.errors import optional_knob

    if optional_knob(send) is None:
        return None
    m = _SEND.match(str(send))
    if not m or not 0 < int(m["port"]) < 65536:
        raise ValueError(f"--send {send!r} is not 'HOST:PORT AE_TITLE' (e.g. --send 'pacs.local:104 ORTHANC').")
    return m["host"], int(m["port"]), m["ae"]


def _grid_map(series_affine: np.ndarray, series_shape: Sequence[int], affine: np.ndarray, shape: Sequence[int]) -> list[tuple[int, bool]] | None:
    """How an array on grid (``affine``, ``shape``) becomes the series' layout: per series axis, (array axis, flipped).

    None when the grids differ (not the same voxels up to axis order and flips).
    """
    try:
        m = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.asarray(series_affine, dtype=np.float64)
    except np.linalg.LinAlgError:
        return None
    rot, shift = m[:3, :3], m[:3, 3]
    signs = np.rint(rot)
    if not np.allclose(rot, signs, atol=_GRID_TOL / max(series_shape)) or sorted(np.abs(signs).sum(axis=0)) != [1, 1, 1]:
        return None
    if sorted(np.abs(signs).sum(axis=1)) != [1, 1, 1]:
        return None
    mapping = []
    for b in range(3):
        a = int(np.flatnonzero(signs[:, b])[0])
        flipped = signs[a, b] < 0
        start = (series_shape[b] - 1) if flipped else 0
        if int(shape[a]) != int(series_shape[b]) or abs(shift[a] - start) > _GRID_TOL:
            return None
        mapping.append((a, bool(flipped)))
    return mapping


def _scan(dicom_dir: Path) -> list[SourceSeries]:
    """The convertible single-frame series of a folder (multi-frame files cannot be SEG sources here)."""
    from pipelines.dicom_to_nifti import DicomSeriesError, ordered_slices, scan_series, series_affine

    found = []
    for series in scan_series(dicom_dir):
        try:
            slices = ordered_slices(series)
        except DicomSeriesError as e:
            logger.warning("series %s in %s cannot be a DICOM-SEG source: %s", series.short_id, dicom_dir, str(e)[:200])
            continue
        if any(s.frame is not None for s in slices):
            logger.warning("series %s in %s is multi-frame (enhanced CT): not supported as a DICOM-SEG source", series.short_id, dicom_dir)
            continue
        rows, cols = slices[0].shape
        found.append(SourceSeries([s.path for s in slices], series_affine(slices), (cols, rows, len(slices)), series.short_id))
    return found


def find_source_series(
    dicom_dir: str | os.PathLike, shape: Sequence[int], affine: np.ndarray, what: str = "the label map", cache: dict | None = None
) -> tuple[SourceSeries, list[tuple[int, bool]]]:
    """The series of ``dicom_dir`` on the voxel grid (``shape``, ``affine``) of a volume.

    Args:
        dicom_dir: folder of DICOM files (searched recursively).
        shape: the volume's 3D shape.
        affine: its RAS affine (NIfTI).
        what: the volume, for messages.
        cache: ``{folder: [SourceSeries]}`` to scan each folder once.

    Returns:
        ``(series, mapping)``: ``mapping[b] = (axis of the volume, flipped)`` for each axis ``b`` of the series layout.

    Raises:
        ValueError: no series there, or none on that grid (the message lists the grids found).
    """
    folder = Path(dicom_dir)
    if not folder.is_dir():
        raise ValueError(f"DICOM reference {folder} is not a folder; pass --dicom_reference <folder of the source series>.")
    key = str(folder.resolve())
    if cache is not None and key in cache:
        candidates = cache[key]
    else:
        candidates = _scan(folder)
        if cache is not None:
            cache[key] = candidates
    shape3 = tuple(int(v) for v in tuple(shape)[:3])
    for series in candidates:
        mapping = _grid_map(series.affine, series.shape, affine, shape3)
        if mapping is not None:
            return series, mapping
    grids = "; ".join(
        f"series {s.short_id}: shape {s.shape}, spacing {tuple(round(float(v), 3) for v in np.linalg.norm(s.affine[:3, :3], axis=0))}"
        for s in candidates
    )
    spacing = tuple(round(float(v), 3) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))
    raise ValueError(
        f"no DICOM series in {folder} lies on the voxel grid of {what} (shape {shape3}, spacing {spacing}): "
        f"{grids or 'no convertible single-frame image series found'}; pass the series the volume was converted from."
    )


def series_frames(labels: np.ndarray, mapping: Sequence[tuple[int, bool]]) -> np.ndarray:
    """A label volume as DICOM frames of its source series: (slices, Rows, Columns).

    Args:
        labels: (X, Y, Z) integer labels on the grid :func:`find_source_series` matched.
        mapping: its ``mapping``.

    Returns:
        uint8 (n, Rows, Columns): frame ``k`` for the k-th slice along the normal, pixel ``[r, c]`` for DICOM row r and
        column c (the converter's layout is (column, row flipped, slice)).
    """
    arr = np.asarray(labels)
    layout = arr.transpose([a for a, _ in mapping])
    flips = tuple(b for b, (_, flipped) in enumerate(mapping) if flipped)
    if flips:
        layout = np.flip(layout, axis=flips)
    return np.ascontiguousarray(layout[:, ::-1, :].transpose(2, 1, 0)).astype(np.uint8)


def segment_descriptions(names: Mapping[int, str], organ: str, algorithm_name: str, algorithm_version: str) -> list:
    """highdicom segment descriptions of the organ and tumor labels, SNOMED CT coded.

    Args:
        names: label value -> name (:func:`pipelines.engine.labels.label_names`; 0 is skipped).
        organ: ``"kidney"`` or ``"liver"``.
        algorithm_name: e.g. ``"ctdistill resnet18_student"``.
        algorithm_version: e.g. ``"0.1.0 weights 1a2b3c4d5e6f"``.

    Returns:
        ``[highdicom.seg.SegmentDescription]``, one per non-zero label, segment number = label value.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from pipelines.engine.labels import LABEL_COLORS

    organ_code = {"kidney": codes.SCT.Kidney, "liver": codes.SCT.Liver}[organ]
    algorithm = hd.AlgorithmIdentificationSequence(name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=algorithm_version)
    out = []
    for value, name in sorted(names.items()):
        if value == 0:
            continue
        tumor = name.endswith("tumor")
        out.append(
            hd.seg.SegmentDescription(
                segment_number=int(value),
                segment_label=name,
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure if tumor else codes.SCT.AnatomicalStructure,
                segmented_property_type=codes.SCT.Neoplasm if tumor else organ_code,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=hd.UID(),
                tracking_id=name,
                anatomic_regions=[organ_code] if tumor else None,
                display_color=hd.color.CIELabColor.from_rgb(*LABEL_COLORS["tumor" if tumor else organ]),
            )
        )
    return out


def _source_datasets(source: SourceSeries) -> list:
    """The source headers (no pixel data), with the UIDs a SEG references filled in memory where the files lack them.

    SOP Class / Instance UIDs missing from the data set are taken from the file meta (the same values by the
    standard). An anonymised series without Study / Series Instance UIDs gets UIDs derived from its SOP instance UIDs
    (the same on every run), with a warning: a PACS cannot link such a SEG to the images. The files are never written.

    Raises:
        ValueError: a source file without any SOP Instance UID (the SEG could not reference it).
    """
    import pydicom
    from pydicom.uid import generate_uid

    datasets = []
    for path in source.paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        meta = getattr(ds, "file_meta", None) or {}
        for keyword, fallback in (("SOPClassUID", "MediaStorageSOPClassUID"), ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not str(ds.get(keyword, "") or "").strip():
                value = str(meta.get(fallback, "") or "").strip()
                if not value:
                    raise ValueError(f"{path} has no {keyword} (nor {fallback}); a DICOM-SEG cannot reference it.")
                setattr(ds, keyword, value)
        datasets.append(ds)
    derived = []
    instances = sorted(str(ds.SOPInstanceUID) for ds in datasets)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not all(str(ds.get(keyword, "") or "").strip() for ds in datasets):
            uid = generate_uid(entropy_srcs=[keyword, *instances])
            for ds in datasets:
                if not str(ds.get(keyword, "") or "").strip():
                    setattr(ds, keyword, uid)
            derived.append(keyword)
    if derived:
        logger.warning(
            "source series %s has no %s (anonymised?): the DICOM-SEG references UIDs derived from its SOP instance UIDs, "
            "which a PACS cannot link to the images",
            source.short_id,
            "/".join(derived),
        )
    return datasets


def write_dicom_seg(
    labels: np.ndarray,
    source: SourceSeries,
    mapping: Sequence[tuple[int, bool]],
    target: str | os.PathLike,
    *,
    names: Mapping[int, str],
    organ: str,
    algorithm_name: str,
    algorithm_version: str,
) -> Path:
    """Write the DICOM-SEG of a label volume on its source series, atomically.

    Args:
        labels: (X, Y, Z) integer labels (the values of ``names``) on the grid of ``source`` (see ``mapping``).
        source: the source series (:func:`find_source_series`).
        mapping: how ``labels`` maps onto its layout.
        target: the ``.seg.dcm`` file.
        names: label value -> segment label.
        organ: ``"kidney"`` or ``"liver"``.
        algorithm_name: the model's name.
        algorithm_version: its version.

    Returns:
        ``target``.

    Raises:
        ValueError: a label value without a name.
    """
    import highdicom as hd

    from pipelines.engine.atomic import atomic_write

    frames = series_frames(labels, mapping)
    unknown = sorted(set(np.unique(frames).tolist()) - set(names))
    if unknown:
        raise ValueError(f"label values {unknown} have no name (known: {dict(names)}); cannot write the DICOM-SEG {target}.")
    datasets = _source_datasets(source)
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(names, organ, algorithm_name, algorithm_version),
        series_instance_uid=hd.UID(),
        series_number=9901,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="ctdistill",
        manufacturer_model_name=algorithm_name[:64],
        software_versions=algorithm_version[:64],
        device_serial_number="none",
        content_label="CTDISTILL",
        content_description=f"{algorithm_name} segmentation"[:64],
        series_description=f"{algorithm_name} segmentation"[:64],
        omit_empty_frames=bool(frames.any()),  # an empty result keeps its frames: a SEG needs at least one
    )
    for keyword in _PATIENT_STUDY:  # highdicom copies the Patient Study module too: nothing PACS needs to file it
        if keyword in seg:
            delattr(seg, keyword)
    return atomic_write(target, lambda tmp: seg.save_as(str(tmp), enforce_file_format=True))


def send_dicom(path: str | os.PathLike, host: str, port: int, ae_title: str, *, calling_ae: str = CALLING_AE, timeout: float = 30.0) -> None:
    """C-STORE a DICOM file to a node (``pynetdicom``).

    Args:
        path: the file (its SOP class and transfer syntax are proposed).
        host: the node's address.
        port: its port.
        ae_title: its (called) AE title.
        calling_ae: our AE title.
        timeout: seconds for the association, each message and the network.

    Raises:
        ConnectionError: the association is refused or aborted, or the store fails (the status is named).
    """
    import pydicom
    from pynetdicom import AE

    ds = pydicom.dcmread(path)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    node = f"{ae_title}@{host}:{port}"
    assoc = ae.associate(host, int(port), ae_title=ae_title)
    if not assoc.is_established:
        raise ConnectionError(f"cannot store {path}: no DICOM association with {node} (refused, aborted or unreachable); check --send.")
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code != 0x0000:
        raise ConnectionError(f"{node} did not store {path}: C-STORE status {'none (connection lost)' if code is None else hex(code)}.")
    logger.info("stored %s to %s", Path(path).name, node)


class DicomSegWriter:
    """Write (and optionally send) the DICOM-SEG of each inference label map; called by ``WriteLabelMapd``.

    Args:
        task: ``"kits"`` or ``"lits"`` (the organ and the segment names).
        algorithm_name: the model's name in the SEG.
        algorithm_version: its version.
        dicom_reference: the source series' folder for NIfTI inputs (None: only DICOM inputs can be written).
        send: ``"HOST:PORT AE_TITLE"`` to C-STORE each SEG to, or None.
        organ_label: organ label value.
        tumor_label: tumor label value.
        scans: ``{folder: [SourceSeries]}`` already scanned (:func:`check_dicom_seg`'s), so no folder is read twice.
    """

    def __init__(
        self,
        task: str,
        algorithm_name: str,
        algorithm_version: str,
        dicom_reference: str | os.PathLike | None = None,
        send: str | None = None,
        organ_label: int = 1,
        tumor_label: int = 2,
        scans: dict[str, list[SourceSeries]] | None = None,
    ) -> None:
        from pipelines.engine.errors import optional_knob
        from pipelines.engine.labels import label_names, organ_of

        self.organ = organ_of(task)
        self.names = label_names(task, organ_label, tumor_label)
        self.algorithm_name, self.algorithm_version = algorithm_name, algorithm_version
        reference = optional_knob(dicom_reference)
        self.dicom_reference = Path(reference) if reference is not None else None
        self.send = parse_send(send)
        self._scans: dict[str, list[SourceSeries]] = {} if scans is None else scans

    def __call__(self, labels: np.ndarray, affine: np.ndarray, label_map: str | os.PathLike, dicom_dir: str | None = None) -> Path:
        """Write ``<case>.seg.dcm`` for the label map ``label_map`` (written or not) and send it when asked.

        Args:
            labels: (X, Y, Z) integer labels.
            affine: their RAS affine.
            label_map: the label map's path (``<case>.nii.gz``); the SEG goes beside it (:func:`seg_path`).
            dicom_dir: the input's own DICOM folder (a DICOM input), else ``dicom_reference`` is used.

        Returns:
            the SEG path.

        Raises:
            ValueError: no source series (a NIfTI input without ``--dicom_reference``) or none on the label map's grid.
            ConnectionError: ``--send`` failed.
        """
        source_dir = dicom_dir or self.dicom_reference
        if source_dir is None:
            raise ValueError(f"{label_map}: a DICOM-SEG needs the source DICOM series; pass --dicom_reference <folder>.")
        series, mapping = find_source_series(source_dir, labels.shape, affine, what=str(label_map), cache=self._scans)
        target = seg_path(label_map)
        write_dicom_seg(
            labels, series, mapping, target, names=self.names, organ=self.organ,
            algorithm_name=self.algorithm_name, algorithm_version=self.algorithm_version,
        )  # fmt: skip
        logger.info("wrote DICOM-SEG %s on source series %s (%d slices)", target, series.short_id, series.shape[2])
        if self.send is not None:
            send_dicom(target, *self.send)
        return target


def _algorithm(settings: Mapping[str, Any], checkpoint: str | os.PathLike) -> tuple[str, str]:
    """``("ctdistill <role or network>", "<package version> weights <sha256[:12]>")`` of a checkpoint."""
    from pipelines.engine.safeguards import ctdistill_version
    from pipelines.engine.tracking import file_sha256

    name = f"ctdistill {settings.get('role') or settings.get('network_name') or 'model'}"
    return name, f"{ctdistill_version()} weights {file_sha256(checkpoint)[:12]}"


def dicom_seg_writer(
    output_format: str,
    settings: Mapping[str, Any],
    checkpoint: str | os.PathLike,
    dicom_reference: Any = None,
    send: Any = None,
    inputs: Sequence[Mapping[str, Any]] | None = None,
) -> DicomSegWriter | None:
    """The :class:`DicomSegWriter` of an inference run (the bundle's ``seg_writer``), None for ``nifti``.

    Built before the first case is inferred; with ``inputs`` it first checks the knobs against them
    (:func:`check_dicom_seg`), so a NIfTI input without ``--dicom_reference`` stops the run before any work.

    Args:
        output_format: ``--output_format``.
        settings: the checkpoint's settings (``preprocessing.task``, ``role``, ``network_name``).
        checkpoint: the checkpoint file (its hash versions the algorithm).
        dicom_reference: ``--dicom_reference``.
        send: ``--send``.
        inputs: ``pipelines.engine.discover_inputs`` of the run.

    Returns:
        the writer, or None when no DICOM-SEG is asked for.

    Raises:
        ValueError: see :func:`check_dicom_seg`.
    """
    scans: dict[str, list[SourceSeries]] = {}  # the reference folder is scanned once, by the check, for the writer too
    if inputs is not None:
        check_dicom_seg(inputs, output_format, dicom_reference, send, cache=scans)
    if check_output_format(output_format) == "nifti":
        return None
    task = str((settings.get("preprocessing") or {}).get("task") or "kits")
    name, version = _algorithm(settings, checkpoint)
    return DicomSegWriter(task, name, version, dicom_reference=dicom_reference, send=send, scans=scans)


def check_dicom_seg(
    inputs: Sequence[Mapping[str, Any]],
    output_format: str,
    dicom_reference: Any = None,
    send: Any = None,
    cache: dict | None = None,
) -> bool:
    """Before any inference: the DICOM-SEG knobs fit the inputs.

    Args:
        inputs: ``pipelines.engine.discover_inputs`` (a DICOM input carries its folder as ``"dicom_dir"``).
        output_format: ``--output_format``.
        dicom_reference: ``--dicom_reference`` (source series of NIfTI inputs).
        send: ``--send``.
        cache: ``{folder: [SourceSeries]}`` (:func:`find_source_series`): the scans, kept for the writer.

    Returns:
        True.

    Raises:
        ValueError: an unknown format; ``--send``/``--dicom_reference`` without a DICOM-SEG output; a NIfTI input
            without ``--dicom_reference``; a reference folder with no series on an input's grid; a bad ``--send``.
    """
    from pipelines.engine.errors import optional_knob

    fmt = check_output_format(output_format)
    reference = optional_knob(dicom_reference)
    destination = parse_send(send)
    if fmt == "nifti":
        if destination is not None or reference is not None:
            knob = "--send" if destination is not None else "--dicom_reference"
            raise ValueError(f"{knob} is for DICOM-SEG output; add --output_format dicom-seg (or both).")
        return True
    nifti = [str(item["image"]) for item in inputs if not item.get("dicom_dir")]
    if nifti and reference is None:
        raise ValueError(
            f"--output_format {fmt}: input {nifti[0]} is NIfTI ({len(nifti)} such input(s)) and a DICOM-SEG must "
            "reference its source DICOM series: pass --dicom_reference <folder of that series>, give the DICOM "
            "series itself as input, or use --output_format nifti."
        )
    if nifti:
        import nibabel as nib

        cache = {} if cache is None else cache
        for path in nifti:
            image = nib.load(path)
            find_source_series(reference, image.shape, image.affine, what=f"input {path}", cache=cache)
    return True
