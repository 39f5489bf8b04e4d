"""DIST, Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022: relations, not exact matches.

With ``Y = softmax(logits / tau)`` over the classes at every pixel (the pixels of the whole batch are the samples,
as in the authors' segmentation code), and ``d_p(u, v) = 1 - pearson(u, v)``::

    L_inter = tau^2 * mean_pixels d_p(Y^s_pixel, Y^t_pixel)      (Pearson over the K classes of each pixel)
    L_intra = tau^2 * mean_classes d_p(Y^s_class, Y^t_class)     (Pearson over all pixels of each class)
    L_DIST  = beta * L_inter + gamma * L_intra

Pearson is ``<u - mean u, v - mean v> / (|u - mean u| |v - mean v| + 1e-8)`` (the authors' ``eps``). Defaults are
the published ones: ``beta = gamma = 1``, ``tau = 1`` (the segmentation code's softmax has no temperature, and 1 is
the paper's default for ImageNet, so the ``tau^2`` factor is 1), overall weight ``dist = 1`` (the segmentation
code's ``lambda_kd``).

With two classes ``L_inter`` is degenerate: two probabilities summing to 1 have Pearson +-1, so the per-pixel term
only says whether student and teacher agree on the class, with (almost) no gradient; the CT tasks have three classes.

``kd_mask="teacher_correct"``: ``L_inter`` is averaged over teacher-correct pixels per label class, then over the
classes (``distill.mask``); ``L_intra``'s correlations run over the teacher-correct pixels only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.attention import resize_to
from distill.mask import check_kd_mask, class_balanced_mean, teacher_correct
from distill.method import Features, KDMethod
from distill.plan import Role, TapPlan

__all__ = ["pearson", "dist_relations", "DIST"]

#: the authors' epsilon in the cosine of the centred vectors
PEARSON_EPS = 1e-8


def pearson(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """Pearson correlation of ``a`` and ``b`` along ``dim`` (that axis reduced), with the authors' ``eps``."""
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    return (a * b).sum(dim=dim) / (a.norm(dim=dim) * b.norm(dim=dim) + PEARSON_EPS)


def dist_relations(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tau: float = 1.0,
    labels: torch.Tensor | None = None,
    kd_mask: str = "none",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_inter, L_intra)`` of DIST for class logits.

    Args:
        student_logits: ``(B, K, *S_s)`` (resized to the teacher's size when different).
        teacher_logits: ``(B, K, *S)``.
        tau: temperature of the softmax (the results are scaled by ``tau^2``).
        labels: ``(B, 1, *S)`` labels, needed for ``kd_mask="teacher_correct"``.
        kd_mask: ``"none"`` or ``"teacher_correct"``.

    Returns:
        two scalar tensors, each in ``[0, 2]`` times ``tau^2``.

    Raises:
        ValueError: different batch sizes or class counts; ``teacher_correct`` without labels.
    """
    if student_logits.shape[:2] != teacher_logits.shape[:2]:
        raise ValueError(
            f"DIST needs student and teacher logits with the same batch and classes, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}."
        )
    y_s = F.softmax(resize_to(student_logits, teacher_logits.shape[2:]) / tau, dim=1)
    y_t = F.softmax(teacher_logits / tau, dim=1)
    per_pixel = 1.0 - pearson(y_s, y_t, dim=1)
    k = y_s.shape[1]
    cols_s, cols_t = y_s.movedim(1, 0).reshape(k, -1), y_t.movedim(1, 0).reshape(k, -1)  # (K, pixels of the batch)
    if check_kd_mask(kd_mask) == "teacher_correct":
        keep, lab = teacher_correct(teacher_logits, labels)  # once for both terms
        inter = class_balanced_mean(per_pixel, lab, keep)
        cols_s, cols_t = cols_s[:, keep.reshape(-1)], cols_t[:, keep.reshape(-1)]
    else:
        inter = per_pixel.mean()
    intra = (1.0 - pearson(cols_s, cols_t, dim=1)).mean() if cols_s.shape[1] > 0 else cols_s.sum() * 0.0
    return inter * tau**2, intra * tau**2


class DIST(KDMethod):
    """``dist * (beta * L_inter + gamma * L_intra)`` on the final class logits (Huang et al., NeurIPS 2022).

    Args:
        plan: resolved taps (student and teacher ``pred_final``).
        dist: overall weight (default 1).
        beta: inter-class relation weight (default 1).
        gamma: intra-class relation weight (default 1).
        temperature: ``tau`` (default 1).
        kd_mask: ``"none"`` or ``"teacher_correct"`` (see the module docstring).

    Returns (forward):
        ``{"kd_inter", "kd_intra", "kd_total"}``.
    """

    name = "dist"
    STUDENT_ROLES = {"pred_final": Role(("pred_final",), single=True, logits=True)}
    TEACHER_ROLES = {"pred_final": Role(("pred_final",), single=True, logits=True)}

    def __init__(
        self,
        plan: TapPlan,
        dist: float = 1.0,
        beta: float = 1.0,
        gamma: float = 1.0,
        temperature: float = 1.0,
        kd_mask: str = "none",
    ) -> None:
        super().__init__(plan)
        self.check_weights(dist=dist, beta=beta, gamma=gamma, temperature=temperature)
        self.dist, self.beta, self.gamma, self.temperature = float(dist), float(beta), float(gamma), float(temperature)
        self.kd_mask = check_kd_mask(kd_mask)

    def term_weights(self) -> dict[str, float]:
        return {"kd_inter": self.dist * self.beta, "kd_intra": self.dist * self.gamma}

    def forward(self, student: Features, teacher: Features, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        inter, intra = dist_relations(student["pred_final"][0], teacher["pred_final"][0], self.temperature, labels, self.kd_mask)
        return {"kd_inter": inter, "kd_intra": intra, "kd_total": self.dist * (self.beta * inter + self.gamma * intra)}
