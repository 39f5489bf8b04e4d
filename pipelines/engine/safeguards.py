"""What inference checks and records around the network: inputs that are not CT, implausible results, provenance.

- :func:`label_name` / :func:`input_problems`: an input that is a label map (by name: ``*_seg*``, ``*_mask*``,
  ``*_label*``, ``segmentation*``, a ``labelsTr``/``labelsTs`` folder; by content: an integer volume with few distinct
  non-negative values), or whose voxels are not Hounsfield units (NaN/inf, nothing below -500 HU such as an unsigned
  0..1905 volume without its rescale, values beyond 1e5 such as 1e30; the checks of
  ``pipelines.check_dataset.image_problems``), is refused naming the file; a spacing far outside the plan's training
  range is a warning naming both spacings (``pipelines.engine.plan.spacing_outside_plan``).
- :func:`result_flags`: an organ or tumor volume outside a configurable mL range, or no organ at all, is flagged
  (``flag``/``reason`` columns of ``volumes.csv`` and a warning), never silently.
- :func:`kidney_sides`: per-kidney volumes (left/right) by connected components and the side from the affine.
- :func:`model_provenance`: the model a prediction came from (role, checkpoint sha256, training MLflow run id, plan),
  the ctdistill version and git commit; :func:`warn_untrained_model` warns at load when the recorded validation tumor
  DSC is 0.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "LABEL_NAME",
    "LABEL_FOLDERS",
    "LABEL_MAX_VALUES",
    "DEFAULT_ML_RANGES",
    "PROVENANCE_COLUMNS",
    "label_name",
    "input_problems",
    "result_flags",
    "kidney_sides",
    "model_provenance",
    "ctdistill_version",
    "warn_untrained_model",
]

logger = logging.getLogger(__name__)

#: file names of label maps, not CT: ``*_seg*``, ``*_mask*``, ``*_label*``, ``segmentation*`` (case-insensitive)
LABEL_NAME = re.compile(r"(_seg|_mask|_label|^segmentation)", re.IGNORECASE)
#: nnU-Net/MSD label folders (lower case) -> their image folder; ``inference.is_label_file`` reads it too
LABEL_FOLDERS: dict[str, str] = {"labelstr": "imagesTr", "labelsts": "imagesTs"}
#: an integer volume with at most this many distinct non-negative values is a label map (a CT has thousands)
LABEL_MAX_VALUES = 256
#: plausible volumes in mL per task: organ (label 1) and tumor (label 2); outside -> flagged
DEFAULT_ML_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "kits": {"organ": (20.0, 1500.0), "tumor": (0.0, 3000.0)},  # both kidneys; normal ~250-400 mL together
    "lits": {"organ": (300.0, 6000.0), "tumor": (0.0, 5000.0)},
}
#: the provenance columns of volumes.csv, in order
PROVENANCE_COLUMNS: tuple[str, ...] = (
    "model_role",
    "checkpoint_sha256",
    "training_run_id",
    "plan",
    "ctdistill_version",
    "git_commit",
    "date",
)


def label_name(path: str | os.PathLike) -> bool:
    """Whether a file's name says it is a label map (``*_seg*``, ``*_mask*``, ``*_label*``, ``segmentation*``, or
    inside a ``labelsTr``/``labelsTs`` folder)."""
    p = Path(path)
    return bool(LABEL_NAME.search(p.name)) or p.parent.name.lower() in LABEL_FOLDERS


def input_problems(path: str | os.PathLike, data: np.ndarray) -> list[str]:
    """Why an input volume is not a CT inference may segment (empty list: it is).

    Args:
        path: the file (named in every message).
        data: its voxels, scaled by the header's slope/intercept (``np.asanyarray(image.dataobj)``).

    Returns:
        one message per problem: a label map by name or by content, NaN/inf voxels, intensities that are not HU.
    """
    from pipelines.check_dataset import image_problems

    p = Path(path)
    out = []
    if label_name(p):
        out.append(
            f"input {p} is named like a label map (*_seg*, *_mask*, *_label*, segmentation*, labelsTr): not a CT; move it out of --input_dir"
        )
    if np.issubdtype(data.dtype, np.integer) and data.size and int(data.min()) >= 0:
        values = np.unique(data) if data.size <= 1 << 22 else np.unique(data[:: max(1, data.shape[0] // 64)])
        if len(values) <= LABEL_MAX_VALUES:
            out.append(
                f"input {p} holds {len(values)} distinct integer values {values[:6].tolist()}{'...' if len(values) > 6 else ''} "
                "and nothing negative: a label map, not a CT (Hounsfield units); give the image"
            )
            return out
    out.extend(f"input {p}: {q.message}" for q in image_problems(p, data) if q.severity == "error")
    return out


def _range(value: Any, default: tuple[float, float], name: str) -> tuple[float, float]:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return default
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(
            f"--{name} must be [low, high] in mL (or null for the task's default {list(default)}), got {value!r}"
        )
    lo, hi = float(value[0]), float(value[1])
    if not (math.isfinite(lo) and lo >= 0 and hi > lo):
        raise ValueError(f"--{name} must be [low, high] in mL with 0 <= low < high, got {value!r}")
    return lo, hi


def result_flags(
    organ_ml: float,
    tumor_ml: float,
    *,
    task: str = "kits",
    organ_ml_range: Sequence[float] | None = None,
    tumor_ml_range: Sequence[float] | None = None,
) -> list[str]:
    """Reasons a predicted segmentation is implausible (empty list: plausible).

    Args:
        organ_ml: predicted organ volume (label 1) in mL.
        tumor_ml: predicted tumor volume (label 2) in mL.
        task: ``"kits"`` or ``"lits"`` (the default ranges, :data:`DEFAULT_ML_RANGES`).
        organ_ml_range: ``[low, high]`` mL for the organ (None: the task's default).
        tumor_ml_range: ``[low, high]`` mL for the tumor (None: the task's default).

    Returns:
        the reasons (e.g. ``"organ 37262 mL outside 20..1500 mL"``, ``"no organ found"``).

    Raises:
        ValueError: a malformed range.
    """
    defaults = DEFAULT_ML_RANGES.get(task, DEFAULT_ML_RANGES["kits"])
    organ_lo, organ_hi = _range(organ_ml_range, defaults["organ"], "organ_ml_range")
    tumor_lo, tumor_hi = _range(tumor_ml_range, defaults["tumor"], "tumor_ml_range")
    reasons = []
    if organ_ml <= 0:
        reasons.append("no organ found")
    elif not organ_lo <= organ_ml <= organ_hi:
        reasons.append(f"organ {organ_ml:.0f} mL outside {organ_lo:g}..{organ_hi:g} mL")
    if not tumor_lo <= tumor_ml <= tumor_hi:
        reasons.append(f"tumor {tumor_ml:.0f} mL outside {tumor_lo:g}..{tumor_hi:g} mL")
    return reasons


def kidney_sides(label: np.ndarray, affine: np.ndarray, labels: Sequence[int] = (1, 2)) -> dict[str, float]:
    """Left and right kidney volumes (kidney + tumor, mL) of a KiTS-type label map.

    The two largest connected components (26-connectivity) of the kidney+tumor mask are the kidneys; the one whose
    centroid has the larger world x (RAS+: x grows toward the patient's right) is the right kidney. A single component
    (one kidney) is placed by its centroid's x against the volume's centre.

    Args:
        label: (X, Y, Z) integer label map.
        affine: its voxel-to-world (RAS mm) affine.
        labels: the label values that make a kidney (organ and tumor).

    Returns:
        ``{"left_ml": ..., "right_ml": ...}`` (0 for a side without a component).
    """
    from scipy import ndimage

    mask = np.isin(label, list(labels))
    out = {"left_ml": 0.0, "right_ml": 0.0}
    if not mask.any():
        return out
    comps, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(comps.ravel())[1:]
    vox = float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    keep = np.argsort(sizes)[::-1][:2] + 1
    centres = ndimage.center_of_mass(mask, comps, keep)
    xs = [float((np.asarray(affine)[:3, :3] @ np.asarray(c) + np.asarray(affine)[:3, 3])[0]) for c in centres]
    if len(xs) == 2:
        sides = ["right", "left"] if xs[0] > xs[1] else ["left", "right"]
    else:
        centre = (np.asarray(affine)[:3, :3] @ ((np.asarray(label.shape) - 1) / 2.0) + np.asarray(affine)[:3, 3])[0]
        sides = ["right" if xs[0] > centre else "left"]
    for comp, side in zip(keep, sides):
        out[f"{side}_ml"] = float(sizes[comp - 1]) * vox
    return out


def model_provenance(checkpoint: str | os.PathLike, settings: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Where predictions come from: :data:`PROVENANCE_COLUMNS` for ``volumes.csv`` (one value per column).

    Args:
        checkpoint: the model checkpoint.
        settings: its ``settings`` (read from the checkpoint when None).

    Returns:
        ``{column: value}``; the plan as compact JSON (``""`` without one), the date as ISO 8601 UTC.
    """
    from pipelines.engine.checkpoint import checkpoint_run_id, checkpoint_settings
    from pipelines.engine.tracking import file_sha256, git_commit

    settings = dict(settings if settings is not None else checkpoint_settings(checkpoint))
    plan = (settings.get("preprocessing") or {}).get("plan")
    commit, dirty = git_commit()
    return {
        "model_role": str(settings.get("role") or ""),
        "checkpoint_sha256": file_sha256(checkpoint),
        "training_run_id": checkpoint_run_id(checkpoint, settings),
        "plan": json.dumps(plan, sort_keys=True, separators=(",", ":")) if plan else "",
        "ctdistill_version": ctdistill_version(),
        "git_commit": commit + ("-dirty" if dirty == "true" else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def ctdistill_version() -> str:
    """The installed ctdistill package version (``"unknown"`` when it is not installed): provenance and DICOM-SEG."""
    from importlib import metadata

    try:
        return metadata.version("ctdistill")
    except metadata.PackageNotFoundError:
        return "unknown"


def warn_untrained_model(checkpoint: str | os.PathLike, key_metric: str = "dsc_tumor") -> bool:
    """Warn at load when the checkpoint's recorded validation tumor DSC is 0 (it never found a tumor).

    Args:
        checkpoint: the model checkpoint.
        key_metric: the metric ``best_metric`` holds (the bundles select ``best.pt`` by ``dsc_tumor``).

    Returns:
        True when the warning was given. False too for released weights (an exported bundle's ``models/model.pt`` is
        a plain state dict: its validation scores are in ``configs/metadata.json``).

    Raises:
        BundleInputError: a missing or unloadable file.
    """
    from pipelines.engine.checkpoint import load_torch_file

    ckpt = load_torch_file(checkpoint, "checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        return False
    if ((ckpt.get("settings") or {}).get("preprocessing") or {}).get("spatial_dims") is None:
        return False  # not a CT segmentation model (the polyp role): no tumor DSC recorded
    best = ckpt.get("best_metric")
    if isinstance(best, (int, float)) and math.isfinite(float(best)) and float(best) <= 0.0:
        logger.warning(
            "%s: its recorded validation %s is %s -- this model never segmented a tumor in validation; its tumor "
            "volumes are meaningless (train longer or on more data)",
            checkpoint, key_metric, best,
        )  # fmt: skip
        return True
    return False
