"""Per-volume segmentation metrics (DSC, signed and absolute RVD, volumes in mL) and their CSV reports.

Every value is computed per *case* (one whole volume, all slices) and kept per case by MONAI's
``IgniteMetricHandler(save_details=True)``, so :class:`CaseMetricsSaver` can write one row per case.

Conventions (HLFD, ISBI 2024, Sec. 3: DSC and RVD on the tumor and on organ+tumor):

- ``dsc = 2 |P & G| / (|P| + |G|)``; empty ground truth and empty prediction is UNDEFINED (NaN, excluded from the
  means and counted as ``n_undefined``, said in the log): a case without tumor never scores a "perfect" 1.0, so a
  validation set without tumor cannot select a checkpoint (issue 19). Empty ground truth with a prediction gives 0.
- ``rvd = (V_pred - V_gt) / V_gt`` (signed); undefined (NaN) when the ground truth is empty. NaN values are
  excluded from every mean and counted in the summary (column ``n`` holds the defined values).
- regions: ``tumor`` is ``label == tumor_label``; ``organ`` is organ+tumor, ``label in organ_labels``.

The polyp metrics (TransFuse, MICCAI 2021) are per-image Dice and IoU of a thresholded probability map; empty vs
empty counts as 1 (the official code's ``2`` for that case is not reproduced).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.handlers import IgniteMetricHandler, MetricsSaver, from_engine
from monai.metrics import CumulativeIterationMetric
from monai.utils import string_list_all_gather

from pipelines.engine.atomic import atomic_write

__all__ = [
    "REGIONS",
    "KINDS",
    "CASE_COLUMNS",
    "dsc",
    "rvd",
    "voxel_volume_ml",
    "RegionMetric",
    "BinaryOverlapMetric",
    "CaseMetricsSaver",
    "summarize_cases",
    "write_csv_atomic",
    "case_id",
    "unique_case_ids",
    "CT_METRICS",
    "ct_metric_handlers",
    "polyp_metric_handlers",
]

logger = logging.getLogger(__name__)

REGIONS = ("tumor", "organ")
KINDS = ("dsc", "rvd", "abs_rvd", "ml_pred", "ml_gt")
#: columns of the per-case CSV, in order
CASE_COLUMNS = ("case", "dsc_tumor", "rvd_tumor", "dsc_organ", "rvd_organ", "tumor_ml_pred", "tumor_ml_gt")


def dsc(pred: torch.Tensor, gt: torch.Tensor, empty: float = 1.0) -> float:
    """Dice similarity coefficient of two boolean masks of any shape.

    Args:
        pred: boolean (or 0/1) mask.
        gt: boolean (or 0/1) mask of the same shape.
        empty: the value for empty vs empty (0/0): 1 by the usual convention; ``RegionMetric`` passes NaN (undefined).

    Returns:
        the DSC in [0, 1] (``empty`` when both masks are empty).
    """
    p, g = pred.bool(), gt.bool()
    denom = int(p.sum()) + int(g.sum())
    if denom == 0:
        return float(empty)
    return 2.0 * int((p & g).sum()) / denom


def rvd(v_pred: float, v_gt: float) -> float:
    """Signed relative volume difference ``(v_pred - v_gt) / v_gt``; NaN when ``v_gt`` is 0 (undefined)."""
    if v_gt == 0:
        return math.nan
    return (v_pred - v_gt) / v_gt


def voxel_volume_ml(affine: torch.Tensor | np.ndarray | None) -> float:
    """Volume of one voxel in mL from a (4, 4) or (B, 4, 4) affine (mm); 1 mm^3 = 1e-3 mL.

    Args:
        affine: the image affine; ``None`` means 1 mm isotropic voxels.

    Returns:
        ``|det(affine[:3, :3])| / 1000``.
    """
    if affine is None:
        return 1e-3
    a = torch.as_tensor(affine, dtype=torch.float64)
    if a.ndim == 3:
        a = a[0]
    sd = a.shape[-1] - 1
    return float(abs(torch.linalg.det(a[:sd, :sd]))) / 1000.0


def _region(labels: torch.Tensor, region: str, tumor_label: int, organ_labels: Sequence[int]) -> torch.Tensor:
    if region == "tumor":
        return labels == tumor_label
    mask = torch.zeros_like(labels, dtype=torch.bool)
    for v in organ_labels:
        mask |= labels == v
    return mask


def _as_labels(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) one-hot/probabilities (C > 1) or label maps (C == 1) -> (B, *spatial) integer labels."""
    if x.ndim < 3:
        raise ValueError(f"expected a batch-first, channel-first tensor (B, C, *spatial); got shape {tuple(x.shape)}.")
    if x.shape[1] == 1:
        return x[:, 0].round().long()
    return x.argmax(dim=1)


