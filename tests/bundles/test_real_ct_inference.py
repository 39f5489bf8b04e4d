"""Issue 17 on real CT: a model trained on the synthetic cohort, run on TotalSegmentator's example abdomen (3 mm), reports
kidney volumes within a factor 3 of the reference labels or flags the case implausible; the label maps beside the CT
are skipped with a message. Skips, with the reason, without ../shared (the data is never copied into the repo)."""

from __future__ import annotations

import csv
import shutil

import nibabel as nib
import numpy as np
import pytest

from tests.bundles.conftest import run_bundle

pytestmark = pytest.mark.slow

#: TotalSegmentator v1 label values in example_seg.nii.gz
RIGHT_KIDNEY, LEFT_KIDNEY = 2, 3


def test_real_ct_volumes_plausible_or_flagged(shared_data, teacher_run, tmp_path):
    folder = shared_data / "ct" / "totalsegmentator_example"
    src = tmp_path / "in"  # a scratch copy outside the repository: the CT and the two label maps beside it
    src.mkdir()
    for name in ("example_ct.nii.gz", "example_seg.nii.gz", "example_seg_dicom.nii.gz"):
        shutil.copyfile(folder / name, src / name)
    seg = nib.load(str(folder / "example_seg.nii.gz"))
    labels = np.asarray(seg.dataobj)
    voxel_ml = abs(np.linalg.det(seg.affine[:3, :3])) / 1000.0
    reference = {"right": (labels == RIGHT_KIDNEY).sum() * voxel_ml, "left": (labels == LEFT_KIDNEY).sum() * voxel_ml}
    assert 90 < reference["right"] < 120 and 90 < reference["left"] < 110  # about 107 and 99 mL

    out = tmp_path / "out"
    proc = run_bundle(
        "inferring", "bundles/unetpp_teacher/configs/inference.yaml", "--input_dir", str(src), "--output_dir", str(out),
        "--checkpoint", str(teacher_run / "checkpoints" / "best.pt"),
        "--tracking_uri", f"sqlite:///{teacher_run.parent / 'mlruns.db'}",  # the training's store
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    for name in ("example_seg.nii.gz", "example_seg_dicom.nii.gz"):
        assert f"skipping {src / name}: named like a label map" in log
    with open(out / "volumes.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["case"] == "example_ct" and row["model_role"] == "unetpp_teacher" and row["plan"].startswith("{")
    right, left = float(row["right_kidney_ml"] or 0), float(row["left_kidney_ml"] or 0)
    within = all(ref / 3 <= got <= ref * 3 for got, ref in ((right, reference["right"]), (left, reference["left"])))
    assert within or (row["flag"] == "implausible" and row["reason"]), row
    if row["flag"]:
        assert f"{out / 'example_ct.nii.gz'}: implausible result ({row['reason']})" in log
    pred = nib.load(str(out / "example_ct.nii.gz"))
    assert pred.shape == nib.load(str(src / "example_ct.nii.gz")).shape
    assert np.allclose(pred.affine, nib.load(str(src / "example_ct.nii.gz")).affine)
    # the inference run is tracked, nested under the training run that wrote the checkpoint
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{teacher_run.parent / 'mlruns.db'}")
    training_run = (teacher_run / "checkpoints" / "mlflow_run_id").read_text().strip()
    runs = [
        r
        for e in client.search_experiments()
        for r in client.search_runs([e.experiment_id])
        if r.info.run_name.startswith("unetpp_teacher_infer_")
    ]
    assert len(runs) == 1 and runs[0].data.tags.get("mlflow.parentRunId") == training_run
    assert runs[0].data.params["stage"] == "inference" and runs[0].data.params["plan"].startswith("{")
