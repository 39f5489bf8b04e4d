"""Inference helpers for the bundles' ``inferring`` workflow: input discovery (NIfTI files or DICOM series),
label maps written atomically in each input's original geometry, and a CSV of predicted volumes.

Flow (``bundles/common/configs/inference.yaml``): :func:`discover_inputs` (inputs that are not CT are skipped or
refused, ``pipelines.engine.safeguards``) -> ``transforms.build_transforms("infer")`` with the checkpoint's plan ->
whole-volume inferer -> softmax -> ``Invertd`` (the probabilities back to the file's exact geometry) -> argmax ->
:class:`WriteLabelMapd` (flags, provenance, sha256) -> :class:`VolumesCsvWriter` at the end. Inputs are never modified
or overwritten, nor is a label map whose content changed since this tool wrote it.

No data loss, by construction: an output folder that is the input folder, or lies inside it while holding files this
tool did not write, is refused; a label map is written only to a path that does not exist yet or that an earlier run
into the same output folder wrote (its ``volumes.csv``, kept up to date after every case, lists it). Label files of
a dataset layout (KiTS ``segmentation.nii.gz``, LiTS ``segmentation-N.nii``, nnU-Net/MSD ``labelsTr``/``labelsTs``)
are not inputs. Every input is checked before any inference: 3D, readable, with a defined voxel spacing.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import MapTransform

from pipelines.engine.atomic import TMP_MARKER, atomic_write
from pipelines.engine.metrics import case_id, unique_case_ids, voxel_volume_ml, write_csv_atomic
from pipelines.engine.safeguards import (
    LABEL_FOLDERS,
    PROVENANCE_COLUMNS,
    input_problems,
    kidney_sides,
    label_name,
    result_flags,
)

__all__ = [
    "NIFTI_SUFFIXES",
    "VOLUMES_CSV",
    "discover_inputs",
    "is_label_file",
    "previous_outputs",
    "check_input_volume",
    "modified_output",
    "prediction_case",
    "convert_dicom",
    "output_path",
    "WriteLabelMapd",
    "VolumesCsvWriter",
    "VOLUME_COLUMNS",
]

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: volumes.csv: volumes, what the label values mean (``labels``, e.g. ``0=background;1=kidney;2=kidney tumor``),
#: per-kidney volumes (KiTS-type labels), the plausibility flag and its reason, where the model came from
#: (``pipelines.engine.safeguards.PROVENANCE_COLUMNS``), the written label map's sha256, and the file (last)
VOLUME_COLUMNS = (
    "case",
    "organ_ml",
    "tumor_ml",
    "organ_and_tumor_ml",
    "labels",
    "left_kidney_ml",
    "right_kidney_ml",
    "flag",
    "reason",
    *PROVENANCE_COLUMNS,
    "sha256",
    "output",
)
#: the columns an earlier volumes.csv must have for its label maps to be replaceable (older ones lack the rest)
_REQUIRED_COLUMNS = ("case", "output")
#: nnU-Net's channel suffix: ``<case>_0000.nii.gz`` is the image of ``<case>``
_NNUNET_CHANNEL = re.compile(r"_\d{4}$")
#: the output folder's record of the label maps written into it (the only existing files inference may replace)
VOLUMES_CSV = "volumes.csv"
#: DICOM series converted to NIfTI go here, inside the output folder
DICOM_NIFTI = ".dicom_nifti"
#: dataset label folders and the image folder beside which they are labels
_KITS_LABEL = re.compile(r"^segmentation\.nii(\.gz)?$", re.IGNORECASE)
_LITS_LABEL = re.compile(r"^segmentation-(\d+)\.nii(\.gz)?$", re.IGNORECASE)


def _is_nifti(p: Path) -> bool:
    return p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES)


def _looks_dicom(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def prediction_case(image: str | os.PathLike) -> str:
    """The case name of an input: KiTS ``case_X/imaging.nii.gz`` -> ``case_X``; nnU-Net ``<case>_0000.nii.gz`` ->
    ``<case>``; else the file's stem."""
    return _NNUNET_CHANNEL.sub("", case_id(str(image)))


