"""EMKD, Qin et al., IEEE TMI 2021 ("Efficient medical image segmentation based on knowledge distillation"), listed
as "DKD" in the HLFD paper, without its relational (RKD) module:

- prediction-map distillation: ``T^2 mean_pixels KL(softmax(t/T) || softmax(s/T))`` on the final maps;
- importance-map distillation: ``sum_j d(A(s_j), A(t_j))`` over paired student/teacher layers, ``A`` the attention
  map of ``distill.attention`` (p = 4 as in EMKD);
- region-affinity distillation: per layer pair, class-region prototypes (features averaged over each class region of
  the label mask, soft-resized to the feature size by average pooling), the cosine between the prototypes of every
  *distinct* pair of regions ``k < l``, and ``mean_{b, k<l} (cos^s_kl - cos^t_kl)^2``; summed over layer pairs.
  With 2 classes this is the authors' ``region_affinity_distillation`` (EagleMIT/EMKD ``utils/loss_functions.py``):
  one cosine between the background and foreground prototypes per sample, ``(rc_s - rc_t)^2`` averaged over the
  batch. Differences: the authors resize the mask to the feature size by nearest interpolation (we average-pool, so a
  small tumour is not lost at stride 16), and an empty background gives them NaN (us a zero prototype, cosine 0).
  Without labels the teacher's final argmax gives the regions.

Layers. The authors' code feeds *the same* two layer pairs, a "low" and a "high" feature, to both IMD and RAD, and
those are encoder features in all three of its networks (NestedUNet ``x1_0`` / ``x3_0``, ResNet-18 stem / ``layer2``,
ENet initial block / end of stage 3, all before any decoder block). Here the two terms have separate roles: ``feat``
(IMD) and ``rad`` (RAD), both defaulting to every student tap of ``early``, ``mid``, ``late`` paired with the teacher
tap (same groups) of the nearest stride. To put RAD on the decoders instead::

    s_taps, t_taps = decoder_rad_taps(student, teacher)  # UNet++ / ResNet18Student decoders, paired by stride
    create_distiller("emkd", student, teacher, student_taps=s_taps, teacher_taps=t_taps)

Any role can be overridden with tap names or ``networks.Tap`` objects (``student_taps={"rad": [...]}``,
``teacher_taps={"rad": [...]}``, same length). Weights: the paper tunes them per dataset; we use the HLFD convention
for the HLFD comparison, 0.1 for the pixel-level (prediction-map) term and 0.9 for the two feature-level terms (the
authors' code: ``alpha = 0.1``, ``beta1 = beta2 = 0.9``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill.attention import attention_distance
from distill.capture import unwrap
from distill.kl import pixel_kl, tempered_probs
from distill.method import Features, KDMethod
from distill.plan import Role, TapPlan
from networks.contract import Tap

__all__ = [
    "ImportanceMapLoss",
    "region_prototypes",
    "region_contrast",
    "RegionAffinityLoss",
    "label_regions",
    "decoder_taps",
    "decoder_rad_taps",
    "EMKD",
]

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


def region_contrast(feature: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Cosine between the prototypes of every distinct pair of class regions (EMKD's "region contrast").

    Args:
        feature: ``(B, C, *S)``.
        regions: ``(B, K, *S_r)`` one-hot (or soft) class masks, ``K >= 2`` (see ``region_prototypes``).

    Returns:
        ``(B, K (K - 1) / 2)``: pairs ``(k, l)``, ``k < l``, in ``itertools.combinations`` order; a pair with an empty
        region gives 0.

    Raises:
        ValueError: for fewer than 2 regions.
    """
    k = regions.shape[1]
    if k < 2:
        raise ValueError(f"Region affinity needs at least 2 class regions, got {k}.")
    protos = F.normalize(region_prototypes(feature, regions), dim=2)  # (B, K, C), empty region -> zero vector
    iu = torch.triu_indices(k, k, offset=1, device=protos.device)
    return (protos @ protos.transpose(1, 2))[:, iu[0], iu[1]]


class RegionAffinityLoss(nn.Module):
    """``sum_j mean_{b, k<l} (cos^s_kl - cos^t_kl)^2`` over paired layers ``j`` (see ``region_contrast``).

    With 2 classes this is exactly EMKD's ``(rc_s - rc_t)^2`` averaged over the batch (one cosine per sample); with
    ``K`` classes it averages the ``K (K - 1) / 2`` distinct pairs (the diagonal, always 1, is not a pair).

    Forward:
        student, teacher: paired sequences of ``(B, C, *S_j)`` (channels and sizes may differ within a pair);
        regions ``(B, K, *S)`` one-hot masks, ``K >= 2`` -> scalar.

    Raises:
        ValueError: unequal or empty sequences, fewer than 2 regions.
    """

    def forward(
        self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], regions: torch.Tensor
    ) -> torch.Tensor:
        if len(student) != len(teacher) or not student:
            raise ValueError(f"Need equally many (>=1) student and teacher maps, got {len(student)} and {len(teacher)}.")
        terms = [
            (region_contrast(s, regions) - region_contrast(t, regions)).pow(2).mean() for s, t in zip(student, teacher)
        ]
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


