"""Issue 17: inference checks its input (not CT -> refused or skipped, naming the file), flags implausible results,
and never overwrites a label map whose content changed since it was written.

Each guard has its own test (NaN, non-HU unsigned volume, 1e30 voxels, label map by name, label map by content);
the expected verdicts come from the inputs' construction, not from the code under test.
"""

from __future__ import annotations

import csv
import hashlib
import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from pipelines.engine import VOLUMES_CSV, WriteLabelMapd, check_input_volume, discover_inputs, output_path, result_flags
from tests.reliability.conftest import one_line, snapshot, write_nifti


def _ct(rng_seed: int = 0) -> np.ndarray:
    """A small int16 volume in Hounsfield units (air, soft tissue, bone)."""
    rng = np.random.default_rng(rng_seed)
    data = rng.integers(-1000, 400, size=(16, 16, 8)).astype(np.int16)
    data[0, 0, 0] = 1200
    return data


def _refused(path, match: str) -> str:
    with pytest.raises(ValueError) as info:
        check_input_volume(path)
    message = str(info.value)
    assert str(path) in message and match in message and one_line(message), message
    return message


def test_plain_ct_is_accepted(tmp_path):
    check_input_volume(write_nifti(tmp_path / "ct.nii.gz", _ct()))


def test_nan_voxels_are_refused(tmp_path):
    data = _ct().astype(np.float32)
    data[3, 3, 3] = np.nan
    _refused(write_nifti(tmp_path / "nan.nii.gz", data), "NaN")


def test_inf_voxels_are_refused(tmp_path):
    data = _ct().astype(np.float32)
    data[1, 2, 3] = np.inf
    _refused(write_nifti(tmp_path / "inf.nii.gz", data), "inf")


