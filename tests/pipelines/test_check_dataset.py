"""pipelines.check_dataset: every bad input of a tiny synthetic cohort is caught, all at once, nothing is modified."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipelines.check_dataset import Problem, check_dataset, main
from pipelines.datalist import write_datalist
from pipelines.engine.data import save_nifti
from pipelines.synthesize import synthesize

SIZE = 64  # smallest in-plane size the synthesizer accepts reliably


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cohorts")
    for task in ("kits", "lits"):
        synthesize(task, cases=3, size=SIZE, out=root / task, seed=0)
    return {"kits": root / "kits", "lits": root / "lits"}


@pytest.fixture
def kits(cohorts, tmp_path) -> Path:
    """A private copy of the clean KiTS-layout cohort (case_00000..case_00002, dataset.json lists all three)."""
    return Path(shutil.copytree(cohorts["kits"], tmp_path / "kits"))


def _case(root: Path, index: int) -> tuple[Path, Path]:
    folder = root / f"case_{index:05d}"
    return folder / "imaging.nii.gz", folder / "segmentation.nii.gz"


def _rewrite(path: Path, edit, affine: np.ndarray | None = None, dtype=None) -> None:
    """Replace a volume by ``edit(voxels)`` (same affine unless given)."""
    image = nib.load(str(path))
    data = edit(np.asarray(image.dataobj).copy())
    save_nifti(data, image.affine if affine is None else affine, path, dtype=dtype)


def _errors(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]


def _warnings(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "warning"]


def _tree_state(root: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("task", ["kits", "lits"])
def test_clean_cohort_passes(cohorts, task, capsys):
    assert main([str(cohorts[task])]) == 0
    out = capsys.readouterr().out
    assert "ERROR" not in out and "WARNING" not in out
    assert "orientation R,A,S in 3 of 3 images" in out  # the synthesizer writes RAS volumes
    assert "3 case(s) checked, 3 with a label" in out
    assert out.strip().splitlines()[-1].startswith("OK: 0 error(s), 0 warning(s)")


def test_problem_line_format_and_validation():
    assert str(Problem("error", "/d/a.nii.gz", "label file is missing")) == "ERROR /d/a.nii.gz: label file is missing"
    assert str(Problem("warning", "b", "m")) == "WARNING b: m"
    with pytest.raises(ValueError, match="severity must be one of"):
        Problem("fatal", "x", "y")


def test_four_problems_at_once_each_named(kits, capsys):
    """The issue's acceptance case: shape mismatch, label value 7, a NaN and a missing label, all reported."""
    image0, label0 = _case(kits, 0)
    _, label1 = _case(kits, 1)
    image2, _ = _case(kits, 2)
    shutil.copytree(kits / "case_00002", kits / "case_00003")
    dataset = json.loads((kits / "dataset.json").read_text())
    dataset["training"].append({"image": "case_00003/imaging.nii.gz", "label": "case_00003/segmentation.nii.gz"})
    (kits / "dataset.json").write_text(json.dumps(dataset))
    _, label3 = _case(kits, 3)
    _rewrite(label0, lambda d: d[:, :-1])
    _rewrite(label1, lambda d: np.where(np.arange(d.size).reshape(d.shape) == 5, 7, d).astype(np.uint8))
    _rewrite(image2, lambda d: np.where(np.arange(d.size).reshape(d.shape) == 9, np.nan, d).astype(np.float32))
    label3.unlink()

    code = main([str(kits)])
    lines = capsys.readouterr().out.splitlines()
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    assert code != 0
    assert len(errors) == 4, lines
    assert any(str(label0) in ln and "shape" in ln and f"({SIZE}, {SIZE - 1}," in ln for ln in errors)
    assert any(str(label1) in ln and "[7]" in ln for ln in errors)
    assert any(str(image2) in ln and "1 NaN" in ln for ln in errors)
    assert any(str(label3) in ln and "missing" in ln for ln in errors)
    assert lines[-1].startswith("FAILED: 4 error(s)")


def test_cli_exit_status_through_python_m(kits):
    """``python -m pipelines.check_dataset`` exits non-zero on an error (main returns, the module raises SystemExit)."""
    _, label = _case(kits, 1)
    _rewrite(label, lambda d: np.full_like(d, 7))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.check_dataset", str(kits)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 1 and f"ERROR {label}: label values [7]" in proc.stdout


@pytest.mark.parametrize(
    "case, expected",
    [
        ("affine", "label affine differs"),
        ("inf", "0 NaN and 2 inf voxels"),
        ("missing_image", "image file is missing"),
        ("unreadable", "label cannot be read"),
        ("normalised", "not Hounsfield units"),
        ("non_integer_label", "non-integer values"),
        ("not_3d", "not a 3D volume"),
    ],
)
def test_each_bad_input_is_an_error(kits, case, expected):
    image, label = _case(kits, 1)
    culprit = label
    if case == "affine":
        moved = nib.load(str(label)).affine.copy()
        moved[0, 3] += 0.5  # half a millimetre: above the 1e-3 tolerance
        _rewrite(label, lambda d: d, affine=moved)
    elif case == "inf":
        culprit = image
        _rewrite(
            image, lambda d: np.concatenate([[np.inf, -np.inf], d.ravel()[2:]]).reshape(d.shape).astype(np.float32)
        )
    elif case == "missing_image":
        culprit = image
        image.unlink()
    elif case == "unreadable":
        label.write_bytes(b"not a nifti file at all")
    elif case == "normalised":
        culprit = image
        _rewrite(image, lambda d: ((d.astype(np.float32) + 1024) / 4095).clip(0, 1), dtype=np.float32)
    elif case == "non_integer_label":
        _rewrite(label, lambda d: d.astype(np.float32) * 0.5, dtype=np.float32)
    elif case == "not_3d":
        _rewrite(label, lambda d: np.stack([d, d], axis=-1))
    errors = _errors(check_dataset(kits))
    assert [(p.file, expected in p.message) for p in errors] == [(str(culprit), True)], errors