def output_path(output_dir: str | os.PathLike, image: str | os.PathLike, case: str | None = None) -> Path:
    """Where the label map of ``image`` goes: ``<output_dir>/<case>.nii.gz`` (:func:`prediction_case`; ``case``
    given: that id, e.g. from ``unique_case_ids``)."""
    return Path(output_dir) / f"{case or prediction_case(image)}.nii.gz"


def is_label_file(path: str | os.PathLike) -> bool:
    """Whether a NIfTI file is the label map of a dataset layout, beside its image (not an input to segment).

    KiTS19 ``case_X/segmentation.nii.gz`` next to ``imaging.nii.gz``; LiTS ``segmentation-N.nii`` next to
    ``volume-N.nii``; nnU-Net/MSD ``labelsTr/*`` (``labelsTs/*``) next to an ``imagesTr`` (``imagesTs``) folder.

    Args:
        path: a NIfTI file.

    Returns:
        True for a label file of one of these layouts.
    """
    p = Path(path)
    if _KITS_LABEL.match(p.name):
        return any((p.parent / f"imaging{suffix}").exists() for suffix in NIFTI_SUFFIXES)
    m = _LITS_LABEL.match(p.name)
    if m:
        return any((p.parent / f"volume-{m.group(1)}{suffix}").exists() for suffix in NIFTI_SUFFIXES)
    images = LABEL_FOLDERS.get(p.parent.name.lower())
    return images is not None and (p.parent.parent / images).is_dir()


def previous_outputs(output_dir: str | os.PathLike) -> dict[str, list[str]]:
    """The label maps an earlier inference wrote into ``output_dir``: rows of its ``volumes.csv`` by output file name.

    Args:
        output_dir: the inference output folder.

    Returns:
        ``{file name: row of VOLUME_COLUMNS}`` (columns an older volumes.csv lacks are ``""``); empty without a
        readable ``volumes.csv`` (then no existing file may be replaced).
    """
    path = Path(output_dir) / VOLUMES_CSV
    if not path.is_file():
        return {}
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not set(_REQUIRED_COLUMNS) <= set(reader.fieldnames):
                logger.warning("%s is not a volumes.csv of this tool (columns %s): no existing output is replaced", path, reader.fieldnames)
                return {}
            rows = [[row.get(c) or "" for c in VOLUME_COLUMNS] for row in reader]
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        logger.warning("cannot read %s (%s): no existing output is replaced", path, e)
        return {}
    return {Path(r[-1]).name: r for r in rows if r[-1]}


def _ours(path: Path, out: Path, previous: Mapping[str, Any]) -> bool:
    """A file under ``out`` that inference wrote: volumes.csv, a listed label map, a DICOM conversion, a temp file."""
    rel = path.relative_to(out)
    if rel.parts and rel.parts[0] == DICOM_NIFTI:
        return True
    if len(rel.parts) != 1:
        return False
    return path.name == VOLUMES_CSV or _listed(path.name, previous) or (path.name.startswith(".") and TMP_MARKER in path.name)


def _listed(name: str, previous: Mapping[str, Any]) -> bool:
    """A file of an output an earlier run recorded: the listed file itself, or the DICOM-SEG / color table of a
    listed label map (``case.seg.dcm``, ``case.ctbl`` beside ``case.nii.gz``; either may be the listed one)."""
    from pipelines.engine.dicom_seg import SEG_SUFFIX

    stem = next((name[: -len(s)] for s in (".nii.gz", SEG_SUFFIX, ".ctbl") if name.endswith(s)), None)
    return name in previous or (stem is not None and any(f"{stem}{s}" in previous for s in (".nii.gz", SEG_SUFFIX)))