class RegionMetric(CumulativeIterationMetric):
    """One per-volume metric of one region, as a MONAI cumulative metric (HLFD paper's DSC and RVD).

    Feed whole volumes: ``y_pred`` and ``y`` batch-first (B, C, *spatial), either label maps (C = 1) or
    one-hot / probabilities (C > 1, argmax taken). Each case gives one value, kept by ``get_buffer()`` (and by
    ``IgniteMetricHandler(save_details=True)``); ``aggregate()`` is the mean over the cases whose value is
    defined (NaN excluded).

    Args:
        kind: ``dsc``, ``rvd`` (signed), ``abs_rvd``, ``ml_pred`` or ``ml_gt`` (region volume in mL, from the
            affine of ``y`` when it is a MetaTensor, else 1 mm^3 voxels).
        region: ``tumor`` (``label == tumor_label``) or ``organ`` (organ + tumor, ``label in organ_labels``).
        tumor_label: the tumor label value.
        organ_labels: the label values forming the organ region.

    Raises:
        ValueError: an unknown kind or region.
    """

    def __init__(
        self, kind: str = "dsc", region: str = "tumor", tumor_label: int = 2, organ_labels: Sequence[int] = (1, 2)
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown metric kind {kind!r}; valid kinds: {', '.join(KINDS)}.")
        if region not in REGIONS:
            raise ValueError(f"unknown region {region!r}; valid regions: {', '.join(REGIONS)}.")
        self.kind, self.region = kind, region
        self.tumor_label, self.organ_labels = int(tumor_label), tuple(int(v) for v in organ_labels)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """(B, C, *spatial) x2 -> (B, 1) float32 values."""
        if y is None:
            raise ValueError("RegionMetric needs the ground truth y.")
        p = _region(_as_labels(y_pred), self.region, self.tumor_label, self.organ_labels)
        g = _region(_as_labels(y), self.region, self.tumor_label, self.organ_labels)
        if p.shape != g.shape:
            raise ValueError(f"prediction shape {tuple(p.shape)} differs from label shape {tuple(g.shape)}.")
        vox = voxel_volume_ml(getattr(y, "affine", None))
        out = []
        for b in range(p.shape[0]):
            vp, vg = float(p[b].sum()) * vox, float(g[b].sum()) * vox
            if self.kind == "dsc":
                value = dsc(p[b], g[b], empty=math.nan)  # no region in either: undefined, never a perfect 1.0
            elif self.kind in ("rvd", "abs_rvd"):
                value = rvd(vp, vg)
                value = abs(value) if self.kind == "abs_rvd" else value
            else:
                value = vp if self.kind == "ml_pred" else vg
            out.append(value)
        return torch.tensor(out, dtype=torch.float32).reshape(-1, 1)

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        """Mean over the cases with a defined value (NaN excluded); NaN when none is defined."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor) or data.numel() == 0:
            return torch.tensor(float("nan"))
        return torch.nanmean(data.float())


class BinaryOverlapMetric(CumulativeIterationMetric):
    """Per-image Dice or IoU of a thresholded one-channel map (TransFuse polyp evaluation, mDice / mIoU).

    Args:
        kind: ``dice`` or ``iou``.
        threshold: probabilities ``> threshold`` are foreground (inputs are probabilities, after sigmoid).

    Empty prediction and empty ground truth give 1 (the official TransFuse code gives 2 there; we do not).

    Raises:
        ValueError: an unknown kind or a threshold outside (0, 1).
    """

    def __init__(self, kind: str = "dice", threshold: float = 0.5) -> None:
        super().__init__()
        if kind not in ("dice", "iou"):
            raise ValueError(f"unknown kind {kind!r}; valid kinds: dice, iou.")
        if not 0.0 < float(threshold) < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold}.")
        self.kind, self.threshold = kind, float(threshold)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """(B, 1, H, W) probabilities and (B, 1, H, W) masks -> (B, 1)."""
        if y is None:
            raise ValueError("BinaryOverlapMetric needs the ground truth y.")
        p = (y_pred > self.threshold).flatten(1)
        g = (y > 0.5).flatten(1)
        inter = (p & g).sum(1).double()
        ps, gs = p.sum(1).double(), g.sum(1).double()
        if self.kind == "dice":
            den = ps + gs
            val = torch.where(den > 0, 2 * inter / den.clamp_min(1), torch.ones_like(den))
        else:
            union = ps + gs - inter
            val = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
        return val.float().reshape(-1, 1)

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        """Mean over images."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor) or data.numel() == 0:
            return torch.tensor(float("nan"))
        return data.float().mean()


def write_csv_atomic(path: str | os.PathLike, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    """Write a CSV through a temporary file in the same folder and ``os.replace`` it into place.

    Args:
        path: destination file.
        header: column names.
        rows: one sequence per row; floats written with ``repr`` precision, NaN as ``nan``.

    Returns:
        the destination path.

    Raises:
        OSError: the folder cannot be written (no temporary file is left behind).
    """
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(list(header))
            for r in rows:
                w.writerow(list(r))

    return atomic_write(path, write)


def summarize_cases(values: Mapping[str, np.ndarray]) -> list[list[object]]:
    """Rows ``[column, mean, std, median, n, n_undefined]`` over the defined (non-NaN) values of each column (pandas).

    Args:
        values: ``{column: (N,) array}``.

    Returns:
        one row per column; ``std`` is the population std (ddof 0); mean/std/median are NaN when ``n`` is 0.

    Raises:
        ValueError: columns of different lengths (one value per case in every column).
    """
    if not values:
        return []
    lengths = {name: len(np.atleast_1d(v)) for name, v in values.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"every column needs one value per case; lengths {lengths}")
    frame = pd.concat({name: pd.Series(np.atleast_1d(np.asarray(v, dtype=np.float64))) for name, v in values.items()}, axis=1)
    table = pd.DataFrame(
        {
            "mean": frame.mean(),
            "std": frame.std(ddof=0),
            "median": frame.median(),
            "n": frame.count(),
            "n_undefined": frame.isna().sum(),
        }
    )
    return [[name, *(float(x) for x in row[:3]), int(row["n"]), int(row["n_undefined"])] for name, row in table.iterrows()]


class CaseMetricsSaver(MetricsSaver):
    """MONAI ``MetricsSaver`` writing the per-case table and its summary with fixed column names.

    Reads ``engine.state.metric_details`` (filled by ``IgniteMetricHandler(save_details=True)`` of each
    :class:`RegionMetric`) and the case names from the batch metadata (``filename_or_obj``), gathered across
    ranks; rank ``save_rank`` writes (atomically):

    - ``<save_dir>/<prefix>cases.csv``: ``case`` then one column per entry of ``columns`` (the metric names as
      attached to the evaluator, e.g. ``dsc_tumor``), one row per case;
    - ``<save_dir>/<prefix>summary.csv``: ``column, mean, std, median, n, n_undefined`` (NaN excluded, counted).

    Args:
        save_dir: output folder.
        columns: metric names, in order (default: the per-case columns of the CT bundles).
        case_name: ``"stem"`` (file name without ``.nii``/``.nii.gz``; KiTS ``case_XXXXX/imaging.nii.gz`` gives
            the folder name) or ``"path"``.
        prefix: file name prefix (e.g. ``"val_"``).
        save_rank: the rank that writes.
    """

    def __init__(
        self,
        save_dir: str,
        columns: Sequence[str] = CASE_COLUMNS[1:],
        case_name: str = "stem",
        prefix: str = "",
        save_rank: int = 0,
    ) -> None:
        if case_name not in ("stem", "path"):
            raise ValueError(f"case_name must be 'stem' or 'path', got {case_name!r}.")
        super().__init__(
            save_dir=save_dir,
            metrics=None,
            metric_details=tuple(columns),
            batch_transform=lambda b: [x["image"].meta if hasattr(x["image"], "meta") else {} for x in b]
            if isinstance(b, list)
            else b["image"].meta,
            save_rank=save_rank,
        )
        self.columns, self.case_name, self.prefix = tuple(columns), case_name, prefix
        self.last_cases: Path | None = None
        self.last_summary: Path | None = None

    def _case(self, filename: str) -> str:
        if self.case_name == "path":
            return filename
        return case_id(filename)

    def __call__(self, engine) -> None:  # noqa: D401 - ignite signature
        """Write the two CSV files for the epoch that just completed."""
        import ignite.distributed as idist

        ws = idist.get_world_size()
        names = string_list_all_gather(strings=self._filenames) if ws > 1 else self._filenames
        if idist.get_rank() != self.save_rank:
            return
        details = getattr(engine.state, "metric_details", {}) or {}
        missing = [c for c in self.columns if c not in details]
        if missing:
            raise ValueError(f"metric details {missing} are missing; attach their IgniteMetricHandler with save_details=True.")
        cols = {c: torch.as_tensor(details[c]).reshape(-1).double().cpu().numpy() for c in self.columns}
        n = len(next(iter(cols.values())))
        if len(names) == n:
            ids = unique_case_ids(names) if self.case_name == "stem" else {s: s for s in names}
            cases = [ids[s] for s in names]
        else:
            cases = [str(i) for i in range(n)]
        rows = [[cases[i], *[cols[c][i] for c in self.columns]] for i in range(n)]
        self.last_cases = write_csv_atomic(Path(self.save_dir) / f"{self.prefix}cases.csv", ["case", *self.columns], rows)
        self.last_summary = write_csv_atomic(
            Path(self.save_dir) / f"{self.prefix}summary.csv",
            ["column", "mean", "std", "median", "n", "n_undefined"],
            summarize_cases(cols),
        )
        undefined = {c: int(np.isnan(v).sum()) for c, v in cols.items() if np.isnan(v).any()}
        if undefined:
            logger.info(
                "undefined values (RVD: empty ground truth; DSC: empty ground truth and empty prediction), excluded "
                "from means: %s", undefined,
            )  # fmt: skip


def case_id(filename: str) -> str:
    """Case name of an image path: KiTS ``.../case_00012/imaging.nii.gz`` -> ``case_00012``; else the stem."""
    p = Path(str(filename))
    name = p.name
    for suf in (".nii.gz", ".nii", ".mha", ".nrrd", ".png", ".jpg", ".jpeg"):
        if name.lower().endswith(suf):
            name = name[: -len(suf)]
            break
    if name in ("imaging", "image", "img") and p.parent.name:
        return p.parent.name
    return name


def unique_case_ids(filenames: Sequence[str]) -> dict[str, str]:
    """:func:`case_id` of every file, made unique: files whose ids collide (``pat01/ct.nii.gz``, ``pat02/ct.nii.gz``)
    get their parent folders prefixed (``pat01_ct``, ``pat02_ct``), as many levels as it takes.

    Args:
        filenames: the image paths of one evaluation/inference run.

    Returns:
        ``{filename: case id}``; distinct files never share an id (no row or prediction file is overwritten).
    """
    unique = list(dict.fromkeys(str(f) for f in filenames))
    ids = {f: case_id(f) for f in unique}
    for level in range(1, 64):
        counts: dict[str, int] = {}
        for v in ids.values():
            counts[v] = counts.get(v, 0) + 1
        clash = [f for f in unique if counts[ids[f]] > 1]
        if not clash:
            break
        for f in clash:
            parents = Path(f).parent.parts[-level:]
            ids[f] = "_".join([*parents, case_id(f)]) if parents else f
    return ids


#: metric handler name -> (RegionMetric kind, region); the first is the key metric (best checkpoint)
CT_METRICS: dict[str, tuple[str, str]] = {
    "dsc_tumor": ("dsc", "tumor"),
    "rvd_tumor": ("rvd", "tumor"),
    "abs_rvd_tumor": ("abs_rvd", "tumor"),
    "dsc_organ": ("dsc", "organ"),
    "rvd_organ": ("rvd", "organ"),
    "abs_rvd_organ": ("abs_rvd", "organ"),
    "tumor_ml_pred": ("ml_pred", "tumor"),
    "tumor_ml_gt": ("ml_gt", "tumor"),
}


def ct_metric_handlers(key: bool, names: Sequence[str] | None = None) -> dict[str, IgniteMetricHandler]:
    """IgniteMetricHandlers of the per-volume CT metrics (``save_details=True`` for the per-case CSV).

    Args:
        key: True -> only the key metric ``{"dsc_tumor": ...}``; False -> every other metric.
        names: metric names to build (default all of ``CT_METRICS``).

    Returns:
        ``{name: handler}`` for ``SupervisedEvaluator(key_val_metric=..., additional_metrics=...)``.
    """
    names = list(names or CT_METRICS)
    chosen = names[:1] if key else names[1:]
    return {
        n: IgniteMetricHandler(
            metric_fn=RegionMetric(*CT_METRICS[n]), output_transform=from_engine(["pred", "label"]), save_details=True
        )
        for n in chosen
    }


def polyp_metric_handlers(key: bool, threshold: float = 0.5) -> dict[str, IgniteMetricHandler]:
    """Per-image ``mdice`` (key metric) or ``miou`` handlers of the polyp bundle (``save_details=True``)."""
    name, kind = ("mdice", "dice") if key else ("miou", "iou")
    return {
        name: IgniteMetricHandler(
            metric_fn=BinaryOverlapMetric(kind, threshold), output_transform=from_engine(["pred", "label"]), save_details=True
        )
    }
