"""transforms: CT data transforms (HU windows, 2.5D slice stacking, sampling, augmentation), stage pipelines, and the
device-resident training paths (cached tensors, batched sampling and augmentation)."""

from __future__ import annotations

from transforms.augment import build_augmentation
from transforms.device_augment import BatchRotateFlip
from transforms.device_images import DeviceImageLoader, build_device_image_loader
from transforms.device_path import DATA_PATHS, DeviceSlabLoader, build_device_train_loader, resolve_data_path
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
    "DATA_PATHS",
    "resolve_data_path",
    "BatchRotateFlip",
    "DeviceSlabLoader",
    "build_device_train_loader",
    "DeviceImageLoader",
    "build_device_image_loader",
]
