"""Pictures of a run (matplotlib, Agg backend): case overlays, training curves and the per-case DSC/RVD plot.

Three PNG files, written atomically beside the CSV files they illustrate and logged to MLflow by the run's tracking
handler (their paths are in its ``artifacts``):

- ``<prefix>overlays.png``: the best, median and worst case by tumor DSC, each as the axial slice through its largest
  tumor (by ground truth; by the prediction when the ground truth has no tumor), side by side: the windowed CT with
  the ground-truth contours (organ blue, tumor red drawn on top so a tumor on the organ's edge stays visible), and
  the CT with the prediction filled translucent (organ blue, tumor red) under the same ground-truth contours. An
  empty prediction says "empty", one that fills the slice says so (and tints the whole panel); radiological
  orientation letters (A/P/R/L) and a scale bar in mm; organ and tumor DSC in the title;
- ``<prefix>case_metrics.png``: tumor DSC and signed tumor RVD per case, one bar each, sorted by DSC;
- ``curves.png`` (training): training loss with each of its terms (``loss_seg``, every ``kd_*``) per epoch, and the
  validation DSC per epoch (from ``train_history.csv`` and ``val_history.csv``).

:class:`CasePictures` is an evaluator handler (evaluation and the validation of a training run), :class:`CurvePictures`
a trainer handler. Drawing never fails a run: any error is logged as a warning and the run goes on.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from pipelines.engine.atomic import atomic_write_bytes
from pipelines.engine.curves import ValidationHistory, read_history
from pipelines.engine.errors import as_bool
from pipelines.engine.metrics import case_id, dsc, rvd

__all__ = [
    "RANKS",
    "select_cases",
    "largest_tumor_slice",
    "CaseSlice",
    "case_slice",
    "draw_overlays",
    "draw_case_metrics",
    "draw_curves",
    "CasePictures",
    "CurvePictures",
]

logger = logging.getLogger(__name__)

#: the cases an overlay picture shows, in order
RANKS = ("best", "median", "worst")


def select_cases(scores: Mapping[str, float]) -> dict[str, str]:
    """The best, median and worst case by score (tumor DSC).

    Cases are ordered by ``(score, name)`` ascending (ties broken by name, so the choice is reproducible); NaN scores
    are left out. The median case is the lower middle one, position ``(n - 1) // 2`` of that order.

    Args:
        scores: ``{case: score}``.

    Returns:
        ``{"best": case, "median": case, "worst": case}`` (one case may fill several ranks when fewer than three are
        defined); ``{}`` when no score is defined.
    """
    defined = sorted((float(v), str(k)) for k, v in scores.items() if v is not None and not math.isnan(float(v)))
    if not defined:
        return {}
    return {"best": defined[-1][1], "median": defined[(len(defined) - 1) // 2][1], "worst": defined[0][1]}


def _counts(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` per index of its LAST axis (the axial slice index after orientation to RAS)."""
    return mask.reshape(-1, mask.shape[-1]).sum(axis=0)


def largest_tumor_slice(
    label: np.ndarray | torch.Tensor | None,
    pred: np.ndarray | torch.Tensor | None = None,
    tumor_label: int = 2,
    organ_labels: Sequence[int] = (1, 2),
) -> tuple[int, str]:
    """The axial slice (index along the last axis) with the most tumor voxels.

    The ground truth decides; when it has no tumor, the prediction; then the ground-truth organ; else the middle slice.
    The first of equal counts wins.

    Args:
        label: ground-truth label map, shape ``(..., D)`` (e.g. ``(1, H, W, D)``), or None.
        pred: predicted label map of the same shape, or None.
        tumor_label: the tumor value.
        organ_labels: values that make up organ+tumor.

    Returns:
        ``(z, basis)``, basis one of ``"ground-truth tumor"``, ``"predicted tumor"``, ``"ground-truth organ"``,
        ``"middle slice"``.

    Raises:
        ValueError: neither map given, or maps of different shapes.
    """
    maps = [None if m is None else np.asarray(m.detach().cpu() if isinstance(m, torch.Tensor) else m) for m in (label, pred)]
    if maps[0] is None and maps[1] is None:
        raise ValueError("largest_tumor_slice needs a label map or a prediction, got neither.")
    if maps[0] is not None and maps[1] is not None and maps[0].shape != maps[1].shape:
        raise ValueError(f"label and prediction shapes differ: {maps[0].shape} vs {maps[1].shape}.")
    gt, pr = maps
    candidates = [(gt, (tumor_label,), "ground-truth tumor"), (pr, (tumor_label,), "predicted tumor"), (gt, tuple(organ_labels), "ground-truth organ")]
    for m, values, basis in candidates:
        if m is None:
            continue
        counts = _counts(np.isin(m, values))
        if counts.max() > 0:
            return int(np.argmax(counts)), basis
    depth = (gt if gt is not None else pr).shape[-1]
    return depth // 2, "middle slice"


