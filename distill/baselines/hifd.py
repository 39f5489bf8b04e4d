"""HIFD, Luo et al., IJCNN 2023 ("Knowledge distillation with deep supervision", DSKD), as the HLFD paper uses it: the
teacher's terminal representation distilled to *individual* student layers, extended for segmentation with
pixel-level feedback.

- feature level: ``(1/N) sum_j MSE(c_j(s_j), t_late)``: each student layer (default: early and middle taps) resized
  to the teacher's late size and mapped to its channels by a learnable 1x1 connector ``c_j``;
- pixel level: the teacher's soft labels supervise the student's *final* classifier and the auxiliary classifiers,
  as in Luo et al. (deep supervision of every classifier with ``T^2 KL`` at temperature ``T``):
  ``(1/(N+1)) [sum_j T^2 KL(softmax(t_final/T) || softmax(h_j(s_j)/T)) + T^2 KL(... || softmax(s_final/T))]`` with a
  learnable 1x1 class head ``h_j`` per layer (the deep-supervision branches, the HLFD authors' pixel-level extension)
  and the student's own final logits ``s_final``.

The original's loss-based per-layer weight allocation is not used: the N auxiliary heads and the final output weigh
equally (the HLFD paper reports "identical implementation settings"). Total: ``beta * feature + lam * pixel``
(0.9 / 0.1 as for HLFD); the final-output part is also reported alone as ``kd_final``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.attention import resize_to
from distill.connectors import conv1x1_list
from distill.kl import pixel_kl, tempered_probs
from distill.method import Features, KDMethod
from distill.plan import Role, TapPlan

__all__ = ["HIFD"]


class HIFD(KDMethod):
    """HIFD with pixel-level feedback on the auxiliary heads and the final output.

    Args:
        plan: resolved taps (student ``layers`` and ``pred_final``; teacher ``late`` and ``pred_final``).
        beta: feature-level weight (default 0.9).
        lam: pixel-level weight (default 0.1).
        temperature: ``T`` (default 4).

    Returns (forward):
        ``{"kd_feature", "kd_pixel", "kd_final", "kd_total"}``: ``kd_pixel`` is the mean over the auxiliary heads
        and the final output; ``kd_final`` (the final output's share, included in ``kd_pixel``) is for logging.

    Raises:
        ValueError: a negative weight or a non-positive temperature.
    """

    name = "hifd"
    STUDENT_ROLES = {
        "layers": Role(("early", "mid")),
        "pred_final": Role(("pred_final",), single=True, logits=True),
    }
    TEACHER_ROLES = {
        "late": Role(("late",), single=True),
        "pred_final": Role(("pred_final",), single=True, logits=True),
    }

    def __init__(self, plan: TapPlan, beta: float = 0.9, lam: float = 0.1, temperature: float = 4.0) -> None:
        super().__init__(plan)
        self.check_weights(beta=beta, lam=lam, temperature=temperature)
        self.beta, self.lam, self.temperature = float(beta), float(lam), float(temperature)
        sd, chans = plan.spatial_dims, plan.channels("student", "layers")
        self.connectors["feature"] = conv1x1_list(sd, chans, plan.channels("teacher", "late")[0])
        self.connectors["pixel"] = conv1x1_list(sd, chans, plan.num_classes)

    def forward(self, student: Features, teacher: Features, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        t_late, t = teacher["late"][0], self.temperature
        p_t = tempered_probs(teacher["pred_final"][0], t)
        layers = student["layers"]
        feature = torch.stack(
            [F.mse_loss(c(resize_to(f, t_late.shape[2:])), t_late) for c, f in zip(self.connectors["feature"], layers)]
        ).mean()
        final = pixel_kl(student["pred_final"][0], p_t, t)
        aux = [pixel_kl(h(f), p_t, t) for h, f in zip(self.connectors["pixel"], layers)]
        pixel = torch.stack(aux + [final]).mean()
        return {
            "kd_feature": feature,
            "kd_pixel": pixel,
            "kd_final": final,
            "kd_total": self.beta * feature + self.lam * pixel,
        }