def test_tolerances_accept_rounding(kits):
    """An affine off by 1e-5 mm and an integral float32 label are fine."""
    _, label = _case(kits, 0)
    moved = nib.load(str(label)).affine.copy()
    moved[:3, 3] += 1e-5
    _rewrite(label, lambda d: d.astype(np.float32), affine=moved, dtype=np.float32)
    assert _errors(check_dataset(kits)) == []


def test_warnings_alone_exit_zero(kits, capsys):
    """Empty training label, no voxel above 200 HU, duplicate image: warnings, exit status 0."""
    _, label0 = _case(kits, 0)
    image1, _ = _case(kits, 1)
    image2, _ = _case(kits, 2)
    _rewrite(label0, np.zeros_like)
    _rewrite(image1, lambda d: np.clip(d, None, 150))
    shutil.copyfile(image1, image2)
    shutil.copyfile(_case(kits, 1)[1], _case(kits, 2)[1])
    problems = check_dataset(kits)
    assert _errors(problems) == []
    warnings = [(p.file, p.message) for p in _warnings(problems)]
    assert (str(label0), "training label has no foreground (only background)") in warnings
    assert any(f == str(image1) and "nothing above 200 HU" in m for f, m in warnings)
    assert any(
        p.file == str(image2) and f"same voxels and affine as {image1}" in p.message for p in _warnings(problems)
    )
    assert main([str(kits)]) == 0
    assert "OK: 0 error(s), 4 warning(s)" in capsys.readouterr().out  # no-bone warning for image1 and its copy


def test_declared_labels_from_argument_and_dataset_json(kits):
    for index in range(3):
        _rewrite(_case(kits, index)[1], lambda d: np.where(d == 2, 7, d).astype(np.uint8))  # tumor stored as 7
    assert any("[7]" in p.message for p in _errors(check_dataset(kits)))
    assert _errors(check_dataset(kits, labels=[0, 1, 7])) == []
    assert main([str(kits), "--labels", "0", "1", "7"]) == 0
    dataset = json.loads((kits / "dataset.json").read_text())
    dataset["labels"] = {"background": 0, "kidney": 1, "tumor": 7}
    (kits / "dataset.json").write_text(json.dumps(dataset))
    assert _errors(check_dataset(kits)) == []


def test_splits_file_source(kits, tmp_path):
    splits = tmp_path / "splits.json"
    write_datalist(kits, splits, val_fraction=0.34, seed=0)
    assert main([str(splits)]) == 0
    data = json.loads(splits.read_text())
    leaked = dict(data["training"][0])
    data["validation"].append(leaked)  # the same case in training and validation
    del data["training"][1]["label"]  # a training entry without a label
    splits.write_text(json.dumps(data))
    errors = _errors(check_dataset(splits))
    assert any(p.file == leaked["image"] and "listed twice: in training case" in p.message for p in errors)
    assert any(p.file == data["training"][1]["image"] and "training entry has no label" in p.message for p in errors)
    assert main([str(splits)]) == 1


def test_splits_unlabelled_section_is_checked(kits, tmp_path):
    """Images of the datalist's 'unlabelled' section (no label expected) are checked too."""
    image, _ = _case(kits, 2)
    _rewrite(image, lambda d: np.where(np.arange(d.size).reshape(d.shape) == 3, np.nan, d).astype(np.float32))
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"training": [], "unlabelled": [{"image": str(image)}]}))
    problems = check_dataset(splits)
    assert [(p.file, p.message) for p in _errors(problems)] == [(str(image), "image has 1 NaN and 0 inf voxels")]
    assert problems[-1].message == "1 case(s) checked, 0 with a label"


def test_orientation_reported_for_axial_first_volumes(tmp_path):
    """A KiTS19-like volume (axial axis first, axcodes I,P,L) is reported as info, not as a problem."""
    hu = np.full((6, 16, 16), -1000, np.int16)
    hu[:, 4:12, 4:12] = 400
    label = np.zeros(hu.shape, np.uint8)
    label[2:4, 6:10, 6:10] = 1
    affine = np.array([[0, 0, -0.8, 0], [0, -0.8, 0, 0], [-2.5, 0, 0, 0], [0, 0, 0, 1.0]])
    case = tmp_path / "ds" / "case_00000"
    save_nifti(hu, affine, case / "imaging.nii.gz")
    save_nifti(label, affine, case / "segmentation.nii.gz")
    problems = check_dataset(tmp_path / "ds")
    assert [p.severity for p in problems] == ["info", "info"]
    assert problems[0].message.startswith("orientation I,P,L in 1 of 1 images (axial axis first")
    assert problems[1].message == "1 case(s) checked, 1 with a label"


def test_bad_source_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().out
    (tmp_path / "x.json").write_text('{"foo": 1}')
    with pytest.raises(ValueError, match="expected a splits file"):
        check_dataset(tmp_path / "x.json")


def test_never_modifies_anything(kits):
    image, label = _case(kits, 0)
    _rewrite(label, lambda d: d[:-1])
    _rewrite(image, lambda d: np.where(np.arange(d.size).reshape(d.shape) == 0, np.nan, d).astype(np.float32))
    before = _tree_state(kits)
    assert main([str(kits)]) == 1
    assert _tree_state(kits) == before
