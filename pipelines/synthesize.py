"""Synthetic abdominal CT in the KiTS19 or LiTS layout: procedural cohorts, or CT built around REAL label maps.

One intensity model serves both sources. Everything is drawn in physical millimetres on a RAS grid (axial axis last):
air (-1000 HU), body outline with subcutaneous fat (~-100 HU), abdominal wall muscle (~50), visceral fat (~-90) and
bowel (~25) with gas pockets (-1000), spine (cortical shell 850, cancellous 450) and ribs (700), psoas (45), aorta and
IVC (180 / 140), liver (55-65), spleen (48), kidneys with enhancing cortex (150-200 HU) around medulla (70-110), and
heterogeneous, partly necrotic tumors (20-120 HU: base 45-110 in the kidney, 30-60 in the liver, smooth texture of
15 HU, necrotic core 15-30 HU and a +15 HU enhancing rim when larger than 15 mm), plus CT-like noise (sigma 10-20 HU).
Labels: 0 background, 1 organ (kidneys or liver), 2 tumor.

* Procedural (``--task kits|lits``): organs and 1-4 tumors (5 mm to several cm, some bulging at the organ boundary)
  are drawn too; the anisotropic grid has a slice spacing 1.5-2.5x the in-plane spacing. Every case has tumor voxels.
* From real labels (``--from-labels DIR``, KiTS19 only): the kidney and tumor voxels are exactly those of each label
  map (oriented to RAS by its affine, then resampled nearest-neighbour, see :func:`resample_labels_nearest`); the
  body, fat, muscle, spine, vessels, liver, spleen and bowel are placed around the kidneys (spine between them,
  kidneys in the posterior abdomen, the body grown where it must contain every labelled voxel), a perirenal fat rim
  surrounds them, the cortex/medulla split follows the depth below the kidney surface and the tumor's necrotic core
  its depth below the tumor surface.

Same seed, same files (byte for byte).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from pipelines.engine.atomic import TMP_MARKER, atomic_write_json, remove_new_files_on_error
from pipelines.engine.data import save_nifti

__all__ = [
    "TASKS",
    "LABELS",
    "HU_MODEL",
    "SyntheticCase",
    "synthesize_case",
    "synthesize",
    "find_label_files",
    "load_label_map",
    "resample_labels_nearest",
    "synthesize_case_from_labels",
    "synthesize_from_labels",
    "main",
]

logger = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("kits", "lits")
LABELS: dict[str, dict[str, int]] = {
    "kits": {"background": 0, "kidney": 1, "tumor": 2},
    "lits": {"background": 0, "liver": 1, "tumor": 2},
}
#: Hounsfield units of the intensity model (a range is drawn uniformly once per case, or once per organ / tumor).
HU_MODEL: dict[str, tuple[float, float]] = {
    "air": (-1000.0, -1000.0),
    "subcutaneous_fat": (-100.0, -100.0),  # + 10 HU smooth texture
    "visceral_fat": (-90.0, -90.0),
    "muscle": (45.0, 50.0),
    "bowel": (25.0, 25.0),
    "bone": (450.0, 850.0),
    "liver": (55.0, 65.0),  # + 6 HU smooth texture
    "spleen": (48.0, 48.0),
    "kidney_cortex": (150.0, 200.0),
    "kidney_medulla": (70.0, 110.0),
    "renal_sinus_fat": (-60.0, -60.0),
    "kidney_tumor_base": (45.0, 110.0),
    "liver_tumor_base": (30.0, 60.0),
    "tumor_necrosis": (15.0, 30.0),
    "tumor": (20.0, 120.0),  # every tumor voxel is clipped to this range (before noise)
    "noise_sigma": (10.0, 20.0),
}
_Z_EXTENT_MM = 240.0
#: Kidney voxels deeper than this normalised radius (1 at the surface, 0 at the deepest point) are medulla.
_MEDULLA_RADIUS = 0.72
#: Real labels: the kidneys' centroid is placed this far (mm) in front of the posterior wall of the abdominal cavity,
#: the first of these that needs the least growth of the body. The procedural model puts the kidney centres 25-35 mm
#: in front of the spine centre, itself 23 mm in front of the wall (48-58 mm); real kidneys are wider apart than the
#: procedural ones, and the elliptic cavity narrows posteriorly, so up to 70 mm is allowed.
_KIDNEY_TO_WALL_MM: tuple[float, ...] = tuple(np.arange(50.0, 70.1, 2.5).tolist())
#: Real labels: kidney centroid height in the procedural model's frame (kidneys span about z = -90..15 mm there).
_KIDNEY_Z_MM = -30.0
#: Real labels: half the distance between the kidneys assumed when only one kidney is labelled.
_KIDNEY_HALF_GAP_MM = 70.0
#: Real labels: largest normalised cavity radius allowed at a labelled voxel (the body grows to keep this margin).
_CAVITY_MARGIN = 0.95
_KITS_CASE = re.compile(r"^case_(\d+)$")
_LABEL_NAMES = ("segmentation.nii.gz", "segmentation.nii")
_CASE_FILES = ("imaging.nii.gz", "segmentation.nii.gz")


@dataclass
class SyntheticCase:
    """One synthetic case: HU image (X, Y, Z) int16, label (X, Y, Z) uint8, RAS affine and a description."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    info: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------------
# The intensity model, shared by the procedural and the real-label cases
# ----------------------------------------------------------------------------------------------------------------------


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], coarse: Sequence[int] = (6, 6, 4)) -> np.ndarray:
    """Smooth random field of roughly unit std on ``shape``: a coarse Gaussian grid blended by separable Gaussian
    kernels (infinitely smooth, and fast: three small matrix products instead of a spline zoom)."""
    grid = rng.standard_normal(tuple(coarse)).astype(np.float32)
    weights = []
    for n, c in zip(shape, coarse):
        pos = np.linspace(0.0, c - 1.0, n, dtype=np.float32)[:, None]
        w = np.exp(-0.5 * ((pos - np.arange(c, dtype=np.float32)[None, :]) / 0.6) ** 2)
        weights.append(w / w.sum(axis=1, keepdims=True))
    out = np.einsum("ia,jb,kc,abc->ijk", *weights, grid, optimize=True)
    return out / max(float(out.std()), 1e-6)