def modified_output(path: str | os.PathLike, row: Sequence[Any]) -> str:
    """Why an earlier label map may NOT be replaced: its content no longer has the sha256 ``volumes.csv`` recorded
    (someone, e.g. a clinician, corrected it); ``""`` when it may (unchanged, or recorded before hashes were).

    Args:
        path: the existing label map.
        row: its ``volumes.csv`` row (:data:`VOLUME_COLUMNS`).

    Returns:
        the refusal message naming the file, or ``""``.
    """
    from pipelines.engine.tracking import file_sha256

    recorded = str(row[VOLUME_COLUMNS.index("sha256")] or "") if len(row) == len(VOLUME_COLUMNS) else ""
    if not recorded or not Path(path).is_file() or file_sha256(path) == recorded:
        return ""
    return (
        f"refusing to overwrite {path}: its content changed since inference wrote it (sha256 differs from the one in "
        f"{VOLUMES_CSV}; it may have been corrected by hand). Move it away or choose another --output_dir."
    )


def check_input_volume(path: str | os.PathLike) -> None:
    """Refuse an input volume inference would get wrong: unreadable, not 3D, without a defined voxel spacing, or not
    a CT (a label map by name or content, NaN/inf voxels, intensities that are not Hounsfield units; see
    ``pipelines.engine.safeguards.input_problems``).

    Args:
        path: a NIfTI file.

    Raises:
        ValueError: naming the file: it cannot be read, is not one scalar per voxel (RGB,
            ``pipelines.check_dataset.dtype_problem``), is 2D or 4D, its spacing is zero / invented (see
            ``pipelines.check_dataset.spacing_problems``), or it is not a CT volume.
    """
    from pipelines.check_dataset import dtype_problem, spacing_problems

    p = Path(path)
    try:
        image = nib.load(str(p))
    except Exception as e:  # noqa: BLE001 - any reader failure is one clear message naming the file
        raise ValueError(f"input {p} cannot be read as NIfTI ({type(e).__name__}: {e}); fix it or remove it from --input_dir.") from e
    bad_dtype = dtype_problem(p, image, "the image")
    if bad_dtype is not None:
        raise ValueError(f"input {p}: {bad_dtype.message}.")
    shape = tuple(int(v) for v in image.shape)
    if len(shape) < 3:
        raise ValueError(f"input {p} is {len(shape)}D (shape {shape}); inference segments 3D CT volumes.")
    if any(v != 1 for v in shape[3:]):
        raise ValueError(f"input {p} is 4D (shape {shape}); give one 3D volume per file.")
    errors = [q.message for q in spacing_problems(image, p) if q.severity == "error"]
    if errors:
        raise ValueError(f"input {p}: {errors[0]}.")
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as e:  # noqa: BLE001 - truncated data is one clear message naming the file
        raise ValueError(f"cannot read {p} ({type(e).__name__}: {e}); fix it or remove it from --input_dir.") from e
    problems = input_problems(p, data.reshape(data.shape[:3]))
    if problems:
        raise ValueError(problems[0] + ".")


