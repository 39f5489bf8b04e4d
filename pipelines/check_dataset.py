"""Integrity check of a CT segmentation dataset before any training (the spirit of nnU-Net's
``verify_dataset_integrity``): every problem of every case is reported, nothing is modified.

Checks per case: image and label exist and load as 3D volumes; same shape and same affine (within ``1e-3``); a
voxel spacing that is defined (ERROR: a zero-length affine axis, or a zero/negative header ``pixdim`` that the affine
is built from, for which nibabel silently substitutes 1 mm) and plausible for CT (WARNING outside
``PLAUSIBLE_SPACING_MM`` or more than ``ANISOTROPY_WARN`` times anisotropic, ERROR beyond ``ANISOTROPY_ERROR``);
label values within the declared labels (``--labels``, else ``dataset.json`` ``labels``, else ``{0, 1, 2}``);
no NaN or inf in the image; a plausible CT range (some voxel below -500 HU, else an ERROR: not Hounsfield units;
some voxel above 200 HU, else a WARNING); each training label has foreground (WARNING); the same file listed
twice (ERROR) or identical voxel data under two names (WARNING). Orientations (axcodes) are reported as INFO lines.

Usage: ``python -m pipelines.check_dataset DIR|splits.json [--labels 0 1 2]``; exit 0 when there is no ERROR.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from pipelines.datalist import SPLITS, UNLABELLED, find_cases, read_declared_labels
from pipelines.engine.splits import entry_path

__all__ = [
    "SEVERITIES",
    "DEFAULT_LABELS",
    "CT_MIN_BELOW",
    "CT_MAX_ABOVE",
    "PLAUSIBLE_SPACING_MM",
    "ANISOTROPY_WARN",
    "ANISOTROPY_ERROR",
    "CT_MAX_PLAUSIBLE",
    "Problem",
    "spacing_problems",
    "dtype_problem",
    "image_problems",
    "check_dataset",
    "main",
]

logger = logging.getLogger(__name__)

SEVERITIES: tuple[str, ...] = ("error", "warning", "info")
DEFAULT_LABELS: tuple[int, ...] = (0, 1, 2)
#: A CT volume holds air or fat below this (HU); otherwise the intensities are not Hounsfield units.
CT_MIN_BELOW = -500.0
#: A CT volume holds bone or contrast above this (HU).
CT_MAX_ABOVE = 200.0
#: No CT voxel lies above this (HU; metal on extended-scale CT stays below ~30000): beyond, the data is corrupt
CT_MAX_PLAUSIBLE = 1.0e5
_AFFINE_TOL = 1e-3
#: voxel spacings (mm) outside this range are implausible for CT, e.g. a header in metres (WARNING); wide on purpose:
#: small synthetic cohorts have 6-13 mm voxels
PLAUSIBLE_SPACING_MM: tuple[float, float] = (0.05, 50.0)
#: largest / smallest voxel spacing above this is suspicious for CT (WARNING; 0.5 mm in-plane with 5 mm slices is 10)
ANISOTROPY_WARN = 15.0
#: ... and above this no CT acquisition: a wrong header (ERROR)
ANISOTROPY_ERROR = 50.0


@dataclass(frozen=True)
class Problem:
    """One finding of :func:`check_dataset`.

    Attributes:
        severity: ``"error"`` (the dataset must be fixed), ``"warning"`` (suspicious) or ``"info"`` (report only).
        file: the file concerned (or the dataset source for dataset-wide findings).
        message: what is wrong and, where possible, what to do.
    """

    severity: str
    file: str
    message: str

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    def __str__(self) -> str:
        return f"{self.severity.upper()} {self.file}: {self.message}"


@dataclass
class _Case:
    image: Path
    label: Path | None
    label_expected: bool
    split: str
    case: str


def _entries_from_json(path: Path) -> tuple[list[_Case], dict[str, Any] | None]:
    """Cases of a splits file (``pipelines.datalist``) or an MSD ``dataset.json``; relative paths are relative to it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read it as JSON ({err})") from err
    if not isinstance(data, dict) or not any(isinstance(data.get(s), list) for s in SPLITS):
        raise ValueError(f"{path}: expected a splits file with {list(SPLITS)} lists (python -m pipelines.datalist)")
    cases: list[_Case] = []

    def resolve(value: Any) -> Path:
        return Path(entry_path(value, path))

    for split in (*SPLITS, UNLABELLED):
        for index, entry in enumerate(data.get(split) or []):
            item = entry if isinstance(entry, dict) else {"image": entry}
            if "image" not in item:
                raise ValueError(f"{path}: {split}[{index}] has no 'image' key: {item}")
            image = resolve(item["image"])
            label = resolve(item["label"]) if item.get("label") else None
            case = str(item.get("case") or image.name.split(".")[0])
            cases.append(_Case(image, label, split in ("training", "validation"), split, case))
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    labels = meta.get("labels") if isinstance(meta.get("labels"), dict) else None
    if labels is None and isinstance(data.get("labels"), dict):  # an MSD / nnU-Net dataset.json given directly
        labels = read_declared_labels(path)
    return cases, labels