def test_rgb_input_is_one_line_naming_it(tmp_path):
    """An RGB NIfTI (structured voxels) is refused as check_dataset refuses it, not a numpy UFunc traceback."""
    path = tmp_path / "rgb.nii.gz"
    rgb = np.zeros((16, 16, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(path))
    _refused(path, "RGB")


def test_unsigned_volume_without_rescale_is_not_hu(tmp_path):
    """A CT stored unsigned 0..1905 whose rescale intercept (-1024) was lost: nothing below -500 HU."""
    rng = np.random.default_rng(1)
    data = rng.integers(0, 1906, size=(16, 16, 8)).astype(np.uint16)
    _refused(write_nifti(tmp_path / "unsigned.nii.gz", data), "not Hounsfield units")


def test_1e30_voxels_are_refused(tmp_path):
    data = _ct().astype(np.float32)
    data[5, 5, 5] = 1e30
    message = _refused(write_nifti(tmp_path / "huge.nii.gz", data), "not Hounsfield units")
    assert "1 voxels beyond" in message


@pytest.mark.parametrize("name", ["case1_seg.nii.gz", "liver_mask.nii.gz", "ct_label.nii.gz", "segmentation_3.nii.gz"])
def test_label_map_by_name(tmp_path, name, caplog):
    """A CT-looking volume named like a label map: refused as an explicit input, skipped in a folder (warning)."""
    folder = tmp_path / "in"
    folder.mkdir()
    path = write_nifti(folder / name, _ct())
    _refused(path, "named like a label map")
    write_nifti(folder / "ct.nii.gz", _ct(2))
    with caplog.at_level(logging.WARNING, logger="pipelines.engine.inference"):
        inputs = discover_inputs(folder, tmp_path / "out")
    assert [i["image"] for i in inputs] == [str(folder / "ct.nii.gz")]
    assert any(str(path) in r.getMessage() and "label map" in r.getMessage() for r in caplog.records)


def test_label_map_in_labelsTr_folder_is_refused(tmp_path):
    (tmp_path / "labelsTr").mkdir()
    _refused(write_nifti(tmp_path / "labelsTr" / "case_001.nii.gz", _ct()), "named like a label map")


def test_label_map_by_content(tmp_path):
    """A uint8 volume with a few values (TotalSegmentator-style labels 0, 2, 3, 117) under a neutral name."""
    data = np.zeros((16, 16, 8), dtype=np.uint8)
    data[2:6, 2:6, 2:5], data[8:12, 8:12, 2:5], data[0:2, 0:2, :] = 2, 3, 117
    _refused(write_nifti(tmp_path / "scan.nii.gz", data), "label map")
    signed = data.astype(np.int16)
    _refused(write_nifti(tmp_path / "scan16.nii.gz", signed), "4 distinct integer values")


def test_guards_run_before_any_output(tmp_path):
    """A folder with one good CT and one NaN volume: refused by discover_inputs, nothing written, inputs unchanged."""
    folder = tmp_path / "in"
    folder.mkdir()
    write_nifti(folder / "a.nii.gz", _ct())
    bad = _ct().astype(np.float32)
    bad[0, 0, 0] = np.nan
    write_nifti(folder / "b.nii.gz", bad)
    before = snapshot(folder)
    with pytest.raises(ValueError, match="b.nii.gz"):
        discover_inputs(folder, tmp_path / "out")
    assert snapshot(folder) == before and not (tmp_path / "out").exists()


def test_spacing_far_outside_the_plan_warns_with_both_spacings(tmp_path, caplog):
    folder = tmp_path / "in"
    folder.mkdir()
    write_nifti(folder / "fine.nii.gz", _ct(), np.diag([0.2, 0.2, 1.0, 1.0]))
    plan = {"spacing_range": {"min": [0.7, 0.7, 1.0], "max": [0.9, 0.9, 3.0]}, "target_spacing": [0.8, 0.8, 2.0]}
    with caplog.at_level(logging.WARNING, logger="pipelines.engine.inference"):
        discover_inputs(folder, tmp_path / "out", plan=plan)
    (message,) = [r.getMessage() for r in caplog.records if "far outside" in r.getMessage()]
    assert "fine.nii.gz" in message and "[0.2, 0.2, 1.0]" in message and "[0.7, 0.7, 1.0]" in message


# ---------------------------------------------------------------------------------------------- results and outputs


def _pred(label: np.ndarray, affine: np.ndarray, src: str) -> dict:
    pred = MetaTensor(torch.as_tensor(label[None]), affine=torch.as_tensor(affine))
    pred.meta["filename_or_obj"] = src
    return {"pred": pred}


def _rows(out) -> list[dict[str, str]]:
    with open(out / VOLUMES_CSV, newline="") as f:
        return list(csv.DictReader(f))


def test_result_flags_ranges():
    assert result_flags(300.0, 20.0, task="kits") == []
    assert result_flags(37262.0, 0.0, task="kits") == ["organ 37262 mL outside 20..1500 mL"]
    assert result_flags(0.0, 0.0) == ["no organ found"]
    assert result_flags(300.0, 20.0, organ_ml_range=[400, 900], tumor_ml_range=[0, 10]) == [
        "organ 300 mL outside 400..900 mL",
        "tumor 20 mL outside 0..10 mL",
    ]
    with pytest.raises(ValueError, match="organ_ml_range"):
        result_flags(1.0, 0.0, organ_ml_range=[5])


def test_writer_flags_implausible_and_records_kidneys_and_provenance(tmp_path, caplog):
    """2 mm voxels (0.008 mL): a right kidney of 1000 voxels at +x, a left one of 500 at -x, with 100 tumor voxels."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-40.0, -40.0, 0.0]  # x world = -40 + 2 i: i < 20 is the patient's left (-x)
    label = np.zeros((40, 20, 20), dtype=np.uint8)
    label[25:35, 0:10, 0:10] = 1  # right kidney (+x), 1000 voxels
    label[5:10, 0:10, 0:10] = 1  # left kidney (-x), 500 voxels
    label[5:6, 0:10, 0:10] = 2  # 100 of them tumor
    provenance = {"model_role": "hlfd", "checkpoint_sha256": "ab" * 32, "training_run_id": "run1", "plan": "{}"}
    writer = WriteLabelMapd(output_dir=str(tmp_path), provenance=provenance, task="kits")
    with caplog.at_level(logging.WARNING, logger="pipelines.engine.inference"):
        writer(_pred(label, affine, str(tmp_path / "in" / "p1_0000.nii.gz")))
    (row,) = _rows(tmp_path)
    assert row["case"] == "p1" and row["output"].endswith("p1.nii.gz")  # nnU-Net channel suffix dropped
    assert float(row["right_kidney_ml"]) == pytest.approx(1000 * 0.008) and float(
        row["left_kidney_ml"]
    ) == pytest.approx(500 * 0.008)
    assert float(row["organ_ml"]) == pytest.approx(1400 * 0.008) and float(row["tumor_ml"]) == pytest.approx(0.8)
    assert row["flag"] == "implausible" and row["reason"] == "organ 11 mL outside 20..1500 mL"
    assert any("implausible" in r.getMessage() and "p1.nii.gz" in r.getMessage() for r in caplog.records)
    assert row["model_role"] == "hlfd" and row["training_run_id"] == "run1"
    written = tmp_path / "p1.nii.gz"
    assert row["sha256"] == hashlib.sha256(written.read_bytes()).hexdigest()
    descrip = nib.load(str(written)).header["descrip"].item().decode()
    assert descrip == "ctdistill hlfd " + "ab" * 8


def test_rerun_overwrites_only_an_unchanged_prediction(tmp_path):
    """A rerun into the same folder replaces its own unchanged label map; once someone edited it, it is refused
    (naming the file) and the edited file is kept byte for byte."""
    affine = np.eye(4)
    label = np.zeros((8, 8, 8), dtype=np.uint8)
    label[2:6, 2:6, 2:6] = 1
    src = str(tmp_path / "in" / "case7.nii.gz")
    WriteLabelMapd(output_dir=str(tmp_path / "out"))(_pred(label, affine, src))
    target = output_path(tmp_path / "out", src)
    WriteLabelMapd(output_dir=str(tmp_path / "out"))(_pred(label, affine, src))  # unchanged: replaced
    corrected = label.copy()
    corrected[2, 2, 2] = 0
    nib.save(nib.Nifti1Image(corrected, affine), str(target))  # a clinician's correction
    edited = target.read_bytes()
    with pytest.raises(ValueError, match="content changed") as info:
        WriteLabelMapd(output_dir=str(tmp_path / "out"))(_pred(label, affine, src))
    assert str(target) in str(info.value)
    assert target.read_bytes() == edited
    # and discover_inputs refuses it before any inference
    (tmp_path / "in").mkdir()
    write_nifti(tmp_path / "in" / "case7.nii.gz", _ct())
    with pytest.raises(ValueError, match="content changed"):
        discover_inputs(tmp_path / "in", tmp_path / "out")


def test_model_whose_validation_tumor_dsc_is_zero_warns_at_load(tmp_path, caplog):
    """Issue 17: a checkpoint that never segmented a tumor in validation (best_metric 0) warns; a trained one and
    released weights (a plain state dict, as in an exported bundle) do not."""
    import torch

    from pipelines.engine.safeguards import warn_untrained_model

    settings = {"preprocessing": {"spatial_dims": 2}}
    zero, good, plain = tmp_path / "zero.pt", tmp_path / "good.pt", tmp_path / "plain.pt"
    torch.save({"model": {}, "settings": settings, "best_metric": 0.0}, zero)
    torch.save({"model": {}, "settings": settings, "best_metric": 0.42}, good)
    torch.save({"w": torch.zeros(2)}, plain)
    with caplog.at_level("WARNING"):
        assert warn_untrained_model(zero) is True
    assert "never segmented a tumor" in caplog.text and "zero.pt" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert warn_untrained_model(good) is False and warn_untrained_model(plain) is False
    assert caplog.text == ""
