"""EMKD, Qin et al., IEEE TMI 2021 ("Efficient medical image segmentation based on knowledge distillation"), listed
as "DKD" in the HLFD paper, without its relational (RKD) module:

- prediction-map distillation: ``T^2 mean_pixels KL(softmax(t/T) || softmax(s/T))`` on the final maps;
- importance-map distillation: ``sum_j d(A(s_j), A(t_j))`` over paired student/teacher layers, ``A`` the attention
  map of ``distill.attention`` (p = 4 as in EMKD);
- region-affinity distillation: per layer pair, class-region prototypes (features averaged over each class region of
  the label mask, soft-resized to the feature size by average pooling), the cosine affinity between every pair of
  regions, and the mean squared difference of the student's and teacher's ``K x K`` affinity matrices; summed over
  pairs. Without labels the teacher's final argmax gives the regions.

Default pairing: each student tap of ``early``, ``mid``, ``late`` with the teacher tap (of the same groups) of the
nearest stride; override with ``student_taps={"feat": [...]}, teacher_taps={"feat": [...]}`` (same length).
Weights: the paper tunes them per dataset; we use the HLFD convention for the HLFD comparison, 0.1 for the pixel-level
(prediction-map) term and 0.9 for the two feature-level terms.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill.attention import attention_distance
from distill.kl import pixel_kl, tempered_probs
from distill.method import Features, KDMethod
from distill.plan import Role, TapPlan

__all__ = ["ImportanceMapLoss", "region_prototypes", "RegionAffinityLoss", "label_regions", "EMKD"]

_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


class ImportanceMapLoss(nn.Module):
    """``sum_j d(A(s_j), A(t_j))`` over paired maps (student maps resized to the teacher's size)."""

    def __init__(self, p: float = 4.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(student) != len(teacher) or not student:
            raise ValueError(f"Need equally many (>=1) student and teacher maps, got {len(student)} and {len(teacher)}.")
        return torch.stack([attention_distance(s, t, self.p) for s, t in zip(student, teacher)]).sum()


def region_prototypes(feature: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Mean feature of every class region.

    Args:
        feature: ``(B, C, *S)``.
        regions: ``(B, K, *S_r)`` one-hot (or soft) class masks; average-pooled to ``S``.

    Returns:
        ``(B, K, C)``; an empty region gives a zero vector.
    """
    w = _POOL[feature.ndim - 2](regions.to(feature.dtype), feature.shape[2:]).flatten(2)  # (B, K, N)
    f = feature.flatten(2)  # (B, C, N)
    return (w @ f.transpose(1, 2)) / w.sum(dim=2, keepdim=True).clamp_min(1e-6)


class RegionAffinityLoss(nn.Module):
    """``sum_j mean((R^s_j - R^t_j)^2)``, ``R_j = cos(prototype_k, prototype_l)`` over the classes ``k, l``.

    Forward:
        student, teacher: paired sequences of ``(B, C, *S_j)``; regions ``(B, K, *S)`` one-hot masks -> scalar.
    """

    def forward(
        self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], regions: torch.Tensor
    ) -> torch.Tensor:
        if len(student) != len(teacher) or not student:
            raise ValueError(f"Need equally many (>=1) student and teacher maps, got {len(student)} and {len(teacher)}.")
        terms = []
        for s, t in zip(student, teacher):
            ps = F.normalize(region_prototypes(s, regions), dim=2)
            pt = F.normalize(region_prototypes(t, regions), dim=2)
            terms.append((ps @ ps.transpose(1, 2) - pt @ pt.transpose(1, 2)).pow(2).mean())
        return torch.stack(terms).sum()


def label_regions(labels: torch.Tensor | None, teacher_logits: torch.Tensor) -> torch.Tensor:
    """One-hot class regions ``(B, K, *S)`` from integer labels ``(B, 1, *S)``, one-hot labels, or the teacher's argmax."""
    k = teacher_logits.shape[1]
    if labels is not None and labels.ndim == teacher_logits.ndim and labels.shape[1] == k and k > 1:
        return labels.float()  # already one-hot
    if labels is None:
        idx = teacher_logits.argmax(dim=1)
    else:
        idx = labels.long().reshape(labels.shape[0], *labels.shape[2:])
    return F.one_hot(idx.clamp(0, k - 1), k).movedim(-1, 1).float()


class EMKD(KDMethod):
    """EMKD without RKD: ``pmd * PMD + imd * IMD + rad * RAD``.

    Args:
        plan: resolved taps (``pred_final`` and paired ``feat`` on both sides).
        pmd: prediction-map weight (default 0.1).
        imd: importance-map weight (default 0.9).
        rad: region-affinity weight (default 0.9).
        temperature: ``T`` of the prediction-map term (default 4).
        p: attention exponent (default 4).

    Returns (forward):
        ``{"kd_pmd", "kd_imd", "kd_rad", "kd_total"}``.
    """

    name = "emkd"
    STUDENT_ROLES = {
        "pred_final": Role(("pred_final",), single=True, logits=True),
        "feat": Role(("early", "mid", "late")),
    }
    TEACHER_ROLES = {
        "pred_final": Role(("pred_final",), single=True, logits=True),
        "feat": Role(("early", "mid", "late"), paired_with="feat", match_stride=True),
    }

    def __init__(
        self, plan: TapPlan, pmd: float = 0.1, imd: float = 0.9, rad: float = 0.9, temperature: float = 4.0, p: float = 4.0
    ) -> None:
        super().__init__(plan)
        self.check_weights(pmd=pmd, imd=imd, rad=rad, temperature=temperature, p=p)
        self.w = {"pmd": float(pmd), "imd": float(imd), "rad": float(rad)}
        self.temperature = float(temperature)
        self.imd_loss, self.rad_loss = ImportanceMapLoss(p), RegionAffinityLoss()

    def forward(self, student: Features, teacher: Features, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        t, t_logits = self.temperature, teacher["pred_final"][0]
        pmd = pixel_kl(student["pred_final"][0], tempered_probs(t_logits, t), t)
        imd = self.imd_loss(student["feat"], teacher["feat"])
        rad = self.rad_loss(student["feat"], teacher["feat"], label_regions(labels, t_logits))
        total = self.w["pmd"] * pmd + self.w["imd"] * imd + self.w["rad"] * rad
        return {"kd_pmd": pmd, "kd_imd": imd, "kd_rad": rad, "kd_total": total}