def _collect(source: Path) -> tuple[list[_Case], dict[str, Any] | None, list[Problem]]:
    if source.is_file() and source.suffix.lower() == ".json":
        cases, labels = _entries_from_json(source)
        return cases, labels, []
    layout, found = find_cases(source)
    cases = [
        _Case(
            Path(c["image"]),
            Path(c["label"]) if c.get("label") else None,
            bool(c["labelled"]),
            "training" if c["labelled"] else "test",
            c["case"],
        )
        for c in found
    ]
    notes: list[Problem] = []
    unlabelled = [c.case for c in cases if not c.label_expected]
    if unlabelled:
        shown = ", ".join(unlabelled[:5]) + (", ..." if len(unlabelled) > 5 else "")
        notes.append(
            Problem(
                "info",
                str(source),
                f"{len(unlabelled)} case(s) without a label, checked as unlabelled test cases: {shown}",
            )
        )
    return cases, read_declared_labels(source), notes


def _load(path: Path, what: str, problems: list[Problem]) -> nib.spatialimages.SpatialImage | None:
    if not path.exists():
        problems.append(Problem("error", str(path), f"{what} file is missing"))
        return None
    try:
        image = nib.load(str(path))
    except Exception as err:  # noqa: BLE001 - any reader failure is reported, the check goes on
        problems.append(Problem("error", str(path), f"{what} cannot be read ({type(err).__name__}: {err})"))
        return None
    shape = image.shape
    bad_dtype = dtype_problem(path, image, what)
    if bad_dtype is not None:
        problems.append(bad_dtype)
        return None
    if len(shape) < 3 or any(int(s) != 1 for s in shape[3:]):
        problems.append(Problem("error", str(path), f"{what} is not a 3D volume (shape {tuple(shape)})"))
        return None
    return image


def dtype_problem(path: str | Path, image: Any, what: str = "image") -> Problem | None:
    """An image whose voxels are not one number each (an RGB/colour NIfTI: a structured dtype), as an ERROR.

    Used by :func:`check_dataset` and by inference on each input (``pipelines.engine.check_input_volume``).

    Args:
        path: the file (for the message).
        image: the loaded image (``nibabel``; its header's data type, no voxel read).
        what: what the file is, e.g. ``"image"``.

    Returns:
        the problem, or None for a scalar dtype (or an image without a declared one).
    """
    dtype = image.get_data_dtype() if hasattr(image, "get_data_dtype") else None
    if dtype is not None and (dtype.fields is not None or not np.issubdtype(dtype, np.number)):
        return Problem("error", str(path), f"{what} is not one scalar value per voxel (NIfTI dtype {dtype}: RGB/colour?); "
                       "give a grayscale volume")  # fmt: skip
    return None


