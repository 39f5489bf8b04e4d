"""Base class of the distillation methods: roles, connectors and the ``forward`` contract."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from distill.plan import Role, TapPlan

__all__ = ["KDMethod", "Features"]

#: ``{role: [tensor per tap]}`` as the distiller passes them to a method
Features = Mapping[str, list[torch.Tensor]]


class KDMethod(nn.Module):
    """A distillation loss over captured taps.

    Subclasses declare ``STUDENT_ROLES`` / ``TEACHER_ROLES`` (see ``distill.plan.Role``), build every learnable
    connector in ``__init__`` inside ``self.connectors`` (the only parameters a method may own), and implement
    ``forward(student, teacher, labels)`` returning ``{"kd_<term>": scalar, ..., "kd_total": scalar}`` where
    ``kd_total`` is the weighted sum that is added to the segmentation loss and the other entries are the
    un-weighted terms.

    Args:
        plan: the resolved taps (``distill.plan.build_plan``).
    """

    name: ClassVar[str] = ""
    STUDENT_ROLES: ClassVar[dict[str, Role]] = {}
    TEACHER_ROLES: ClassVar[dict[str, Role]] = {}

    def __init__(self, plan: TapPlan) -> None:
        super().__init__()
        self.plan = plan
        self.connectors = nn.ModuleDict()

    #: parameters that must be strictly positive (a temperature, an attention exponent)
    POSITIVE: ClassVar[tuple[str, ...]] = ("temperature", "p")

    @classmethod
    def check_weights(cls, **weights: float) -> None:
        """Raise ValueError naming any negative or non-finite weight, or a non-positive ``temperature``/``p``."""
        for k, v in weights.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (v >= 0) or v == float("inf"):
                raise ValueError(f"Weight {k}={v!r} must be a finite number >= 0.")
            if k in cls.POSITIVE and v <= 0:
                raise ValueError(f"{k} must be > 0, got {v!r}.")

    def term_weights(self) -> dict[str, float]:
        """``{term key: weight}`` with ``kd_total == sum(weight * out[term])`` for the ``forward`` output ``out``.

        ``kd_balance="grad"`` (``distill.balance``) re-weights these terms. The default treats ``kd_total`` as one
        term; methods whose terms are separate losses override it.
        """
        return {"kd_total": 1.0}

    def forward(self, student: Features, teacher: Features, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError
