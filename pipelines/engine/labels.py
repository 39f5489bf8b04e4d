"""What the label values of a ctdistill label map mean, for people and for viewers: names, colours, codes.

A label map holds 0 background, 1 organ, 2 tumor (the organ is the task's: KiTS -> kidney, LiTS -> liver; see
``transforms.window.TASK_WINDOWS``). This module is the one place that turns a task into

- names (``"kidney"``, ``"kidney tumor"``) for ``volumes.csv`` headers and DICOM-SEG segment labels,
- colours (the ones 3D Slicer's ``GenericAnatomyColors`` gives kidney / liver, and a tumor yellow),
- a color table written beside each label map (:func:`write_color_table`) that 3D Slicer reads.

Why a color table (``<case>.ctbl``) and not a ``.seg.nrrd``: the label map stays the NIfTI every other tool reads
(nnU-Net, ITK-SNAP, nibabel), and the sidecar is a few lines of text in the format of Slicer's own color tables
(``vtkMRMLColorTableStorageNode``: ``index name R G B A`` per line, ``#`` comments), which Slicer loads by
drag-and-drop as a color node; choosing it as the label map's lookup table (or as the color table when importing the
label map as a segmentation) names and colours each segment. A ``.seg.nrrd`` would duplicate every voxel in a
second format only Slicer reads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["ORGAN_OF_TASK", "LABEL_COLORS", "organ_of", "label_names", "color_table_text", "color_table_path", "write_color_table"]

#: the organ a task segments (its HU window preset has the same name, ``transforms.window.TASK_WINDOWS``)
ORGAN_OF_TASK: dict[str, str] = {"kits": "kidney", "lits": "liver"}
#: RGB (0-255) of label 1 by organ (3D Slicer GenericAnatomyColors: kidney, liver) and of the tumor label
LABEL_COLORS: dict[str, tuple[int, int, int]] = {"kidney": (185, 102, 83), "liver": (221, 130, 101), "tumor": (255, 215, 0)}


def organ_of(task: str) -> str:
    """The organ of a task (``"kits"`` -> ``"kidney"``).

    Args:
        task: a task name of :data:`ORGAN_OF_TASK`.

    Returns:
        the organ's name.

    Raises:
        ValueError: an unknown task, naming the valid ones.
    """
    key = str(task).lower()
    if key not in ORGAN_OF_TASK:
        raise ValueError(f"unknown task {task!r}: label names are defined for {sorted(ORGAN_OF_TASK)}")
    return ORGAN_OF_TASK[key]


def label_names(task: str, organ_label: int = 1, tumor_label: int = 2) -> dict[int, str]:
    """Names of the label values: ``{0: "background", 1: "kidney", 2: "kidney tumor"}`` for KiTS.

    Args:
        task: ``"kits"`` or ``"lits"``.
        organ_label: the organ's value.
        tumor_label: the tumor's value.

    Returns:
        value -> name, background first.
    """
    organ = organ_of(task)
    return {0: "background", int(organ_label): organ, int(tumor_label): f"{organ} tumor"}


def color_table_text(names: Mapping[int, str]) -> str:
    """A 3D Slicer color table (``.ctbl``): ``index name R G B A`` per label, names with ``_`` for spaces.

    Args:
        names: :func:`label_names`.

    Returns:
        the file's text.
    """
    lines = ["# Color table file (3D Slicer .ctbl): label value, name, R G B A", f"# Number of colors: {len(names)}"]
    for value, name in sorted(names.items()):
        if value == 0:
            rgba = (0, 0, 0, 0)
        else:
            rgb = LABEL_COLORS["tumor"] if name.endswith("tumor") else LABEL_COLORS.get(name, (128, 174, 128))
            rgba = (*rgb, 255)
        lines.append(f"{value} {name.replace(' ', '_')} {' '.join(str(v) for v in rgba)}")
    return "\n".join(lines) + "\n"


def color_table_path(label_map: str | os.PathLike) -> Path:
    """The color table beside a label map: ``case.nii.gz`` -> ``case.ctbl``."""
    p = Path(label_map)
    stem = p.name[: -len(".nii.gz")] if p.name.endswith(".nii.gz") else p.stem
    return p.with_name(f"{stem}.ctbl")


def write_color_table(label_map: str | os.PathLike, names: Mapping[int, str]) -> Path:
    """Write (atomically) the 3D Slicer color table beside a label map.

    Args:
        label_map: the label map file.
        names: :func:`label_names`.

    Returns:
        the color table path (:func:`color_table_path`).
    """
    from pipelines.engine.atomic import atomic_write_text

    target = color_table_path(label_map)
    atomic_write_text(target, color_table_text(names))
    return target
