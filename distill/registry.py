"""Method registry: ``hlfd | hinton | skd | imf | emkd | hifd | cwd | dist | none`` and ``create_distiller``."""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch import nn

from distill.baselines import CWD, DIST, EMKD, HIFD, IMF, SKD, HintonKD
from distill.distiller import Distiller
from distill.hlfd import HLFD
from distill.mask import check_kd_mask
from distill.method import Features, KDMethod
from distill.plan import TapOverride, TapPlan, build_plan

__all__ = ["NoDistillation", "METHODS", "MASKABLE", "method_class", "default_weights", "create_distiller"]


class NoDistillation(KDMethod):
    """``none``: plain supervised training; ``kd_total`` is 0 and no teacher is run."""

    name = "none"

    def forward(self, student: Features, teacher: Features, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"kd_total": torch.zeros(())}


_REGISTRY: dict[str, type[KDMethod]] = {
    "hlfd": HLFD,
    "hinton": HintonKD,
    "skd": SKD,
    "imf": IMF,
    "emkd": EMKD,
    "hifd": HIFD,
    "cwd": CWD,
    "dist": DIST,
    "none": NoDistillation,
}
METHODS: tuple[str, ...] = tuple(_REGISTRY)
#: methods with pixel-level terms that ``kd_mask="teacher_correct"`` restricts
MASKABLE: tuple[str, ...] = tuple(k for k, c in _REGISTRY.items() if "kd_mask" in inspect.signature(c.__init__).parameters)
#: names the HLFD paper's Table 1 uses for two baselines
_PAPER_NAMES = {"ifd": "imf", "dkd": "emkd"}


def method_class(name: str) -> type[KDMethod]:
    """The ``KDMethod`` class of a method name.

    Raises:
        ValueError: for an unknown name, listing the valid ones.
    """
    key = str(name).strip().lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        hint = f" (the HLFD paper's {str(name).upper()} baseline is {_PAPER_NAMES[key]!r})" if key in _PAPER_NAMES else ""
        raise ValueError(f"Unknown distillation method {name!r}; valid methods: {', '.join(METHODS)}{hint}.")
    return _REGISTRY[key]


def default_weights(name: str) -> dict[str, float]:
    """``{weight name: default}`` a method accepts (e.g. ``beta``, ``lam``, ``temperature`` for ``hlfd``); the
    ``kd_mask`` option is not a weight (``create_distiller(kd_mask=...)``)."""
    sig = inspect.signature(method_class(name).__init__)
    return {k: p.default for k, p in sig.parameters.items() if k not in ("self", "plan", "kd_mask")}


def create_distiller(
    method: str,
    student: nn.Module,
    teacher: nn.Module | None = None,
    *,
    student_taps: Mapping[str, TapOverride] | None = None,
    teacher_taps: Mapping[str, TapOverride] | None = None,
    kd_mask: str = "none",
    **weights: float,
) -> Distiller:
    """Build a distiller for a student/teacher pair.

    Args:
        method: one of ``METHODS``.
        student: student ``TapNetwork`` (plain or DDP/DataParallel-wrapped).
        teacher: teacher ``TapNetwork``; None only for ``none``. It is frozen (eval, no grad).
        student_taps: per-role tap overrides, e.g. ``{"mid": ["mid.1", "mid.2"]}`` (tap names, ``"output"`` or
            ``networks.Tap``); defaults come from the networks' ``feature_contract()``.
        teacher_taps: the same for the teacher.
        kd_mask: ``"none"`` or ``"teacher_correct"`` (``distill.mask``; only for the methods in ``MASKABLE``).
        weights: the method's weights (see ``default_weights(method)``), e.g. ``beta=0.9, lam=0.1, temperature=4``.

    Returns:
        the ``Distiller`` (move it to the device with the student; optimise ``trainable_parameters``).

    Raises:
        ValueError: unknown method or weight names, a ``kd_mask`` the method cannot apply, missing teacher,
            incompatible taps (see ``distill.plan``).
        TypeError: a network without a feature contract.
    """
    cls = method_class(method)
    valid = default_weights(method)
    unknown = sorted(set(weights) - set(valid))
    if unknown:
        raise ValueError(
            f"Unknown weight(s) {unknown} for method {cls.name!r}; valid: {', '.join(valid) or 'none'}."
        )
    options = {}
    if check_kd_mask(kd_mask) != "none":
        if cls.name not in MASKABLE:
            raise ValueError(
                f"kd_mask={kd_mask!r} restricts pixel-level terms; method {cls.name!r} has none it applies to "
                f"(methods that take it: {', '.join(MASKABLE)})."
            )
        options["kd_mask"] = check_kd_mask(kd_mask)
    if cls is NoDistillation:
        if student_taps or teacher_taps:
            raise ValueError("Method 'none' reads no taps; drop student_taps/teacher_taps.")
        return Distiller(cls(TapPlan()), student, teacher)
    if teacher is None:
        raise ValueError(f"Method {cls.name!r} needs a teacher network (see distill.load_teacher).")
    plan = build_plan(student, teacher, cls.STUDENT_ROLES, cls.TEACHER_ROLES, student_taps, teacher_taps)
    return Distiller(cls(plan, **weights, **options), student, teacher)