def _raw_pixdim(path: Path) -> np.ndarray | None:
    """``pixdim[1:4]`` as stored in a NIfTI file (nibabel replaces 0 by 1 and negative values by their absolute value
    on load), or None for a file that is not NIfTI-1/2."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read(540)
    except (OSError, EOFError):
        return None
    for klass, size in ((nib.Nifti1Header, 348), (nib.Nifti2Header, 540)):
        for endian in "<>":
            if len(raw) >= size and int(np.frombuffer(raw[:4], dtype=f"{endian}i4")[0]) == size:
                header = klass(binaryblock=raw[:size], endianness=endian, check=False)
                return np.asarray(header["pixdim"][1:4], dtype=np.float64)
    return None


def spacing_problems(image: nib.spatialimages.SpatialImage, path: str | Path) -> list[Problem]:
    """Voxel-spacing problems of a loaded volume: undefined (ERROR), invented by nibabel (ERROR), implausible (WARNING).

    The spacing is the length of each affine column (what MONAI and the volume in mL use). A zero or negative header
    ``pixdim`` is an ERROR when the affine is built from it (no sform: nibabel substitutes 1 mm or the absolute value,
    so the spacing is invented), a WARNING when an sform defines the affine.

    Args:
        image: the nibabel image (header only is read).
        path: its file (read again for the raw header; named in the problems).

    Returns:
        the problems (empty for a plausible CT spacing).
    """
    path = Path(path)
    problems: list[Problem] = []
    spacing = np.linalg.norm(np.asarray(image.affine, dtype=np.float64)[:3, :3], axis=0)
    shown = " x ".join(f"{v:g}" for v in spacing)
    if not np.all(np.isfinite(spacing)) or spacing.min() <= 1e-6:
        problems.append(
            Problem(
                "error",
                str(path),
                f"voxel spacing {shown} mm is zero or undefined (an affine axis of length 0): volumes in mL and "
                "resampling would be wrong; fix the header (pixdim / sform)",
            )
        )
        return problems
    raw = _raw_pixdim(path) if isinstance(image.header, nib.Nifti1Header) else None
    if raw is not None and (not np.all(np.isfinite(raw)) or raw.min() <= 0):
        raw_shown = " x ".join(f"{v:g}" for v in raw)
        if int(image.header["sform_code"]) > 0:
            problems.append(
                Problem(
                    "warning",
                    str(path),
                    f"header pixdim {raw_shown} has zero/negative values (invalid NIfTI); the sform gives {shown} mm, "
                    "but tools that read pixdim may disagree",
                )
            )
        else:
            problems.append(
                Problem(
                    "error",
                    str(path),
                    f"header pixdim {raw_shown} has zero/negative values and there is no sform: the spacing {shown} mm "
                    "is invented (nibabel substitutes 1 mm / the absolute value); fix the header",
                )
            )
            return problems
    ratio = float(spacing.max() / spacing.min())
    if ratio > ANISOTROPY_ERROR:
        problems.append(
            Problem(
                "error",
                str(path),
                f"voxel spacing {shown} mm is {ratio:.0f}x anisotropic (more than {ANISOTROPY_ERROR:g}x): no CT is "
                "acquired like this; the header spacing is wrong",
            )
        )
    elif ratio > ANISOTROPY_WARN:
        problems.append(
            Problem("warning", str(path), f"voxel spacing {shown} mm is {ratio:.0f}x anisotropic: check the header spacing")
        )
    lo, hi = PLAUSIBLE_SPACING_MM
    if spacing.min() < lo or spacing.max() > hi:
        problems.append(
            Problem("warning", str(path), f"voxel spacing {shown} mm is outside {lo:g}..{hi:g} mm: check the header units")
        )
    return problems


def _voxels(image: nib.spatialimages.SpatialImage, path: Path, what: str, problems: list[Problem]) -> np.ndarray | None:
    """The stored voxels (scaled by the header's slope/intercept only when they are not 1/0), read once."""
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as err:  # noqa: BLE001 - truncated/corrupt data is reported, the check goes on
        problems.append(Problem("error", str(path), f"{what} voxel data cannot be read ({type(err).__name__}: {err})"))
        return None
    return data.reshape(data.shape[:3])


def _fingerprint(data: np.ndarray, affine: np.ndarray) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str((data.shape, data.dtype.str)).encode())
    digest.update(np.ascontiguousarray(data).data)
    digest.update(np.round(affine, 3).tobytes())
    return digest.hexdigest()


def image_problems(path: str | Path, data: np.ndarray) -> list[Problem]:
    """The CT intensity checks of one image's voxels: NaN/inf (ERROR), not Hounsfield units (ERROR: nothing below
    ``CT_MIN_BELOW``, e.g. unsigned 0..1905 without its rescale; or voxels beyond ``CT_MAX_PLAUSIBLE``, e.g. 1e30),
    no bone or contrast (WARNING). Used by :func:`check_dataset` and by inference on each input.

    Args:
        path: the file (for the messages).
        data: its voxels (scaled by the header's slope/intercept).

    Returns:
        the problems found (empty for a plausible CT).
    """
    problems: list[Problem] = []
    _check_image(Path(path), np.asanyarray(data), problems)
    return problems


