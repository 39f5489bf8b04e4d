"""Issue 19, raw tracebacks and misleading messages: each bad input is one clear line naming the file or knob,
before long work, with the inputs unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.engine import BundleInputError
from tests.reliability.conftest import one_line, snapshot


def test_dicom_pixel_spacing_zero_is_one_line_naming_the_series(tmp_path, capsys):
    from pipelines.dicom_to_nifti import main as dicom_main
    from tests.pipelines.test_dicom_to_nifti import _z_positions, write_series

    src = tmp_path / "src"
    write_series(src, _z_positions([0, 2, 4]), spacing=(0.0, 0.0), number=6)
    before = snapshot(src)
    assert dicom_main([str(src), str(tmp_path / "out")]) != 0
    printed = capsys.readouterr()
    text = (printed.out + printed.err).strip()
    assert "PixelSpacing" in text and "series6_" in text and "Traceback" not in text and "LinAlgError" not in text
    assert not list(tmp_path.glob("out/*.nii.gz"))
    assert snapshot(src) == before


def test_rgb_nifti_is_a_clear_error_in_check_dataset(tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    from pipelines.check_dataset import main as check_main

    case = tmp_path / "kits" / "case_00000"
    case.mkdir(parents=True)
    rgb = np.zeros((16, 16, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(case / "imaging.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8), np.uint8), np.eye(4)), str(case / "segmentation.nii.gz"))
    assert check_main([str(tmp_path / "kits")]) == 1
    printed = capsys.readouterr()
    assert "Traceback" not in printed.err and "UFunc" not in printed.out + printed.err
    assert any(line.startswith("ERROR") and "RGB" in line and "imaging.nii.gz" in line for line in printed.out.splitlines())


# ------------------------------------------------------------------------------------------------ knobs


@pytest.mark.parametrize(
    "knobs, named",
    [
        ({"epochs": "abc"}, "--epochs 'abc'"),
        ({"seed": "abc"}, "--seed 'abc'"),
        ({"lr": -0.001}, "--lr -0.001"),
        ({"val_interval": 0}, "--val_interval 0"),
        ({"network_name": "resnet18_student", "network_kwargs": {"foo": 1}}, "--network_kwargs: 'foo'"),
        ({"run_tags": "{'a'}"}, "--run_tags"),
        ({"run_tags": "not a dict"}, "--run_tags"),
        ({"tracking_uri": "ftp://host/mlruns"}, "--tracking_uri 'ftp://host/mlruns'"),
        ({"batch_size": 1, "samples_per_volume": 1}, "--batch_size 1 with --samples_per_volume 1"),
    ],
    ids=["epochs_abc", "seed_abc", "lr_negative", "val_interval_0", "network_kwargs_foo", "run_tags_set", "run_tags_text",
         "tracking_ftp", "batch_norm_single_crop"],  # fmt: skip
)
def test_bad_knob_values_are_one_line_naming_the_knob(knobs, named):
    from pipelines.engine import validate_knobs

    with pytest.raises(ValueError) as err:
        validate_knobs(**knobs)
    assert named in str(err.value) and one_line(str(err.value)), str(err.value)


def test_good_knob_values_pass():
    from pipelines.engine import validate_knobs

    assert validate_knobs(epochs="3", seed=0, lr=1e-3, val_interval=1, batch_size=4, samples_per_volume=2, network_name="resnet18_student",
                          network_kwargs={"base_width": 8}, run_tags={"mlflow.parentRunId": "abc"}, tracking_uri="sqlite:///x.db")  # fmt: skip


def test_dataset_dir_that_is_a_file_says_so(tmp_path):
    from pipelines.engine import validate_knobs

    f = tmp_path / "scan.nii.gz"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file, not a dataset") as err:
        validate_knobs(dataset_dir=str(f))
    assert str(f) in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("knob, value", [("epochs", "abc"), ("lr", "-0.001"), ("network_kwargs", "{'foo': 1}"), ("tracking_uri", "ftp://x/y")])
def test_bundle_command_line_bad_knob_is_one_error_line(knob, value, tmp_path, cohort):
    """Through ``python -m monai.bundle run training``: stderr starts with one ``ERROR:`` line naming the knob."""
    from tests.reliability.conftest import run_bundle

    proc = run_bundle("training", "bundles/resnet18_student/configs/train.yaml", "--dataset_dir", str(cohort),
                      "--output_dir", str(tmp_path / "run"), f"--{knob}", value, expect_ok=False)  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR:")]
    assert errors and f"--{knob}" in errors[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_parent_run_that_does_not_exist_is_refused(tmp_path):
    from pipelines.engine.preflight import _check_parent_run

    with pytest.raises(BundleInputError, match="'feedface'") as err:
        _check_parent_run(f"sqlite:///{tmp_path / 'none.db'}", "feedface")
    assert one_line(str(err.value)) and "--run_tags mlflow.parentRunId" in str(err.value)
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("x"))
    _check_parent_run(uri, run.info.run_id)  # an existing parent passes
    with pytest.raises(BundleInputError):
        _check_parent_run(uri, "0" * 32)


def test_teacher_checkpoint_of_a_student_names_the_file(tmp_path):
    import torch

    import networks
    from pipelines.engine import check_teacher_checkpoint

    kwargs = {"spatial_dims": 2, "in_channels": 3, "out_channels": 3, "base_width": 8}
    net = networks.create("resnet18_student", **kwargs)
    ckpt = tmp_path / "student_best.pt"
    torch.save({"model": net.state_dict(), "network": {"name": "resnet18_student", **kwargs}, "epoch": 1}, ckpt)
    with pytest.raises(BundleInputError) as err:
        check_teacher_checkpoint(ckpt, "hlfd", method="hlfd", in_channels=3, spatial_dims=2)
    assert str(ckpt) in str(err.value) and "student" in str(err.value) and one_line(str(err.value))


def test_evaluating_a_checkpoint_with_another_roles_config_is_refused():
    from pipelines.engine import check_checkpoint_role

    settings = {"role": "resnet18_student", "network_name": "resnet18_student"}
    with pytest.raises(BundleInputError) as err:
        check_checkpoint_role("unetpp_teacher", settings, "runs/student/checkpoints/best.pt")
    assert "bundles/resnet18_student/configs/evaluate.yaml" in str(err.value) and one_line(str(err.value))
    assert check_checkpoint_role("resnet18_student", settings, "x.pt")


def _first_project_error(exc):
    from pipelines.engine.knobs import project_error

    return project_error(exc)


def test_polyp_grayscale_image_is_read_as_rgb_and_truncated_jpeg_is_one_line(tmp_path):
    import numpy as np
    from PIL import Image

    from pipelines.engine.polyp import polyp_transforms

    gray, mask = tmp_path / "g.png", tmp_path / "g_mask.png"
    Image.fromarray(np.full((40, 40), 90, np.uint8)).save(gray)
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(mask)
    out = polyp_transforms("train", 32)({"image": str(gray), "label": str(mask)})
    assert tuple(out["image"].shape) == (3, 32, 32) and tuple(out["label"].shape) == (1, 32, 32)
    jpeg = tmp_path / "t.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[:300])  # truncated
    with pytest.raises(Exception) as err:
        polyp_transforms("infer", 32)({"image": str(jpeg)})
    found = _first_project_error(err.value)
    assert found is not None and str(jpeg) in str(found) and one_line(str(found)), repr(err.value)


def test_experiment_with_a_nan_voxel_prints_the_error_not_a_traceback(tmp_path):
    import shutil
    import subprocess
    import sys

    import nibabel as nib
    import numpy as np

    from pipelines.synthesize import synthesize
    from tests.conftest import subprocess_env

    data = tmp_path / "kits"
    synthesize("kits", cases=3, size=32, out=data, seed=2)
    image = data / "case_00001" / "imaging.nii.gz"
    img = nib.load(str(image))
    arr = np.asarray(img.dataobj).astype(np.float32)
    arr[3, 3, 1] = np.nan
    nib.save(nib.Nifti1Image(arr, img.affine), str(image))
    cmd = [sys.executable, "-m", "pipelines.experiment", "--dataset_dir", str(data), "--out", str(tmp_path / "exp"),
           "--methods", "hlfd", "--seeds", "1", "--epochs", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "ERROR: dataset integrity check failed" in proc.stderr and "NaN" in proc.stderr and str(image) in proc.stderr
    shutil.rmtree(tmp_path / "exp", ignore_errors=True)


def test_resume_with_other_network_kwargs_is_one_line_before_long_work(tmp_path):
    import torch

    import networks
    from pipelines.engine.preflight import _check_resume_fits

    kwargs = {"spatial_dims": 2, "in_channels": 3, "out_channels": 3}
    last = tmp_path / "last.pt"
    trained = networks.create("resnet18_student", base_width=8, **kwargs)
    torch.save({"model": trained.state_dict(), "epoch": 1, "settings": {"network_kwargs": {"base_width": 8}}}, last)
    _check_resume_fits(last, networks.create("resnet18_student", base_width=8, **kwargs))  # same network: fine
    with pytest.raises(BundleInputError) as err:
        _check_resume_fits(last, networks.create("resnet18_student", base_width=16, **kwargs))
    assert str(last) in str(err.value) and "--network_kwargs {'base_width': 8}" in str(err.value) and one_line(str(err.value))


def test_label_value_beyond_the_networks_classes_is_refused_in_preflight(tmp_path):
    import json

    import networks
    from pipelines.engine import preflight

    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"training": [], "validation": [], "test": [],
                                  "meta": {"labels": {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3}}}))  # fmt: skip
    net = networks.create("resnet18_student", spatial_dims=2, in_channels=3, out_channels=3, base_width=8)
    with pytest.raises(BundleInputError) as err:
        preflight(str(splits), role="resnet18_student", network=net, check_integrity=False)
    assert "'cyst' = 3" in str(err.value) and str(splits) in str(err.value) and one_line(str(err.value))


def test_mlflow_store_on_a_read_only_disk_is_one_line(read_only_dir):
    from pipelines.engine.preflight import _check_store_writable

    uri = f"sqlite:///{read_only_dir / 'mlruns.db'}"
    with pytest.raises(BundleInputError) as err:
        _check_store_writable(uri)
    assert "mlruns.db" in str(err.value) and "--tracking_uri" in str(err.value) and one_line(str(err.value))
    _check_store_writable(f"sqlite:///{read_only_dir.parent / 'mlruns.db'}")  # a writable folder passes


def test_dataset_dir_file_in_resolve_splits_says_file_and_a_csv_is_read(tmp_path):
    import numpy as np

    from pipelines.engine import resolve_splits
    from tests.reliability.conftest import write_nifti

    f = tmp_path / "scan.nii.gz"
    write_nifti(f, np.zeros((8, 8, 4), np.int16))
    with pytest.raises(BundleInputError, match="is a file, not a dataset"):
        resolve_splits(f, tmp_path / "run")
    rows = ["image,label"]
    for i in range(3):
        write_nifti(tmp_path / f"i{i}.nii.gz", np.zeros((8, 8, 4), np.int16))
        write_nifti(tmp_path / f"l{i}.nii.gz", np.zeros((8, 8, 4), np.uint8))
        rows.append(f"i{i}.nii.gz,l{i}.nii.gz")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    assert Path(resolve_splits(tmp_path / "list.csv", tmp_path / "run", task=None)).is_file()
