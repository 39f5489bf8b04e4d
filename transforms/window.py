"""CT intensity windowing (HU clip + linear rescale), the HLFD paper's radiological windows."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

__all__ = ["WINDOW_PRESETS", "TASK_WINDOWS", "resolve_window", "HUWindow", "HUWindowd"]

#: HU windows from HLFD (ISBI 2024, Sec. 3 "Implementation"): liver -40..160 HU, kidney -200..300 HU.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {"kidney": (-200.0, 300.0), "liver": (-40.0, 160.0)}
#: Task name -> window preset (KiTS -> kidney, LiTS -> liver).
TASK_WINDOWS: dict[str, str] = {"kits": "kidney", "lits": "liver"}


def resolve_window(window: str | Sequence[float]) -> tuple[float, float]:
    """Turn a preset name or an explicit ``(lo, hi)`` pair into a validated HU window.

    Args:
        window: a name in :data:`WINDOW_PRESETS` (``"kidney"``, ``"liver"``), a task name in :data:`TASK_WINDOWS`
            (``"kits"``, ``"lits"``), or two numbers ``(lo, hi)`` in HU.

    Returns:
        ``(lo, hi)`` as floats with ``lo < hi``.

    Raises:
        ValueError: unknown name, wrong length, non-finite bounds or ``lo >= hi``; the message lists the valid presets.
        TypeError: neither a string nor a sequence of two numbers.
    """
    valid = f"valid presets: {sorted(WINDOW_PRESETS)} (or tasks {sorted(TASK_WINDOWS)}), or an explicit (lo, hi) pair"
    if isinstance(window, str):
        name = TASK_WINDOWS.get(window.lower(), window.lower())
        if name not in WINDOW_PRESETS:
            raise ValueError(f"unknown HU window {window!r}; {valid}")
        return WINDOW_PRESETS[name]
    if not isinstance(window, Sequence) or isinstance(window, bytes):
        raise TypeError(f"HU window must be a preset name or a (lo, hi) pair, got {type(window).__name__}; {valid}")
    if len(window) != 2:
        raise ValueError(f"HU window must have exactly two values (lo, hi), got {tuple(window)!r}; {valid}")
    lo, hi = float(window[0]), float(window[1])
    if not (torch.isfinite(torch.tensor([lo, hi])).all() and lo < hi):
        raise ValueError(f"HU window needs finite lo < hi, got ({lo}, {hi}); {valid}")
    return lo, hi


class HUWindow(Transform):
    """Clip Hounsfield units to ``[lo, hi]`` and map them linearly onto ``output_range``.

    ``y = out_lo + (clip(x, lo, hi) - lo) / (hi - lo) * (out_hi - out_lo)``; any shape in, same shape out
    (float32), MetaTensor metadata (affine, applied operations) kept.

    Args:
        window: preset name (``"kidney"`` -200..300 HU, ``"liver"`` -40..160 HU, HLFD paper), task name
            (``"kits"``/``"lits"``) or explicit ``(lo, hi)`` in HU.
        output_range: ``(out_lo, out_hi)``, default ``(0, 1)``; ``out_lo > out_hi`` is allowed (inverted map), equal
            values are not.

    Raises:
        ValueError: see :func:`resolve_window`; also for a degenerate ``output_range``.
    """

    def __init__(self, window: str | Sequence[float] = "kidney", output_range: Sequence[float] = (0.0, 1.0)) -> None:
        self.lo, self.hi = resolve_window(window)
        if len(output_range) != 2 or float(output_range[0]) == float(output_range[1]):
            raise ValueError(f"output_range must be two different numbers (out_lo, out_hi), got {tuple(output_range)!r}")
        self.out_lo, self.out_hi = float(output_range[0]), float(output_range[1])

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """Args: img: HU tensor, any shape (typically (C, H, W[, D])). Returns: windowed float32, same shape."""
        x = torch.as_tensor(img).to(torch.float32)
        x = (x.clamp(self.lo, self.hi) - self.lo) * ((self.out_hi - self.out_lo) / (self.hi - self.lo)) + self.out_lo
        if isinstance(img, MetaTensor) and not isinstance(x, MetaTensor):
            x = MetaTensor(x, meta=dict(img.meta), applied_operations=list(img.applied_operations))
        return x


class HUWindowd(MapTransform):
    """Dictionary wrapper of :class:`HUWindow` (apply to image keys only, never to labels).

    Args:
        keys: keys to window (default ``"image"``).
        window: preset name, task name or ``(lo, hi)``; see :class:`HUWindow`.
        output_range: target range, default ``(0, 1)``.
        allow_missing_keys: do not raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        window: str | Sequence[float] = "kidney",
        output_range: Sequence[float] = (0.0, 1.0),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.windower = HUWindow(window, output_range)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.windower(d[key])
        return d
