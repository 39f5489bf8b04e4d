"""A case that cannot be read, with ``--check_data false`` (issue 12): one clear error naming the file and the remedy,
whether it is found while caching (``--cache_rate 1``) or at the first iteration (``--cache_rate 0``), in the main
process or in a DataLoader worker; never the raw nibabel/MONAI traceback. Inputs stay byte-identical."""

from __future__ import annotations

import gc
import gzip
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from pipelines.engine import BundleInputError, build_dataset
from tests.reliability.conftest import one_line, snapshot

#: damage done to one file of case_00001: name -> (file, bytes -> damaged bytes)
DAMAGE = {
    "image_truncated_gzip": ("imaging.nii.gz", lambda b: b[: len(b) // 2]),
    "image_header_only": ("imaging.nii.gz", lambda b: b[:300]),
    "image_not_nifti": ("imaging.nii.gz", lambda b: b"this is not a NIfTI file"),
    "image_missing_voxels": ("imaging.nii.gz", lambda b: gzip.compress(gzip.decompress(b)[:-500])),
    "label_truncated_gzip": ("segmentation.nii.gz", lambda b: b[: len(b) // 2]),
    "image_empty": ("imaging.nii.gz", lambda b: b""),
}


@pytest.fixture(scope="module")
def transforms_2d():
    from transforms import build_transforms

    return build_transforms("val", spatial_dims=2, num_slices=3, task="kits", in_plane_size=None)


def _items(root: Path) -> list[dict[str, str]]:
    return [
        {
            "image": str(root / f"case_0000{i}" / "imaging.nii.gz"),
            "label": str(root / f"case_0000{i}" / "segmentation.nii.gz"),
        }
        for i in (0, 1)
    ]


@pytest.fixture
def damaged(request, tmp_path) -> tuple[list[dict[str, str]], Path]:
    """(the datalist, the damaged file) of a 2-case 32^2 cohort whose case_00001 has ``request.param`` damage."""
    from pipelines.synthesize import synthesize

    synthesize("kits", cases=2, size=32, out=tmp_path / "kits", seed=4)
    name, damage = DAMAGE[request.param]
    bad = tmp_path / "kits" / "case_00001" / name
    bad.write_bytes(damage(bad.read_bytes()))
    return _items(tmp_path / "kits"), bad


def _assert_clear(err: BaseException, bad: Path) -> None:
    message = str(err)
    assert isinstance(err, BundleInputError), f"{type(err).__name__}: {message}"
    assert message.startswith(f"cannot read {bad} ("), message
    assert "pipelines.check_dataset" in message and "re-export" in message and one_line(message), message


@pytest.mark.parametrize("damaged", sorted(DAMAGE), indirect=True)
def test_unreadable_case_while_caching(damaged, transforms_2d):
    items, bad = damaged
    before = snapshot(bad.parent.parent)
    with pytest.raises(BundleInputError) as err:
        build_dataset(items, transforms_2d, cache_rate=1.0, num_workers=0)
    _assert_clear(err.value, bad)
    assert snapshot(bad.parent.parent) == before


@pytest.mark.parametrize("workers", [0, 1], ids=["main_process", "dataloader_worker"])
@pytest.mark.parametrize("damaged", ["image_truncated_gzip", "label_truncated_gzip"], indirect=True)
def test_unreadable_case_at_the_first_iteration(damaged, workers, transforms_2d):
    """``--cache_rate 0``: nothing is read until the loader asks; the error then names the file, also when it is
    raised in a DataLoader worker process (torch rebuilds it from the worker's message)."""
    items, bad = damaged
    dataset = build_dataset(items, transforms_2d, cache_rate=0.0, num_workers=0)
    assert dataset[0]["image"].shape[0] == 3, "the intact case still loads"
    with pytest.raises(BundleInputError) as err:
        list(DataLoader(dataset, batch_size=1, num_workers=workers))
    error = err.value
    error.__traceback__ = None  # its frames hold the loader's iterator: stop the worker process now, not at exit
    del err
    gc.collect()
    _assert_clear(error, bad)


def test_a_bug_in_a_transform_is_not_reported_as_an_unreadable_file(tmp_path):
    """Only read failures become the dataset message: a failing transform keeps its own error and traceback."""
    from monai.transforms import Compose, Lambdad, LoadImaged

    from pipelines.synthesize import synthesize

    synthesize("kits", cases=2, size=32, out=tmp_path / "kits", seed=4)

    def broken(x):
        raise KeyError("a bug, not a bad file")

    dataset = build_dataset(
        _items(tmp_path / "kits"), Compose([LoadImaged(["image", "label"]), Lambdad("image", broken)]), cache_rate=0.0
    )
    with pytest.raises(RuntimeError) as err:
        dataset[0]
    assert not isinstance(err.value, BundleInputError) and isinstance(err.value.__cause__, KeyError)


def _tiny_student_checkpoint(path: Path) -> Path:
    """A 4-wide 2.5D ResNet18 student checkpoint with the settings a training run records (no training needed)."""
    import torch

    import networks

    kwargs = {"spatial_dims": 2, "in_channels": 3, "out_channels": 3, "base_width": 8}
    preprocessing = {"spatial_dims": 2, "num_slices": 3, "task": "kits", "window": None, "pixdim": None}
    settings = {
        "role": "resnet18_student",
        "network_name": "resnet18_student",
        "network_kwargs": kwargs,
        "preprocessing": {**preprocessing, "in_plane_size": [32, 32], "roi_size": None},
    }
    torch.save(
        {"model": networks.create("resnet18_student", **kwargs).state_dict(), "epoch": 1, "settings": settings}, path
    )
    return path


def test_inference_input_whose_voxels_are_missing(tmp_path):
    """Its header is valid; its voxels cannot be read (was: MONAI's traceback, no file named). Now: one ERROR line
    naming it, before any inference (the input check reads every input's voxels: issue 17's CT checks); the inputs
    unchanged; nothing written and no temporary file left."""
    from pipelines.synthesize import synthesize
    from tests.reliability.conftest import leftovers, run_bundle

    synthesize("kits", cases=2, size=32, out=tmp_path / "kits", seed=4)
    src = tmp_path / "in"
    src.mkdir()
    (src / "a_good.nii.gz").write_bytes((tmp_path / "kits" / "case_00000" / "imaging.nii.gz").read_bytes())
    bad = src / "b_bad.nii.gz"
    bad.write_bytes(
        DAMAGE["image_missing_voxels"][1]((tmp_path / "kits" / "case_00001" / "imaging.nii.gz").read_bytes())
    )
    ckpt = _tiny_student_checkpoint(tmp_path / "student.pt")
    before = snapshot(src, ckpt)
    out = tmp_path / "out"
    proc = run_bundle(
        "inferring", "bundles/resnet18_student/configs/inference.yaml", "--input_dir", str(src),
        "--output_dir", str(out), "--checkpoint", str(ckpt), expect_ok=False, timeout=240,
    )  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR: ")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"ERROR: cannot read {bad} (OSError: Expected"), errors[0]
    assert "Traceback" not in proc.stderr and "Failed to evaluate" not in proc.stderr
    assert snapshot(src, ckpt) == before
    assert not out.exists() or (not list(out.glob("*.nii.gz")) and not leftovers(out))