@dataclass
class CaseSlice:
    """One case's axial slice for an overlay, with its tumor DSC and RVD.

    Attributes:
        case: case name.
        dsc: tumor DSC of the whole volume.
        rvd: signed tumor RVD of the whole volume (NaN without ground-truth tumor).
        z: the slice index (last axis).
        basis: why this slice (see :func:`largest_tumor_slice`).
        image: (H, W) windowed CT of the slice, uint8 (0..255 = the window).
        label: (H, W) ground-truth labels, uint8.
        pred: (H, W) predicted labels, uint8.
        dsc_organ: organ+tumor DSC of the whole volume (NaN when not computed).
        spacing: mm per pixel of ``image`` along its two axes (None: unknown, no scale bar).
    """

    case: str
    dsc: float
    rvd: float
    z: int
    basis: str
    image: np.ndarray
    label: np.ndarray
    pred: np.ndarray
    dsc_organ: float = math.nan
    spacing: tuple[float, float] | None = None


def _np(x: Any) -> np.ndarray:
    return np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)


def case_slice(
    case: str,
    image: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    pred: np.ndarray | torch.Tensor,
    tumor_label: int = 2,
    organ_labels: Sequence[int] = (1, 2),
    max_side: int = 256,
    spacing: Sequence[float] | None = None,
) -> CaseSlice:
    """The :class:`CaseSlice` of one evaluated volume: whole-volume tumor and organ DSC, tumor RVD, the largest-tumor slice.

    Args:
        case: case name.
        image: windowed CT ``(C, H, W, D)`` in ``[0, 1]`` (2.5D: C neighbouring slices, the middle channel is drawn;
            3D: C = 1).
        label: ground truth ``(1, H, W, D)``.
        pred: prediction ``(1, H, W, D)`` (labels, after argmax).
        tumor_label: the tumor value.
        organ_labels: values that make up organ+tumor.
        max_side: slices larger than this are subsampled (every k-th pixel) to keep the memory per case small.
        spacing: voxel spacing (mm) along H and W (for the scale bar); None when unknown.

    Returns:
        the case's slice (uint8 arrays).

    Raises:
        ValueError: shapes that do not match.
    """
    img, gt, pr = _np(image), _np(label), _np(pred)
    if gt.shape != pr.shape or img.shape[1:] != gt.shape[1:]:
        raise ValueError(f"image {img.shape}, label {gt.shape} and prediction {pr.shape} must be (C, H, W, D) with equal H, W, D.")
    t_gt, t_pr = gt == tumor_label, pr == tumor_label
    z, basis = largest_tumor_slice(gt, pr, tumor_label, organ_labels)
    step = max(1, math.ceil(max(gt.shape[1:3]) / max_side))
    center = img[img.shape[0] // 2, ::step, ::step, z]
    o_gt, o_pr = np.isin(gt, tuple(organ_labels)), np.isin(pr, tuple(organ_labels))
    return CaseSlice(
        case=str(case),
        dsc=dsc(torch.from_numpy(t_pr), torch.from_numpy(t_gt)),
        dsc_organ=dsc(torch.from_numpy(o_pr), torch.from_numpy(o_gt)),
        spacing=(float(spacing[0]) * step, float(spacing[1]) * step) if spacing is not None else None,
        rvd=rvd(float(t_pr.sum()), float(t_gt.sum())),
        z=z,
        basis=basis,
        image=np.round(np.clip(center.astype(np.float32), 0.0, 1.0) * 255).astype(np.uint8),
        label=gt[0, ::step, ::step, z].astype(np.uint8),
        pred=pr[0, ::step, ::step, z].astype(np.uint8),
    )


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    plt = _pyplot()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _radiological(a: np.ndarray) -> np.ndarray:
    """(x, y) slice of a RAS array -> display rows/cols: anterior up, patient right on the left."""
    return a.T[::-1, ::-1]


_TUMOR_COLOR, _ORGAN_COLOR = "red", "deepskyblue"
#: opacity of the filled prediction
_FILL_ALPHA = 0.45


def _fill(ax: Any, labels: np.ndarray, tumor_label: int, organ_labels: Sequence[int]) -> None:
    """The label map filled translucent: organ blue, tumor red (so a prediction filling the slice tints it all)."""
    from matplotlib.colors import to_rgba

    rgba = np.zeros((*labels.shape, 4), dtype=np.float32)
    organ = np.isin(labels, tuple(organ_labels)) & (labels != tumor_label)
    rgba[organ] = to_rgba(_ORGAN_COLOR, _FILL_ALPHA)
    rgba[labels == tumor_label] = to_rgba(_TUMOR_COLOR, _FILL_ALPHA)
    ax.imshow(np.stack([_radiological(rgba[..., c]) for c in range(4)], -1), interpolation="nearest")


def _contours(ax: Any, labels: np.ndarray, tumor_label: int, organ_labels: Sequence[int], width: float) -> None:
    """Ground-truth contours: organ+tumor blue first, tumor red on top (never hidden under the organ's); a mask that
    fills the slice (no contour inside it) is drawn as a frame."""
    for values, color, z in ((tuple(organ_labels), _ORGAN_COLOR, 2), ((tumor_label,), _TUMOR_COLOR, 3)):
        mask = np.isin(labels, values)
        if mask.all():
            h, w = _radiological(mask).shape
            ax.add_patch(_frame(w, h, color, width, z))
        elif mask.any():
            ax.contour(_radiological(mask.astype(np.float32)), levels=[0.5], colors=color, linewidths=width, zorder=z)


def _frame(w: int, h: int, color: str, width: float, z: int) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((-0.5, -0.5), w, h, fill=False, edgecolor=color, lw=width * 2, zorder=z)


def _degenerate(labels: np.ndarray, organ_labels: Sequence[int]) -> str:
    """``"empty"`` (no organ or tumor on the slice), ``"fills the whole slice"``, else ``""``."""
    fg = np.isin(labels, tuple(organ_labels))
    return "empty" if not fg.any() else "fills the whole slice" if fg.all() else ""


def _orientation(ax: Any) -> None:
    """Radiological orientation letters: anterior up, patient right on the viewer's left."""
    style = {"color": "yellow", "fontsize": 8, "fontweight": "bold", "transform": ax.transAxes}
    for x, y, letter, ha, va in ((0.5, 0.98, "A", "center", "top"), (0.5, 0.02, "P", "center", "bottom"), (0.02, 0.5, "R", "left", "center"), (0.98, 0.5, "L", "right", "center")):
        ax.text(x, y, letter, ha=ha, va=va, **style)


def _scale_bar(ax: Any, shape: Sequence[int], spacing: tuple[float, float] | None) -> None:
    """A white bar of a round length (5-100 mm, about a quarter of the width) in the lower left corner."""
    if not spacing or not all(v > 0 for v in spacing):
        return
    mm_per_px = float(spacing[0])  # display columns run along the slice's first (x) axis
    width_mm = shape[0] * mm_per_px
    length = max((v for v in (5, 10, 20, 50, 100) if v <= width_mm / 3), default=None)
    if length is None:
        return
    h = shape[1]
    x0, y = 0.06 * shape[0], h - 1 - 0.08 * h
    ax.plot([x0, x0 + length / mm_per_px], [y, y], color="white", lw=3, solid_capstyle="butt", zorder=4)
    ax.text(x0, y - 0.03 * h, f"{length} mm", color="white", fontsize=7, va="bottom", zorder=4)


def draw_overlays(
    slices: Mapping[str, CaseSlice],
    path: str | os.PathLike,
    title: str = "",
    *,
    tumor_label: int = 2,
    organ_labels: Sequence[int] = (1, 2),
) -> Path:
    """One PNG with two panels per case, side by side: the ground truth as contours, and the prediction filled
    translucent under the same contours (see the module docstring). Tumor red, organ+tumor blue; a degenerate slice
    (empty, or filled entirely) is named on its panel. A case that fills several ranks is drawn once.

    Args:
        slices: ``{rank: CaseSlice}`` in panel order (e.g. best, median, worst).
        path: the PNG file (written atomically).
        title: figure title.
        tumor_label: the tumor value.
        organ_labels: values that make up organ+tumor.

    Returns:
        the written path.

    Raises:
        ValueError: no slice given.
    """
    if not slices:
        raise ValueError("draw_overlays needs at least one case slice.")
    panels: list[tuple[list[str], CaseSlice]] = []
    for rank, s in slices.items():
        same = [p for p in panels if p[1] is s or p[1].case == s.case]
        if same:
            same[0][0].append(rank)
        else:
            panels.append(([rank], s))
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, 2 * len(panels), figsize=(3.4 * 2 * len(panels), 4.4), squeeze=False)
    for k, (ranks, s) in enumerate(panels):
        a_gt, a_pr = axes[0][2 * k], axes[0][2 * k + 1]
        rvd_txt = "n/a" if math.isnan(s.rvd) else f"{s.rvd:+.2f}"
        organ_txt = "n/a" if math.isnan(s.dsc_organ) else f"{s.dsc_organ:.3f}"
        a_gt.set_title(f"{' = '.join(ranks)}: {s.case} (z={s.z}, {s.basis})\nground truth", fontsize=8)
        a_pr.set_title(f"organ DSC {organ_txt}, tumor DSC {s.dsc:.3f}, RVD {rvd_txt}\nprediction (filled) vs ground truth", fontsize=8)
        for ax in (a_gt, a_pr):
            ax.imshow(_radiological(s.image), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        _fill(a_pr, s.pred, tumor_label, organ_labels)
        for ax, width in ((a_gt, 1.6), (a_pr, 1.0)):
            _contours(ax, s.label, tumor_label, organ_labels, width)
            _orientation(ax)
            ax.set_axis_off()
        _scale_bar(a_gt, s.image.shape, s.spacing)
        for ax, m, what in ((a_gt, s.label, "ground truth"), (a_pr, s.pred, "prediction")):
            note = _degenerate(m, organ_labels)
            if note:
                ax.text(0.5, 0.5, f"{what}: {note}", ha="center", va="center", transform=ax.transAxes, fontsize=10,
                        color="yellow", fontweight="bold", bbox={"facecolor": "black", "alpha": 0.6, "lw": 0})  # fmt: skip
    handles = [
        Line2D([], [], color=_ORGAN_COLOR, lw=1.6, label="organ, ground truth"),
        Line2D([], [], color=_TUMOR_COLOR, lw=1.6, label="tumor, ground truth"),
        Patch(color=_ORGAN_COLOR, alpha=_FILL_ALPHA, label="organ, prediction"),
        Patch(color=_TUMOR_COLOR, alpha=_FILL_ALPHA, label="tumor, prediction"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(bottom=0.08)
    return _save(fig, path)


def draw_case_metrics(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    dsc_key: str = "dsc_tumor",
    rvd_key: str = "rvd_tumor",
    title: str = "",
) -> Path:
    """Per-case bars of tumor DSC and signed tumor RVD, sorted by DSC (best on top); undefined RVD marked "n/a".

    Args:
        rows: one mapping per case with ``case``, ``dsc_key`` and ``rvd_key`` (e.g. the rows of ``cases.csv``).
        path: the PNG file (written atomically).
        dsc_key: the DSC column.
        rvd_key: the RVD column.
        title: figure title.

    Returns:
        the written path.

    Raises:
        ValueError: no rows, or a row without the named columns.
    """
    if not rows:
        raise ValueError("draw_case_metrics needs at least one case row.")
    missing = [k for k in ("case", dsc_key, rvd_key) if k not in rows[0]]
    if missing:
        raise ValueError(f"case rows lack the columns {missing}; they have {sorted(rows[0])}.")

    def num(v: Any) -> float:
        try:
            return float(v)
        except (TypeError, ValueError):
            return math.nan

    table = sorted(((num(r[dsc_key]), num(r[rvd_key]), str(r["case"])) for r in rows), key=lambda t: (-np.nan_to_num(t[0], nan=-1.0), t[2]))
    n = len(table)
    plt = _pyplot()
    fig, (a_dsc, a_rvd) = plt.subplots(1, 2, sharey=True, figsize=(9, min(30.0, 1.2 + 0.22 * n)))
    y = np.arange(n)
    d = np.array([t[0] for t in table])
    r = np.array([t[1] for t in table])
    a_dsc.barh(y, np.nan_to_num(d), color="tab:green")
    a_dsc.set_xlim(0, 1)
    a_dsc.set_xlabel(dsc_key)
    a_rvd.barh(y, np.nan_to_num(r), color=np.where(r > 0, "tab:orange", "tab:blue"))
    a_rvd.axvline(0, color="black", lw=0.8)
    a_rvd.set_xlabel(f"{rvd_key} (signed)")
    for i in np.flatnonzero(np.isnan(r)):
        a_rvd.text(0, i, " n/a", va="center", fontsize=7)
    a_dsc.set_yticks(y, [t[2] for t in table] if n <= 150 else [""] * n, fontsize=max(4, min(9, int(400 / max(n, 1)))))
    a_dsc.invert_yaxis()
    mean = np.nanmean(d) if np.isfinite(d).any() else math.nan
    fig.suptitle(f"{title + ': ' if title else ''}{n} cases, mean {dsc_key} {mean:.3f}", fontsize=10)
    return _save(fig, path)


def draw_curves(
    train_rows: Sequence[Mapping[str, float]],
    val_rows: Sequence[Mapping[str, float]],
    path: str | os.PathLike,
    *,
    loss_keys: Sequence[str] = ("train_loss", "loss_seg"),
    val_keys: Sequence[str] = ("dsc_tumor", "dsc_organ"),
    title: str = "",
) -> Path:
    """Training curves: losses per epoch (``loss_keys`` and every ``kd_*`` column) and validation DSC per epoch.

    Args:
        train_rows: per-epoch rows with ``epoch`` (e.g. ``train_history.csv``).
        val_rows: per-validation rows with ``epoch`` (``val_history.csv``).
        path: the PNG file (written atomically).
        loss_keys: loss columns drawn when present; every column starting with ``kd_`` is added.
        val_keys: validation columns drawn when present.
        title: figure title.

    Returns:
        the written path.

    Raises:
        TypeError: ``loss_keys`` or ``val_keys`` given as one string instead of a sequence of column names.
    """
    for what, keys in (("loss_keys", loss_keys), ("val_keys", val_keys)):
        if isinstance(keys, str):
            raise TypeError(f"{what} must be a sequence of column names, got the string {keys!r}.")
    plt = _pyplot()
    fig, (a_loss, a_val) = plt.subplots(1, 2, figsize=(11, 4))

    def series(rows: Sequence[Mapping[str, float]], key: str) -> tuple[list[float], list[float]]:
        pts = [(float(r["epoch"]), float(r[key])) for r in rows if key in r and r[key] is not None and not math.isnan(float(r[key]))]
        return [p[0] for p in pts], [p[1] for p in pts]

    columns = list(dict.fromkeys([*loss_keys, *sorted({k for r in train_rows for k in r if k.startswith("kd_")})]))
    drawn = 0
    positive = True
    for key in columns:
        x, v = series(train_rows, key)
        if x:
            a_loss.plot(x, v, marker="o" if len(x) < 30 else None, ms=3, label=key)
            positive = positive and min(v) > 0
            drawn += 1
    if drawn and positive:
        a_loss.set_yscale("log")
    a_loss.set_xlabel("epoch")
    a_loss.set_title("training loss and its terms (epoch means)", fontsize=10)
    for key in val_keys:
        x, v = series(val_rows, key)
        if x:
            a_val.plot(x, v, marker="o", ms=3, label=key)
    a_val.set_ylim(0, 1)
    a_val.set_xlabel("epoch")
    from matplotlib.ticker import MaxNLocator

    for ax in (a_loss, a_val):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    a_val.set_title("validation", fontsize=10)
    for ax in (a_loss, a_val):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _rank0() -> bool:
    import ignite.distributed as idist

    return idist.get_rank() == 0


class CasePictures:
    """Evaluator handler: after each evaluation (each validation of a training run), the overlay and per-case PNGs.

    While the evaluator iterates, every case's largest-tumor slice and its whole-volume tumor DSC and RVD are kept
    (:func:`case_slice`; a few hundred kB per case); at ``EPOCH_COMPLETED`` the best, median and worst case by tumor
    DSC (:func:`select_cases`) are drawn to ``<save_dir>/<prefix>overlays.png`` (:func:`draw_overlays`) and every case
    to ``<save_dir>/<prefix>case_metrics.png`` (:func:`draw_case_metrics`), replacing the previous validation's
    files. Items without a label (inference) are skipped. With several ranks, rank 0 draws the cases it evaluated.
    A failure to draw is logged as a warning; it never stops the run.

    Args:
        save_dir: output folder (where the CSV files of the same evaluation go).
        prefix: file name prefix (``"val_"`` during training).
        enabled: False makes the handler a no-op (a CLI string such as ``"false"`` is accepted).
        title: figure title prefix (e.g. the role).
        tumor_label: the tumor value.
        organ_labels: values that make up organ+tumor.
        max_side: in-plane size above which the kept slices are subsampled.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        prefix: str = "",
        enabled: Any = True,
        title: str = "",
        tumor_label: int = 2,
        organ_labels: Sequence[int] = (1, 2),
        max_side: int = 256,
    ) -> None:
        if "/" in str(prefix):
            raise ValueError(f"prefix must be a plain file-name prefix, got {prefix!r}.")
        self.save_dir, self.prefix, self.enabled, self.title = Path(save_dir), str(prefix), as_bool(enabled), str(title)
        self.tumor_label, self.organ_labels, self.max_side = int(tumor_label), tuple(organ_labels), int(max_side)
        self.cases: dict[str, CaseSlice] = {}
        #: the cases drawn by the last call, ``{"best": case, "median": case, "worst": case}``
        self.chosen: dict[str, str] = {}
        self._warned = False

    @property
    def overlays_path(self) -> Path:
        return self.save_dir / f"{self.prefix}overlays.png"

    @property
    def case_metrics_path(self) -> Path:
        return self.save_dir / f"{self.prefix}case_metrics.png"

    def attach(self, engine: Engine) -> None:
        """Register on ``STARTED`` (reset), ``ITERATION_COMPLETED`` (keep slices) and ``EPOCH_COMPLETED`` (draw)."""
        if not self.enabled:
            return
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self.cases, self._warned = {}, False

    def _warn(self, what: str, e: Exception) -> None:
        if not self._warned:
            logger.warning("pictures: could not %s (%s: %s); the run goes on without them", what, type(e).__name__, e)
            self._warned = True

    def _collect(self, engine: Engine) -> None:
        out = engine.state.output
        try:
            for item in out if isinstance(out, list) else [out]:
                if not isinstance(item, Mapping) or item.get("label") is None or item.get("pred") is None:
                    continue
                image = item["image"]
                meta = getattr(image, "meta", {}) or {}
                name = meta.get("filename_or_obj", "")
                name = case_id(name[0] if isinstance(name, (list, tuple)) else name) if name else f"case_{len(self.cases)}"
                label = item["label"] if item["label"].shape[0] == 1 else item["label"].argmax(0, keepdim=True)
                pred = item["pred"] if item["pred"].shape[0] == 1 else item["pred"].argmax(0, keepdim=True)
                affine = getattr(image, "affine", None)
                spacing = None if affine is None else tuple(float(v) for v in np.linalg.norm(_np(affine)[:3, :3], axis=0)[:2])
                self.cases[name] = case_slice(name, image, label, pred, self.tumor_label, self.organ_labels, self.max_side, spacing)
        except Exception as e:  # noqa: BLE001 - a picture never stops a run
            self._warn("keep a case slice", e)

    def __call__(self, engine: Engine) -> None:
        """Draw the overlays of the best, median and worst case and the per-case plot (rank 0)."""
        if not self.cases or not _rank0():
            return
        epoch = int(getattr(engine.state, "epoch", 0) or 0)
        title = f"{self.title + ' ' if self.title else ''}{self.prefix.rstrip('_') or 'evaluation'}" + (f", epoch {epoch}" if self.prefix else "")
        try:
            chosen = self.chosen = select_cases({k: s.dsc for k, s in self.cases.items()})
            draw_overlays(
                {rank: self.cases[c] for rank, c in chosen.items()}, self.overlays_path, title, tumor_label=self.tumor_label, organ_labels=self.organ_labels
            )
            rows = [{"case": s.case, "dsc_tumor": s.dsc, "rvd_tumor": s.rvd} for s in self.cases.values()]
            draw_case_metrics(rows, self.case_metrics_path, title=title)
        except Exception as e:  # noqa: BLE001 - a picture never stops a run
            self._warn(f"draw {self.overlays_path.name} / {self.case_metrics_path.name}", e)


class CurvePictures:
    """Trainer handler: the per-epoch training losses to ``train_history.csv``, and ``curves.png`` at the end.

    At each ``EPOCH_COMPLETED`` the trainer's scalar metrics (``train_loss``, ``loss_seg``, each ``kd_*``, ``lr``,
    ``grad_norm``: what :class:`pipelines.engine.handlers.EpochAverager` publishes; attach after it) are appended to
    ``<save_dir>/train_history.csv`` (:class:`pipelines.engine.curves.ValidationHistory`, kept across ``--resume``).
    At ``COMPLETED`` (before the tracking handler logs its artifacts: attach before it) the curves are drawn from that
    file and ``val_history.csv`` (:func:`draw_curves`). A failure to draw is logged as a warning.

    Args:
        save_dir: the training run's output folder.
        name: the PNG file name.
        enabled: False makes the handler a no-op.
        title: figure title (e.g. the role).
        val_keys: the validation columns drawn (the polyp role: ``["mdice", "miou"]``).

    Raises:
        ValueError: a name that is not a plain ``.png`` file name.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        name: str = "curves.png",
        enabled: Any = True,
        title: str = "",
        val_keys: Sequence[str] = ("dsc_tumor", "dsc_organ"),
    ) -> None:
        if not str(name).endswith(".png") or "/" in str(name):
            raise ValueError(f"name must be a plain .png file name, got {name!r}.")
        self.save_dir, self.enabled, self.title = Path(save_dir), as_bool(enabled), str(title)
        self.val_keys = (val_keys,) if isinstance(val_keys, str) else tuple(val_keys)
        self.path = self.save_dir / name
        self.history = ValidationHistory(save_dir, name="train_history.csv")

    def attach(self, engine: Engine) -> None:
        """Register the history on ``EPOCH_COMPLETED`` and the drawing on ``COMPLETED``."""
        if not self.enabled:
            return
        self.history.attach(engine)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Draw ``curves.png`` (rank 0)."""
        if not _rank0():
            return
        try:
            train, val = read_history(self.history.path), read_history(self.save_dir / "val_history.csv")
            draw_curves(train, val, self.path, val_keys=self.val_keys, title=self.title)
        except Exception as e:  # noqa: BLE001 - a picture never stops a run
            logger.warning("pictures: could not draw %s (%s: %s); the run goes on without it", self.path, type(e).__name__, e)