def decoder_taps(network: nn.Module) -> tuple[Tap, ...]:
    """Decoder feature taps, deep to shallow, of the networks whose decoders are known.

    - ``UNetPlusPlus``: the nodes of the path that feeds the final head, ``conv{i}_{L-1-i}`` for ``i = L-2 .. 0``
      (``features[i]`` channels, stride ``2**i``); other nested nodes ``conv{i}_{j}``, ``j > 0``, can be given as
      explicit ``Tap`` objects.
    - ``ResNet18Student``: ``decoder.k`` for ``k = 0 .. 4`` (``decoder_channels[k]`` channels, stride ``2**(4-k)``).

    Args:
        network: the network (plain or DDP/DataParallel-wrapped).

    Returns:
        the taps, for ``student_taps``/``teacher_taps`` overrides (e.g. EMKD's ``rad`` role).

    Raises:
        ValueError: for another network type, or when a module path is missing (a changed architecture).
    """
    from networks.student import ResNet18Student
    from networks.unetpp import UNetPlusPlus

    net = unwrap(network)
    if isinstance(net, UNetPlusPlus):
        levels = int(net.levels)
        taps = tuple(Tap(f"conv{i}_{levels - 1 - i}", int(net.features[i]), 2**i) for i in range(levels - 2, -1, -1))
    elif isinstance(net, ResNet18Student):
        n = len(net.decoder)
        taps = tuple(Tap(f"decoder.{k}", int(net.decoder_channels[k]), 2 ** (n - 1 - k)) for k in range(n))
    else:
        raise ValueError(
            f"decoder_taps knows the decoders of UNetPlusPlus and ResNet18Student, not {type(net).__name__}; "
            "pass the decoder layers as explicit networks.Tap(path, channels, stride) objects instead."
        )
    modules = dict(net.named_modules())
    missing = [t.path for t in taps if t.path not in modules]
    if missing:
        raise ValueError(f"{type(net).__name__} has no decoder module(s) {missing}; decoder_taps is out of date.")
    return taps


def decoder_rad_taps(
    student: nn.Module, teacher: nn.Module
) -> tuple[dict[str, tuple[Tap, ...]], dict[str, tuple[Tap, ...]]]:
    """Tap overrides that put EMKD's region affinity on the decoders of both networks.

    Every student decoder tap (``decoder_taps``) is paired with the teacher decoder tap of the nearest stride.

    Args:
        student: student network (UNet++ or ResNet18Student, possibly wrapped).
        teacher: teacher network (idem).

    Returns:
        ``(student_taps, teacher_taps)``, each ``{"rad": (Tap, ...)}``, for ``create_distiller("emkd", ...)``.

    Raises:
        ValueError: see ``decoder_taps``.
    """
    s_taps, t_taps = decoder_taps(student), decoder_taps(teacher)
    paired = tuple(min(t_taps, key=lambda c, s=s: abs(math.log2(c.stride / s.stride))) for s in s_taps)
    return {"rad": s_taps}, {"rad": paired}


class EMKD(KDMethod):
    """EMKD without RKD: ``pmd * PMD + imd * IMD + rad * RAD``.

    Args:
        plan: resolved taps (``pred_final``, paired ``feat`` for IMD and paired ``rad`` for RAD on both sides).
        pmd: prediction-map weight (default 0.1).
        imd: importance-map weight (default 0.9).
        rad: region-affinity weight (default 0.9).
        temperature: ``T`` of the prediction-map term (default 4).
        p: attention exponent (default 4).

    Returns (forward):
        ``{"kd_pmd", "kd_imd", "kd_rad", "kd_total"}``.

    Raises:
        ValueError: a negative weight, a non-positive temperature or ``p``, fewer than 2 classes.
    """

    name = "emkd"
    STUDENT_ROLES = {
        "pred_final": Role(("pred_final",), single=True, logits=True),
        "feat": Role(("early", "mid", "late")),
        "rad": Role(("early", "mid", "late")),
    }
    TEACHER_ROLES = {
        "pred_final": Role(("pred_final",), single=True, logits=True),
        "feat": Role(("early", "mid", "late"), paired_with="feat", match_stride=True),
        "rad": Role(("early", "mid", "late"), paired_with="rad", match_stride=True),
    }

    def __init__(
        self, plan: TapPlan, pmd: float = 0.1, imd: float = 0.9, rad: float = 0.9, temperature: float = 4.0, p: float = 4.0
    ) -> None:
        super().__init__(plan)
        self.check_weights(pmd=pmd, imd=imd, rad=rad, temperature=temperature, p=p)
        if plan.num_classes < 2:
            raise ValueError(f"EMKD's region affinity needs at least 2 classes, got num_classes={plan.num_classes}.")
        self.w = {"pmd": float(pmd), "imd": float(imd), "rad": float(rad)}
        self.temperature = float(temperature)
        self.imd_loss, self.rad_loss = ImportanceMapLoss(p), RegionAffinityLoss()

    def forward(self, student: Features, teacher: Features, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        t, t_logits = self.temperature, teacher["pred_final"][0]
        pmd = pixel_kl(student["pred_final"][0], tempered_probs(t_logits, t), t)
        imd = self.imd_loss(student["feat"], teacher["feat"])
        rad = self.rad_loss(student["rad"], teacher["rad"], label_regions(labels, t_logits))
        total = self.w["pmd"] * pmd + self.w["imd"] * imd + self.w["rad"] * rad
        return {"kd_pmd": pmd, "kd_imd": imd, "kd_rad": rad, "kd_total": total}
