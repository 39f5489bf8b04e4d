"""Label names and colours (pipelines.engine.labels): the 3D Slicer color table beside each label map, the label
meanings in volumes.csv, and the label writer's refusal to replace a DICOM-SEG or color table it did not write."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from pipelines.engine.inference import VOLUMES_CSV, WriteLabelMapd, previous_outputs
from pipelines.engine.labels import color_table_path, color_table_text, label_names


def _pred(name: str = "scan_a.nii.gz") -> dict:
    from monai.data import MetaTensor

    labels = torch.zeros((1, 16, 16, 8))
    labels[0, 2:6, 2:6, 1:3] = 1
    labels[0, 3:4, 3:4, 1:2] = 2
    return {"pred": MetaTensor(labels, affine=torch.eye(4), meta={"filename_or_obj": f"/nowhere/{name}"})}


def test_names_and_slicer_color_table():
    assert label_names("kits") == {0: "background", 1: "kidney", 2: "kidney tumor"}
    assert label_names("LiTS") == {0: "background", 1: "liver", 2: "liver tumor"}
    with pytest.raises(ValueError, match=r"unknown task 'brats'.*\['kits', 'lits'\]"):
        label_names("brats")
    # Slicer's .ctbl lines: value name R G B A (background transparent; GenericAnatomyColors kidney; tumor yellow)
    lines = [line for line in color_table_text(label_names("kits")).splitlines() if not line.startswith("#")]
    assert lines == ["0 background 0 0 0 0", "1 kidney 185 102 83 255", "2 kidney_tumor 255 215 0 255"]
    assert color_table_path("/o/case_1.nii.gz") == Path("/o/case_1.ctbl") and color_table_path("/o/a.nii") == Path("/o/a.ctbl")


def test_label_writer_writes_color_table_and_label_meanings(tmp_path):
    WriteLabelMapd(output_dir=str(tmp_path), label_names=label_names("lits"))(_pred())
    assert (tmp_path / "scan_a.ctbl").read_text() == color_table_text(label_names("lits"))
    with open(tmp_path / VOLUMES_CSV) as f:
        [row] = list(csv.DictReader(f))
    assert row["labels"] == "0=background;1=liver;2=liver tumor" and row["output"].endswith("scan_a.nii.gz")
    # an older volumes.csv without the labels column still lists its outputs (they stay replaceable)
    (tmp_path / VOLUMES_CSV).write_text(f"case,organ_ml,tumor_ml,organ_and_tumor_ml,output\nscan_a,1,2,3,{tmp_path / 'scan_a.nii.gz'}\n")
    assert list(previous_outputs(tmp_path)) == ["scan_a.nii.gz"]
    WriteLabelMapd(output_dir=str(tmp_path), label_names=label_names("lits"))(_pred())


def test_label_writer_never_replaces_a_seg_or_color_table_it_did_not_write(tmp_path):
    foreign = tmp_path / "scan_a.seg.dcm"
    foreign.write_bytes(b"someone else's SEG")
    with pytest.raises(ValueError, match=r"refusing to overwrite .*scan_a\.seg\.dcm"):
        WriteLabelMapd(output_dir=str(tmp_path), output_format="both", seg_writer=lambda *a, **k: None)(_pred())
    (tmp_path / "scan_b.ctbl").write_text("mine")
    with pytest.raises(ValueError, match=r"refusing to overwrite .*scan_b\.ctbl"):
        WriteLabelMapd(output_dir=str(tmp_path), label_names=label_names("kits"))(_pred("scan_b.nii.gz"))
    assert foreign.read_bytes() == b"someone else's SEG" and (tmp_path / "scan_b.ctbl").read_text() == "mine"
    assert not (tmp_path / "scan_a.nii.gz").exists() and not (tmp_path / "scan_b.nii.gz").exists()
    with pytest.raises(ValueError, match="needs a seg_writer"):
        WriteLabelMapd(output_dir=str(tmp_path), output_format="dicom-seg")
    with pytest.raises(ValueError, match="not one of nifti, dicom-seg, both"):
        WriteLabelMapd(output_dir=str(tmp_path), output_format="png")
