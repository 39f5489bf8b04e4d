"""Which taps of the student and the teacher each distillation method reads (its *roles*), checked at build time.

A method declares roles, e.g. HLFD's student ``early`` and ``mid`` and teacher ``mid``, ``late``, ``pred_mid`` and
``pred_final``; by default each role takes the taps of the same-named group of the network's feature contract
(``networks.contract``). Configuration may override any role with tap names (``"mid.1"``), the module path of a
declared tap, ``"output"`` (the network's forward output) or explicit ``Tap`` objects (any module path), e.g.
``student_taps={"mid": ["mid.1", "mid.2"]}``. The plan checks that names exist, single-tap roles get one tap,
prediction roles have as many channels as classes, and paired roles have equal lengths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from distill.capture import OUTPUT_PATH, unwrap
from networks.contract import Tap

__all__ = ["Role", "TapPlan", "network_taps", "build_plan", "check_trained_heads", "TapOverride"]

TapOverride = str | Tap | Sequence[str | Tap]


@dataclass(frozen=True)
class Role:
    """One input of a distillation method.

    Args:
        groups: contract groups giving the default taps, in order (``"pred_final"`` falls back to ``"output"``).
        single: exactly one tap.
        logits: class logits (channels must equal the number of classes).
        paired_with: name of a role of the *other* side (the student's, for a teacher role) that must have the same
            number of taps; the taps are paired by position.
        match_stride: (teacher roles with ``paired_with``) by default pick, for each paired student tap, the tap of
            ``groups`` with the nearest stride instead of the whole groups.
    """

    groups: tuple[str, ...]
    single: bool = False
    logits: bool = False
    paired_with: str | None = None
    match_stride: bool = False


def network_taps(model: nn.Module) -> dict[str, Tap]:
    """``{tap name: Tap}`` of a (possibly wrapped) ``TapNetwork``, plus ``"output"`` for the forward output.

    Raises:
        TypeError: when the network has no ``feature_contract()``.
    """
    net = unwrap(model)
    if not callable(getattr(net, "feature_contract", None)):
        raise TypeError(f"{type(net).__name__} has no feature_contract(); distillation needs a networks.TapNetwork.")
    taps = dict(net.feature_contract().named())
    taps["output"] = Tap(OUTPUT_PATH, int(net.out_channels), 1)
    return taps


def _default_names(taps: Mapping[str, Tap], groups: Sequence[str]) -> list[str]:
    names: list[str] = []
    for g in groups:
        if g == "output":
            names.append("output")
        elif g == "pred_final":
            names.append("pred_final" if "pred_final" in taps else "output")
        else:
            names.extend(k for k in taps if k == g or k.startswith(g + "."))
    return names


@dataclass
class TapPlan:
    """Resolved taps per role for both networks.

    Attributes:
        student: ``{role: (Tap, ...)}``.
        teacher: ``{role: (Tap, ...)}``.
        num_classes: classes of the prediction maps.
        spatial_dims: 2 or 3.
    """

    student: dict[str, tuple[Tap, ...]] = field(default_factory=dict)
    teacher: dict[str, tuple[Tap, ...]] = field(default_factory=dict)
    num_classes: int = 2
    spatial_dims: int = 2

    def paths(self, side: str) -> dict[str, str]:
        """``{path: path}`` of every tap of one side (``"student"`` or ``"teacher"``), for ``FeatureCapture``."""
        roles = self.student if side == "student" else self.teacher
        return {t.path: t.path for taps in roles.values() for t in taps}

    def channels(self, side: str, role: str) -> list[int]:
        """Declared channels of one role's taps."""
        return [t.channels for t in (self.student if side == "student" else self.teacher)[role]]


def _resolve(side: str, role: str, value: TapOverride, taps: Mapping[str, Tap]) -> tuple[Tap, ...]:
    items = [value] if isinstance(value, (str, Tap)) else list(value)
    by_path = {t.path: t for t in taps.values()}
    out: list[Tap] = []
    for item in items:
        if isinstance(item, Tap):
            out.append(item)
        elif isinstance(item, str) and (item in taps or item in by_path):
            out.append(taps[item] if item in taps else by_path[item])
        else:
            raise ValueError(
                f"Unknown {side} tap {item!r} for role {role!r}; valid tap names: {', '.join(taps)} (or a networks.Tap)."
            )
    return tuple(out)


def _nearest_stride(candidates: Sequence[Tap], targets: Sequence[Tap]) -> tuple[Tap, ...]:
    return tuple(min(candidates, key=lambda c: abs(math.log2(c.stride / t.stride))) for t in targets)


def _side(
    side: str,
    roles: Mapping[str, Role],
    taps: Mapping[str, Tap],
    overrides: Mapping[str, TapOverride] | None,
    num_classes: int,
    other: Mapping[str, tuple[Tap, ...]] | None = None,
) -> dict[str, tuple[Tap, ...]]:
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(roles))
    if unknown:
        raise ValueError(f"Unknown {side} role(s) {unknown}; this method's {side} roles: {', '.join(roles) or 'none'}.")
    out: dict[str, tuple[Tap, ...]] = {}
    for role, spec in roles.items():
        if role in overrides:
            chosen = _resolve(side, role, overrides[role], taps)
        else:
            chosen = _resolve(side, role, _default_names(taps, spec.groups), taps)
            if spec.match_stride and spec.paired_with and other is not None and chosen:
                chosen = _nearest_stride(chosen, other[spec.paired_with])
        if not chosen:
            raise ValueError(
                f"The {side} declares no taps for role {role!r} (groups {spec.groups}); "
                f"pass {side}_taps={{'{role}': [...]}} naming some of: {', '.join(taps)}."
            )
        if spec.single and len(chosen) != 1:
            raise ValueError(f"{side} role {role!r} takes exactly one tap, got {[t.path for t in chosen]}.")
        if spec.logits:
            bad = [t for t in chosen if t.channels != num_classes]
            if bad:
                raise ValueError(
                    f"{side} role {role!r} needs class logits with {num_classes} channels; "
                    f"{[(t.path, t.channels) for t in bad]} do not match."
                )
        out[role] = chosen
    return out


