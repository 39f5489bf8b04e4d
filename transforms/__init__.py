"""transforms: CT data transforms (HU windows, 2.5D slice stacking, sampling, augmentation) and stage pipelines."""

from __future__ import annotations

from transforms.augment import build_augmentation
from transforms.pipeline import DEFAULT_ROI_3D, STAGES, CacheBoundary, build_transforms
from transforms.sampling import build_class_indexer, build_sampler, class_ratios
from transforms.stack import VALID_NUM_SLICES, StackSlicesd, stack_slices
from transforms.window import TASK_WINDOWS, WINDOW_PRESETS, HUWindow, HUWindowd, resolve_window

__all__ = [
    "WINDOW_PRESETS",
    "TASK_WINDOWS",
    "resolve_window",
    "HUWindow",
    "HUWindowd",
    "VALID_NUM_SLICES",
    "StackSlicesd",
    "stack_slices",
    "build_sampler",
    "build_class_indexer",
    "class_ratios",
    "build_augmentation",
    "STAGES",
    "DEFAULT_ROI_3D",
    "CacheBoundary",
    "build_transforms",
]