def discover_inputs(
    input_dir: str | os.PathLike, output_dir: str | os.PathLike, plan: Mapping[str, Any] | None = None
) -> list[dict[str, str]]:
    """List the volumes to segment, converting DICOM series to NIfTI first, and make sure no file can be lost.

    NIfTI files are found anywhere below ``input_dir`` (label files of a dataset layout, see :func:`is_label_file`,
    and files named like label maps, ``*_seg*``/``*_mask*``/``*_label*``/``segmentation*``, are skipped with a
    warning naming them); a folder holding DICOM files (with or without an extension) is converted with
    ``pipelines.dicom_to_nifti`` into ``<output_dir>/.dicom_nifti/`` (one NIfTI per series; patient identifiers are
    not carried over). Every input is checked (:func:`check_input_volume`) before any inference.

    Args:
        input_dir: folder of NIfTI volumes and/or DICOM series, or a single NIfTI file.
        output_dir: the inference output folder (label maps go here). It must not be ``input_dir``; inside it, it
            may hold only this tool's earlier outputs.
        plan: the model's preprocessing plan: an input whose spacing lies far outside its training range gets a
            warning naming both spacings.

    Returns:
        ``[{"image": path}]`` sorted by path; a converted DICOM series also has ``"dicom_dir"`` (its folder, the
        source series of a DICOM-SEG, ``pipelines.engine.dicom_seg``).

    Raises:
        ValueError: a missing input, nothing to segment, a bad input volume, two inputs with the same case name, an
            output folder that is (or mixes with) the input folder or cannot be written to, or an output that would
            replace an input or a file no earlier inference into ``output_dir`` wrote.
    """
    src = Path(input_dir)
    out = Path(output_dir)
    if not src.exists():
        raise ValueError(f"input_dir {src} does not exist; pass --input_dir <folder of NIfTI volumes or DICOM series>.")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} is a file; pass a folder for the label maps (--output_dir).")
    previous = previous_outputs(out)
    src_r, out_r = src.resolve(), out.resolve()
    sources: dict[Path, Path] = {}  # converted NIfTI -> its DICOM folder (the source series of a DICOM-SEG)
    if src.is_file():
        if not _is_nifti(src):
            raise ValueError(f"{src} is not a NIfTI file (.nii/.nii.gz); pass a folder for DICOM series.")
        images = [src]
    else:
        if out_r == src_r:
            raise ValueError(
                f"output_dir {out} is the input folder: writing label maps there would overwrite the inputs or mix "
                f"with them (and be read as inputs by the next run); choose an --output_dir outside {src}."
            )
        nested = src_r in out_r.parents
        if nested and out.is_dir():
            foreign = sorted(p for p in out.rglob("*") if (p.is_file() or p.is_symlink()) and not _ours(p, out, previous))
            if foreign:
                raise ValueError(
                    f"output_dir {out} lies inside input_dir {src} and holds files this tool did not write (e.g. "
                    f"{foreign[0]}): they would be skipped as inputs or overwritten; choose an --output_dir outside {src}."
                )
        found = [p for p in src.rglob("*") if not (nested and (out_r == p.resolve() or out_r in p.resolve().parents))]
        candidates = [p for p in found if _is_nifti(p)]
        labels = [p for p in candidates if is_label_file(p)]
        if labels:
            logger.info("skipping %d label file(s) of the dataset layout in %s (e.g. %s)", len(labels), src, labels[0])
        named = sorted(p for p in candidates if p not in labels and label_name(p))
        for p in named:
            logger.warning("skipping %s: named like a label map (*_seg*, *_mask*, *_label*, segmentation*), not a CT", p)
        labels += named
        images = sorted(set(candidates) - set(labels))
        dicom_dirs = sorted({p.parent for p in found if p.is_file() and not _is_nifti(p) and _looks_dicom(p)})
        if dicom_dirs:
            conv = out / DICOM_NIFTI
            for d in dicom_dirs:
                rel = d.relative_to(src)
                target = conv / ("_".join(rel.parts) if rel.parts else src.name)
                converted = convert_dicom(d, target)
                sources.update({c: d for c in converted})
                images.extend(converted)
    if not images:
        raise ValueError(f"no NIfTI volume (.nii/.nii.gz) and no DICOM series found in {src}.")
    inputs = {p.resolve() for p in images}
    seen: dict[str, Path] = {}
    for p in images:
        target = output_path(out, p)
        if target.resolve() in inputs:
            raise ValueError(f"writing {target} would overwrite the input {p}; choose another --output_dir.")
        name = target.name
        if name in seen:
            raise ValueError(f"inputs {seen[name]} and {p} would both be written to {target}; segment them separately.")
        seen[name] = p
        if (target.exists() or target.is_symlink()) and (target.is_dir() or name not in previous):
            raise ValueError(
                f"{target} exists and no earlier inference into {out} wrote it (its {VOLUMES_CSV} does not list it): "
                "refusing to overwrite it; choose an empty --output_dir."
            )
        changed = modified_output(target, previous[name]) if name in previous else ""
        if changed:  # hashed once: the message is the verdict
            raise ValueError(changed)
    from pipelines.engine.plan import spacing_outside_plan

    for p in images:
        check_input_volume(p)
        far = spacing_outside_plan(p, plan)
        if far:
            logger.warning(far)
    _check_writable(out)
    return [{"image": str(p), "dicom_dir": str(sources[p])} if p in sources else {"image": str(p)} for p in images]


