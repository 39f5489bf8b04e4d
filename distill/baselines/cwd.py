"""Channel-wise distillation (CWD), Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021.

For every class channel ``c`` of the final logits, a softmax over the spatial positions with temperature ``tau``
turns the channel into a distribution; the loss is (paper Eq. 3-4, with the teacher first as in the authors' code)::

    L_CWD = tau^2 / (B C) * sum_{b, c} sum_i phi(t_{b,c,i}) * log(phi(t_{b,c,i}) / phi(s_{b,c,i})),
    phi(y_{b,c,i}) = exp(y_{b,c,i} / tau) / sum_j exp(y_{b,c,j} / tau)

i.e. the KL(teacher || student) of each channel's spatial distribution, summed over positions, scaled by ``tau^2`` and
averaged over channels and the batch. No connector: the student's and the teacher's logits have the same classes
(the student map is resized to the teacher's size when they differ).

Defaults: ``tau = 4`` and weight ``cwd = 3``, the paper's values for semantic segmentation on logits (Sec. 4; 3 is
also mmrazor's loss weight for its segmentation configs). The authors' own mmsegmentation configs use ``tau = 1``
with weights 5 (Cityscapes) / 10 (ADE20K); pass ``--temperature 1 --kd_weights "{'cwd': 5.0}"`` for those.

``kd_mask="teacher_correct"``: each channel's spatial softmax runs over the teacher-correct positions of its sample
only (``distill.mask``); the term is already a per-class (per-channel) average, so no background weighting arises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.attention import resize_to
from distill.mask import check_kd_mask, teacher_correct
from distill.method import Features, KDMethod
from distill.plan import Role, TapPlan

__all__ = ["channel_wise_divergence", "CWD"]


def _channel_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(t) || softmax(s))`` along the last axis: ``(..., N) -> (...)``."""
    p_t = F.softmax(t, dim=-1)
    return (torch.xlogy(p_t, p_t) - p_t * F.log_softmax(s, dim=-1)).sum(dim=-1)


def channel_wise_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 4.0, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """``tau^2 * mean_{b, c} KL(softmax_i(t_bc / tau) || softmax_i(s_bc / tau))`` over the spatial positions ``i``.

    Args:
        student_logits: ``(B, C, *S_s)`` (resized to the teacher's size when different).
        teacher_logits: ``(B, C, *S)``.
        tau: temperature (> 0).
        keep: optional bool ``(B, *S)``: the positions each sample's softmax runs over (a sample with none is skipped).

    Returns:
        scalar tensor (0 when every channel's spatial distributions agree, or when ``keep`` keeps nothing).

    Raises:
        ValueError: different batch sizes or channel counts.
    """
    if student_logits.shape[:2] != teacher_logits.shape[:2]:
        raise ValueError(
            f"CWD needs student and teacher logits with the same batch and classes, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}."
        )
    s = resize_to(student_logits, teacher_logits.shape[2:]).flatten(2) / tau
    t = teacher_logits.flatten(2) / tau
    if keep is None:
        return _channel_kl(s, t).mean() * tau**2
    keep = keep.flatten(1)
    per_sample = [_channel_kl(s[b][:, keep[b]], t[b][:, keep[b]]) for b in range(s.shape[0]) if bool(keep[b].any())]
    if not per_sample:
        return s.sum() * 0.0
    return torch.cat(per_sample).mean() * tau**2


class CWD(KDMethod):
    """``cwd * L_CWD`` on the final class logits (Shu et al., ICCV 2021).

    Args:
        plan: resolved taps (student and teacher ``pred_final``).
        cwd: weight of the term (default 3, the paper's for segmentation).
        temperature: ``tau`` (default 4, the paper's for segmentation).
        kd_mask: ``"none"`` or ``"teacher_correct"`` (see the module docstring).

    Returns (forward):
        ``{"kd_cwd", "kd_total"}``.
    """

    name = "cwd"
    STUDENT_ROLES = {"pred_final": Role(("pred_final",), single=True, logits=True)}
    TEACHER_ROLES = {"pred_final": Role(("pred_final",), single=True, logits=True)}

    def __init__(self, plan: TapPlan, cwd: float = 3.0, temperature: float = 4.0, kd_mask: str = "none") -> None:
        super().__init__(plan)
        self.check_weights(cwd=cwd, temperature=temperature)
        self.cwd, self.temperature = float(cwd), float(temperature)
        self.kd_mask = check_kd_mask(kd_mask)

    def term_weights(self) -> dict[str, float]:
        return {"kd_cwd": self.cwd}

    def forward(self, student: Features, teacher: Features, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        s, t = student["pred_final"][0], teacher["pred_final"][0]
        keep = teacher_correct(t, labels)[0] if self.kd_mask == "teacher_correct" else None
        loss = channel_wise_divergence(s, t, self.temperature, keep)
        return {"kd_cwd": loss, "kd_total": self.cwd * loss}
