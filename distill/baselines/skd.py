"""Structured Knowledge Distillation (SKD), Liu et al., CVPR 2019 ("Structured knowledge distillation for semantic
segmentation"): pixel-wise distillation + pair-wise (affinity) distillation + optional holistic (adversarial) term.

- pixel-wise: ``T^2 sum_b mean_pixels KL(q_t || q_s)`` on the final class maps (``T = 1`` as in the paper), i.e.
  summed over the batch and the classes and divided by the number of pixels only, the scale of the authors' code
  (``CriterionPixelWise`` of irfanICMLL/structure_knowledge_distillation: ``sum(-softmax(t) * log_softmax(s)) / W / H``
  over the whole batch). The official value is that cross-entropy; we report the KL form, the official value minus the
  teacher's entropy ``-sum(q_t log q_t) / W / H`` (a constant): the same gradient, and 0 when the student matches.
- pair-wise: ``a_ij = f_i . f_j / (|f_i| |f_j|)`` over the spatial nodes of the late feature map (after an optional
  ``pool x pool`` average pooling that sets the node granularity); loss ``mean_b (1/N^2) sum_ij (a^s_ij - a^t_ij)^2``.
  Channels may differ; the student feature is resized to the teacher's spatial size. (The authors' code pools nodes
  with a *max* pooling of ``scale * size`` patches, ``scale = 0.5``; our ``pool`` is an average pooling, 1 by default.)
- holistic (off by default, ``holistic=0``): a Wasserstein critic ``D`` on class-probability maps (the paper also
  feeds the image; we use the maps only) trained through a gradient-reversal layer, so one optimiser trains both
  the critic (minimising ``D(q_s) - D(q_t) + gp * GP``) and the student (maximising ``D(q_s)``). The gradient
  penalty samples random interpolates, so this term is not deterministic.

Weights follow the paper's ``lambda_1 = 10`` (pixel and pair) and ``lambda_2 = 0.1`` (holistic when enabled).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.layers import Conv, Pool
from torch import nn

from distill.attention import resize_to
from distill.kl import pixel_kl, tempered_probs
from distill.method import Features, KDMethod
from distill.plan import Role, TapPlan

__all__ = ["pixel_wise_loss", "pairwise_affinity", "PairwiseAffinityLoss", "Critic", "SKD"]


def pixel_wise_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """SKD pixel-wise term at the authors' scale: ``T^2 sum_b mean_pixels KL(softmax(t/T) || softmax(s/T))``.

    The authors' ``CriterionPixelWise`` sums ``-softmax(t) * log_softmax(s)`` over batch, pixels and classes and
    divides by ``W * H`` only; this is that sum minus the teacher's entropy (a constant: identical gradient). The
    student map is resized to the teacher's size first (the authors require equal sizes).

    Args:
        student_logits: ``(B, K, *S_s)``.
        teacher_logits: ``(B, K, *S_t)``.
        temperature: ``T`` (the paper uses 1).

    Returns:
        scalar tensor (``B`` times the per-sample pixel mean).

    Raises:
        ValueError: when batch or class counts differ.
    """
    return pixel_kl(student_logits, tempered_probs(teacher_logits, temperature), temperature) * teacher_logits.shape[0]


def pairwise_affinity(feature: torch.Tensor, pool: int = 1) -> torch.Tensor:
    """Cosine similarity between every pair of spatial nodes.

    Args:
        feature: ``(B, C, *spatial)``.
        pool: node size (average pooling kernel and stride, ``ceil_mode``); 1 keeps every position.

    Returns:
        ``(B, N, N)``.
    """
    if pool > 1:
        feature = Pool[Pool.AVG, feature.ndim - 2](kernel_size=pool, stride=pool, ceil_mode=True)(feature)
    f = F.normalize(feature.flatten(2), p=2, dim=1)
    return f.transpose(1, 2) @ f


class PairwiseAffinityLoss(nn.Module):
    """SKD pair-wise term: mean squared difference of the student's and teacher's node affinity matrices.

    Args:
        pool: node size (see ``pairwise_affinity``).

    Forward:
        student ``(B, Cs, *S_s)``, teacher ``(B, Ct, *S_t)`` -> scalar (student resized to ``S_t``).
    """

    def __init__(self, pool: int = 1) -> None:
        super().__init__()
        if int(pool) < 1:
            raise ValueError(f"pool must be >= 1, got {pool}.")
        self.pool = int(pool)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        a_s = pairwise_affinity(resize_to(student, teacher.shape[2:]), self.pool)
        a_t = pairwise_affinity(teacher, self.pool)
        return (a_s - a_t).pow(2).mean()


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: D401
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


class Critic(nn.Module):
    """Small Wasserstein critic on class-probability maps: ``(B, K, *S) -> (B,)``."""

    def __init__(self, spatial_dims: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.net = nn.Sequential(
            conv(num_classes, width, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            conv(width, 2 * width, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            conv(2 * width, 1, 1, bias=False),  # a constant offset cancels in D(q_s) - D(q_t)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1).mean(1)


class SKD(KDMethod):
    """SKD: ``pixel * L_pi + pair * L_pa [+ holistic * (L_ho + gp * GP)]``.

    Args:
        plan: resolved taps (``pred_final`` and ``late`` on both sides).
        pixel: pixel-wise weight (paper lambda_1 = 10).
        pair: pair-wise weight (paper lambda_1 = 10).
        holistic: adversarial weight (paper lambda_2 = 0.1); 0 (default) disables it and builds no critic.
        temperature: pixel-wise temperature (paper: 1).
        pool: pair-wise node size.
        gp: gradient-penalty weight of the critic (WGAN-GP: 10).

    Returns (forward):
        ``{"kd_pixel", "kd_pair", ["kd_holistic",] "kd_total"}``; ``kd_pixel`` is summed over the batch (the authors'
        scale, see ``pixel_wise_loss``).
    """

    name = "skd"
    STUDENT_ROLES = {"pred_final": Role(("pred_final",), single=True, logits=True), "late": Role(("late",), single=True)}
    TEACHER_ROLES = {"pred_final": Role(("pred_final",), single=True, logits=True), "late": Role(("late",), single=True)}

    def __init__(
        self,
        plan: TapPlan,
        pixel: float = 10.0,
        pair: float = 10.0,
        holistic: float = 0.0,
        temperature: float = 1.0,
        pool: int = 1,
        gp: float = 10.0,
    ) -> None:
        super().__init__(plan)
        self.check_weights(pixel=pixel, pair=pair, holistic=holistic, temperature=temperature, gp=gp)
        self.w_pixel, self.w_pair, self.w_holistic = float(pixel), float(pair), float(holistic)
        self.temperature, self.gp = float(temperature), float(gp)
        self.pair_loss = PairwiseAffinityLoss(pool)
        if self.w_holistic > 0:
            self.connectors["critic"] = Critic(plan.spatial_dims, plan.num_classes)

    def holistic_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Critic objective ``D(GRL(q_s)) - D(q_t) + gp * GP`` (student gradients reversed by the GRL)."""
        critic = self.connectors["critic"]
        q_t = F.softmax(teacher_logits, dim=1)
        q_s = F.softmax(resize_to(student_logits, q_t.shape[2:]), dim=1)
        adv = critic(_GradReverse.apply(q_s)).mean() - critic(q_t).mean()
        if not torch.is_grad_enabled():  # evaluation: no critic training, no penalty
            return adv
        eps = torch.rand((q_t.shape[0],) + (1,) * (q_t.ndim - 1), device=q_t.device, dtype=q_t.dtype)
        mix = (eps * q_s.detach() + (1 - eps) * q_t).requires_grad_(True)
        (grad,) = torch.autograd.grad(critic(mix).sum(), mix, create_graph=True)
        penalty = (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()
        return adv + self.gp * penalty

    def forward(self, student: Features, teacher: Features, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        t = self.temperature
        s_logits, t_logits = student["pred_final"][0], teacher["pred_final"][0]
        pixel = pixel_wise_loss(s_logits, t_logits, t)
        pair = self.pair_loss(student["late"][0], teacher["late"][0])
        out = {"kd_pixel": pixel, "kd_pair": pair}
        total = self.w_pixel * pixel + self.w_pair * pair
        if self.w_holistic > 0:
            out["kd_holistic"] = self.holistic_loss(s_logits, t_logits)
            total = total + self.w_holistic * out["kd_holistic"]
        out["kd_total"] = total
        return out