def _check_image(path: Path, data: np.ndarray, problems: list[Problem]) -> None:
    if np.issubdtype(data.dtype, np.floating):
        finite = np.isfinite(data)
        n_bad = int(data.size - np.count_nonzero(finite))
        if n_bad:
            n_nan = int(np.count_nonzero(np.isnan(data)))
            problems.append(Problem("error", str(path), f"image has {n_nan} NaN and {n_bad - n_nan} inf voxels"))
            if not finite.any():
                return
            data = data[finite]
    lo, hi = float(data.min()), float(data.max())
    if max(abs(lo), abs(hi)) > CT_MAX_PLAUSIBLE:
        n_far = int(np.count_nonzero(np.abs(data) > CT_MAX_PLAUSIBLE))
        problems.append(
            Problem(
                "error",
                str(path),
                f"intensities {lo:g}..{hi:g}: {n_far} voxels beyond +-{CT_MAX_PLAUSIBLE:g}, not Hounsfield units (corrupt "
                "data or a wrong rescale slope/intercept); give raw HU volumes",
            )
        )
    elif lo >= CT_MIN_BELOW:
        problems.append(
            Problem(
                "error",
                str(path),
                f"intensities {lo:g}..{hi:g}: nothing below {CT_MIN_BELOW:g} HU (air/fat), so not Hounsfield units "
                "(rescale slope/intercept not applied, already normalised, or not a CT); give raw HU volumes",
            )
        )
    elif hi <= CT_MAX_ABOVE:
        problems.append(
            Problem(
                "warning",
                str(path),
                f"intensities {lo:g}..{hi:g}: nothing above {CT_MAX_ABOVE:g} HU (no bone or contrast): check it is a CT",
            )
        )


def _check_label(path: Path, data: np.ndarray, declared: set[int], training: bool, problems: list[Problem]) -> None:
    if np.issubdtype(data.dtype, np.floating):
        if not np.isfinite(data).all():
            problems.append(Problem("error", str(path), "label has NaN or inf voxels"))
            return
        if not np.array_equal(data, np.round(data)):
            problems.append(
                Problem("error", str(path), "label has non-integer values (resampled with linear interpolation?)")
            )
            return
    if np.issubdtype(data.dtype, np.integer) and data.size and int(data.min()) >= 0 and int(data.max()) < 1 << 16:
        counts = np.bincount(data.ravel().astype(np.intp, copy=False))
        values = {int(v) for v in np.flatnonzero(counts)}
    else:
        values = {int(v) for v in np.unique(data)}
    unexpected = sorted(values - declared)
    if unexpected:
        problems.append(
            Problem("error", str(path), f"label values {unexpected} are not declared labels {sorted(declared)}")
        )
    if training and not any(v != 0 for v in values):
        problems.append(Problem("warning", str(path), "training label has no foreground (only background)"))


def _same_geometry(
    image: nib.spatialimages.SpatialImage,
    label: nib.spatialimages.SpatialImage,
    label_path: Path,
    problems: list[Problem],
) -> None:
    ishape, lshape = tuple(image.shape[:3]), tuple(label.shape[:3])
    if ishape != lshape:
        problems.append(Problem("error", str(label_path), f"label shape {lshape} differs from image shape {ishape}"))
    if not np.allclose(label.affine, image.affine, rtol=_AFFINE_TOL, atol=_AFFINE_TOL):
        diff = float(np.abs(np.asarray(label.affine) - np.asarray(image.affine)).max())
        problems.append(
            Problem(
                "error", str(label_path), f"label affine differs from the image affine (max abs difference {diff:.4g})"
            )
        )


