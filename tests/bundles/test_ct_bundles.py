"""CT bundles end to end through ``python -m monai.bundle run ...`` (subprocesses from the repo root)."""

from __future__ import annotations

import csv
import math
import shutil
import sqlite3

import nibabel as nib
import numpy as np
import pytest
import torch

from pipelines.engine import load_checkpoint
from pipelines.engine.metrics import CASE_COLUMNS
from tests.bundles.conftest import TINY, TINY_WIDTHS, run_bundle
from tests.conftest import subprocess_env

pytestmark = pytest.mark.slow


def _np_dsc(p, g):
    s = p.sum() + g.sum()
    return math.nan if s == 0 else 2.0 * np.logical_and(p, g).sum() / s  # 0/0: undefined


def _np_rvd(p, g):
    return math.nan if g.sum() == 0 else (p.sum() - g.sum()) / g.sum()


def test_teacher_run_writes_checkpoints_and_csv(teacher_run):
    ck = teacher_run / "checkpoints"
    for name in ("best.pt", "last.pt", "splits.json", "settings.json"):
        assert (ck / name).is_file(), name
    last = load_checkpoint(ck / "last.pt")
    assert last["epoch"] == 1 and last["trainer"]["epoch"] == 1
    assert {"model", "network", "optimizer", "lr_scheduler", "settings"} <= set(last)
    assert last["network"]["name"] == "unetpp_teacher"
    assert last["settings"]["preprocessing"]["num_slices"] == 3
    with open(teacher_run / "val_cases.csv") as f:
        assert tuple(next(csv.reader(f))) == CASE_COLUMNS


@pytest.mark.parametrize("role", ["resnet18_student", "hlfd", "kd_baselines", "transfuse_ct"])
def test_train_role_one_epoch(role, cohort, teacher_run, tmp_path):
    args = ["--dataset_dir", str(cohort), "--output_dir", str(tmp_path), "--network_kwargs", TINY_WIDTHS[role], *TINY]
    if role in ("hlfd", "kd_baselines"):
        args += ["--teacher_ckpt", str(teacher_run / "checkpoints" / "best.pt")]
    if role == "kd_baselines":
        args += ["--kd_method", "cwd", "--kd_mask", "teacher_correct"]
    if role == "hlfd":  # the safeguards: balanced weights, and a (fabricated) plain student no tiny run can beat
        baseline = tmp_path / "baseline.pt"
        torch.save({"model": {}, "best_metric": 0.99, "settings": {"kd_method": "none", "key_metric": "dsc_tumor"}}, baseline)
        args += ["--kd_balance", "grad", "--kd_balance_ratio", "0.5", "--baseline_ckpt", str(baseline)]
    if role == "transfuse_ct":
        args += ["--batch_size", "2"]
    proc = run_bundle("training", f"bundles/{role}/configs/train.yaml", *args)
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ck["epoch"] == 1
    if role in ("hlfd", "kd_baselines"):
        assert ck["distiller"] is not None
        assert ck["settings"]["kd_method"] == ("hlfd" if role == "hlfd" else "cwd")
    if role == "kd_baselines":
        assert ck["settings"]["kd_options"]["kd_mask"] == "teacher_correct"
    if role == "hlfd":
        assert any(k.startswith("method.connectors") for k in ck["distiller"]), "HLFD's 1x1 heads are checkpointed"
        run_id = (tmp_path / "checkpoints" / "mlflow_run_id").read_text().strip()
        con = sqlite3.connect(tmp_path.parent / "mlruns.db")  # the default store beside the run folder
        metrics = {k for (k,) in con.execute("select distinct key from metrics where run_uuid=?", (run_id,))}
        params = dict(con.execute("select key, value from params where run_uuid=?", (run_id,)).fetchall())
        con.close()
        assert {"kd_ufd", "kd_ifd", "kd_upd", "kd_ipd", "kd_total", "loss_seg", "train_loss", "dsc_tumor"} <= metrics
        assert params["method"] == "hlfd" and params["beta"] == "0.9" and params["lambda"] == "0.1"
        assert params["T"] == "4.0" and params["p"] == "4"
        # the safeguards: balanced weights logged per epoch, the gate's verdict in the log, checkpoints and MLflow
        assert {"kd_weight_ufd", "kd_weight_ifd", "kd_weight_upd", "kd_weight_ipd", "kd_gradratio_ifd", "gate_kd_lost"} <= metrics
        assert params["kd_balance"] == "grad" and params["kd_balance_ratio"] == "0.5" and params["kd_mask"] == "none"
        assert params["baseline_dsc_tumor"] == "0.99" and params["baseline_ckpt"] == str(tmp_path / "baseline.pt")
        assert "distillation lost on validation: kd " in proc.stdout + proc.stderr
        for name in ("best.pt", "last.pt"):
            gate = load_checkpoint(tmp_path / "checkpoints" / name)["settings"]["validation_gate"]
            assert gate["kd_lost"] is True and gate["baseline"] == 0.99