def check_trained_heads(
    teacher: nn.Module, roles: Mapping[str, Role], chosen: Mapping[str, tuple[Tap, ...]] | None = None
) -> None:
    """Refuse teacher prediction taps that never received a training loss (see ``TapNetwork.supervised_taps``).

    Args:
        teacher: the teacher ``TapNetwork`` (built with the kwargs it was trained with).
        roles: a method's teacher roles; only ``logits`` roles are checked.
        chosen: the resolved taps per role; None takes each role's default taps from the contract.

    Raises:
        ValueError: a prediction role on a head outside ``teacher.supervised_taps()``, naming the heads and the fix.
    """
    teacher = unwrap(teacher)
    supervised = getattr(teacher, "supervised_taps", None)
    if not callable(supervised):
        return
    if chosen is None:
        taps = network_taps(teacher)
        chosen = {r: _resolve("teacher", r, _default_names(taps, spec.groups), taps) for r, spec in roles.items() if spec.logits}
    trained = set(supervised()) | {OUTPUT_PATH}
    for role, spec in roles.items():
        if not spec.logits or role not in chosen:
            continue
        untrained = [t.path for t in chosen[role] if t.path not in trained]
        if untrained:
            hint = ""
            if getattr(teacher, "deep_supervision", True) is False:
                hint = (
                    f" The {type(teacher).__name__} teacher was trained without deep supervision "
                    "(its checkpoint's network kwargs say deep_supervision=False), so these heads never received a "
                    "gradient and still hold their random initialisation. Retrain the teacher with deep supervision "
                    "(bundles/unetpp_teacher does by default: --deep_supervision true)."
                )
            raise ValueError(
                f"teacher role {role!r} reads prediction heads {untrained} that were not trained; trained heads: "
                f"{sorted(trained - {OUTPUT_PATH})}.{hint} Or override teacher_taps={{'{role}': [...]}} with trained heads."
            )


def build_plan(
    student: nn.Module,
    teacher: nn.Module,
    student_roles: Mapping[str, Role],
    teacher_roles: Mapping[str, Role],
    student_taps: Mapping[str, TapOverride] | None = None,
    teacher_taps: Mapping[str, TapOverride] | None = None,
) -> TapPlan:
    """Resolve and check every role of a method for a student/teacher pair.

    Args:
        student: student ``TapNetwork`` (may be DDP-wrapped).
        teacher: teacher ``TapNetwork``.
        student_roles: the method's student roles.
        teacher_roles: the method's teacher roles.
        student_taps: overrides ``{role: tap name | Tap | [..]}``.
        teacher_taps: overrides for the teacher.

    Returns:
        the checked ``TapPlan``.

    Raises:
        ValueError: different spatial dims or class counts, unknown role or tap names, wrong tap counts,
            logits with the wrong channels, paired roles of different lengths, teacher prediction roles on heads
            that were never trained (``TapNetwork.supervised_taps``; e.g. UNet++ built without deep supervision).
    """
    s_net, t_net = unwrap(student), unwrap(teacher)
    s_taps, t_taps = network_taps(s_net), network_taps(t_net)
    if int(s_net.spatial_dims) != int(t_net.spatial_dims):
        raise ValueError(f"Student is {s_net.spatial_dims}D but teacher is {t_net.spatial_dims}D.")
    if int(s_net.out_channels) != int(t_net.out_channels):
        raise ValueError(f"Student has {s_net.out_channels} output classes but teacher has {t_net.out_channels}.")
    k = int(s_net.out_channels)
    plan = TapPlan(
        student=_side("student", student_roles, s_taps, student_taps, k),
        teacher={},
        num_classes=k,
        spatial_dims=int(s_net.spatial_dims),
    )
    plan.teacher = _side("teacher", teacher_roles, t_taps, teacher_taps, k, other=plan.student)
    check_trained_heads(t_net, teacher_roles, plan.teacher)
    for side, roles, other in (("student", student_roles, plan.teacher), ("teacher", teacher_roles, plan.student)):
        mine = plan.student if side == "student" else plan.teacher
        for role, spec in roles.items():
            if spec.paired_with is not None and len(mine[role]) != len(other[spec.paired_with]):
                raise ValueError(
                    f"{side} role {role!r} ({len(mine[role])} taps) is paired one-to-one with the other network's "
                    f"{spec.paired_with!r} ({len(other[spec.paired_with])} taps); give both the same number of taps."
                )
    return plan