def _ellipsoid(coords: tuple[np.ndarray, ...], centre: Sequence[float], semi: Sequence[float]) -> np.ndarray:
    """Normalised ellipsoid radius (1 on the surface) at every voxel."""
    x, y, z = coords
    return np.sqrt(
        ((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + ((z - centre[2]) / semi[2]) ** 2
    )


def _unit_vector(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


@dataclass
class _Body:
    """Body outline: semi-axes ``a`` (left-right) and ``b`` (antero-posterior) in mm, subcutaneous fat thickness
    ``fat`` (mm), and ``wobble`` (X, Y, Z), a smooth factor near 1 that lets the outline breathe along z."""

    a: float
    b: float
    fat: float
    wobble: np.ndarray

    def cavity_semi_axes(self) -> tuple[float, float]:
        """Semi-axes (mm) of the abdominal cavity (inside the fat and the 12 mm muscle wall)."""
        return self.a - self.fat - 12, self.b - self.fat - 12


@dataclass
class _Abdomen:
    """What the organs placed afterwards need: the cavity and liver masks (X, Y, Z) bool, the spine centre and the
    liver ellipsoid."""

    cavity: np.ndarray
    liver: np.ndarray
    spine_c: tuple[float, float]
    liver_c: tuple[float, float, float]
    liver_s: tuple[float, float, float]


def _draw_body(rng: np.random.Generator, shape: Sequence[int]) -> _Body:
    """Draw the body outline (the first draws of every case)."""
    a_body, b_body = rng.uniform(150, 170), rng.uniform(115, 130)
    wobble = 1.0 + 0.03 * _smooth_field(rng, shape, (4, 4, 3))
    fat_t = rng.uniform(12, 25)
    return _Body(a=a_body, b=b_body, fat=fat_t, wobble=wobble)


def _paint_abdomen(hu: np.ndarray, coords: tuple[np.ndarray, ...], rng: np.random.Generator, body: _Body) -> _Abdomen:
    """Paint the abdomen around the kidneys into ``hu`` (X, Y, Z) float32, in place.

    Body (subcutaneous fat, muscle wall), visceral fat and bowel with gas, spine, psoas, ribs (z > 0), aorta and IVC,
    liver (patient's right = +x, upper abdomen) and spleen, in the anatomical frame of ``coords`` (mm; x, y, z
    broadcastable to ``hu.shape``; body centre at (0, -5), kidneys expected near z = -30).

    Args:
        hu: image to paint, (X, Y, Z) float32, air (-1000) outside the body.
        coords: x, y, z in mm (RAS), each broadcastable to ``hu.shape``.
        rng: random generator.
        body: outline from :func:`_draw_body`.

    Returns:
        :class:`_Abdomen`.
    """
    shape = hu.shape
    x, y, z = coords

    def field3(coarse: Sequence[int] = (6, 6, 4)) -> np.ndarray:
        return _smooth_field(rng, shape, coarse)

    a_body, b_body, fat_t, wobble = body.a, body.b, body.fat, body.wobble
    r_body = np.sqrt((x / a_body) ** 2 + ((y + 5) / b_body) ** 2) * wobble
    body_mask = r_body < 1.0
    inner_fat = np.sqrt((x / (a_body - fat_t)) ** 2 + ((y + 5) / (b_body - fat_t)) ** 2) * wobble < 1.0
    cavity = np.sqrt((x / (a_body - fat_t - 12)) ** 2 + ((y + 5) / (b_body - fat_t - 12)) ** 2) * wobble < 1.0
    hu[body_mask] = -100.0 + 10.0 * field3()[body_mask]
    hu[inner_fat & ~cavity] = 50.0
    # visceral fat mixed with bowel loops (soft tissue, fluid, gas)
    bowel_field = field3((10, 10, 6))
    hu[cavity] = np.where(bowel_field[cavity] > 0.3, 25.0, -90.0)
    gas = cavity & (field3((12, 12, 8)) > 1.5) & (y > -40)
    hu[gas] = -1000.0
    # spine (cortical shell >= 700, cancellous ~ 450) with psoas muscles; ribs in the upper half
    spine_c = (0.0, -(b_body - fat_t - 30))
    r_spine = np.sqrt((x - spine_c[0]) ** 2 + (y - spine_c[1]) ** 2)
    for side in (-1, 1):
        psoas = np.sqrt(((x - side * 35) / 18) ** 2 + ((y - spine_c[1] - 5) / 20) ** 2) < 1.0
        hu[psoas & cavity] = 45.0
    hu[np.broadcast_to(r_spine < 20, shape)] = 850.0  # the coordinates may be sparse (broadcast) grids
    hu[np.broadcast_to(r_spine < 16, shape)] = 450.0
    for angle in np.linspace(0.25 * np.pi, 0.75 * np.pi, 4):
        for side in (-1, 1):
            cx, cy = side * (a_body - fat_t - 8) * np.cos(angle), (b_body - fat_t - 8) * np.sin(angle) * 0.2 - 20
            rib = (np.sqrt((x - cx) ** 2 + (y - cy) ** 2) < 6) & (z > 0)
            hu[np.broadcast_to(rib, shape)] = 700.0
    # vessels
    hu[np.broadcast_to(np.sqrt((x + 12) ** 2 + (y - spine_c[1] - 30) ** 2) < 11, shape)] = 180.0
    hu[np.broadcast_to(np.sqrt((x - 22) ** 2 + (y - spine_c[1] - 30) ** 2) < 12, shape)] = 140.0

    # liver (patient's right = +x in RAS, anterior, upper abdomen) and spleen (left, posterior)
    liver_c = (rng.uniform(55, 75), rng.uniform(-5, 15), rng.uniform(30, 50))
    liver_s = (rng.uniform(70, 85), rng.uniform(65, 80), rng.uniform(70, 85))
    r_liver = _ellipsoid(coords, liver_c, liver_s) + 0.12 * field3((5, 5, 4))
    liver = (r_liver < 1.0) & cavity
    hu[liver] = rng.uniform(*HU_MODEL["liver"]) + 6.0 * field3()[liver]
    spleen = (_ellipsoid(coords, (-85, -35, 50), (30, 45, 45)) + 0.1 * field3((5, 5, 4)) < 1.0) & cavity
    hu[spleen] = HU_MODEL["spleen"][0]
    return _Abdomen(cavity=cavity, liver=liver, spine_c=spine_c, liver_c=liver_c, liver_s=liver_s)


def _paint_kidney(
    hu: np.ndarray,
    kidney: np.ndarray,
    medulla: np.ndarray,
    rng: np.random.Generator,
    sinus: np.ndarray | None = None,
) -> None:
    """Paint one kidney in place: enhancing cortex (150-200 HU) around the medulla (70-110 HU), optional sinus fat.

    Args:
        hu: image (X, Y, Z) float32.
        kidney, medulla, sinus: masks (X, Y, Z) bool; ``medulla`` and ``sinus`` lie inside ``kidney``.
        rng: random generator (draws the cortex value, then the medulla value).
    """
    hu[kidney] = rng.uniform(*HU_MODEL["kidney_cortex"])
    hu[medulla] = rng.uniform(*HU_MODEL["kidney_medulla"])
    if sinus is not None:
        hu[sinus] = HU_MODEL["renal_sinus_fat"][0]


def _tumor_hu(
    rng: np.random.Generator,
    task: str,
    shape: Sequence[int],
    radius: np.ndarray,
    diameter: float,
    mask: np.ndarray,
) -> np.ndarray:
    """HU of the tumor voxels: base value plus smooth texture; larger tumors get a necrotic core and enhancing rim.

    Args:
        rng: random generator.
        task: ``"kits"`` (base 45-110 HU) or ``"lits"`` (base 30-60 HU).
        shape: volume shape (X, Y, Z); the texture is a smooth field over the whole volume.
        radius: normalised radius (X, Y, Z) float: 0 at the tumor centre, 1 at its surface (read at ``mask`` only).
        diameter: tumor diameter in mm; above 15 mm the core (radius < 0.4-0.6) is necrotic (15-30 HU) and the rim
            (radius > 0.85) enhances by 15 HU.
        mask: tumor voxels (X, Y, Z) bool.

    Returns:
        (N,) float HU of the ``N = mask.sum()`` tumor voxels, clipped to 20-120 HU.
    """
    base = rng.uniform(*HU_MODEL["kidney_tumor_base"]) if task == "kits" else rng.uniform(*HU_MODEL["liver_tumor_base"])
    tex = _smooth_field(rng, shape, (10, 10, 8))[mask]
    r_t = radius[mask]
    values = base + 15.0 * tex
    if diameter > 15.0:  # necrotic core in larger tumors, enhancing rim
        core = r_t < rng.uniform(0.4, 0.6)
        values = np.where(core, rng.uniform(*HU_MODEL["tumor_necrosis"]) + 5.0 * tex, values)
        values = np.where(r_t > 0.85, values + 15.0, values)
    return np.clip(values, *HU_MODEL["tumor"])


def _add_noise(hu: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Add white Gaussian noise (sigma 10-20 HU) in place and quantise.

    Returns:
        ``(image, sigma)``: image (X, Y, Z) int16 HU clipped to [-1024, 3071], and the noise sigma.
    """
    sigma = rng.uniform(*HU_MODEL["noise_sigma"])
    hu += rng.normal(0.0, sigma, size=hu.shape).astype(np.float32)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), sigma


# ----------------------------------------------------------------------------------------------------------------------
# Procedural cases
# ----------------------------------------------------------------------------------------------------------------------


def synthesize_case(task: str, size: int, rng: np.random.Generator) -> SyntheticCase:
    """Draw one abdominal CT case.

    Args:
        task: ``"kits"`` (label 1 = kidneys) or ``"lits"`` (label 1 = liver); tumors in that organ.
        size: in-plane matrix (size x size); the slice count follows from a ~240 mm z extent.
        rng: random generator (the only source of randomness).

    Returns:
        :class:`SyntheticCase` with image (size, size, D) int16 HU, label uint8, affine (RAS, axcodes R,A,S).

    Raises:
        ValueError: unknown task or ``size < 32``.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if size < 32:
        raise ValueError(f"size must be >= 32 voxels, got {size}")
    fov = rng.uniform(380.0, 420.0)
    sxy = fov / size
    sz = sxy * rng.uniform(1.5, 2.5)
    depth = max(12, int(round(_Z_EXTENT_MM / sz)))
    shape = (size, size, depth)
    spacing = np.array([sxy, sxy, sz])
    origin = -(np.array(shape) - 1) / 2.0 * spacing
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    axes = [origin[i] + spacing[i] * np.arange(shape[i], dtype=np.float32) for i in range(3)]
    coords = tuple(np.meshgrid(*axes, indexing="ij", sparse=True))  # broadcast: same values as a dense grid
    x, y, z = coords

    def field3(coarse: Sequence[int] = (6, 6, 4)) -> np.ndarray:
        return _smooth_field(rng, shape, coarse)

    hu = np.full(shape, -1000.0, dtype=np.float32)
    abdomen = _paint_abdomen(hu, coords, rng, _draw_body(rng, shape))
    cavity, liver, spine_c = abdomen.cavity, abdomen.liver, abdomen.spine_c

    # kidneys: cortex (150-200 HU) around medulla, renal sinus fat at the hilum
    kidneys = np.zeros(shape, dtype=bool)
    kidney_geom = []
    for side in (-1, 1):
        centre = (
            side * rng.uniform(65, 75),
            spine_c[1] + rng.uniform(25, 35),
            rng.uniform(-45, -10) + (side > 0) * -10,
        )
        semi = (rng.uniform(24, 30), rng.uniform(20, 26), rng.uniform(45, 58))
        r_kidney = _ellipsoid(coords, centre, semi) + 0.05 * field3((5, 5, 4))
        kidney = (r_kidney < 1.0) & cavity
        medulla = kidney & (r_kidney < _MEDULLA_RADIUS)
        sinus = (
            medulla & (np.sign(centre[0]) * (x - centre[0]) < -0.35 * semi[0]) & (np.abs(z - centre[2]) < 0.3 * semi[2])
        )
        _paint_kidney(hu, kidney, medulla, rng, sinus)
        kidneys |= kidney
        kidney_geom.append((centre, semi))
    organ = kidneys if task == "kits" else liver
    organ_geom = kidney_geom if task == "kits" else [(abdomen.liver_c, abdomen.liver_s)]

    # tumors: the first one large enough to be seen at any matrix size, then 0-3 more from 5 mm to several cm
    label = np.zeros(shape, dtype=np.uint8)
    label[organ] = 1
    n_tumors = 1 + int(rng.integers(0, 2 if task == "kits" else 4))
    tumors = []
    min_first = max(20.0, 3.0 * float(spacing.max()))
    attempts = 0
    while len(tumors) < n_tumors and attempts < 50:
        attempts += 1
        first = not tumors
        # coarse grids (small matrices) need a larger first tumor: keep the draw range non-empty
        high = max(60.0, 1.25 * min_first)
        diameter = rng.uniform(min_first, high) if first else float(np.exp(rng.uniform(np.log(5.0), np.log(45.0))))
        centre, semi = organ_geom[int(rng.integers(len(organ_geom)))]
        boundary = bool(rng.random() < 0.4)
        depth_frac = rng.uniform(0.85, 1.0) if boundary else rng.uniform(0.0, 0.6)
        t_centre = np.asarray(centre) + depth_frac * np.asarray(semi) * _unit_vector(rng)
        t_semi = 0.5 * diameter * rng.uniform(0.8, 1.2, size=3)
        r_t = _ellipsoid(coords, t_centre, t_semi) + 0.15 * field3((8, 8, 6))
        allowed = cavity if task == "kits" else liver
        tumor = (r_t < 1.0) & allowed & (hu < 400)
        if not tumor.any():
            continue
        hu[tumor] = _tumor_hu(rng, task, shape, r_t, diameter, tumor)
        label[tumor] = 2
        tumors.append(
            {
                "diameter_mm": round(float(diameter), 1),
                "boundary": boundary,
                "voxels": int(tumor.sum()),
                "centre_mm": [round(float(c), 1) for c in t_centre],
            }
        )
    if not (label == 2).any():  # cannot happen with the minimum first diameter, but never ship a tumor-free case
        raise RuntimeError("synthetic case without tumor voxels; try another seed")

    image, sigma = _add_noise(hu, rng)
    info = {
        "shape": list(shape),
        "spacing_mm": [round(float(s), 4) for s in spacing],
        "noise_sigma_hu": round(float(sigma), 2),
        "tumors": tumors,
    }
    return SyntheticCase(image=image, label=label, affine=affine, info=info)


def _case_paths(task: str, out: Path, index: int) -> tuple[Path, Path]:
    if task == "kits":
        case = out / f"case_{index:05d}"
        return case / "imaging.nii.gz", case / "segmentation.nii.gz"
    return out / f"volume-{index}.nii", out / f"segmentation-{index}.nii"


def _free_mb(path: Path) -> str:
    """Free space on the disk holding ``path`` (its nearest existing folder), for a message."""
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f} MB free"
    except OSError:
        return "free space unknown"


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """A failed write of ``path`` (full disk, no permission, a file where a folder must be) becomes one clear line.

    Raises:
        OSError: same errno, message naming ``path``, the reason and the remedy.
    """
    try:
        yield
    except OSError as err:
        full = err.errno == errno.ENOSPC
        reason = f"the disk is full ({_free_mb(path)})" if full else (err.strerror or str(err))
        remedy = "free some space or choose another --out" if full else "choose an --out you can write to"
        raise OSError(
            err.errno,
            f"cannot write {path}: {reason}; every file and folder this run created is removed (what was there "
            f"before is kept): {remedy}, then run it again",
        ) from err


def _save_case(case: SyntheticCase, image_path: Path, label_path: Path) -> None:
    """Write a case's image (int16 HU) and label map (uint8), each atomically."""
    for data, path, dtype in ((case.image, image_path, np.int16), (case.label, label_path, np.uint8)):
        with _writing(path):
            save_nifti(data, case.affine, path, dtype=dtype)


def _write_json(out: Path, dataset: dict[str, Any]) -> Path:
    """Write ``out/dataset.json`` atomically (temporary file, then rename; removed when the write fails)."""
    path = out / "dataset.json"
    with _writing(path):
        atomic_write_json(path, dataset, indent=2)
    return path


def synthesize(task: str, cases: int, size: int, out: str | Path, seed: int = 0) -> Path:
    """Write a synthetic cohort and its nnU-Net style ``dataset.json``.

    Layouts: ``kits`` -> KiTS19 (``case_XXXXX/imaging.nii.gz`` int16 HU + ``segmentation.nii.gz``); ``lits`` -> LiTS
    (``volume-N.nii`` + ``segmentation-N.nii``). Case i uses the generator seeded by ``(seed, i)``, so the same seed
    gives identical files and a larger cohort extends a smaller one.

    Args:
        task: ``"kits"`` or ``"lits"``.
        cases: number of cases (>= 1).
        size: in-plane matrix size (>= 32).
        out: output folder (created; existing case files with the same names are replaced, nothing else touched).
        seed: random seed.

    Returns:
        Path of the written ``dataset.json``.

    Raises:
        ValueError: unknown task, ``cases < 1``, ``size < 32``, or ``out`` is an existing file.
        OSError: a file cannot be written (full disk, no permission): one line naming it; every file and folder this
            run created is removed first (no partial case, no temporary file), what was there before is kept.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if cases < 1:
        raise ValueError(f"cases must be >= 1, got {cases}")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    _refuse_foreign_content(out, task)
    with remove_new_files_on_error(out):  # a failed run leaves nothing it created (no partial case)
        return _synthesize_into(task, cases, size, out, seed)


def _refuse_foreign_content(out: Path, task: str) -> None:
    """Refuse a non-empty ``--out`` that is not an earlier procedural synthesize output (a real dataset, say).

    Accepted: a missing or empty folder, or one holding only a synthesize ``dataset.json`` (with its ``synthetic``
    section) and this task's case files (``case_XXXXX/{imaging,segmentation}.nii.gz`` or ``volume-N.nii`` /
    ``segmentation-N.nii``), which a re-run rewrites.

    Raises:
        ValueError: naming the folder and the first entries synthesize did not write.
    """
    if not out.is_dir():
        return
    entries = sorted(out.iterdir())
    if not entries:
        return
    lits = re.compile(r"^(volume|segmentation)-\d+\.nii$")

    def ours(entry: Path) -> bool:
        if entry.is_symlink():
            return False
        if entry.is_file() and (entry.name == "dataset.json" or _is_temp_of(entry.name, "dataset.json")):
            return True
        if task == "kits":
            return entry.is_dir() and _KITS_CASE.match(entry.name) is not None and all(
                f.is_file() and not f.is_symlink() and (f.name in _CASE_FILES or any(_is_temp_of(f.name, c) for c in _CASE_FILES))
                for f in entry.iterdir()
            )  # fmt: skip
        return entry.is_file() and (lits.match(entry.name) is not None or TMP_MARKER in entry.name)

    foreign = [e.name for e in entries if not ours(e)]
    if foreign or not _is_synthesize_json(out / "dataset.json"):
        what = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "") if foreign else "no synthesize dataset.json"
        raise ValueError(
            f"--out {out} is not empty and pipelines.synthesize did not create it ({what}); nothing is written there "
            "(its files would be overwritten or mixed with synthetic cases): give a new or empty folder"
        )


def _synthesize_into(task: str, cases: int, size: int, out: Path, seed: int) -> Path:
    """The cases and ``dataset.json`` of :func:`synthesize` (arguments already checked)."""
    training, details = [], {}
    for index in range(cases):
        case = synthesize_case(task, size, np.random.default_rng([int(seed), index]))
        image_path, label_path = _case_paths(task, out, index)
        _save_case(case, image_path, label_path)
        training.append(
            {"image": image_path.relative_to(out).as_posix(), "label": label_path.relative_to(out).as_posix()}
        )
        details[image_path.relative_to(out).as_posix()] = case.info
        logger.info("%s: shape %s, %d tumor(s)", image_path, case.info["shape"], len(case.info["tumors"]))
    dataset = {
        "name": f"synthetic_{task}",
        "description": f"procedural abdominal CT ({task}), ctdistill.pipelines.synthesize seed={seed} size={size}",
        "reference": "synthetic, no patient data",
        "licence": "CC0",
        "tensorImageSize": "3D",
        "channel_names": {"0": "CT"},
        "modality": {"0": "CT"},
        "labels": LABELS[task],
        "numTraining": cases,
        "numTest": 0,
        "file_ending": ".nii.gz" if task == "kits" else ".nii",
        "layout": "kits19" if task == "kits" else "lits",
        "training": training,
        "test": [],
        "synthetic": {"task": task, "seed": int(seed), "size": int(size), "cases": details},
    }
    return _write_json(out, dataset)


# ----------------------------------------------------------------------------------------------------------------------
# CT around real label maps
# ----------------------------------------------------------------------------------------------------------------------


def find_label_files(folder: str | Path) -> list[Path]:
    """Label maps of a folder, sorted: KiTS19 ``case_XXXXX/segmentation.nii.gz`` (or ``.nii``), else the ``.nii`` /
    ``.nii.gz`` files directly in the folder (sorted by the last number in the name, then the name).

    Args:
        folder: the label folder (read only).

    Returns:
        Paths of the label files (at least one).

    Raises:
        ValueError: the folder does not exist, is not a folder, or holds no label file.
    """
    folder = Path(folder)
    if not folder.exists():
        raise ValueError(
            f"--from-labels folder {folder} does not exist; give the folder of KiTS19 label maps "
            "(case_XXXXX/segmentation.nii.gz), e.g. ../shared/data/kits19_labels"
        )
    if not folder.is_dir():
        raise ValueError(f"--from-labels {folder} is not a folder; give the folder that holds the case_XXXXX folders")
    found = []
    for case in sorted(p for p in folder.iterdir() if p.is_dir() and _KITS_CASE.match(p.name)):
        label = next((case / name for name in _LABEL_NAMES if (case / name).is_file()), None)
        if label is not None:
            found.append(label)
    if found:
        return found

    def order(path: Path) -> tuple[int, str]:
        digits = re.findall(r"\d+", path.name)
        return (int(digits[-1]) if digits else -1, path.name)

    flat = [
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and (p.name.endswith(".nii.gz") or p.name.endswith(".nii"))
    ]
    if not flat:
        raise ValueError(
            f"no label files found in {folder}: expected KiTS19 case_XXXXX/segmentation.nii.gz (or .nii) files, or "
            ".nii/.nii.gz label maps directly in the folder"
        )
    return sorted(flat, key=order)


def _check_label_values(data: np.ndarray, path: Path) -> None:
    """Raise a ValueError naming ``path`` unless every voxel is 0, 1 or 2."""
    if data.size == 0:
        raise ValueError(f"{path}: empty label map (shape {data.shape})")
    kind = data.dtype.kind
    if kind == "b":
        return
    if kind in "iu":
        if int(data.min()) >= 0 and int(data.max()) <= 2:
            return
        bad = (data < 0) | (data > 2)
    elif kind == "f":
        ok = np.isfinite(data) & (data >= 0) & (data <= 2)
        ok &= data == np.floor(np.where(ok, data, 0))
        if ok.all():
            return
        bad = ~ok
    else:
        raise ValueError(f"{path}: label map of dtype {data.dtype}; expected integers 0, 1, 2")
    values = np.unique(data[bad])
    shown = ", ".join(str(v) for v in values[:8].tolist()) + (", ..." if values.size > 8 else "")
    raise ValueError(
        f"{path}: label values outside {{0, 1, 2}}: {shown} ({int(bad.sum())} voxels); KiTS19 labels are "
        "0 background, 1 kidney, 2 tumor: remap the other values before synthesizing"
    )


def load_label_map(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read a 3D label map and orient it to RAS by its affine (never by array index).

    KiTS19 files store the axial axis first (axcodes I,P,L); this returns the voxels in R,A,S order with the matching
    affine, exactly what ``nibabel.as_closest_canonical`` gives (axes permuted and flipped, no interpolation).

    Args:
        path: ``.nii`` / ``.nii.gz`` label map with values 0 background, 1 kidney, 2 tumor.

    Returns:
        ``(label, affine, info)``: label (X, Y, Z) in R,A,S voxel order (the file's dtype, possibly a view),
        its 4x4 affine, and ``info`` (source shape, zooms, axcodes).

    Raises:
        ValueError: unreadable file, not a 3D array (2D, 4D, ...), or values outside {0, 1, 2}.
    """
    path = Path(path)
    try:
        image = nib.load(str(path))
        shape = tuple(int(n) for n in image.shape)
        if len(shape) != 3:
            raise ValueError(
                f"{path}: label map has {len(shape)} dimensions (shape {shape}); expected one 3D volume (X, Y, Z) "
                "per case with labels 0 background, 1 kidney, 2 tumor"
            )
        data = np.asanyarray(image.dataobj)
    except ValueError:
        raise
    except Exception as err:  # nibabel raises many types for damaged or foreign files
        raise ValueError(f"{path}: cannot read it as a NIfTI label map ({type(err).__name__}: {err})") from err
    _check_label_values(data, path)
    ornt = nib.io_orientation(image.affine)
    label = nib.orientations.apply_orientation(data, ornt)
    affine = image.affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    info = {
        "shape": list(shape),
        "zooms_mm": [round(float(s), 4) for s in np.linalg.norm(image.affine[:3, :3], axis=0)],
        "axcodes": "".join(nib.aff2axcodes(image.affine)),
    }
    return label, affine, info


def resample_labels_nearest(
    label: np.ndarray, affine: np.ndarray, size: int | None = None, z_spacing: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour resampling of a RAS label map onto a coarser or finer grid covering the same volume.

    In-plane (axes 0, 1) the grid becomes ``size x size`` with the same field of view (edges aligned: spacing
    ``n * spacing / size``); along z the spacing becomes ``z_spacing`` with ``round(extent / z_spacing)`` slices centred
    on the original extent. Each output voxel takes the value of the input voxel that contains its centre (a centre
    exactly on a voxel border takes the voxel of higher index); the returned affine places every output voxel where
    it was sampled, so world coordinates are preserved. ``size=None`` / ``z_spacing=None`` keep that axis as it is.

    Args:
        label: (X, Y, Z) label map in R,A,S voxel order (see :func:`load_label_map`).
        affine: its 4x4 affine.
        size: in-plane matrix of the output (>= 1), or None.
        z_spacing: output slice spacing in mm (> 0), or None.

    Returns:
        ``(label, affine)``: (size, size, D) uint8 array and its 4x4 affine.

    Raises:
        ValueError: ``label`` not 3D, ``size < 1`` or ``z_spacing <= 0``.
    """
    if label.ndim != 3:
        raise ValueError(f"label must be 3D (X, Y, Z), got shape {label.shape}")
    if size is not None and int(size) < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if z_spacing is not None and not (math.isfinite(z_spacing) and z_spacing > 0):
        raise ValueError(f"z_spacing must be a positive number of mm, got {z_spacing}")
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    n_in = label.shape
    n_out, ratio = list(n_in), [1.0, 1.0, 1.0]
    if size is not None:
        for axis in (0, 1):
            n_out[axis], ratio[axis] = int(size), n_in[axis] / int(size)
    if z_spacing is not None:
        n_out[2] = max(1, int(round(n_in[2] * spacing[2] / z_spacing)))
        ratio[2] = float(z_spacing) / spacing[2]
    index, shift = [], []
    for axis in range(3):
        # output voxel j has its centre at input edge coordinate pos (input voxel i spans [i, i + 1))
        pos = n_in[axis] / 2.0 + (np.arange(n_out[axis]) - (n_out[axis] - 1) / 2.0) * ratio[axis]
        index.append(np.clip(np.floor(pos).astype(np.int64), 0, n_in[axis] - 1))
        shift.append(n_in[axis] / 2.0 - 0.5 - (n_out[axis] - 1) / 2.0 * ratio[axis])  # centre index of voxel 0
    out = np.ascontiguousarray(label[np.ix_(*index)]).astype(np.uint8)
    scale = np.eye(4)
    scale[:3, :3] = np.diag(ratio)
    scale[:3, 3] = shift
    return out, affine @ scale


def _distance_inside(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Exact Euclidean distance (mm) from each True voxel to the nearest False voxel (0 on False voxels).

    Separable squared-distance transform (one brute-force minimum per axis, in chunks); meant for the cropped
    neighbourhood of the kidneys (a few hundred thousand voxels). Voxels outside the array count as True, so pad the
    mask with False where the border must count as outside.

    Args:
        mask: (X, Y, Z) bool.
        spacing: voxel size (mm) per axis.

    Returns:
        (X, Y, Z) float64 distances; ``inf`` where there is no False voxel at all.
    """
    dist = np.where(mask, np.inf, 0.0)
    for axis in range(mask.ndim):
        n = dist.shape[axis]
        if n == 1:
            continue
        moved = np.moveaxis(dist, axis, -1)
        lines = moved.reshape(-1, n)
        steps = np.arange(n, dtype=np.float64) * float(spacing[axis])
        penalty = (steps[:, None] - steps[None, :]) ** 2  # (i, j): (s (i - j))^2
        out = np.empty_like(lines)
        chunk = max(1, 4_000_000 // (n * n))
        for start in range(0, lines.shape[0], chunk):
            out[start : start + chunk] = (lines[start : start + chunk, None, :] + penalty[None]).min(axis=2)
        dist = np.moveaxis(out.reshape(moved.shape), -1, axis)
    return np.sqrt(dist)


def _bbox(mask: np.ndarray, pad: Sequence[int]) -> tuple[slice, ...]:
    """Bounding box of ``mask`` grown by ``pad`` voxels per axis (clipped to the array)."""
    box = []
    for axis in range(mask.ndim):
        hit = np.nonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))[0]
        box.append(slice(max(0, int(hit[0]) - pad[axis]), min(mask.shape[axis], int(hit[-1]) + 1 + pad[axis])))
    return tuple(box)


def _crop_distance(mask: np.ndarray, spacing: np.ndarray, outside: bool, reach_mm: float = 0.0) -> np.ndarray:
    """Distance map (mm) over the whole volume computed on the padded bounding box of ``mask`` (inf elsewhere).

    ``outside=False``: depth of every ``mask`` voxel below the mask surface (the volume border counts as outside).
    ``outside=True``: distance of every other voxel to the mask, within ``reach_mm`` of it (inf beyond).
    """
    pad = [int(math.ceil(reach_mm / s)) + 1 for s in spacing]
    box = _bbox(mask, pad)
    full = np.full(mask.shape, np.inf)
    padded = np.pad(mask[box], 1, constant_values=False)
    dist = _distance_inside(~padded if outside else padded, spacing)[1:-1, 1:-1, 1:-1]
    full[box] = dist
    return full


def _normalised_radius(depth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Depth (X, Y, Z) mm mapped to a normalised radius like the procedural ellipsoids': 1 on the outermost voxel
    layer of ``mask``, 0 at its deepest voxel (meaningful inside ``mask`` only)."""
    inside = depth[mask]
    shallow, deep = float(inside.min()), float(inside.max())
    return 1.0 - (depth - shallow) / max(deep - shallow, 1e-6)


def _kidney_anchor(label: np.ndarray, spacing: np.ndarray) -> tuple[float, float, float, int]:
    """Grid position (mm from voxel 0 along each axis) of the kidneys' midline, mean y and mean z, and how many
    kidneys were found (2 when the labelled voxels form two clusters along x at least 60 mm apart)."""
    idx = np.nonzero(label > 0)
    if idx[0].size == 0:
        centre = (np.array(label.shape) - 1) / 2.0 * spacing
        return float(centre[0]), float(centre[1]) - 40.0, float(centre[2]), 0
    xs = idx[0] * spacing[0]
    lo, hi = float(xs.min()), float(xs.max())
    for _ in range(25):  # two-means along x
        split = 0.5 * (lo + hi)
        left = xs < split
        if left.all() or not left.any():
            break
        new_lo, new_hi = float(xs[left].mean()), float(xs[~left].mean())
        if (new_lo, new_hi) == (lo, hi):
            break
        lo, hi = new_lo, new_hi
    y0, z0 = float((idx[1] * spacing[1]).mean()), float((idx[2] * spacing[2]).mean())
    if hi - lo >= 60.0:
        return 0.5 * (lo + hi), y0, z0, 2
    mean_x = float(xs.mean())
    side = 1.0 if mean_x >= (label.shape[0] - 1) / 2.0 * spacing[0] else -1.0  # +x = patient's right in RAS
    return mean_x - side * _KIDNEY_HALF_GAP_MM, y0, z0, 1


def synthesize_case_from_labels(label: np.ndarray, affine: np.ndarray, rng: np.random.Generator) -> SyntheticCase:
    """Build a CT-like image around a real KiTS19 label map, with the intensity model of :func:`synthesize_case`.

    The kidney (1) and tumor (2) voxels are painted exactly where the label has them; the abdomen is placed around
    them in the grid's own frame (mm along the R, A, S array axes): spine on the kidneys' midline, kidneys 50-70 mm
    in front of the posterior cavity wall (whichever fits best) and at the model's kidney height, body grown (never
    shrunk) until every labelled voxel lies inside the abdominal cavity (normalised cavity radius <= 0.95),
    perirenal fat (3-8 mm, at least one voxel) around the kidneys (and in the unlabelled renal sinus). Cortex
    (150-200 HU) and medulla (70-110 HU) are drawn per side: the depth below the kidney surface is normalised like
    the procedural ellipsoid radius (1 on the outermost voxel layer, 0 at the deepest voxel) and the medulla is where
    it is below 0.72. All tumor voxels form one tumor (one draw) whose
    necrotic core (> 15 mm equivalent diameter) and enhancing rim follow the same normalised depth below its surface.

    Args:
        label: (X, Y, Z) integer array with values in {0, 1, 2}, R,A,S voxel order (see :func:`load_label_map`).
        affine: its 4x4 affine (axcodes R,A,S).
        rng: random generator (the only source of randomness).

    Returns:
        :class:`SyntheticCase` with image (X, Y, Z) int16 HU, the label as uint8 (same values) and the same affine.

    Raises:
        ValueError: ``label`` not 3D, values outside {0, 1, 2}, affine not 4x4 or not R,A,S.
    """
    label = np.asarray(label)
    if label.ndim != 3:
        raise ValueError(f"label must be a 3D (X, Y, Z) array, got shape {label.shape}")
    _check_label_values(label, Path("label array"))
    label = label.astype(np.uint8)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    codes = nib.aff2axcodes(affine)
    if codes != ("R", "A", "S"):
        raise ValueError(
            f"label must be in R,A,S voxel order, got axcodes {','.join(codes)}; orient it with load_label_map"
        )
    shape = label.shape
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    grid = [spacing[i] * np.arange(shape[i], dtype=np.float64) for i in range(3)]  # mm from voxel 0 along each axis
    x_mid, y_kidney, z_kidney, n_kidneys = _kidney_anchor(label, spacing)

    body = _draw_body(rng, shape)
    # frame of the procedural model: spine at x = 0, kidneys 50-70 mm in front of the posterior cavity wall, z = -30
    a_c, b_c = body.cavity_semi_axes()
    z_off = z_kidney - _KIDNEY_Z_MM
    fg = label > 0
    idx = np.nonzero(fg)
    grown, to_wall, y_off = 1.0, _KIDNEY_TO_WALL_MM[0], y_kidney - (-5.0 - b_c + _KIDNEY_TO_WALL_MM[0])
    if idx[0].size:
        x_term = ((grid[0][idx[0]] - x_mid) / a_c) ** 2
        wobble = body.wobble[idx]
        worst = math.inf
        for candidate in _KIDNEY_TO_WALL_MM:
            offset = y_kidney - (-5.0 - b_c + candidate)
            r_c = float((np.sqrt(x_term + ((grid[1][idx[1]] - offset + 5.0) / b_c) ** 2) * wobble).max())
            if r_c < worst - 1e-9:
                worst, to_wall, y_off = r_c, candidate, offset
        if worst > _CAVITY_MARGIN:  # grow the cavity (and the body around it) about the body centre
            grown = worst / _CAVITY_MARGIN
            body.a = float(a_c * grown + body.fat + 12)
            body.b = float(b_c * grown + body.fat + 12)
    coords = (
        (grid[0] - x_mid)[:, None, None],
        (grid[1] - y_off)[None, :, None],
        (grid[2] - z_off)[None, None, :],
    )
    hu = np.full(shape, HU_MODEL["air"][0], dtype=np.float32)
    abdomen = _paint_abdomen(hu, coords, rng, body)

    rim_mm = max(float(rng.uniform(3.0, 8.0)), float(spacing[:2].min()))
    kidney, tumor = label == 1, label == 2
    tumors = []
    if idx[0].size:
        near = _crop_distance(fg, spacing, outside=True, reach_mm=rim_mm) <= rim_mm
        hu[near & ~fg & abdomen.cavity] = HU_MODEL["visceral_fat"][0]
        depth = _crop_distance(fg, spacing, outside=False)
        right = coords[0] >= 0  # patient's right (+x)
        for side_mask in (~right, right):
            side = kidney & side_mask
            if side.any():
                radius = _normalised_radius(depth, side)
                _paint_kidney(hu, side, side & (radius < _MEDULLA_RADIUS), rng)
    if tumor.any():
        t_depth = _crop_distance(tumor, spacing, outside=False)
        radius = np.where(tumor, _normalised_radius(t_depth, tumor), 1.0)
        volume_mm3 = float(tumor.sum()) * float(np.prod(spacing))
        diameter = (6.0 * volume_mm3 / math.pi) ** (1.0 / 3.0)
        hu[tumor] = _tumor_hu(rng, "kits", shape, radius, diameter, tumor)
        tumors.append({"equivalent_diameter_mm": round(diameter, 1), "voxels": int(tumor.sum())})
    else:
        logger.warning("label map without tumor voxels (after resampling): the case holds kidney only")

    image, sigma = _add_noise(hu, rng)
    info = {
        "shape": list(shape),
        "spacing_mm": [round(float(s), 4) for s in spacing],
        "noise_sigma_hu": round(float(sigma), 2),
        "kidneys_found": n_kidneys,
        "kidney_voxels": int(kidney.sum()),
        "kidneys_to_wall_mm": to_wall,
        "body_grown": round(grown, 3),
        "perirenal_fat_mm": round(rim_mm, 2),
        "tumors": tumors,
    }
    return SyntheticCase(image=image, label=label, affine=affine, info=info)


def _output_name(path: Path, index: int) -> str:
    """KiTS19 case folder name of the i-th label file: its own ``case_XXXXX`` folder name, else ``case_{i:05d}``."""
    parent = path.parent.name
    return parent if _KITS_CASE.match(parent) and path.name in _LABEL_NAMES else f"case_{index:05d}"


def _is_synthesize_json(path: Path) -> bool:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("synthetic"), dict)


def _is_temp_of(name: str, target: str) -> bool:
    """Whether ``name`` is the temporary file of a killed atomic write of ``target`` (``.<target>.<random>.tmp...``)."""
    return name.startswith(f".{target}.") and TMP_MARKER in name


def _check_out_folder(out: Path, labels: Path, names: Sequence[str]) -> None:
    """Refuse an output folder inside the label folder, a file, or a folder with content synthesize did not write.

    Accepted: a missing or empty folder, or an earlier synthesize output (``dataset.json`` with a ``synthetic``
    section, case folders holding only ``imaging.nii.gz`` / ``segmentation.nii.gz``) whose cases this run rewrites.
    """
    out_r, labels_r = out.resolve(), labels.resolve()
    if out_r == labels_r or labels_r in out_r.parents:
        raise ValueError(
            f"--out {out} is inside the label folder {labels}; the label folder is never written to: "
            "choose an output folder outside it"
        )
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if not out.exists():
        return
    foreign, stale, cases_seen = [], [], False
    wanted = set(names)
    for entry in sorted(out.iterdir()):
        if entry.is_file() and (entry.name == "dataset.json" or _is_temp_of(entry.name, "dataset.json")):
            continue
        ours = (
            entry.is_dir()
            and not entry.is_symlink()
            and _KITS_CASE.match(entry.name) is not None
            and all(
                f.is_file() and (f.name in _CASE_FILES or any(_is_temp_of(f.name, c) for c in _CASE_FILES))
                for f in entry.iterdir()
            )
        )
        if not ours:
            foreign.append(entry.name)
            continue
        cases_seen = True
        if entry.name not in wanted:
            stale.append(entry.name)
    meta = out / "dataset.json"
    if foreign or ((cases_seen or meta.exists()) and not _is_synthesize_json(meta)):
        what = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "") if foreign else "case folders"
        raise ValueError(
            f"--out {out} already holds content that pipelines.synthesize did not write ({what}"
            f"{'' if _is_synthesize_json(meta) else '; no synthesize dataset.json'}); give a new or empty folder"
        )
    if stale:
        raise ValueError(
            f"--out {out} holds {len(stale)} case folder(s) from an earlier synthesize run that this run does not "
            f"rewrite ({', '.join(stale[:5])}{', ...' if len(stale) > 5 else ''}); they would mix into the dataset: "
            "delete them or give a new folder"
        )


def _licence_line(labels: Path) -> str:
    licence = labels / "DATA_LICENSE.txt"
    if licence.is_file():
        first = next((line.strip() for line in licence.read_text(errors="replace").splitlines() if line.strip()), "")
        if first:
            return f"labels: {first} (see DATA_LICENSE.txt of the label folder); synthetic images: CC0"
    return "labels: the licence of the source label maps; synthetic images: CC0"


def synthesize_from_labels(
    labels: str | Path,
    out: str | Path,
    cases: int | None = None,
    size: int | None = None,
    z_spacing: float | None = 3.0,
    seed: int = 0,
) -> Path:
    """Write a KiTS19-layout cohort of synthetic CT built around real label maps, with its ``dataset.json``.

    Each label file (see :func:`find_label_files`) is oriented to RAS by its affine (:func:`load_label_map`),
    resampled nearest-neighbour (:func:`resample_labels_nearest`) and written unchanged as
    ``case_XXXXX/segmentation.nii.gz`` (uint8) beside ``imaging.nii.gz`` (int16 HU, same affine) from
    :func:`synthesize_case_from_labels`. KiTS19 case folders keep their name; flat label files become ``case_{i:05d}``.
    Case ``case_N`` uses the generator seeded by ``(seed, N, 1)``: same seed, same bytes, and a larger cohort
    extends a smaller one. The label folder is only read.

    Args:
        labels: folder of label maps (0 background, 1 kidney, 2 tumor).
        out: output folder: new, empty, or an earlier synthesize output whose case folders this run rewrites.
        cases: use the first ``cases`` label files (sorted), or all of them (None).
        size: in-plane matrix of the output (>= 32), or None to keep the source matrix.
        z_spacing: output slice spacing in mm, or None / 0 to keep the source slices.
        seed: random seed.

    Returns:
        Path of the written ``dataset.json``.

    Raises:
        ValueError: missing label folder or no label file in it, ``cases`` < 1 or more than the files found,
            ``size < 32``, negative ``z_spacing``, a label map that is not 3D or holds values outside {0, 1, 2},
            ``out`` inside the label folder, or ``out`` holding content synthesize did not write.
        OSError: a file cannot be written (full disk, no permission): one line naming it; every file and folder this
            run created is removed first, what was there before is kept.
    """
    labels, out = Path(labels), Path(out)
    files = find_label_files(labels)
    if cases is not None:
        if int(cases) < 1:
            raise ValueError(f"cases must be >= 1, got {cases}")
        if int(cases) > len(files):
            raise ValueError(
                f"cases={cases} but only {len(files)} label files in {labels}; ask for at most {len(files)}"
            )
        files = files[: int(cases)]
    if size is not None and int(size) < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    if z_spacing is not None and not (math.isfinite(z_spacing) and z_spacing >= 0):
        raise ValueError(f"z_spacing must be >= 0 mm (0: keep the source slices), got {z_spacing}")
    z_spacing = float(z_spacing) if z_spacing else None
    for path in files:  # cheap header checks first: a 2D/4D file fails before anything is written
        try:
            ndim = len(nib.load(str(path)).shape)
        except Exception as err:  # nibabel raises many types for damaged or foreign files
            raise ValueError(f"{path}: cannot read it as a NIfTI label map ({type(err).__name__}: {err})") from err
        if ndim != 3:
            load_label_map(path)  # raises the dimension error
    names = [_output_name(path, index) for index, path in enumerate(files)]
    if len(set(names)) != len(names):
        raise ValueError(f"label files of {labels} map to duplicate case names {names}")
    _check_out_folder(out, labels, names)

    settings = {
        "task": "kits",
        "seed": int(seed),
        "size": None if size is None else int(size),
        "z_spacing_mm": z_spacing,
        "from_labels": str(labels.resolve()),
    }
    dataset: dict[str, Any] = {
        "name": "synthetic_kits_from_labels",
        "description": (
            f"real label maps ({labels.name}) with procedural abdominal CT intensities, ctdistill.pipelines.synthesize "
            f"--from-labels seed={seed} size={size if size is not None else 'source'} "
            f"z_spacing={z_spacing if z_spacing is not None else 'source'}"
        ),
        "reference": "labels: real label maps (nearest-neighbour resampled, values unchanged); images: synthetic",
        "licence": _licence_line(labels),
        "tensorImageSize": "3D",
        "channel_names": {"0": "CT"},
        "modality": {"0": "CT"},
        "labels": LABELS["kits"],
        "numTraining": 0,
        "numTest": 0,
        "file_ending": ".nii.gz",
        "layout": "kits19",
        "training": [],
        "test": [],
        "synthetic": {**settings, "in_progress": True, "cases": {}},
    }
    with remove_new_files_on_error(out):  # a failed run leaves nothing it created (no partial case)
        return _synthesize_from_labels_into(files, names, labels, out, size, z_spacing, seed, dataset, settings)


def _synthesize_from_labels_into(
    files: Sequence[Path],
    names: Sequence[str],
    labels: Path,
    out: Path,
    size: int | None,
    z_spacing: float | None,
    seed: int,
    dataset: dict[str, Any],
    settings: dict[str, Any],
) -> Path:
    """The cases and ``dataset.json`` of :func:`synthesize_from_labels` (arguments and ``out`` already checked)."""
    training, details = [], {}
    for path, name in zip(files, names):
        start = time.perf_counter()
        source, source_affine, source_info = load_label_map(path)
        if not training and not _is_synthesize_json(out / "dataset.json"):
            _write_json(out, dataset)  # mark the folder as synthesize output before the first case (a rerun accepts it)
        label, affine = resample_labels_nearest(source, source_affine, size, z_spacing)
        del source
        case_number = int(name.split("_")[1])
        case = synthesize_case_from_labels(label, affine, np.random.default_rng([int(seed), case_number, 1]))
        image_path, label_path = out / name / "imaging.nii.gz", out / name / "segmentation.nii.gz"
        _save_case(case, image_path, label_path)
        rel = image_path.relative_to(out).as_posix()
        training.append({"image": rel, "label": label_path.relative_to(out).as_posix()})
        details[rel] = {
            "source": path.relative_to(labels).as_posix(),
            "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "source_shape": source_info["shape"],
            "source_zooms_mm": source_info["zooms_mm"],
            "source_axcodes": source_info["axcodes"],
            **case.info,
        }
        logger.info(
            "%s <- %s: shape %s, %d tumor voxels, %.1f s",
            image_path,
            path,
            case.info["shape"],
            sum(t["voxels"] for t in case.info["tumors"]),
            time.perf_counter() - start,
        )
    dataset.update(numTraining=len(training), training=training, synthetic={**settings, "cases": details})
    return _write_json(out, dataset)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI.

    ``python -m pipelines.synthesize --task kits|lits --cases N --size S --out DIR --seed K`` (procedural), or
    ``python -m pipelines.synthesize --from-labels DIR --out DIR [--cases N] [--size S] [--z-spacing MM] [--seed K]``
    (CT around real KiTS19 label maps).
    """
    parser = argparse.ArgumentParser(prog="ctdistill-synthesize", description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=TASKS, default=None, help="kits: kidney + tumor; lits: liver + tumor")
    parser.add_argument(
        "--from-labels",
        metavar="DIR",
        default=None,
        help="build CT around the real label maps of DIR (KiTS19 case_XXXXX/segmentation.nii.gz; read only)",
    )
    parser.add_argument("--cases", type=int, default=None, help="number of cases (default 4; --from-labels: all)")
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help="in-plane matrix size (default 96, slices from ~240 mm; --from-labels: the source matrix, nearest)",
    )
    parser.add_argument(
        "--z-spacing",
        type=float,
        default=3.0,
        metavar="MM",
        help="--from-labels only: output slice spacing in mm, nearest neighbour (default 3; 0 keeps the source)",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        if args.from_labels is not None:
            if args.task not in (None, "kits"):
                raise ValueError(
                    f"--from-labels builds KiTS19 (kidney + tumor) cases; --task {args.task} is not supported"
                )
            path = synthesize_from_labels(args.from_labels, args.out, args.cases, args.size, args.z_spacing, args.seed)
            count = json.loads(path.read_text())["numTraining"]
            what = f"{count} kits cases from the labels of {args.from_labels}"
            what += f" (size {args.size or 'source'}, z {args.z_spacing or 'source'} mm)"
        else:
            task = args.task or "kits"
            cases = 4 if args.cases is None else args.cases
            size = 96 if args.size is None else args.size
            path = synthesize(task, cases, size, args.out, args.seed)
            what = f"{cases} {task} cases (size {size})"
    except ValueError as err:
        parser.error(str(err))
    except OSError as err:  # a full disk, no permission: the message names the file; nothing partial is left
        parser.exit(1, f"{parser.prog}: error: {err.strerror if err.filename is None and err.strerror else err}\n")
    print(f"wrote {what} and {path} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