def _check_writable(out: Path) -> None:
    """Refuse an output folder (or, when it does not exist yet, the folder it would be made in) nobody can write to.

    Raises:
        ValueError: naming the folder, before any inference.
    """
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):  # also False on a read-only filesystem, for root too
        where = "" if existing == out else f" (it would be created in {existing})"
        raise ValueError(f"output_dir {out} is not writable{where}; choose an --output_dir you can write to.")


def convert_dicom(series_dir: str | os.PathLike, target: str | os.PathLike) -> list[Path]:
    """Convert the DICOM series of a folder to NIfTI (``pipelines.dicom_to_nifti.convert_dicom``).

    Args:
        series_dir: folder holding the DICOM files (any file names).
        target: output folder (one NIfTI per series).

    Returns:
        the NIfTI files written.

    Raises:
        ValueError: the conversion fails (the converter's message is included).
    """
    from pipelines import dicom_to_nifti

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    try:
        dicom_to_nifti.convert_dicom(series_dir, target)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"DICOM conversion of {series_dir} failed: {e}") from e
    except OSError as e:  # an output folder that is a file, read-only, or a full disk (no partial file is left)
        raise ValueError(f"DICOM conversion of {series_dir} failed: cannot write {e.filename or target}: {e.strerror or e}") from e
    written = sorted(p for p in target.rglob("*") if _is_nifti(p))
    if not written:
        raise ValueError(f"DICOM conversion of {series_dir} wrote no NIfTI file.")
    return written


