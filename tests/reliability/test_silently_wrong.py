"""Issue 19, silently wrong results (exit 0): a NaN loss trained on, empty-vs-empty tumor DSC counted as perfect,
check_dataset passing ambiguous or absurd files, colliding evaluation case ids, role/network mismatch at
evaluation, a parent run that does not exist, polyp masks of another size."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipelines.engine import BundleInputError
from tests.reliability.conftest import one_line, write_nifti

# ------------------------------------------------------------------------------------------------ NaN loss


def _trainer(images: torch.Tensor, files: list[str]):
    """A MONAI SupervisedTrainer over one batch (MetaTensor images naming ``files``), with the project's guard."""
    from monai.data import MetaTensor
    from monai.engines import SupervisedTrainer

    from pipelines.engine import NonFiniteLossStop

    net = torch.nn.Conv2d(1, 2, 3, padding=1)
    batch = {"image": MetaTensor(images, meta={"filename_or_obj": files}), "label": torch.zeros(len(files), 1, 8, 8)}
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=[batch], network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=lambda p, y: p.mean(), decollate=False,
    )  # fmt: skip
    NonFiniteLossStop().attach(trainer)
    return trainer, net


def test_nan_loss_stops_at_the_first_batch_naming_its_cases_before_the_weights_change():
    images = torch.zeros(2, 1, 8, 8)
    images[1, 0, 3, 3] = float("nan")  # one NaN voxel, as with --check_data false
    trainer, net = _trainer(images, ["/d/case_00007/imaging.nii.gz", "/d/case_00009/imaging.nii.gz"])
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(BundleInputError) as err:
        trainer.run()
    message = str(err.value)
    assert one_line(message) and "nan" in message and "case_00007" in message and "case_00009" in message, message
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters())), "a NaN step reached the weights"
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_finite_loss_trains_as_before():
    trainer, net = _trainer(torch.ones(2, 1, 8, 8), ["a.nii.gz", "b.nii.gz"])
    before = [p.detach().clone() for p in net.parameters()]
    trainer.run()
    assert not all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


@pytest.mark.slow
def test_training_on_a_nan_voxel_exits_non_zero_and_saves_no_nan_model(cohort, tmp_path):
    """The issue's run: one NaN voxel, ``--check_data false``: one ERROR line naming the case, exit 1, and no
    checkpoint holds a NaN weight."""
    import shutil

    import nibabel as nib

    from pipelines.engine import load_checkpoint
    from tests.reliability.conftest import TINY, TINY_WIDTHS, run_bundle

    data = tmp_path / "kits"
    shutil.copytree(cohort, data)
    for image in sorted(data.glob("case_*/imaging.nii.gz")):
        img = nib.load(str(image))
        arr = np.asarray(img.dataobj).astype(np.float32)
        arr[5:60, 5:60, :] = np.nan  # every slice: whichever slab is drawn holds NaN
        nib.save(nib.Nifti1Image(arr, img.affine), str(image))
    out = tmp_path / "run"
    proc = run_bundle(
        "training", "bundles/resnet18_student/configs/train.yaml", "--dataset_dir", str(data), "--output_dir", str(out),
        "--check_data", "false", "--network_kwargs", TINY_WIDTHS["resnet18_student"], *TINY, expect_ok=False,
    )  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR:")]
    assert errors and "training loss is nan" in errors[0] and "case_0000" in errors[0], proc.stderr[-3000:]
    for ckpt in sorted((out / "checkpoints").glob("*.pt")):
        state = load_checkpoint(ckpt)["model"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), ckpt


# ------------------------------------------------------------------------------------------------ empty vs empty


