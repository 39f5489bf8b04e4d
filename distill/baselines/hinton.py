"""Hinton et al., "Distilling the knowledge in a neural network", 2015: pixel-wise tempered KL on the final logits."""

from __future__ import annotations

import torch

from distill.kl import pixel_kl, tempered_probs
from distill.mask import check_kd_mask
from distill.method import Features, KDMethod
from distill.plan import Role, TapPlan

__all__ = ["HintonKD"]


class HintonKD(KDMethod):
    """``kd * T^2 * mean_pixels KL(softmax(t/T) || softmax(s/T))`` on the final class logits.

    Args:
        plan: resolved taps (student and teacher ``pred_final``).
        kd: weight of the term (default 1).
        temperature: ``T`` (default 4).
        kd_mask: ``"none"`` or ``"teacher_correct"`` (``distill.mask``: only pixels the teacher classifies correctly,
            averaged per label class).

    Returns (forward):
        ``{"kd_kl", "kd_total"}``.
    """

    name = "hinton"
    STUDENT_ROLES = {"pred_final": Role(("pred_final",), single=True, logits=True)}
    TEACHER_ROLES = {"pred_final": Role(("pred_final",), single=True, logits=True)}

    def __init__(self, plan: TapPlan, kd: float = 1.0, temperature: float = 4.0, kd_mask: str = "none") -> None:
        super().__init__(plan)
        self.check_weights(kd=kd, temperature=temperature)
        self.kd, self.temperature = float(kd), float(temperature)
        self.kd_mask = check_kd_mask(kd_mask)

    def term_weights(self) -> dict[str, float]:
        return {"kd_kl": self.kd}

    def forward(self, student: Features, teacher: Features, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        t = self.temperature
        kl = pixel_kl(student["pred_final"][0], tempered_probs(teacher["pred_final"][0], t), t, labels, self.kd_mask)
        return {"kd_kl": kl, "kd_total": self.kd * kl}
