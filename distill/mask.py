"""``kd_mask``: which pixels a pixel-level distillation term reads, and how they are averaged.

- ``"none"`` (default, the papers'): every pixel, plain mean.
- ``"teacher_correct"``: only pixels where the teacher's class (argmax of the distilled teacher map) equals the
  label; the per-pixel values are averaged within each label class, then over the classes present in the batch, so
  the background (most pixels of a CT slice) cannot dominate the small tumor class. Masked pixels contribute nothing
  and receive exactly zero gradient.

Labels are brought to the distilled map's spatial size with nearest-neighbour sampling when the sizes differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["KD_MASKS", "check_kd_mask", "labels_at", "teacher_correct", "class_balanced_mean", "pixel_mean"]

#: valid values of ``kd_mask``
KD_MASKS: tuple[str, ...] = ("none", "teacher_correct")


def check_kd_mask(kd_mask: str) -> str:
    """Return ``kd_mask`` normalised (stripped, lower case).

    Raises:
        ValueError: a value outside ``KD_MASKS``, naming the valid ones.
    """
    key = kd_mask.strip().lower() if isinstance(kd_mask, str) else kd_mask
    if key not in KD_MASKS:
        raise ValueError(f"Unknown kd_mask {kd_mask!r}; valid: {', '.join(KD_MASKS)}.")
    return key


def labels_at(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Integer label map ``(B, *size)`` from labels ``(B, 1, *S)`` or ``(B, *S)`` (nearest when ``S != size``).

    Raises:
        ValueError: labels whose number of spatial axes differs from ``size``'s.
    """
    size = tuple(int(s) for s in size)
    lab = labels if labels.ndim == len(size) + 2 else labels.unsqueeze(1)
    if lab.ndim != len(size) + 2 or lab.shape[1] != 1:
        raise ValueError(f"Labels of shape {tuple(labels.shape)} do not match a {len(size)}D map of size {size}.")
    if tuple(lab.shape[2:]) != size:
        lab = F.interpolate(lab.float(), size=size, mode="nearest")
    return lab[:, 0].round().long()


def teacher_correct(teacher_scores: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels where the teacher's class equals the label.

    Args:
        teacher_scores: teacher logits or probabilities ``(B, K, *S)`` (argmax over axis 1).
        labels: ``(B, 1, *S_l)`` integer labels (resized to ``S`` by nearest when needed).

    Returns:
        ``(keep, label_map)``: bool ``(B, *S)`` and long ``(B, *S)``.

    Raises:
        ValueError: no labels.
    """
    if labels is None:
        raise ValueError("kd_mask='teacher_correct' needs the labels of the batch (the handler passes them).")
    lab = labels_at(labels, teacher_scores.shape[2:]).to(teacher_scores.device)
    return teacher_scores.argmax(dim=1) == lab, lab


def class_balanced_mean(values: torch.Tensor, label_map: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the kept pixels of each label class, then over the classes that have kept pixels.

    Args:
        values: per-pixel values ``(B, *S)``.
        label_map: long ``(B, *S)``.
        keep: bool ``(B, *S)``.

    Returns:
        scalar; 0 (still connected to ``values``, zero gradient everywhere) when no pixel is kept.
    """
    v, lab = values[keep], label_map[keep]
    if v.numel() == 0:
        return values.sum() * 0.0
    n = int(lab.max()) + 1
    sums = torch.zeros(n, dtype=v.dtype, device=v.device).index_add(0, lab, v)
    counts = torch.bincount(lab, minlength=n)
    present = counts > 0
    return (sums[present] / counts[present].to(v.dtype)).mean()


def pixel_mean(
    values: torch.Tensor,
    teacher_scores: torch.Tensor,
    labels: torch.Tensor | None,
    kd_mask: str = "none",
    correct: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Reduce per-pixel values of a distillation term to a scalar under ``kd_mask``.

    Args:
        values: ``(B, *S)`` per-pixel term (e.g. the KL of each pixel).
        teacher_scores: the distilled teacher map ``(B, K, *S)`` (its argmax decides which pixels the teacher gets right).
        labels: ``(B, 1, *S_l)`` labels; required for ``"teacher_correct"``.
        kd_mask: ``"none"`` (plain mean) or ``"teacher_correct"`` (class-balanced mean over teacher-correct pixels).
        correct: :func:`teacher_correct` of ``teacher_scores`` and ``labels`` when the caller already has it (several
            terms on one teacher map); None computes it.

    Returns:
        scalar tensor.

    Raises:
        ValueError: an unknown ``kd_mask``, or ``"teacher_correct"`` without labels.
    """
    if check_kd_mask(kd_mask) == "none":
        return values.mean()
    keep, lab = teacher_correct(teacher_scores, labels) if correct is None else correct
    return class_balanced_mean(values, lab, keep)