def test_empty_vs_empty_tumor_dsc_is_undefined_and_never_selects_a_checkpoint(tmp_path, caplog):
    """Validation where no label has tumor and nothing is predicted: tumor DSC is NaN (not 1.0), the mean is
    undefined, and the checkpointer says so instead of keeping a "perfect" best.pt."""
    from pipelines.engine import TrainCheckpointer
    from pipelines.engine.metrics import RegionMetric

    organ_only = torch.zeros(3, 1, 8, 8, 4)
    organ_only[:, :, 2:5, 2:5, :] = 1  # kidney, no tumor
    metric = RegionMetric("dsc", "tumor")
    values = metric(organ_only, organ_only)
    assert torch.isnan(values).all() and math.isnan(metric.aggregate().item())
    assert RegionMetric("dsc", "organ")(organ_only, organ_only).eq(1.0).all()  # a defined region is still scored

    net = torch.nn.Linear(2, 2)
    evaluator = SimpleNamespace(state=SimpleNamespace(metrics={"dsc_tumor": float("nan")}))
    saver = TrainCheckpointer(str(tmp_path / "ck"), net, evaluator=evaluator, key_metric="dsc_tumor")
    saver._trainer = SimpleNamespace(state=SimpleNamespace(epoch=3, max_epochs=5, epoch_length=1))
    caplog.set_level(logging.WARNING)
    saver._validated(evaluator)
    assert saver.best_metric == -math.inf and not (tmp_path / "ck" / "best.pt").exists()
    assert any("undefined" in r.getMessage() and "dsc_tumor" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------ check_dataset


def _kits_case(root, image: np.ndarray, name: str = "imaging.nii.gz"):
    case = root / "case_00000"
    case.mkdir(parents=True, exist_ok=True)
    write_nifti(case / name, image)
    label = np.zeros(image.shape[:3], np.uint8)
    label[2:5, 2:5, 1:3] = 1
    write_nifti(case / "segmentation.nii.gz", label)
    return case


def _hu(shape=(16, 16, 8)) -> np.ndarray:
    data = np.random.default_rng(0).integers(-1000, 400, size=shape).astype(np.float32)
    data[0, 0, 0] = 1200
    return data


def test_check_dataset_refuses_imaging_nii_next_to_imaging_nii_gz(tmp_path, capsys):
    from pipelines.check_dataset import main as check_main

    case = _kits_case(tmp_path / "kits", _hu())
    write_nifti(case / "imaging.nii", _hu() + 5)  # which one is the case? never picked silently
    assert check_main([str(tmp_path / "kits")]) != 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "imaging.nii.gz" in text and "imaging.nii" in text and "both" in text


def test_check_dataset_flags_1e30_voxels(tmp_path, capsys):
    from pipelines.check_dataset import main as check_main

    data = _hu()
    data[3, 3, 3] = 1e30
    _kits_case(tmp_path / "kits", data)
    assert check_main([str(tmp_path / "kits")]) == 1
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ERROR")]
    assert any("1e+30" in line and "imaging.nii.gz" in line for line in errors), errors


# ------------------------------------------------------------------------------------------------ case ids


def test_evaluation_files_sharing_a_name_get_unique_case_ids_and_prediction_files(tmp_path):
    """patXX/ct.nii.gz: three predictions, three distinct files and rows (never one overwriting the others)."""
    from monai.data import MetaTensor

    from pipelines.engine.inference import WriteLabelMapd
    from pipelines.engine.metrics import unique_case_ids

    images = [str(tmp_path / "data" / f"pat{i:02d}" / "ct.nii.gz") for i in range(3)]
    ids = unique_case_ids(images)
    assert sorted(ids.values()) == ["pat00_ct", "pat01_ct", "pat02_ct"]
    assert unique_case_ids(["/d/case_00001/imaging.nii.gz", "/e/case_00002/imaging.nii.gz"]) == {
        "/d/case_00001/imaging.nii.gz": "case_00001", "/e/case_00002/imaging.nii.gz": "case_00002"}  # fmt: skip
    writer = WriteLabelMapd(keys="pred", output_dir=str(tmp_path / "pred"), images=images)
    for i, src in enumerate(images):
        pred = MetaTensor(torch.full((1, 4, 4, 2), i, dtype=torch.float32), affine=torch.eye(4))
        writer({"pred": pred, "image": MetaTensor(torch.zeros(1, 4, 4, 2), meta={"filename_or_obj": src})})
    written = sorted(p.name for p in (tmp_path / "pred").glob("*.nii.gz"))
    assert written == ["pat00_ct.nii.gz", "pat01_ct.nii.gz", "pat02_ct.nii.gz"]
    assert sorted(r[0] for r in writer.all_rows()) == ["pat00_ct", "pat01_ct", "pat02_ct"]


# ------------------------------------------------------------------------------------------------ polyp


def _png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)
    return str(path)


def test_polyp_mask_of_another_size_is_an_error_naming_both(tmp_path):
    from pipelines.engine.polyp import polyp_transforms

    image = _png(tmp_path / "a.png", np.full((40, 48, 3), 120, np.uint8))
    mask = _png(tmp_path / "a_mask.png", np.zeros((30, 30), np.uint8))
    with pytest.raises(Exception) as err:
        polyp_transforms("train", 32)({"image": image, "label": mask})
    chain, e = [], err.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    found = [c for c in chain if isinstance(c, BundleInputError)]
    assert found and "a_mask.png" in str(found[0]) and "a.png" in str(found[0]) and one_line(str(found[0]))
