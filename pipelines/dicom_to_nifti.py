"""DICOM CT series -> NIfTI (one file per SeriesInstanceUID), without any patient-identifying data.

Every file below SRC is tried (names need no extension; non-DICOM files are skipped). Slices are grouped by
SeriesInstanceUID and ordered by their position along the slice normal (the cross product of the
ImageOrientationPatient row and column directions), never by file name. Voxels are Hounsfield units from
RescaleSlope/RescaleIntercept (int16 when integral, else float32); compressed transfer syntaxes (JPEG 2000,
JPEG-LS, RLE, ...) are decoded by pydicom's pixel handlers (pylibjpeg). The affine follows the dcm2niix convention:
array axes (column, row flipped, slice), axial axis last, DICOM LPS converted to NIfTI RAS.

Enhanced (multi-frame) CT files are read frame by frame: each frame's position, orientation, pixel spacing and
rescale come from its PerFrameFunctionalGroupsSequence item, else from the SharedFunctionalGroupsSequence, else from
the top-level attributes; frames then join the series like single-frame slices (ordered by position, checked for
gaps), and the file is decoded once.

Gantry-tilted series (slices stacked off their normal) keep their sheared affine, with a warning giving the tilt: the
voxels stay the acquired slices and their world coordinates stay exact; nothing is resampled.

Skipped with a warning: localizers, images (or multi-frame files) without position/orientation (secondary
captures). Skipped silently: files that are not DICOM (no ``DICM`` preamble and not parseable). Errors (nothing is
written): any file that cannot be read (permissions, I/O) or that is DICOM (``DICM`` preamble or a ``.dcm`` name) but
corrupt or truncated (header or pixel data): it is named, never dropped, wherever it sits in the series; gaps or
uneven steps in slice positions (a step deviating more than 10 % from the median), duplicate positions, mixed
orientations or matrix sizes within a series. Warnings: Modality other than CT; a single-slice series, whose slice
spacing cannot be measured and is taken from SpacingBetweenSlices / SliceThickness (1 mm when both are absent).
Only geometry, the series number and a short hash of the series UID are used for outputs and logs: no free-text field
(SeriesDescription, names, IDs, which may hold a patient's name or MRN) ever reaches a file name, a case id or a log.

Usage: ``python -m pipelines.dicom_to_nifti SRC OUT [--series UID]``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.engine.data import save_nifti

__all__ = ["GAP_TOLERANCE", "TILT_WARN_DEGREES", "gantry_tilt_degrees", "SeriesInfo", "DicomSeriesError", "scan_series", "ordered_slices", "series_affine", "convert_dicom", "main"]

logger = logging.getLogger(__name__)

#: Largest relative deviation of a slice step from the median step before it counts as a gap.
GAP_TOLERANCE = 0.10
#: Stacking directions further than this from the slice normal are reported as gantry tilt (sheared affine).
TILT_WARN_DEGREES = 0.5
_ORIENTATION_TOL = 1e-4
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class DicomSeriesError(ValueError):
    """A series cannot be converted faithfully (gaps, duplicate positions, mixed orientations or sizes); nothing was written."""


@dataclass
class _Slice:
    path: Path
    position: np.ndarray  # ImagePositionPatient (LPS, mm)
    orientation: np.ndarray  # ImageOrientationPatient (6,)
    spacing: tuple[float, float]  # PixelSpacing (row spacing, column spacing)
    shape: tuple[int, int]  # (Rows, Columns)
    rescale: tuple[float, float]  # (RescaleSlope, RescaleIntercept)
    frame: int | None = None  # frame index in a multi-frame (enhanced) file; None: a single-frame file
    thickness: float | None = None  # SpacingBetweenSlices, else SliceThickness (mm); used for a single slice only


@dataclass
class SeriesInfo:
    """One DICOM series found by :func:`scan_series` (headers only, no pixel data).

    Attributes:
        uid: SeriesInstanceUID (empty when the files have none: then grouped by number/description/geometry).
        number: SeriesNumber or None.
        description: SeriesDescription ("" when absent).
        modality: Modality ("" when absent).
        slices: the image slices (unordered).
    """

    uid: str
    number: int | None
    description: str
    modality: str
    slices: list[_Slice]

    @property
    def short_id(self) -> str:
        """8 hex characters of a hash of the UID: names outputs without exposing the UID itself."""
        key = self.uid or f"{self.number}|{self.description}|{self.slices[0].shape if self.slices else ''}"
        return hashlib.sha1(key.encode()).hexdigest()[:8]

    @property
    def name(self) -> str:
        """Output file stem (also the case id of inference and every log line): ``series<number>_<hash>``.

        Never the SeriesDescription or any other free-text field: sites type patient names and MRNs into them
        (issue 19: "ABD CT DOE JANE MRN4455667" reached the file name, ``volumes.csv`` and the log).
        """
        return f"series{self.number}_{self.short_id}" if self.number is not None else f"series_{self.short_id}"


#: Modality values shown in a log line as they are (any other value may be free text: never logged)
_KNOWN_MODALITIES = frozenset({"CT", "MR", "PT", "NM", "US", "XA", "RF", "CR", "DX", "MG", "OT", "SC", "SEG", "RTSTRUCT", "SR", "PR", "REG"})

#: file names that declare a DICOM file even without the ``DICM`` preamble
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


class _Unreadable(Exception):
    """A file that is (or may be) part of a series but cannot be read: reported, never dropped."""


def _is_image_sop_class(uid: object) -> bool:
    from pydicom.uid import UID

    try:
        return "Image Storage" in UID(str(uid)).name
    except Exception:  # noqa: BLE001 - an unknown or malformed UID is simply not an image class
        return False


def _header(path: Path):
    """pydicom dataset without pixel data, or None for a file that is not a DICOM image.

    Raises:
        _Unreadable: the file cannot be read (permissions, I/O), or it is DICOM (``DICM`` preamble or a DICOM file
            name) but corrupt: unparseable, or truncated (no file meta, or an image SOP class without Rows/Columns).
    """
    import pydicom

    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            declared = handle.read(4) == b"DICM" or path.name.lower().endswith(_DICOM_SUFFIXES)
    except OSError as err:
        raise _Unreadable(f"{path}: cannot be read ({err.strerror or type(err).__name__})") from err
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except OSError as err:
        raise _Unreadable(f"{path}: cannot be read ({err.strerror or type(err).__name__})") from err
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for a damaged file
        if declared:
            raise _Unreadable(f"{path}: corrupt DICOM file ({type(err).__name__}: {str(err)[:120]})") from err
        logger.debug("skipping %s: not readable as DICOM (%s)", path, type(err).__name__)
        return None
    if "Rows" not in ds or "Columns" not in ds:
        meta = getattr(ds, "file_meta", None)
        if declared and (meta is None or "TransferSyntaxUID" not in meta or "MediaStorageSOPClassUID" not in meta):
            raise _Unreadable(f"{path}: truncated DICOM file (incomplete file meta header)")
        sop = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
        if declared and _is_image_sop_class(sop):
            raise _Unreadable(f"{path}: truncated or corrupt DICOM image (no Rows/Columns in its header)")
        logger.debug("skipping %s: not a DICOM image (no Rows/Columns)", path)
        return None
    return ds


def _functional(ds, frame: int | None, sequence: str, attribute: str):
    """An attribute of a multi-frame functional group: the frame's own item, else the shared one, else top level."""
    holders = []
    if frame is not None:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame is not None and frame < len(per_frame):
            holders.append(per_frame[frame])
        shared = ds.get("SharedFunctionalGroupsSequence")
        if shared:
            holders.append(shared[0])
    for holder in holders:
        group = holder.get(sequence)
        if group and attribute in group[0]:
            return group[0].get(attribute)
    return ds.get(attribute)


