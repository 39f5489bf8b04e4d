"""Pixel-wise Kullback-Leibler divergence between tempered class-probability maps (Hinton et al., 2015)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from distill.attention import resize_to
from distill.mask import pixel_mean

__all__ = ["tempered_probs", "unified_probs", "pixel_kl"]


def tempered_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(logits / T)`` over the class axis 1. Shapes ``(B, K, *spatial)`` in and out."""
    return F.softmax(logits / temperature, dim=1)


def unified_probs(logits: Sequence[torch.Tensor], temperature: float, size: Sequence[int] | None = None) -> torch.Tensor:
    """Average of the tempered probabilities of several predictive maps (HLFD's unified middle map ``p_mid^t``).

    Each map's logits are resized to ``size`` (default: the largest map's size) before the softmax.

    Args:
        logits: non-empty sequence of ``(B, K, *spatial_i)``.
        temperature: softmax temperature.
        size: common spatial size or None.

    Returns:
        ``(B, K, *size)`` probabilities (sum 1 over axis 1).

    Raises:
        ValueError: on an empty sequence.
    """
    if len(logits) == 0:
        raise ValueError("unified_probs needs at least one predictive map.")
    if size is None:
        size = max((tuple(x.shape[2:]) for x in logits), key=lambda s: torch.Size(s).numel())
    probs = [tempered_probs(resize_to(x, size), temperature) for x in logits]
    return torch.stack(probs, dim=0).mean(dim=0)


def pixel_kl(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    kd_mask: str = "none",
    correct: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``T^2 * mean_{b, pixels} KL(p_t || softmax(s / T))``; student logits resized to the teacher's size.

    Args:
        student_logits: ``(B, K, *spatial_s)``.
        teacher_probs: ``(B, K, *spatial_t)`` probabilities (already tempered by the caller).
        temperature: the student's temperature ``T``; the result is scaled by ``T^2``.
        labels: ``(B, 1, *S)`` labels, needed for ``kd_mask="teacher_correct"``.
        kd_mask: ``"none"`` (mean over all pixels) or ``"teacher_correct"`` (``distill.mask.pixel_mean``: only pixels
            where the teacher's argmax equals the label, averaged per label class, then over classes).
        correct: ``distill.mask.teacher_correct(teacher_probs, labels)`` when already computed (several student maps
            against one teacher map); None computes it.

    Returns:
        scalar tensor, 0 when the tempered student probabilities equal ``teacher_probs``.

    Raises:
        ValueError: when batch or class counts differ, or on a bad ``kd_mask``.
    """
    if student_logits.shape[:2] != teacher_probs.shape[:2]:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher probabilities {tuple(teacher_probs.shape)} "
            "need the same batch size and number of classes."
        )
    log_q = F.log_softmax(resize_to(student_logits, teacher_probs.shape[2:]) / temperature, dim=1)
    kl = (torch.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_q).sum(dim=1)
    return pixel_mean(kl, teacher_probs, labels, kd_mask, correct) * (temperature**2)
