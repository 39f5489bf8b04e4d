"""Inference helpers for the bundles' ``inferring`` workflow: input discovery (NIfTI files or DICOM series),
label maps written atomically in each input's original geometry, and a CSV of predicted volumes.

Flow (``bundles/common/configs/inference.yaml``): :func:`discover_inputs` -> ``transforms.build_transforms("infer")``
-> whole-volume inferer -> ``AsDiscreted(argmax)`` -> ``Invertd`` (back to the file's geometry) ->
:class:`WriteLabelMapd` -> :class:`VolumesCsvWriter` at the end. Inputs are never modified or overwritten.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import MapTransform

from pipelines.metrics import case_id, voxel_volume_ml, write_csv_atomic

__all__ = ["NIFTI_SUFFIXES", "discover_inputs", "convert_dicom", "output_path", "WriteLabelMapd", "VolumesCsvWriter", "VOLUME_COLUMNS"]

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
VOLUME_COLUMNS = ("case", "organ_ml", "tumor_ml", "organ_and_tumor_ml", "output")


def _is_nifti(p: Path) -> bool:
    return p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES)


def _looks_dicom(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def output_path(output_dir: str | os.PathLike, image: str | os.PathLike) -> Path:
    """Where the label map of ``image`` goes: ``<output_dir>/<case>.nii.gz`` (KiTS ``case_X/imaging`` -> ``case_X``)."""
    return Path(output_dir) / f"{case_id(str(image))}.nii.gz"


def discover_inputs(input_dir: str | os.PathLike, output_dir: str | os.PathLike) -> list[dict[str, str]]:
    """List the volumes to segment, converting DICOM series to NIfTI first.

    NIfTI files are found anywhere below ``input_dir``; a folder holding DICOM files (with or without an
    extension) is converted with ``pipelines.dicom_to_nifti`` into ``<output_dir>/.dicom_nifti/`` (one NIfTI
    per series; patient identifiers are not carried over).

    Args:
        input_dir: folder of NIfTI volumes and/or DICOM series, or a single NIfTI file.
        output_dir: the inference output folder (label maps go here).

    Returns:
        ``[{"image": path}]`` sorted by path.

    Raises:
        ValueError: a missing input, nothing to segment, two inputs with the same case name, or an output that
            would overwrite an input.
    """
    src = Path(input_dir)
    out = Path(output_dir)
    if not src.exists():
        raise ValueError(f"input_dir {src} does not exist; pass --input_dir <folder of NIfTI volumes or DICOM series>.")
    if src.is_file():
        if not _is_nifti(src):
            raise ValueError(f"{src} is not a NIfTI file (.nii/.nii.gz); pass a folder for DICOM series.")
        images = [src]
    else:
        # outputs of an earlier run inside input_dir (output_dir below it) are not inputs
        nested_out = out.resolve() != src.resolve() and src.resolve() in out.resolve().parents
        images = sorted(
            p for p in src.rglob("*") if _is_nifti(p) and not (nested_out and out.resolve() in p.resolve().parents)
        )
        dicom_dirs = sorted({p.parent for p in src.rglob("*") if p.is_file() and not _is_nifti(p) and _looks_dicom(p)})
        if dicom_dirs:
            conv = out / ".dicom_nifti"
            for d in dicom_dirs:
                rel = d.relative_to(src)
                target = conv / ("_".join(rel.parts) if rel.parts else src.name)
                images.extend(convert_dicom(d, target))
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
    return [{"image": str(p)} for p in images]


def convert_dicom(series_dir: str | os.PathLike, target: str | os.PathLike) -> list[Path]:
    """Convert the DICOM series of a folder to NIfTI with ``python -m pipelines.dicom_to_nifti SRC OUT`` (in process).

    Args:
        series_dir: folder holding the DICOM files (any file names).
        target: output folder (one NIfTI per series).

    Returns:
        the NIfTI files written.

    Raises:
        ValueError: the converter is missing or reports an error (its messages are included).
    """
    import contextlib
    import importlib.util
    import io

    if importlib.util.find_spec("pipelines.dicom_to_nifti") is None:
        raise ValueError(f"{series_dir} holds DICOM files but pipelines.dicom_to_nifti is not available; convert to NIfTI first.")
    from pipelines import dicom_to_nifti

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    code: Any = 0
    with contextlib.redirect_stdout(buf):
        try:
            ret = dicom_to_nifti.main([str(series_dir), str(target)])
            code = ret if isinstance(ret, int) else 0
        except SystemExit as e:
            code = e.code
    if code not in (0, None):
        raise ValueError(f"DICOM conversion of {series_dir} failed: {buf.getvalue().strip() or code}")
    written = sorted(p for p in target.rglob("*") if _is_nifti(p))
    if not written:
        raise ValueError(f"DICOM conversion of {series_dir} wrote no NIfTI file.")
    return written


class WriteLabelMapd(MapTransform):
    """Write the (inverted) label map of each case as NIfTI, atomically, and record its volumes.

    Expects ``data[key]`` of shape (1, *spatial) holding integer labels in the ORIGINAL geometry (after
    ``Invertd``), as a MetaTensor whose affine is the input's. The file is written to a temporary name in the
    output folder and moved into place with ``os.replace``; an existing file equal to an input is refused.

    Args:
        keys: the prediction key (``"pred"``).
        output_dir: destination folder.
        image_key: key whose metadata names the input file.
        organ_label: organ label value.
        tumor_label: tumor label value.
    """

    def __init__(self, keys: str | Sequence[str] = "pred", output_dir: str = ".", image_key: str = "image", organ_label: int = 1, tumor_label: int = 2) -> None:
        super().__init__(keys)
        self.output_dir = Path(output_dir)
        self.image_key = image_key
        self.organ_label, self.tumor_label = int(organ_label), int(tumor_label)
        self.rows: list[list[Any]] = []

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
            target = output_path(self.output_dir, src)
            if target.resolve() == Path(src).resolve():
                raise ValueError(f"refusing to overwrite the input {src}.")
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name[:-7]}.tmp{os.getpid()}.nii.gz")
            img = nib.Nifti1Image(arr, affine)
            img.header.set_data_dtype(np.uint8)
            img.header.set_xyzt_units("mm")
            nib.save(img, str(tmp))
            os.replace(tmp, target)
            vox = voxel_volume_ml(affine)
            organ = float((arr == self.organ_label).sum()) * vox
            tumor = float((arr == self.tumor_label).sum()) * vox
            self.rows.append([case_id(src), organ, tumor, organ + tumor, str(target)])
            logger.info("wrote %s (organ %.1f mL, tumor %.1f mL)", target, organ, tumor)
        return d


class VolumesCsvWriter:
    """At the end of inference, write ``volumes.csv`` (``case, organ_ml, tumor_ml, organ_and_tumor_ml, output``).

    Args:
        writer: the :class:`WriteLabelMapd` of the postprocessing chain (its recorded rows are written).
        path: CSV destination (written atomically).
    """

    def __init__(self, writer: WriteLabelMapd, path: str) -> None:
        self.writer, self.path = writer, path

    def attach(self, engine: Engine) -> None:
        """Write on COMPLETED."""
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Write the CSV rows recorded so far, sorted by case."""
        rows = sorted(self.writer.rows, key=lambda r: r[0])
        write_csv_atomic(self.path, VOLUME_COLUMNS, rows)
        logger.info("wrote %s (%d cases)", self.path, len(rows))
