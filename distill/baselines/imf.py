"""IMF, Kim et al., IJCAI 2023 ("IMF: Integrating matched features using attentive logit in knowledge distillation"),
listed as "IFD" in the HLFD paper: the teacher's terminal representation distilled into *concatenated* student branches.

Our reading (the paper targets classification; where it is ambiguous we follow the HLFD paper's one-line description):

- each student branch ``j`` (default: the middle taps and the late tap) is resized to the teacher's late size and
  mapped by a learnable 1x1 connector to the teacher's late channels (``b_j``);
- the branches are concatenated and integrated by a 1x1 connector into one feature, matched to the teacher's late
  feature with the mean squared error (``kd_feature``);
- each branch gets a 1x1 class head; the *attentive logit* is the per-sample softmax-weighted sum of the branch
  logits (weights from a linear score of each branch's global average), distilled from the teacher's final map
  with tempered KL (``kd_logit``).

All connectors are dropped at export; the student network itself is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill.attention import resize_to
from distill.connectors import conv1x1, conv1x1_list
from distill.kl import pixel_kl, tempered_probs
from distill.method import Features, KDMethod
from distill.plan import Role, TapPlan

__all__ = ["IMF"]


class IMF(KDMethod):
    """IMF: ``feature * MSE(integrate(cat_j b_j), t_late) + logit * T^2 KL(t_final || attentive logit)``.

    Args:
        plan: resolved taps (student ``branches``; teacher ``late`` and ``pred_final``).
        feature: weight of the feature term (default 1).
        logit: weight of the attentive-logit term (default 1).
        temperature: ``T`` (default 4).

    Returns (forward):
        ``{"kd_feature", "kd_logit", "kd_total"}``.
    """

    name = "imf"
    STUDENT_ROLES = {"branches": Role(("mid", "late"))}
    TEACHER_ROLES = {
        "late": Role(("late",), single=True),
        "pred_final": Role(("pred_final",), single=True, logits=True),
    }

    def __init__(self, plan: TapPlan, feature: float = 1.0, logit: float = 1.0, temperature: float = 4.0) -> None:
        super().__init__(plan)
        self.check_weights(feature=feature, logit=logit, temperature=temperature)
        self.w_feature, self.w_logit, self.temperature = float(feature), float(logit), float(temperature)
        sd, k = plan.spatial_dims, plan.num_classes
        ct = plan.channels("teacher", "late")[0]
        n = len(plan.student["branches"])
        self.connectors["branch"] = conv1x1_list(sd, plan.channels("student", "branches"), ct)
        self.connectors["integrate"] = conv1x1(sd, n * ct, ct)
        self.connectors["heads"] = conv1x1_list(sd, [ct] * n, k)
        self.connectors["score"] = nn.Linear(ct, 1)

    def forward(self, student: Features, teacher: Features, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        t_late, t_final = teacher["late"][0], teacher["pred_final"][0]
        size = t_late.shape[2:]
        branches = [c(resize_to(f, size)) for c, f in zip(self.connectors["branch"], student["branches"])]
        integrated = self.connectors["integrate"](torch.cat(branches, dim=1))
        feature = F.mse_loss(integrated, t_late)
        logits = torch.stack([h(b) for h, b in zip(self.connectors["heads"], branches)], dim=1)  # (B, n, K, *S)
        scores = torch.stack([self.connectors["score"](b.flatten(2).mean(2)).squeeze(1) for b in branches], dim=1)
        weights = F.softmax(scores, dim=1).view(*scores.shape, *([1] * (logits.ndim - 2)))
        attentive = (weights * logits).sum(dim=1)
        t = self.temperature
        logit = pixel_kl(attentive, tempered_probs(t_final, t), t)
        return {"kd_feature": feature, "kd_logit": logit, "kd_total": self.w_feature * feature + self.w_logit * logit}