def check_dataset(source: str | Path, labels: Iterable[int] | None = None) -> list[Problem]:
    """Check every case of a dataset folder (any :mod:`pipelines.datalist` layout) or of a splits JSON file.

    Each file is read once (header, then voxels); nothing is written. All problems are collected, none stops the
    check early.

    Args:
        source: dataset folder (KiTS19, LiTS, nnU-Net, MSD, CSV) or a splits file from ``pipelines.datalist``.
        labels: the declared label values; None: from ``dataset.json``/the splits file's meta, else ``{0, 1, 2}``.

    Returns:
        Problems in case order (errors, warnings), then dataset-wide findings (duplicates, orientation info).

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: an unknown layout or an unreadable splits file (see :func:`pipelines.datalist.detect_layout`).
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist; give a dataset folder or a splits JSON file")
    cases, declared_map, problems = _collect(source)
    if labels is not None:
        declared = {int(v) for v in labels}
    elif declared_map:
        declared = {int(v) for v in declared_map.values()}
    else:
        declared = set(DEFAULT_LABELS)
    if not cases:
        problems.append(Problem("error", str(source), "no case found"))
        return problems

    seen_paths: dict[Path, str] = {}
    fingerprints: dict[str, Path] = {}
    axcodes: dict[str, list[str]] = defaultdict(list)
    for case in cases:
        where = f"{case.split} case {case.case}"
        for path in (case.image, case.label):
            if path is None:
                continue
            key = path.resolve()
            if key in seen_paths:
                problems.append(Problem("error", str(path), f"listed twice: in {seen_paths[key]} and {where}"))
            else:
                seen_paths[key] = where
        image = _load(case.image, "image", problems)
        if case.label_expected and case.label is None:
            problems.append(Problem("error", str(case.image), f"{case.split} entry has no label"))
        label = _load(case.label, "label", problems) if case.label is not None else None
        if image is not None:
            problems.extend(spacing_problems(image, case.image))
            with np.errstate(all="ignore"):  # a singular affine (reported above) has no orientation
                codes = nib.aff2axcodes(image.affine)
            axcodes["".join(str(c) for c in codes)].append(str(case.image))
            if label is not None:
                _same_geometry(image, label, case.label, problems)
            data = _voxels(image, case.image, "image", problems)
            if data is not None:
                _check_image(case.image, data, problems)
                fingerprint = _fingerprint(data, np.asarray(image.affine))
                if fingerprint in fingerprints:
                    problems.append(
                        Problem(
                            "warning",
                            str(case.image),
                            f"duplicate case: same voxels and affine as {fingerprints[fingerprint]}",
                        )
                    )
                else:
                    fingerprints[fingerprint] = case.image
                del data
        if label is not None:
            data = _voxels(label, case.label, "label", problems)
            if data is not None:
                _check_label(case.label, data, declared, case.split == "training", problems)
    for codes, files in sorted(axcodes.items(), key=lambda kv: -len(kv[1])):
        note = " (axial axis first; transforms reorient to RAS)" if codes[0] in "SI" else ""
        problems.append(
            Problem(
                "info",
                files[0],
                f"orientation {','.join(codes)} in {len(files)} of {sum(map(len, axcodes.values()))} images{note}",
            )
        )
    labelled = sum(case.label is not None for case in cases)
    problems.append(Problem("info", str(source), f"{len(cases)} case(s) checked, {labelled} with a label"))
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m pipelines.check_dataset DIR|splits.json [--labels 0 1 2]``.

    Prints one line per problem (``ERROR <file>: <message>``) and a summary line.

    Returns:
        0 when there is no error (warnings alone pass), 1 otherwise, 2 for a bad source.
    """
    parser = argparse.ArgumentParser(prog="ctdistill-check-dataset", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="dataset folder (KiTS19, LiTS, nnU-Net, MSD, CSV) or splits JSON file")
    parser.add_argument(
        "--labels", type=int, nargs="+", default=None, help="declared label values (default: dataset.json, else 0 1 2)"
    )
    args = parser.parse_args(argv)
    try:
        problems = check_dataset(args.source, labels=args.labels)
    except (FileNotFoundError, ValueError) as err:
        print(f"ERROR {args.source}: {err}")
        return 2
    for problem in problems:
        print(problem)
    counts = {s: sum(p.severity == s for p in problems) for s in SEVERITIES}
    verdict = "FAILED" if counts["error"] else "OK"
    print(f"{verdict}: {counts['error']} error(s), {counts['warning']} warning(s) in {args.source}")
    return 1 if counts["error"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
