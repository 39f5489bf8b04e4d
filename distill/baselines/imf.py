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

Deployment: Kim et al. keep the branches at inference and predict with the attentive logit. ``IMFNetwork(student,
distiller)`` wraps the trained student and the IMF connectors into one inference network whose output is that
attentive logit, resized to the input size (exactly the map ``kd_logit`` distils). The student network itself is
unchanged; exporting the student alone (as for the other methods) drops the branches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill.attention import resize_to
from distill.capture import FeatureCapture, unwrap
from distill.connectors import conv1x1, conv1x1_list
from distill.distiller import Distiller
from distill.kl import pixel_kl, tempered_probs
from distill.method import Features, KDMethod
from distill.plan import Role, TapPlan

__all__ = ["IMF", "IMFNetwork"]


class IMF(KDMethod):
    """IMF: ``feature * MSE(integrate(cat_j b_j), t_late) + logit * T^2 KL(t_final || attentive logit)``.

    Args:
        plan: resolved taps (student ``branches``; teacher ``late`` and ``pred_final``).
        feature: weight of the feature term (default 1).
        logit: weight of the attentive-logit term (default 1).
        temperature: ``T`` (default 4).

    Returns (forward):
        ``{"kd_feature", "kd_logit", "kd_total"}``.

    Raises:
        ValueError: a negative weight or a non-positive temperature.
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

    def branch_features(self, features: Sequence[torch.Tensor], size: Sequence[int]) -> list[torch.Tensor]:
        """The matched branches ``b_j``: each student feature resized to ``size`` and mapped to the teacher's channels.

        Args:
            features: one ``(B, C_j, *S_j)`` per ``branches`` tap, in plan order.
            size: the teacher's late spatial size.

        Returns:
            list of ``(B, C_t, *size)``.
        """
        return [c(resize_to(f, size)) for c, f in zip(self.connectors["branch"], features)]

    def attentive_logits(self, branches: Sequence[torch.Tensor]) -> torch.Tensor:
        """The attentive logit: the branch logits weighted by a per-sample softmax over the branches' scores.

        Args:
            branches: the matched branches ``(B, C_t, *S)`` (``branch_features``).

        Returns:
            ``(B, K, *S)`` class logits.
        """
        logits = torch.stack([h(b) for h, b in zip(self.connectors["heads"], branches)], dim=1)  # (B, n, K, *S)
        scores = torch.stack([self.connectors["score"](b.flatten(2).mean(2)).squeeze(1) for b in branches], dim=1)
        weights = F.softmax(scores, dim=1).view(*scores.shape, *([1] * (logits.ndim - 2)))
        return (weights * logits).sum(dim=1)

    def forward(self, student: Features, teacher: Features, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        t_late, t_final = teacher["late"][0], teacher["pred_final"][0]
        branches = self.branch_features(student["branches"], t_late.shape[2:])
        integrated = self.connectors["integrate"](torch.cat(branches, dim=1))
        feature = F.mse_loss(integrated, t_late)
        t = self.temperature
        logit = pixel_kl(self.attentive_logits(branches), tempered_probs(t_final, t), t)
        return {"kd_feature": feature, "kd_logit": logit, "kd_total": self.w_feature * feature + self.w_logit * logit}


class IMFNetwork(nn.Module):
    """The IMF-trained student with its branches, as Kim et al. deploy it: one network predicting the attentive logit.

    The student's ``branches`` taps are captured with forward hooks during its forward pass (its own head still
    runs, its output is not used), resized to ``input_size // stride`` of the teacher's late tap (the size the
    branches were trained at; no teacher is run), mapped by the trained connectors and combined into the attentive
    logit, which is resized (bilinear/trilinear) to the input size. Export by tracing (``torch.jit.trace``,
    ``torch.onnx.export``; the trace fixes the input size); the hooks exist only during ``forward``.
    ``state_dict()`` holds ``student.*`` and ``imf.connectors.*``.

    Args:
        student: the trained student (a ``TapNetwork``, plain or DDP/DataParallel-wrapped).
        method: the trained ``IMF`` method, or the ``Distiller`` holding it.

    Forward:
        ``(B, C_in, *S)`` -> logits ``(B, K, *S)``.

    Raises:
        TypeError: when ``method`` is not IMF (or a Distiller of IMF).
        ValueError: when the student has no module at a branch tap's path.
    """

    def __init__(self, student: nn.Module, method: IMF | Distiller) -> None:
        super().__init__()
        imf = method.method if isinstance(method, Distiller) else method
        if not isinstance(imf, IMF):
            raise TypeError(f"IMFNetwork needs a trained IMF method or its Distiller, got {type(imf).__name__}.")
        self.student = student
        self.imf = imf
        self.branch_paths = tuple(tap.path for tap in imf.plan.student["branches"])
        self.late_stride = int(imf.plan.teacher["late"][0].stride)
        self._capture = FeatureCapture(student, {p: p for p in self.branch_paths})
        net = unwrap(student)
        self.spatial_dims = int(imf.plan.spatial_dims)
        self.out_channels = int(imf.plan.num_classes)
        self.in_channels = getattr(net, "in_channels", None)
        self.size_divisor = max(int(getattr(net, "size_divisor", 1)), self.late_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, *S)`` -> attentive logits ``(B, K, *S)``."""
        with self._capture:
            self.student(x)
        feats = self._capture.outputs
        self._capture.clear()
        size = [int(n) // self.late_stride for n in x.shape[2:]]
        branches = self.imf.branch_features([feats[p] for p in self.branch_paths], size)
        return resize_to(self.imf.attentive_logits(branches), x.shape[2:])
