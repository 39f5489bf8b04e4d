"""The ``Distiller``: a distillation method, its connectors, and the feature captures of the student and teacher.

The distiller is an ``nn.Module`` whose only parameters are the method's connectors (``distiller.connectors``); the
student and the teacher are referenced, not registered, so ``distiller.state_dict()`` holds the connectors alone and
exporting the student drops them. The teacher is frozen (eval mode, ``requires_grad=False``) when the distiller is
built and runs under ``torch.no_grad``. Losses are computed in float32 with autocast disabled.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from monai.data import MetaTensor
from torch import nn

from distill.capture import FeatureCapture, unwrap
from distill.method import KDMethod

__all__ = ["Distiller", "freeze", "trainable_parameters"]

logger = logging.getLogger(__name__)


def freeze(model: nn.Module) -> nn.Module:
    """Put a network in eval mode and disable gradients of all its parameters; returns it."""
    model.eval()
    model.requires_grad_(False)
    return model


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else x


class Distiller(nn.Module):
    """A method plus the captures that feed it.

    Args:
        method: a built ``KDMethod`` (its plan says which taps to capture).
        student: the student network (plain or DDP/DataParallel-wrapped).
        teacher: the teacher network; may be None only for a method without teacher roles (``none``).

    Raises:
        ValueError: when the method needs a teacher and none is given.
    """

    def __init__(self, method: KDMethod, student: nn.Module, teacher: nn.Module | None) -> None:
        super().__init__()
        if not isinstance(method, KDMethod):
            raise TypeError(f"method must be a KDMethod, got {type(method).__name__}.")
        self.method = method
        plan = method.plan
        if plan.teacher and teacher is None:
            raise ValueError(f"Method {method.name!r} needs a teacher network.")
        # referenced, not registered: the distiller's parameters and state_dict are the connectors only
        self.__dict__["_student"] = student
        self.__dict__["_teacher"] = teacher
        self.student_capture = FeatureCapture(student, plan.paths("student")) if plan.student else None
        self.teacher_capture = FeatureCapture(teacher, plan.paths("teacher")) if plan.teacher else None
        if teacher is not None:
            freeze(teacher)

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def connectors(self) -> nn.Module:
        """The learnable connectors (all of this module's parameters)."""
        return self.method.connectors

    @property
    def student(self) -> nn.Module:
        return self._student

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher

    @property
    def needs_teacher(self) -> bool:
        return self.teacher_capture is not None

    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the frozen teacher on a batch and return its captured taps ``{path: tensor}``.

        Args:
            images: ``(B, C_in, *spatial)`` on the teacher's device.
        """
        if self.teacher_capture is None:
            return {}
        teacher = self._teacher
        if teacher.training:
            teacher.eval()
        with self.teacher_capture:
            teacher(_plain(images))
        feats = self.teacher_capture.outputs
        self.teacher_capture.clear()
        return feats

    def _gather(
        self, side: str, feats: Mapping[str, torch.Tensor], input_size: Sequence[int] | None
    ) -> dict[str, list[torch.Tensor]]:
        plan = self.method.plan
        roles = plan.student if side == "student" else plan.teacher
        out: dict[str, list[torch.Tensor]] = {}
        for role, taps in roles.items():
            tensors = []
            for tap in taps:
                if tap.path not in feats:
                    raise RuntimeError(
                        f"No {side} output captured for tap {tap.path!r} (role {role!r}); run the {side} forward inside "
                        f"distiller.{side}_capture (DistillationHandler does this)."
                    )
                x = _plain(feats[tap.path])
                if not isinstance(x, torch.Tensor) or x.ndim != plan.spatial_dims + 2 or x.shape[1] != tap.channels:
                    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                    raise ValueError(
                        f"{side} tap {tap.path!r} declares {tap.channels} channels ({plan.spatial_dims}D) but produced {shape}."
                    )
                if input_size is not None:
                    expected = tuple(int(n) // tap.stride for n in input_size)
                    if tuple(x.shape[2:]) != expected:
                        raise ValueError(
                            f"{side} tap {tap.path!r} declares stride {tap.stride} (spatial {expected} for input "
                            f"{tuple(input_size)}) but produced {tuple(x.shape)}."
                        )
                tensors.append(x.float())
            out[role] = tensors
        return out

    def forward(
        self,
        student_features: Mapping[str, torch.Tensor],
        teacher_features: Mapping[str, torch.Tensor],
        labels: torch.Tensor | None = None,
        input_size: Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Compute the method's terms in float32.

        Args:
            student_features: ``{tap path: tensor}`` from ``student_capture.outputs``.
            teacher_features: ``{tap path: tensor}`` from ``teacher_features()``.
            labels: ``(B, 1, *spatial)`` integer labels (used by EMKD's region affinity), or None.
            input_size: spatial size of the network input; when given, every tap's spatial size is checked against
                ``input_size // stride`` (the handler passes it).

        Returns:
            ``{"kd_<term>": scalar, ..., "kd_total": scalar}`` (float32 tensors).

        Raises:
            RuntimeError: a needed tap was not captured. ValueError: a tap's output disagrees with its declared
            channels or stride.
        """
        s = self._gather("student", student_features, input_size)
        t = self._gather("teacher", teacher_features, input_size)
        device = next((v[0].device for v in s.values() if v), torch.device("cpu"))
        with torch.autocast(device_type=device.type, enabled=False):
            out = self.method(s, t, None if labels is None else _plain(labels))
        return {k: v.float() for k, v in out.items()}


def trainable_parameters(student: nn.Module, distiller: Distiller | None) -> list[nn.Parameter]:
    """Parameters the optimiser must update: the student's and the distiller's connectors (no duplicates, no teacher).

    Args:
        student: the student network (plain or wrapped).
        distiller: the distiller, or None for plain supervised training.

    Returns:
        list of parameters with ``requires_grad``.

    Raises:
        ValueError: if a parameter belongs to the teacher.
    """
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    teacher_ids = set()
    if distiller is not None and distiller.teacher is not None:
        teacher_ids = {id(p) for p in unwrap(distiller.teacher).parameters()}
    modules = [student] + ([distiller] if distiller is not None else [])
    for module in modules:
        for p in module.parameters():
            if id(p) in teacher_ids:
                raise ValueError("The student shares parameters with the teacher; distillation needs separate networks.")
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params
