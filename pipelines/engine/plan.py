"""The preprocessing plan (like nnU-Net's plans file): target spacing, HU window and network input, from the data.

At training, :func:`make_plan` reads the headers of the TRAINING split (no voxel data) and derives:

- ``target_spacing`` (x, y, z) in mm, RAS order: the median in-plane spacing of the cases (or ``--target_spacing``)
  for x and y, the median slice spacing (or ``--slice_spacing``) for z -- the distance between the 2.5D neighbours;
- ``in_plane_size`` (h, w): the network input. The ``--in_plane_size`` knob when set, else the median in-plane
  extent of the resampled cases rounded up to a multiple of 32;
- ``window``: the HU window (task preset or ``--window``);
- ``spacing_range``: the smallest and largest spacing per axis seen in training (inference warns far outside it).

:func:`apply_plan` turns it into ``transforms.build_transforms`` keyword arguments: every volume is resampled to
``target_spacing`` (images bilinear, labels nearest) and padded (``in_plane_mode="pad"``) instead of resized, so a
kidney keeps its size in millimetres on every scanner and field of view; slices larger than the input are predicted
with an in-plane sliding window (:class:`pipelines.engine.SliceBatchInferer`). The plan is stored in the checkpoint
(``settings["preprocessing"]["plan"]``), so evaluation, inference and exported bundles use it unchanged;
:func:`checkpoint_preprocessing` reads it back and warns, naming what it assumes, for a checkpoint without one.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.transforms import EnsureChannelFirst, LoadImage, MapTransform

from transforms.window import TASK_WINDOWS, resolve_window

__all__ = [
    "PLAN_VERSION",
    "PLAN_DIVISOR",
    "SPACING_TOLERANCE",
    "ras_geometry",
    "make_plan",
    "training_plan",
    "apply_plan",
    "checkpoint_preprocessing",
    "spacing_outside_plan",
    "OriginalLabeld",
]

logger = logging.getLogger(__name__)

PLAN_VERSION = 1
#: a derived network input is rounded up to a multiple of this (the encoders downsample by up to 32)
PLAN_DIVISOR = 32
#: inference warns when a volume's spacing lies more than this factor outside the training range
SPACING_TOLERANCE = 2.0


def ras_geometry(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Voxel spacing and shape of a NIfTI file along the RAS axes (header only, no voxel data read).

    The axes are matched to R, A, S by the affine (``nibabel.orientations.io_orientation``), as
    ``Orientationd("RAS")`` reorders them, so an I,P,L-stored KiTS19 volume gives its slice spacing last.

    Args:
        path: a NIfTI file.

    Returns:
        ``(spacing (3,), shape (3,))`` in mm and voxels, x (R), y (A), z (S).

    Raises:
        ValueError: the file cannot be read or is not 3D (naming it).
    """
    try:
        image = nib.load(str(path))
    except Exception as e:  # noqa: BLE001 - any reader failure is one message naming the file
        raise ValueError(f"cannot read the header of {path} ({type(e).__name__}: {e})") from e
    shape = tuple(int(v) for v in image.shape)
    if len(shape) < 3:
        raise ValueError(f"{path} is {len(shape)}D (shape {shape}); the plan needs 3D CT volumes")
    affine = np.asarray(image.affine, dtype=np.float64)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    ornt = nib.orientations.io_orientation(affine)
    spacing, size = np.zeros(3), np.zeros(3, dtype=np.int64)
    for axis, (ras, _) in enumerate(ornt):
        spacing[int(ras)], size[int(ras)] = zooms[axis], shape[axis]
    return spacing, size


def _positive(value: Any, name: str) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(value, (list, tuple)):
        raise ValueError(f"--{name} is one spacing in mm (a number), got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"--{name} must be a spacing in mm (a positive number) or null (the median), got {value!r}"
        ) from None
    if not math.isfinite(out) or out <= 0:
        raise ValueError(f"--{name} must be a positive spacing in mm or null (the median), got {value!r}")
    return out


def make_plan(
    datalist: Sequence[Mapping[str, Any]],
    *,
    task: str = "kits",
    window: str | Sequence[float] | None = None,
    target_spacing: float | None = None,
    slice_spacing: float | None = None,
    in_plane_size: Sequence[int] | None = None,
    image_key: str = "image",
) -> dict[str, Any]:
    """Derive the preprocessing plan from the TRAINING cases' headers (see the module docstring).

    Args:
        datalist: the training split ``[{"image": path, ...}]``.
        task: ``"kits"`` or ``"lits"``: the HU window preset when ``window`` is None.
        window: a preset name or ``(lo, hi)`` in HU, overriding the task's.
        target_spacing: in-plane spacing in mm (None: the median of the cases' x and y spacings).
        slice_spacing: slice spacing in mm (None: the median of the cases' z spacings).
        in_plane_size: the network input (h, w) (None: median resampled extent rounded up to a multiple of 32).
        image_key: the image key of the datalist items.

    Returns:
        a JSON-able dict: ``version``, ``target_spacing`` [x, y, z], ``in_plane_size`` [h, w], ``window`` [lo, hi],
        ``spacing_range`` {"min": [x, y, z], "max": [x, y, z]}, ``median_shape`` (resampled, [x, y, z]),
        ``cases``, ``spacing_source`` ("median" or "knob").

    Raises:
        ValueError: an empty datalist, an unreadable header (naming the file), a bad knob value.
    """
    if len(datalist) == 0:
        raise ValueError("the training split is empty: no plan can be derived (check the splits file)")
    if window is None:
        if task not in TASK_WINDOWS:
            raise ValueError(f"task must be one of {sorted(TASK_WINDOWS)} (or pass window=...), got {task!r}")
        window = TASK_WINDOWS[task]
    lo, hi = resolve_window(window)
    in_plane = _positive(target_spacing, "target_spacing")
    through = _positive(slice_spacing, "slice_spacing")
    geoms = [ras_geometry(item[image_key]) for item in datalist]
    spacings = np.stack([g[0] for g in geoms])
    shapes = np.stack([g[1] for g in geoms]).astype(np.float64)
    xy = float(np.median(spacings[:, :2])) if in_plane is None else in_plane
    z = float(np.median(spacings[:, 2])) if through is None else through
    target = np.array([xy, xy, z])
    resampled = np.median(shapes * spacings / target, axis=0)
    if in_plane_size is None:
        size = [int(math.ceil(float(v) / PLAN_DIVISOR) * PLAN_DIVISOR) for v in resampled[:2]]
    else:
        if len(in_plane_size) != 2 or min(int(v) for v in in_plane_size) < 1:
            raise ValueError(f"in_plane_size must be two positive ints (h, w), got {tuple(in_plane_size)!r}")
        size = [int(v) for v in in_plane_size]
    plan = {
        "version": PLAN_VERSION,
        "target_spacing": [round(float(v), 5) for v in target],
        "in_plane_size": size,
        "window": [lo, hi],
        "spacing_range": {
            "min": [round(float(v), 5) for v in spacings.min(0)],
            "max": [round(float(v), 5) for v in spacings.max(0)],
        },
        "median_shape": [round(float(v), 1) for v in resampled],
        "cases": len(datalist),
        "spacing_source": "median" if in_plane is None and through is None else "knob",
    }
    logger.info(
        "plan from %d training cases: target spacing %s mm, network input %s, HU window %s (training spacings %s..%s mm)",
        len(datalist), plan["target_spacing"], size, plan["window"], plan["spacing_range"]["min"], plan["spacing_range"]["max"],
    )  # fmt: skip
    return plan


def training_plan(
    datalist: Sequence[Mapping[str, Any]], *, enabled: Any = True, teacher_checkpoint: str | os.PathLike | None = "", **kwargs: Any
) -> dict[str, Any] | None:
    """The plan a training run uses: a KD student takes its teacher's plan (the teacher's features are only
    meaningful at the scale it was trained at), any other run derives one from its training split (:func:`make_plan`).

    Args:
        datalist: the training split.
        enabled: the ``--plan`` knob (False: None, the old path).
        teacher_checkpoint: the KD teacher's checkpoint (``""``: none).
        kwargs: :func:`make_plan` keyword arguments.

    Returns:
        the plan, or None when disabled.
    """
    from pipelines.engine.errors import as_bool

    if not as_bool(enabled):
        return None
    if teacher_checkpoint and str(teacher_checkpoint).strip():
        from pipelines.engine.checkpoint import checkpoint_settings

        plan = (checkpoint_settings(teacher_checkpoint).get("preprocessing") or {}).get("plan")
        if plan:
            logger.info("plan of the teacher %s: target spacing %s mm, network input %s", teacher_checkpoint, plan.get("target_spacing"), plan.get("in_plane_size"))
            return dict(plan)
        logger.warning("teacher %s has no preprocessing plan: the student derives its own from its training split", teacher_checkpoint)
    return make_plan(datalist, **kwargs)