class WriteLabelMapd(MapTransform):
    """Write the (inverted) label map of each case (NIfTI and/or DICOM-SEG, ``output_format``), atomically, and record
    it in ``volumes.csv``.

    Expects ``data[key]`` of shape (1, *spatial) holding integer labels in the ORIGINAL geometry (after
    ``Invertd``), as a MetaTensor whose affine is the input's. The file is written to a temporary name in the
    output folder and moved into place with ``os.replace``. A destination that exists is replaced only when an
    earlier run into the same folder wrote it (its ``volumes.csv`` lists it) or this run did; an input is never
    replaced. After every case ``<output_dir>/volumes.csv`` is rewritten (atomically) with the rows of this run and
    those of earlier runs whose label maps are still there, so a crashed run's outputs stay replaceable.

    Each row also records what the label values mean (``labels``, from ``label_names``), the left/right kidney
    volumes (``task="kits"``: connected components, side from the affine), a ``flag`` (``implausible``) with its ``reason`` when the organ or tumor volume lies outside its mL range
    or no organ was found (also a warning in the log), the model's provenance (``provenance``: role, checkpoint
    sha256, training run, plan, version, commit, date) and the sha256 of the written file: a later run into the same
    folder replaces the file only while its content still has that hash (:func:`modified_output`). The NIfTI
    header's ``descrip`` names the model.

    Args:
        keys: the prediction key (``"pred"``).
        output_dir: destination folder.
        image_key: key whose metadata names the input file.
        organ_label: organ label value.
        tumor_label: tumor label value.
        output_format: ``nifti`` (the label map), ``dicom-seg`` (its DICOM-SEG ``<case>.seg.dcm`` only) or ``both``.
        seg_writer: writes the DICOM-SEG (``pipelines.engine.dicom_seg.DicomSegWriter``); required unless ``nifti``.
        label_names: label value -> name: a 3D Slicer color table ``<case>.ctbl`` is written beside each NIfTI label
            map (``pipelines.engine.labels``); None writes none.
        provenance: ``pipelines.engine.safeguards.model_provenance`` of the model (None: those columns stay empty).
        task: ``"kits"`` (per-kidney volumes) or ``"lits"``; picks the default mL ranges.
        organ_ml_range: plausible organ volume ``[low, high]`` mL (None: the task's default).
        tumor_ml_range: plausible tumor volume ``[low, high]`` mL (None: the task's default).
        images: every input file of the run (optional): ids made unique by ``unique_case_ids``.
    """

    def __init__(
        self,
        keys: str | Sequence[str] = "pred",
        output_dir: str = ".",
        image_key: str = "image",
        organ_label: int = 1,
        tumor_label: int = 2,
        output_format: str = "nifti",
        seg_writer: Any = None,
        label_names: Mapping[int, str] | None = None,
        provenance: Mapping[str, Any] | None = None,
        task: str = "kits",
        organ_ml_range: Sequence[float] | None = None,
        tumor_ml_range: Sequence[float] | None = None,
        images: Sequence[str] | None = None,
    ) -> None:
        from pipelines.engine.dicom_seg import check_output_format

        super().__init__(keys)
        self.output_format = check_output_format(output_format)
        if self.output_format != "nifti" and seg_writer is None:
            raise ValueError(f"output_format {output_format!r} needs a seg_writer (pipelines.engine.dicom_seg.dicom_seg_writer).")
        self.seg_writer, self.label_names = seg_writer, label_names
        # every input of the run, when known: files sharing a name (patXX/ct.nii.gz) get distinct case ids
        self.case_ids = unique_case_ids(list(images)) if images else {}
        self.output_dir = Path(output_dir)
        self.image_key = image_key
        self.organ_label, self.tumor_label = int(organ_label), int(tumor_label)
        self.provenance = {k: str((provenance or {}).get(k, "")) for k in PROVENANCE_COLUMNS}
        self.task = str(task)
        self.ranges = {"organ_ml_range": organ_ml_range, "tumor_ml_range": tumor_ml_range}
        result_flags(1.0, 0.0, task=self.task, **self.ranges)  # a malformed range fails here, before any inference
        self.rows: list[list[Any]] = []
        # read before this run writes anything: the label maps earlier runs wrote into this folder
        self.previous = previous_outputs(self.output_dir)

    def _files_of(self, target: Path) -> list[Path]:
        """The files one case writes: the label map and its color table, and/or its DICOM-SEG."""
        from pipelines.engine.dicom_seg import seg_path
        from pipelines.engine.labels import color_table_path

        files = [] if self.output_format == "dicom-seg" else [target] + ([color_table_path(target)] if self.label_names else [])
        return files + ([seg_path(target)] if self.output_format != "nifti" else [])

    def all_rows(self) -> list[list[Any]]:
        """This run's rows plus the earlier runs' rows whose label maps this run did not rewrite and still exist.

        Returns:
            rows of :data:`VOLUME_COLUMNS`, sorted by case.
        """
        mine = {Path(str(r[-1])).name for r in self.rows}
        kept = [r for name, r in self.previous.items() if name not in mine and (self.output_dir / name).is_file()]
        return sorted(kept + self.rows, key=lambda r: str(r[0]))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            meta = getattr(d.get(self.image_key), "meta", None) or getattr(pred, "meta", {})
            src = str(meta.get("filename_or_obj", "case"))
            affine = np.asarray(torch.as_tensor(getattr(pred, "affine", torch.eye(4))).cpu().numpy(), dtype=np.float64)
            arr = torch.as_tensor(pred).detach().cpu().numpy()
            if arr.ndim == 4:
                arr = arr[0]
            arr = np.rint(arr).astype(np.uint8)
            case = self.case_ids.get(src) or prediction_case(src)
            target = output_path(self.output_dir, src, case)
            if target.resolve() == Path(src).resolve():
                raise ValueError(f"refusing to overwrite the input {src}.")
            written = {Path(str(r[-1])).name: r for r in self.rows}
            for path in self._files_of(target):
                if (path.exists() or path.is_symlink()) and not _listed(path.name, self.previous) and not _listed(path.name, written):
                    raise ValueError(
                        f"refusing to overwrite {path}: it exists and no inference into {self.output_dir} wrote it "
                        f"(not in its {VOLUMES_CSV}); choose an empty output folder."
                    )
            modified = modified_output(target, written.get(target.name) or self.previous.get(target.name) or [])
            if modified:
                raise ValueError(modified)
            written_to = target
            if self.output_format != "dicom-seg":
                img = nib.Nifti1Image(arr, affine)
                img.header.set_data_dtype(np.uint8)
                img.header.set_xyzt_units("mm")
                role, sha = self.provenance["model_role"], self.provenance["checkpoint_sha256"]
                img.header["descrip"] = (f"ctdistill {role or 'model'} {sha[:16]}".strip())[:79].encode()
                atomic_write(target, lambda tmp, img=img: nib.save(img, str(tmp)))
                if self.label_names:
                    from pipelines.engine.labels import write_color_table

                    write_color_table(target, self.label_names)
            if self.seg_writer is not None and self.output_format != "nifti":
                seg = self.seg_writer(arr, affine, target, dicom_dir=d.get("dicom_dir"))
                written_to = target if self.output_format == "both" else seg
            from pipelines.engine.tracking import file_sha256

            vox = voxel_volume_ml(affine)
            organ = float((arr == self.organ_label).sum()) * vox
            tumor = float((arr == self.tumor_label).sum()) * vox
            sides = kidney_sides(arr, affine, (self.organ_label, self.tumor_label)) if self.task == "kits" else {}
            reasons = result_flags(organ, tumor, task=self.task, **self.ranges)
            if reasons:
                logger.warning("%s: implausible result (%s); check the input and the model before using it", written_to, "; ".join(reasons))
            self.rows = [r for r in self.rows if Path(str(r[-1])).name != Path(written_to).name]
            meanings = ";".join(f"{v}={n}" for v, n in sorted((self.label_names or {}).items()))
            self.rows.append(
                [
                    case,
                    organ,
                    tumor,
                    organ + tumor,
                    meanings,
                    sides.get("left_ml", ""),
                    sides.get("right_ml", ""),
                    "implausible" if reasons else "",
                    "; ".join(reasons),
                    *(self.provenance[k] for k in PROVENANCE_COLUMNS),
                    file_sha256(written_to),
                    str(written_to),
                ]
            )
            write_csv_atomic(self.output_dir / VOLUMES_CSV, VOLUME_COLUMNS, self.all_rows())
            logger.info("wrote %s (organ %.1f mL, tumor %.1f mL)", target, organ, tumor)
        return d


class VolumesCsvWriter:
    """At the end of inference, write ``volumes.csv`` (:data:`VOLUME_COLUMNS`).

    Args:
        writer: the :class:`WriteLabelMapd` of the postprocessing chain (its recorded rows are written, with the
            rows of earlier runs into the same folder whose label maps are still there).
        path: CSV destination (written atomically).
    """

    def __init__(self, writer: WriteLabelMapd, path: str) -> None:
        self.writer, self.path = writer, path

    def attach(self, engine: Engine) -> None:
        """Write on COMPLETED."""
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Write the CSV rows recorded so far, sorted by case."""
        rows = self.writer.all_rows()
        write_csv_atomic(self.path, VOLUME_COLUMNS, rows)
        logger.info("wrote %s (%d cases)", self.path, len(rows))