def _image_slices(ds, path: Path) -> list[_Slice] | str:
    """The slices of one DICOM image file (one per frame), or the reason it cannot join a volume."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    enhanced = frames > 1 or "PerFrameFunctionalGroupsSequence" in ds
    indices: list[int | None] = list(range(frames)) if enhanced else [None]
    slices = []
    for frame in indices:
        position = _functional(ds, frame, "PlanePositionSequence", "ImagePositionPatient")
        orientation = _functional(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = _functional(ds, frame, "PixelMeasuresSequence", "PixelSpacing")
        if position is None or orientation is None or spacing is None:
            where = f" (frame {frame + 1} of {frames})" if frame is not None else ""
            return f"no ImagePositionPatient/ImageOrientationPatient/PixelSpacing{where} (secondary capture?)"
        slope = _functional(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _functional(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
        thickness = None
        for attribute in ("SpacingBetweenSlices", "SliceThickness"):
            value = _functional(ds, frame, "PixelMeasuresSequence", attribute)
            try:
                if value not in (None, "") and float(value) > 0:
                    thickness = float(value)
                    break
            except (TypeError, ValueError):
                continue
        slices.append(
            _Slice(
                path,
                np.array([float(v) for v in position], dtype=np.float64),
                np.array([float(v) for v in orientation], dtype=np.float64),
                (float(spacing[0]), float(spacing[1])),
                (int(ds.Rows), int(ds.Columns)),
                (float(slope if slope not in (None, "") else 1), float(intercept if intercept not in (None, "") else 0)),
                frame,
                thickness,
            )
        )
    return slices


def scan_series(src: str | Path, skipped: list[str] | None = None) -> list[SeriesInfo]:
    """Group the DICOM image files below ``src`` by series, reading headers only.

    Files that are not DICOM are skipped with a debug log; a file that cannot be read, or a DICOM file that is
    corrupt or truncated, stops the scan (it is never dropped). DICOM images that cannot form a volume are skipped
    with a warning: localizers (ImageType LOCALIZER) and images without ImagePositionPatient/ImageOrientationPatient/
    PixelSpacing (secondary captures such as dose reports). A multi-frame (enhanced CT) file contributes one slice per
    frame, with the frame's functional-group geometry.

    Args:
        src: folder (searched recursively; any file names) or a single DICOM file.
        skipped: when given, one ``"<file>: <reason>"`` is appended per skipped DICOM image.

    Returns:
        Series sorted by (number, description, hash).

    Raises:
        FileNotFoundError: ``src`` does not exist.
        DicomSeriesError: files that cannot be read or are corrupt DICOM (all listed, up to 5 named).
    """
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    try:
        files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    except OSError as err:
        raise DicomSeriesError(f"{err.filename or src}: folder cannot be listed ({err.strerror or err})") from err
    groups: dict[tuple, SeriesInfo] = {}
    unreadable: list[str] = []
    for path in files:
        try:
            ds = _header(path)
        except _Unreadable as err:
            unreadable.append(str(err))
            continue
        if ds is None:
            continue
        reason = None
        if "LOCALIZER" in [str(v).upper() for v in (ds.get("ImageType") or [])]:
            reason = "localizer (scout) image"
        else:
            found = _image_slices(ds, path)
            reason = found if isinstance(found, str) else None
        if reason is not None:
            logger.warning("skipping %s: %s", path, reason)
            if skipped is not None:
                skipped.append(f"{path}: {reason}")
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
        number = ds.get("SeriesNumber")
        number = int(number) if number not in (None, "") else None
        description = str(ds.get("SeriesDescription", "") or "")
        shape = (int(ds.Rows), int(ds.Columns))
        key = (uid,) if uid else ("", number, description, shape)
        series = groups.setdefault(key, SeriesInfo(uid, number, description, str(ds.get("Modality", "") or ""), []))
        series.slices.extend(found)
    if unreadable:
        more = f" (and {len(unreadable) - 5} more)" if len(unreadable) > 5 else ""
        raise DicomSeriesError(
            f"{len(unreadable)} file(s) below {src} cannot be read: " + "; ".join(unreadable[:5]) + more
            + " (nothing written: fix or remove them; a slice is never dropped silently)"
        )
    return sorted(groups.values(), key=lambda s: (s.number if s.number is not None else -1, s.description, s.short_id))


def _normal(orientation: np.ndarray) -> np.ndarray:
    normal = np.cross(orientation[:3], orientation[3:])
    return normal / np.linalg.norm(normal)


def _validate(series: SeriesInfo) -> tuple[list[_Slice], list[str]]:
    """Slices ordered along the normal, and every problem found (empty: convertible)."""
    label = series.name
    problems: list[str] = []
    slices = series.slices
    orientations = np.round(np.stack([s.orientation for s in slices]), 4)
    distinct = {tuple(o) for o in orientations}
    if len(distinct) > 1 and np.abs(orientations - orientations[0]).max() > _ORIENTATION_TOL:
        counts = {o: int(np.all(orientations == o, axis=1).sum()) for o in distinct}
        text = "; ".join(f"{list(o)} x{n}" for o, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        problems.append(
            f"{label}: mixed ImageOrientationPatient within the series ({text}); convert one orientation at a time"
        )
        return slices, problems
    shapes = {s.shape for s in slices}
    if len(shapes) > 1:
        problems.append(f"{label}: slices of different sizes (Rows, Columns) {sorted(shapes)}")
    spacings = {tuple(np.round(s.spacing, 4)) for s in slices}
    if len(spacings) > 1:
        problems.append(f"{label}: slices with different PixelSpacing {sorted(spacings)}")
    bad_spacing = sorted({sp for sp in spacings if not all(np.isfinite(v) and v > 0 for v in sp)})
    if bad_spacing:  # the affine would be singular (LinAlgError), or the volume's mm meaningless
        problems.append(f"{label}: PixelSpacing {list(bad_spacing[0])} is not positive; the pixel size in mm is unknown")
        return slices, problems
    if np.linalg.norm(np.cross(slices[0].orientation[:3], slices[0].orientation[3:])) < 1e-6:
        problems.append(f"{label}: ImageOrientationPatient {list(slices[0].orientation)} has parallel row and column directions")
        return slices, problems
    normal = _normal(slices[0].orientation)
    along = np.array([float(s.position @ normal) for s in slices])
    order = np.argsort(along, kind="stable")
    slices = [slices[i] for i in order]
    along = along[order]
    if len(slices) >= 2:
        steps = np.diff(along)
        duplicates = [f"{along[i]:.3f}" for i in np.flatnonzero(steps < 1e-3)]
        if duplicates:
            problems.append(
                f"{label}: {len(duplicates)} duplicate slice position(s) at {', '.join(duplicates[:10])} mm along the normal "
                "(several acquisitions or echoes in one series?)"
            )
        else:
            median = float(np.median(steps))
            bad = np.flatnonzero(np.abs(steps - median) > GAP_TOLERANCE * median)
            if bad.size:
                where = ", ".join(f"{along[i]:.3f}->{along[i + 1]:.3f} ({steps[i]:.3f} mm)" for i in bad[:10])
                problems.append(
                    f"{label}: gap or uneven slice spacing: {bad.size} step(s) deviate more than {GAP_TOLERANCE:.0%} from "
                    f"the median {median:.3f} mm: {where} (missing slices?)"
                )
    return slices, problems


def ordered_slices(series: SeriesInfo) -> list[_Slice]:
    """The slices of a series in the order of the converted volume's last axis (along the slice normal).

    Args:
        series: one series of :func:`scan_series`.

    Returns:
        the slices, ``[k]`` being ``volume[:, :, k]`` of :func:`convert_dicom` (with :func:`series_affine`).

    Raises:
        DicomSeriesError: the series cannot be converted (the problems of :func:`convert_dicom`).
    """
    slices, problems = _validate(series)
    if problems:
        raise DicomSeriesError("; ".join(problems))
    return slices


def gantry_tilt_degrees(slices: Sequence[_Slice]) -> float:
    """Angle between the slice stacking direction (first to last ImagePositionPatient) and the slice normal.

    0 for an ordinary series; a gantry-tilted acquisition stacks its slices off the normal, which makes the affine of
    :func:`series_affine` sheared.

    Returns:
        Degrees (0 for fewer than two slices).
    """
    if len(slices) < 2:
        return 0.0
    step = slices[-1].position - slices[0].position
    norm = float(np.linalg.norm(step))
    if norm == 0.0:
        return 0.0
    cosine = abs(float(step @ _normal(slices[0].orientation))) / norm
    return float(np.degrees(np.arccos(min(1.0, cosine))))


def series_affine(slices: Sequence[_Slice]) -> np.ndarray:
    """NIfTI (RAS) affine of ordered slices for the array layout (column, row flipped, slice), as dcm2niix writes it.

    The LPS position of pixel (row r, column c) of slice k is ``IPP_k + c * dc * row_dir + r * dr * col_dir``, with
    (dr, dc) = PixelSpacing and row_dir/col_dir the two ImageOrientationPatient vectors; array index j = Rows - 1 - r.
    The slice axis is (IPP_last - IPP_first) / (n - 1); for a single slice, the normal times its SpacingBetweenSlices
    or SliceThickness (1 mm when both are absent).

    Returns:
        4x4 float64 affine.
    """
    first = slices[0]
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    dr, dc = first.spacing
    rows = first.shape[0]
    if len(slices) > 1:
        step = (slices[-1].position - first.position) / (len(slices) - 1)
    else:
        step = _normal(first.orientation) * (first.thickness or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * dc
    lps[:3, 1] = -col_dir * dr
    lps[:3, 2] = step
    lps[:3, 3] = first.position + (rows - 1) * dr * col_dir
    return _LPS_TO_RAS @ lps


def _read_volume(slices: Sequence[_Slice]) -> np.ndarray:
    """HU volume (Columns, Rows, n) in the layout of :func:`series_affine`: int16 when integral, else float32.

    Each file is decoded once (a multi-frame file too: its frames are kept until the volume is filled), slice by
    slice, into the output array (no full-volume float copy for int16 series).
    """
    import pydicom

    rows, cols = slices[0].shape
    integral = all(float(v).is_integer() for item in slices for v in item.rescale)
    volume = np.empty((cols, rows, len(slices)), dtype=np.int16 if integral else np.float32)
    limits = np.iinfo(np.int16)
    multi_frame: dict[Path, np.ndarray] = {}
    def decode(path: Path) -> np.ndarray:
        try:
            return pydicom.dcmread(path, force=True).pixel_array
        except Exception as err:  # noqa: BLE001 - truncated or undecodable pixel data: name the file
            raise DicomSeriesError(
                f"{path}: pixel data cannot be decoded ({type(err).__name__}: {str(err)[:160]}); nothing written"
            ) from err

    for k, item in enumerate(slices):
        if item.frame is None:
            pixels = decode(item.path)
        else:
            if item.path not in multi_frame:
                multi_frame[item.path] = decode(item.path)
            frames = multi_frame[item.path]
            if frames.ndim == 2:  # an enhanced file holding a single frame
                frames = frames[None]
            if frames.ndim != 3 or item.frame >= frames.shape[0]:
                raise DicomSeriesError(f"{item.path}: pixel data of shape {frames.shape} has no frame {item.frame + 1}")
            pixels = frames[item.frame]
        if pixels.shape != (rows, cols):
            raise DicomSeriesError(f"{item.path}: pixel data of shape {pixels.shape}, expected {(rows, cols)}")
        slope, intercept = item.rescale
        hu = (pixels.astype(np.float32) * slope + intercept).T[:, ::-1]
        if volume.dtype == np.int16 and (hu.min() < limits.min or hu.max() > limits.max):
            volume = volume.astype(np.float32)  # HU beyond int16 (unusual): keep every value exactly
        volume[:, :, k] = hu
    return volume


def convert_dicom(src: str | Path, out: str | Path, series_uid: str | None = None) -> list[Path]:
    """Convert the DICOM series below ``src`` to NIfTI files in ``out`` (one per series).

    Args:
        src: folder of DICOM files (any names, searched recursively) or one file. Never written to.
        out: output folder (created); must not be ``src`` or lie inside it. Each file is written atomically.
        series_uid: convert only this series (its SeriesInstanceUID, or the 8-character hash in the file names).

    Returns:
        The written NIfTI paths ``<out>/<series name>.nii.gz``.

    Raises:
        FileNotFoundError: ``src`` does not exist.
        ValueError: ``out`` inside ``src``, no DICOM image found, or ``series_uid`` not found (lists the series).
        DicomSeriesError: gaps, duplicate positions, mixed orientations or sizes (all listed).
    """
    src, out = Path(src), Path(out)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist; give a folder of DICOM files")
    src_dir = (src if src.is_dir() else src.parent).resolve()
    out_resolved = out.resolve()
    if out_resolved == src_dir or src_dir in out_resolved.parents:
        raise ValueError(
            f"output folder {out} is inside the DICOM source {src}; choose a folder outside it (sources are never written to)"
        )
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is a file; give a folder for the NIfTI files")
    skipped: list[str] = []
    all_series = scan_series(src, skipped)
    if not all_series:
        why = f"; skipped {len(skipped)}: " + "; ".join(skipped[:3]) if skipped else ""
        raise ValueError(f"no DICOM image series found in {src} (files are read whatever their extension){why}")
    if series_uid is not None:
        chosen = [s for s in all_series if series_uid in (s.uid, s.short_id)]
        if not chosen:
            listing = "; ".join(f"{s.short_id} ({s.name}, {len(s.slices)} slices)" for s in all_series)
            raise ValueError(f"series {series_uid!r} not found in {src}; available (pass the 8-character hash): {listing}")
        all_series = chosen
    ordered, problems = [], []
    for series in all_series:
        slices, found = _validate(series)
        ordered.append(slices)
        problems.extend(found)
        tilt = gantry_tilt_degrees(slices) if not found else 0.0
        if tilt > TILT_WARN_DEGREES:
            logger.warning(
                "%s: slices are stacked %.1f degrees off their normal (gantry tilt): the NIfTI affine is sheared and "
                "kept as acquired, not resampled; 2.5D slices stay the acquired slices, world coordinates stay exact",
                series.name,
                tilt,
            )
        if len(slices) == 1 and not found:
            thickness = slices[0].thickness
            logger.warning(
                "%s: a single slice: its spacing along the normal cannot be measured; %s",
                series.name,
                f"{thickness:g} mm taken from SpacingBetweenSlices/SliceThickness"
                if thickness
                else "no SpacingBetweenSlices/SliceThickness either, 1 mm assumed",
            )
        if series.modality.upper() != "CT":
            shown = series.modality if series.modality.upper() in _KNOWN_MODALITIES else "a non-standard value"
            logger.warning("%s: Modality is %r, not CT: HU windows may not apply", series.name, shown)
    if problems:
        raise DicomSeriesError("; ".join(problems) + " (nothing written; pick a good series with --series UID)")
    written = []
    for series, slices in zip(all_series, ordered):
        target = out / f"{series.name}.nii.gz"
        volume = _read_volume(slices)
        affine = series_affine(slices)
        save_nifti(volume, affine, target)
        zooms = np.linalg.norm(affine[:3, :3], axis=0)
        logger.info(
            "%s: %d slices -> %s shape %s spacing (%.3f, %.3f, %.3f) HU %s..%s",
            series.name,
            len(slices),
            target,
            volume.shape,
            *zooms,
            volume.min(),
            volume.max(),
        )
        written.append(target)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m pipelines.dicom_to_nifti SRC OUT [--series UID]``; prints one line per NIfTI written.

    Returns:
        0 on success, 1 when a series cannot be converted or the input is bad (the reason is printed).
    """
    parser = argparse.ArgumentParser(prog="ctdistill-dicom-to-nifti", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="folder of DICOM files (any file names; searched recursively)")
    parser.add_argument("out", help="output folder for the NIfTI files (outside SRC)")
    parser.add_argument("--series", default=None, help="convert only this SeriesInstanceUID (or its 8-character hash)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log skipped files")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        written = convert_dicom(args.src, args.out, series_uid=args.series)
    except (FileNotFoundError, ValueError) as err:
        print(f"ERROR: {err}")
        return 1
    except OSError as err:  # an output folder that is a file, read-only, or a full disk (no partial file is left)
        print(f"ERROR: cannot write {err.filename or args.out}: {err.strerror or err}")
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