def apply_plan(preprocessing: Mapping[str, Any], plan: Mapping[str, Any] | None) -> dict[str, Any]:
    """``transforms.build_transforms`` keyword arguments that follow ``plan`` (unchanged when ``plan`` is None).

    Sets ``pixdim`` (the target spacing), ``in_plane_size`` (the network input), ``in_plane_mode="pad"`` (pad or
    crop, never resize), ``window`` and keeps the plan itself under ``"plan"`` (provenance; the checkpoint stores it).

    Args:
        preprocessing: the bundles' ``preprocessing`` section.
        plan: a :func:`make_plan` dict, or None (the old path: optional ``pixdim``, in-plane resize).

    Returns:
        a new dict.

    Raises:
        ValueError: a plan without its keys.
    """
    out = dict(preprocessing)
    if not plan:
        out.pop("plan", None)
        return out
    missing = [k for k in ("target_spacing", "in_plane_size", "window") if k not in plan]
    if missing:
        raise ValueError(f"the plan lacks {missing}; it was not written by pipelines.engine.make_plan")
    out.update(
        pixdim=[float(v) for v in plan["target_spacing"]],
        in_plane_size=[int(v) for v in plan["in_plane_size"]],
        in_plane_mode="pad",
        window=[float(v) for v in plan["window"]],
        plan=dict(plan),
    )
    return out


def checkpoint_preprocessing(
    settings: Mapping[str, Any], source: str | os.PathLike = "the checkpoint"
) -> dict[str, Any]:
    """The preprocessing a checkpoint was trained with, for evaluation and inference (its plan, unchanged).

    A checkpoint written before plans existed has none: it keeps working as trained (no resampling unless it
    recorded ``pixdim``; every slice resized to its ``in_plane_size``), with one warning naming what is assumed.

    Args:
        settings: the checkpoint's ``settings`` (``pipelines.engine.checkpoint_settings``).
        source: the checkpoint path, for the warning.

    Returns:
        ``transforms.build_transforms`` keyword arguments.
    """
    pre = dict(settings.get("preprocessing") or {})
    plan = pre.get("plan")
    if plan:
        return apply_plan(pre, plan)
    if pre.get("spatial_dims") is not None:  # a CT checkpoint (the polyp role has its own preprocessing)
        size = pre.get("in_plane_size")
        logger.warning(
            "%s has no preprocessing plan (trained before plans): assuming its recorded preprocessing -- %s, %s, "
            "HU window %s. Volumes at another spacing or field of view than the training data are seen at another "
            "scale; retrain for spacing-aware preprocessing.",
            source,
            f"resampling to {pre['pixdim']} mm" if pre.get("pixdim") else "no resampling (voxel spacing ignored)",
            f"every slice resized to {list(size)} (aspect ratio not kept)" if size else "slices kept at their size",
            pre.get("window") or TASK_WINDOWS.get(str(pre.get("task", "kits")), pre.get("task")),
        )
    return pre


def spacing_outside_plan(
    path: str | os.PathLike, plan: Mapping[str, Any] | None, tolerance: float = SPACING_TOLERANCE
) -> str:
    """A warning when a volume's spacing lies far outside the training cases' spacing range, else ``""``.

    Args:
        path: the input NIfTI file.
        plan: the checkpoint's plan (None: nothing to compare with).
        tolerance: factor beyond the training range (below ``min / tolerance`` or above ``max * tolerance``).

    Returns:
        the message (naming the file and both spacings), or ``""``.
    """
    if not plan or "spacing_range" not in plan:
        return ""
    spacing, _ = ras_geometry(path)
    lo = np.asarray(plan["spacing_range"]["min"], dtype=np.float64) / float(tolerance)
    hi = np.asarray(plan["spacing_range"]["max"], dtype=np.float64) * float(tolerance)
    if np.all((spacing >= lo) & (spacing <= hi)):
        return ""
    shown = [round(float(v), 3) for v in spacing]
    return (
        f"{Path(path)}: voxel spacing {shown} mm is far outside the training spacings "
        f"{plan['spacing_range']['min']}..{plan['spacing_range']['max']} mm (target {plan.get('target_spacing')} mm): "
        "it is resampled to the target, but check the header and expect lower accuracy"
    )


class OriginalLabeld(MapTransform):
    """Replace a preprocessed label by the label file as stored (its original geometry), for metrics computed on
    predictions resampled back to each input's geometry (evaluation with a plan): the reference is never a label
    resampled twice.

    Args:
        keys: the label key(s); each must be a MetaTensor whose ``meta["filename_or_obj"]`` names its file.

    Raises:
        ValueError: a label without a file name.
    """

    def __init__(self, keys: str | Sequence[str] = "label") -> None:
        super().__init__(keys)
        self.loader = LoadImage(image_only=True)
        self.channel = EnsureChannelFirst()

    def __call__(self, data: Mapping[Any, Any]) -> dict[Any, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            name = (getattr(d[key], "meta", None) or {}).get("filename_or_obj")
            if not name:
                raise ValueError(f"{key!r} carries no file name (meta['filename_or_obj']); cannot reload the original label")
            d[key] = self.channel(self.loader(str(name)))
        return d