def test_3d_variant_by_one_override(cohort, tmp_path):
    run_bundle(
        "training", "bundles/unetpp_teacher/configs/train.yaml",
        "--dataset_dir", str(cohort), "--output_dir", str(tmp_path), "--network_kwargs", TINY_WIDTHS["unetpp_teacher"],
        *TINY, "--spatial_dims", "3", "--roi_size", "[32,32,16]", "--batch_size", "2",
    )  # fmt: skip
    ck = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert ck["network"]["spatial_dims"] == 3 and ck["network"]["in_channels"] == 1


def test_evaluate_matches_numpy(teacher_run, cohort):
    run_bundle(
        "evaluating", "bundles/unetpp_teacher/configs/evaluate.yaml",
        "--dataset_dir", str(cohort), "--output_dir", str(teacher_run), "--save_predictions", "true",
    )  # fmt: skip
    ev = teacher_run / "eval"
    with open(ev / "cases.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CASE_COLUMNS
    assert len(rows) >= 1
    for r in rows:
        gt_img = nib.load(str(cohort / r["case"] / "segmentation.nii.gz"))
        pred_img = nib.load(str(ev / "predictions" / f"{r['case']}.nii.gz"))
        assert pred_img.shape == gt_img.shape and np.allclose(pred_img.affine, gt_img.affine, atol=1e-4)
        g, p = np.asarray(gt_img.dataobj), np.asarray(pred_img.dataobj)
        vox_ml = abs(np.linalg.det(gt_img.affine[:3, :3])) / 1000
        expected = {
            "dsc_tumor": _np_dsc(p == 2, g == 2),
            "rvd_tumor": _np_rvd(p == 2, g == 2),
            "dsc_organ": _np_dsc(p >= 1, g >= 1),
            "rvd_organ": _np_rvd(p >= 1, g >= 1),
            "tumor_ml_pred": (p == 2).sum() * vox_ml,
            "tumor_ml_gt": (g == 2).sum() * vox_ml,
        }
        for k, v in expected.items():
            got = float(r[k])
            assert (math.isnan(v) and math.isnan(got)) or got == pytest.approx(v, rel=1e-4, abs=1e-5), k
    with open(ev / "summary.csv") as f:
        summary = {row["column"]: row for row in csv.DictReader(f)}
    assert set(summary) == set(CASE_COLUMNS[1:])
    assert {"mean", "std", "median", "n"} <= set(summary["dsc_tumor"])


def test_resume_continues_from_saved_epoch(teacher_run, cohort, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(teacher_run, out)
    before = load_checkpoint(out / "checkpoints" / "last.pt")
    proc = run_bundle(
        "training", "bundles/unetpp_teacher/configs/train.yaml",
        "--dataset_dir", str(cohort), "--output_dir", str(out), "--network_kwargs", TINY_WIDTHS["unetpp_teacher"],
        *TINY, "--epochs", "2", "--resume", "true",
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert "resumed from" in log and "at epoch 1" in log
    assert "Epoch[1] Complete" not in log.replace("SupervisedEvaluator - INFO - Epoch[1] Complete", "")
    after = load_checkpoint(out / "checkpoints" / "last.pt")
    assert before["epoch"] == 1 and after["epoch"] == 2
    assert after["optimizer"]["state"], "optimizer state restored and advanced"


def test_inference_writes_nifti_in_input_geometry(teacher_run, cohort, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(cohort / "case_00000" / "imaging.nii.gz", src / "scan_a.nii.gz")
    before = (src / "scan_a.nii.gz").read_bytes()
    out = tmp_path / "out"
    run_bundle(
        "inferring", "bundles/unetpp_teacher/configs/inference.yaml",
        "--input_dir", str(src), "--output_dir", str(out), "--checkpoint", str(teacher_run / "checkpoints" / "best.pt"),
    )  # fmt: skip
    inp, seg = nib.load(str(src / "scan_a.nii.gz")), nib.load(str(out / "scan_a.nii.gz"))
    assert seg.shape == inp.shape
    assert np.allclose(seg.affine, inp.affine, atol=1e-5)
    assert (src / "scan_a.nii.gz").read_bytes() == before, "the input is untouched"
    with open(out / "volumes.csv") as f:
        rows = list(csv.DictReader(f))
    lab = np.asarray(seg.dataobj)
    vox = abs(np.linalg.det(inp.affine[:3, :3])) / 1000
    assert rows[0]["case"] == "scan_a"
    assert float(rows[0]["tumor_ml"]) == pytest.approx((lab == 2).sum() * vox, rel=1e-6, abs=1e-9)
    assert float(rows[0]["organ_ml"]) == pytest.approx((lab == 1).sum() * vox, rel=1e-6, abs=1e-9)
    # writing into the input folder would overwrite the input: refused
    proc = run_bundle(
        "inferring", "bundles/unetpp_teacher/configs/inference.yaml",
        "--input_dir", str(src), "--output_dir", str(src), "--checkpoint", str(teacher_run / "checkpoints" / "best.pt"),
        expect_ok=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "would overwrite the input" in proc.stdout + proc.stderr
    assert (src / "scan_a.nii.gz").read_bytes() == before


def test_mlflow_sqlite_store_holds_the_run(teacher_run):
    db = teacher_run.parent / "mlruns.db"  # the default store lies beside the run folders, shared by the roles
    assert db.is_file()
    con = sqlite3.connect(db)
    # the training run, recorded beside its checkpoints (other runs of the shared store are other tests')
    run_id = (teacher_run / "checkpoints" / "mlflow_run_id").read_text().strip()
    [(name, status)] = con.execute("select name, status from runs where run_uuid=?", (run_id,)).fetchall()
    assert name.startswith("unetpp_teacher_") and status == "FINISHED"
    params = dict(con.execute("select key, value from params where run_uuid=?", (run_id,)).fetchall())
    for key in ("role", "method", "network", "window", "num_slices", "epochs", "lr", "seed", "splits_sha256"):
        assert key in params, key
    assert params["role"] == "unetpp_teacher" and len(params["splits_sha256"]) == 64
    assert not any("case_0" in v for v in params.values()), "no case identifiers in params"
    metrics = {k for (k,) in con.execute("select distinct key from metrics where run_uuid=?", (run_id,))}
    assert {"train_loss", "dsc_tumor", "rvd_tumor", "dsc_organ"} <= metrics
    con.close()
    art_dir = teacher_run.parent / "mlruns" / run_id / "artifacts"
    names = {p.name for p in art_dir.iterdir()}
    assert {"best.pt", "val_cases.csv", "executed_config.json"} <= names


def test_kd_role_without_teacher_stops_before_training(cohort, tmp_path):
    proc = run_bundle(
        "training", "bundles/hlfd/configs/train.yaml", "--dataset_dir", str(cohort), "--output_dir", str(tmp_path), *TINY,
        expect_ok=False,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "--teacher_ckpt" in log
    assert not (tmp_path / "checkpoints").exists()


def test_kd_role_with_a_bad_kd_knob_stops_before_training(cohort, teacher_run, tmp_path):
    proc = run_bundle(
        "training", "bundles/kd_baselines/configs/train.yaml", "--dataset_dir", str(cohort), "--output_dir", str(tmp_path),
        "--teacher_ckpt", str(teacher_run / "checkpoints" / "best.pt"), "--kd_method", "skd", "--kd_mask", "teacher_correct",
        *TINY, expect_ok=False,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "ERROR: --kd_mask teacher_correct restricts pixel-level terms; --kd_method skd has none" in log
    assert not (tmp_path / "checkpoints").exists()


def test_init_checkpoint_of_another_network_stops_before_training(cohort, teacher_run, tmp_path):
    """--init_checkpoint with the teacher's weights on the student role: one clear error, nothing trained or written."""
    proc = run_bundle(
        "training", "bundles/resnet18_student/configs/train.yaml", "--dataset_dir", str(cohort), "--output_dir",
        str(tmp_path / "out"), "--init_checkpoint", str(teacher_run / "checkpoints" / "best.pt"),
        "--network_kwargs", TINY_WIDTHS["resnet18_student"], *TINY, expect_ok=False,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    first = next(line for line in log.splitlines() if line.startswith("ERROR"))
    assert "best.pt does not fit this role's network (it was trained as unetpp_teacher" in first
    assert not (tmp_path / "out" / "checkpoints" / "last.pt").exists()


def test_dataset_dir_without_data_stops(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_bundle(
        "training", "bundles/resnet18_student/configs/train.yaml", "--dataset_dir", str(empty),
        "--output_dir", str(tmp_path / "out"), *TINY, expect_ok=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "holds no dataset" in proc.stdout + proc.stderr


def test_inference_on_a_dicom_series(teacher_run, shared_data, tmp_path):
    series = shared_data / "ct" / "totalsegmentator_example" / "example_ct_dicom"
    if not series.is_dir():
        pytest.skip(f"{series} not found")
    src = tmp_path / "dicom_in"
    shutil.copytree(series, src / "patient_a")
    out = tmp_path / "out"
    run_bundle(
        "inferring", "bundles/unetpp_teacher/configs/inference.yaml",
        "--input_dir", str(src), "--output_dir", str(out), "--checkpoint", str(teacher_run / "checkpoints" / "best.pt"),
    )  # fmt: skip
    written = sorted(p for p in out.glob("*.nii.gz"))
    assert len(written) == 1
    ref = nib.load(str(shared_data / "ct" / "totalsegmentator_example" / "example_seg_dicom.nii.gz"))
    seg = nib.load(str(written[0]))
    assert seg.shape == ref.shape == (512, 512, 20)
    assert np.allclose(seg.affine, ref.affine, atol=1e-3)
    with open(out / "volumes.csv") as f:
        assert len(list(csv.DictReader(f))) == 1


def test_multi_gpu_overlay_on_cpu_gloo(cohort, teacher_run, tmp_path):
    """The DDP overlay, one process on the gloo backend (no GPU here): DistributedSampler, rank-0 outputs."""
    import subprocess
    import sys

    from tests.bundles.conftest import REPO

    cfg = "['bundles/hlfd/configs/train.yaml','bundles/hlfd/configs/multi_gpu_train.yaml']"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "1",
        "-m", "monai.bundle", "run", "training", "--config_file", cfg, "--dataset_dir", str(cohort),
        "--output_dir", str(tmp_path), "--teacher_ckpt", str(teacher_run / "checkpoints" / "best.pt"),
        "--network_kwargs", TINY_WIDTHS["hlfd"], *TINY,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ck["epoch"] == 1 and not any(k.startswith("module.") for k in ck["model"]), "weights saved unwrapped"
    assert (tmp_path.parent / "mlruns.db").is_file()
