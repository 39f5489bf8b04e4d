"""Procedural abdominal CT cohort (KiTS19 or LiTS layout): the default data for the demo and the tests.

Each case is drawn in physical millimetres (RAS, origin at the volume centre, axial axis last) then sampled on an
anisotropic grid (slice spacing 1.5-2.5x the in-plane spacing): air, body outline with subcutaneous fat (~-100 HU),
abdominal wall muscle (~50), visceral fat and bowel with gas pockets (~-1000), spine and ribs (>= 400), aorta/IVC,
liver (~60), spleen, kidneys with enhancing cortex (150-200 HU) and medulla, and 1-4 heterogeneous, partly necrotic
tumors (20-120 HU, 5 mm to several cm across, some bulging at the organ boundary) in the kidney (``kits``) or the
liver (``lits``), plus CT-like noise (sigma 10-20 HU). Labels: 0 background, 1 organ (kidneys or liver), 2 tumor.
Every case has tumor voxels. Same seed, same files.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.data import save_nifti

__all__ = ["TASKS", "LABELS", "SyntheticCase", "synthesize_case", "synthesize", "main"]

logger = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("kits", "lits")
LABELS: dict[str, dict[str, int]] = {
    "kits": {"background": 0, "kidney": 1, "tumor": 2},
    "lits": {"background": 0, "liver": 1, "tumor": 2},
}
_Z_EXTENT_MM = 240.0


@dataclass
class SyntheticCase:
    """One synthetic case: HU image (X, Y, Z) int16, label (X, Y, Z) uint8, RAS affine and a description."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    info: dict = field(default_factory=dict)


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
    coords = tuple(np.meshgrid(*axes, indexing="ij"))
    x, y, z = coords

    def field3(coarse: Sequence[int] = (6, 6, 4)) -> np.ndarray:
        return _smooth_field(rng, shape, coarse)

    hu = np.full(shape, -1000.0, dtype=np.float32)
    # body outline: an ellipse that breathes slightly along z; fat, muscle wall, cavity
    a_body, b_body = rng.uniform(150, 170), rng.uniform(115, 130)
    wobble = 1.0 + 0.03 * field3((4, 4, 3))
    r_body = np.sqrt((x / a_body) ** 2 + ((y + 5) / b_body) ** 2) * wobble
    body = r_body < 1.0
    fat_t = rng.uniform(12, 25)
    inner_fat = np.sqrt((x / (a_body - fat_t)) ** 2 + ((y + 5) / (b_body - fat_t)) ** 2) * wobble < 1.0
    cavity = np.sqrt((x / (a_body - fat_t - 12)) ** 2 + ((y + 5) / (b_body - fat_t - 12)) ** 2) * wobble < 1.0
    hu[body] = -100.0 + 10.0 * field3()[body]
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
    hu[r_spine < 20] = 850.0
    hu[r_spine < 16] = 450.0
    for angle in np.linspace(0.25 * np.pi, 0.75 * np.pi, 4):
        for side in (-1, 1):
            cx, cy = side * (a_body - fat_t - 8) * np.cos(angle), (b_body - fat_t - 8) * np.sin(angle) * 0.2 - 20
            rib = (np.sqrt((x - cx) ** 2 + (y - cy) ** 2) < 6) & (z > 0)
            hu[rib] = 700.0
    # vessels
    hu[np.sqrt((x + 12) ** 2 + (y - spine_c[1] - 30) ** 2) < 11] = 180.0
    hu[np.sqrt((x - 22) ** 2 + (y - spine_c[1] - 30) ** 2) < 12] = 140.0

    # liver (patient's right = +x in RAS, anterior, upper abdomen) and spleen (left, posterior)
    liver_c = (rng.uniform(55, 75), rng.uniform(-5, 15), rng.uniform(30, 50))
    liver_s = (rng.uniform(70, 85), rng.uniform(65, 80), rng.uniform(70, 85))
    r_liver = _ellipsoid(coords, liver_c, liver_s) + 0.12 * field3((5, 5, 4))
    liver = (r_liver < 1.0) & cavity
    hu[liver] = rng.uniform(55, 65) + 6.0 * field3()[liver]
    spleen = (_ellipsoid(coords, (-85, -35, 50), (30, 45, 45)) + 0.1 * field3((5, 5, 4)) < 1.0) & cavity
    hu[spleen] = 48.0

    # kidneys: cortex (150-200 HU) around medulla, renal sinus fat at the hilum
    kidneys = np.zeros(shape, dtype=bool)
    kidney_geom = []
    for side in (-1, 1):
        centre = (side * rng.uniform(65, 75), spine_c[1] + rng.uniform(25, 35), rng.uniform(-45, -10) + (side > 0) * -10)
        semi = (rng.uniform(24, 30), rng.uniform(20, 26), rng.uniform(45, 58))
        r_kidney = _ellipsoid(coords, centre, semi) + 0.05 * field3((5, 5, 4))
        kidney = (r_kidney < 1.0) & cavity
        medulla = kidney & (r_kidney < 0.72)
        sinus = medulla & (np.sign(centre[0]) * (x - centre[0]) < -0.35 * semi[0]) & (np.abs(z - centre[2]) < 0.3 * semi[2])
        hu[kidney] = rng.uniform(150, 200)
        hu[medulla] = rng.uniform(70, 110)
        hu[sinus] = -60.0
        kidneys |= kidney
        kidney_geom.append((centre, semi))
    organ = kidneys if task == "kits" else liver
    organ_geom = kidney_geom if task == "kits" else [(liver_c, liver_s)]

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
        base = rng.uniform(45, 110) if task == "kits" else rng.uniform(30, 60)
        tex = field3((10, 10, 8))
        values = base + 15.0 * tex
        if diameter > 15.0:  # necrotic core in larger tumors, enhancing rim
            core = r_t < rng.uniform(0.4, 0.6)
            values = np.where(core, rng.uniform(15, 30) + 5.0 * tex, values)
            values = np.where(r_t > 0.85, values + 15.0, values)
        hu[tumor] = np.clip(values[tumor], 20.0, 120.0)
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

    sigma = rng.uniform(10.0, 20.0)
    hu += rng.normal(0.0, sigma, size=shape).astype(np.float32)
    image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
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
    training, details = [], {}
    for index in range(cases):
        case = synthesize_case(task, size, np.random.default_rng([int(seed), index]))
        image_path, label_path = _case_paths(task, out, index)
        save_nifti(case.image, case.affine, image_path, dtype=np.int16)
        save_nifti(case.label, case.affine, label_path, dtype=np.uint8)
        training.append({"image": image_path.relative_to(out).as_posix(), "label": label_path.relative_to(out).as_posix()})
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
    path = out / "dataset.json"
    tmp = out / ".dataset.json.tmp"
    tmp.write_text(json.dumps(dataset, indent=2) + "\n")
    tmp.replace(path)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m pipelines.synthesize --task kits|lits --cases N --size S --out DIR --seed K``."""
    parser = argparse.ArgumentParser(prog="ctdistill-synthesize", description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=TASKS, default="kits", help="kits: kidney + tumor; lits: liver + tumor")
    parser.add_argument("--cases", type=int, default=4, help="number of cases")
    parser.add_argument("--size", type=int, default=96, help="in-plane matrix size (slices follow from ~240 mm)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        path = synthesize(args.task, args.cases, args.size, args.out, args.seed)
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {args.cases} {args.task} cases (size {args.size}) and {path} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
