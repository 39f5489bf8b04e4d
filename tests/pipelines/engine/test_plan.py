"""The preprocessing plan: derived from the training headers, applied to the transforms, read back from checkpoints."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
import torch

from pipelines.engine import (
    SliceBatchInferer,
    apply_plan,
    checkpoint_preprocessing,
    make_plan,
    ras_geometry,
    spacing_outside_plan,
)


def _save(path, shape, zooms, axcodes_ipl: bool = False):
    """A zero int16 volume; ``axcodes_ipl``: stored I, P, L like KiTS19 (the axial axis first)."""
    if axcodes_ipl:  # array axes (I, P, L): affine columns -z, -y, -x
        affine = np.zeros((4, 4))
        affine[2, 0], affine[1, 1], affine[0, 2], affine[3, 3] = -zooms[0], -zooms[1], -zooms[2], 1.0
    else:
        affine = np.diag([*zooms, 1.0])
    nib.save(nib.Nifti1Image(np.zeros(shape, dtype=np.int16), affine), str(path))
    return {"image": str(path)}


def test_make_plan_medians_and_ras_order(tmp_path):
    items = [
        _save(tmp_path / "a.nii.gz", (40, 50, 10), (0.8, 0.8, 3.0)),
        _save(tmp_path / "b.nii.gz", (60, 60, 20), (0.6, 0.6, 1.0)),
        # KiTS19-like: stored (slices, rows, columns); in RAS its slice spacing 5.0 is z, the in-plane 1.0 x/y
        _save(tmp_path / "c.nii.gz", (8, 30, 30), (5.0, 1.0, 1.0), axcodes_ipl=True),
    ]
    spacing, shape = ras_geometry(items[2]["image"])
    assert spacing.tolist() == [1.0, 1.0, 5.0] and shape.tolist() == [30, 30, 8]
    plan = make_plan(items, task="kits")
    # in-plane: median of {0.8, 0.8, 0.6, 0.6, 1.0, 1.0} = 0.8; slices: median of {3, 1, 5} = 3
    assert plan["target_spacing"] == [0.8, 0.8, 3.0]
    # resampled in-plane extents: 40, 45, 37.5 (x) and 50, 45, 37.5 (y): medians 40 and 45, rounded up to 64
    assert plan["median_shape"][:2] == [40.0, 45.0] and plan["in_plane_size"] == [64, 64]
    assert plan["window"] == [-200.0, 300.0] and plan["cases"] == 3 and plan["spacing_source"] == "median"
    assert plan["spacing_range"] == {"min": [0.6, 0.6, 1.0], "max": [1.0, 1.0, 5.0]}
    knob = make_plan(items, window="liver", target_spacing=0.7, slice_spacing="2.5", in_plane_size=[96, 80])
    assert knob["target_spacing"] == [0.7, 0.7, 2.5] and knob["in_plane_size"] == [96, 80]
    assert knob["window"] == [-40.0, 160.0] and knob["spacing_source"] == "knob"


@pytest.mark.parametrize("bad", [0, -1.0, "x", [1, 1], float("nan")])
def test_make_plan_refuses_bad_spacing_knob(tmp_path, bad):
    items = [_save(tmp_path / "a.nii.gz", (8, 8, 4), (1.0, 1.0, 2.0))]
    with pytest.raises(ValueError, match="target_spacing"):
        make_plan(items, target_spacing=bad)


def test_make_plan_names_unreadable_file(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="broken.nii.gz"):
        make_plan([{"image": str(bad)}])
    with pytest.raises(ValueError, match="empty"):
        make_plan([])


def test_apply_plan_and_old_checkpoint_warning(caplog):
    plan = {"target_spacing": [0.8, 0.8, 3.0], "in_plane_size": [64, 64], "window": [-200.0, 300.0]}
    base = {
        "spatial_dims": 2,
        "num_slices": 3,
        "task": "kits",
        "pixdim": None,
        "in_plane_size": [256, 256],
        "roi_size": None,
    }
    pre = apply_plan(base, plan)
    assert pre["pixdim"] == [0.8, 0.8, 3.0] and pre["in_plane_size"] == [64, 64] and pre["in_plane_mode"] == "pad"
    assert pre["plan"] == plan and base["in_plane_size"] == [256, 256]  # the input is not modified
    assert apply_plan(base, None) == base
    with caplog.at_level(logging.WARNING, logger="pipelines.engine.plan"):
        assert checkpoint_preprocessing({"preprocessing": pre}, "new.pt") == pre
        assert not caplog.records
        old = checkpoint_preprocessing({"preprocessing": base}, "old.pt")
    assert old == base
    (record,) = caplog.records
    assert "old.pt has no preprocessing plan" in record.message
    assert "no resampling" in record.message and "resized to [256, 256]" in record.message


def test_spacing_outside_plan(tmp_path):
    plan = {"spacing_range": {"min": [0.6, 0.6, 1.0], "max": [1.0, 1.0, 5.0]}, "target_spacing": [0.8, 0.8, 3.0]}
    ok = _save(tmp_path / "ok.nii.gz", (8, 8, 4), (1.5, 1.5, 2.0))
    far = _save(tmp_path / "far.nii.gz", (8, 8, 4), (0.2, 0.2, 2.0))
    assert spacing_outside_plan(ok["image"], plan) == ""
    message = spacing_outside_plan(far["image"], plan)
    assert "far.nii.gz" in message and "[0.2, 0.2, 2.0]" in message and "[0.6, 0.6, 1.0]" in message
    assert spacing_outside_plan(far["image"], None) == ""


def test_pad_mode_keeps_millimetres(tmp_path):
    """A 40 mm disc at 0.5 mm and at 1.0 mm has the same size after the planned transforms (resize would not)."""
    from transforms import build_transforms

    paths = []
    for spacing, n in ((0.5, 160), (1.0, 60)):
        c = (np.arange(n) - (n - 1) / 2) * spacing
        disc = (c[:, None] ** 2 + c[None, :] ** 2) <= 20.0**2
        image = np.where(disc, 100, -1000)[..., None].repeat(3, -1).astype(np.int16)
        nib.save(nib.Nifti1Image(image, np.diag([spacing, spacing, 2.0, 1.0])), str(tmp_path / f"{n}.nii.gz"))
        paths.append(str(tmp_path / f"{n}.nii.gz"))
    plan = {"target_spacing": [1.0, 1.0, 2.0], "in_plane_size": [64, 64], "window": [-200.0, 300.0]}
    pre = apply_plan({"spatial_dims": 2, "num_slices": 1, "task": "kits"}, plan)
    out = [build_transforms("infer", **pre)({"image": p})["image"] for p in paths]
    assert out[0].shape[1:3] == (80, 80) and out[1].shape[1:3] == (64, 64)  # larger field of view kept, small padded
    areas = [float((o[0, :, :, 1] > 0.5).sum()) for o in out]
    assert abs(areas[0] - areas[1]) / areas[1] < 0.03 and abs(areas[1] - np.pi * 20.0**2) / (np.pi * 20.0**2) < 0.05


def test_slice_inferer_in_plane_window():
    """Slices larger than roi_size go through an in-plane sliding window: a 1x1 network gives the whole-slice result,
    and the network never sees more than roi_size."""
    seen = []

    class Pointwise(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 2, 1)

        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return self.conv(x)

    net = Pointwise()
    x = torch.randn(1, 3, 90, 70, 5)
    with torch.no_grad():
        whole = SliceBatchInferer(4)(x, net)
        seen.clear()
        windowed = SliceBatchInferer(4, roi_size=(64, 64))(x, net)
    assert windowed.shape == whole.shape == (1, 2, 90, 70, 5)
    assert torch.allclose(windowed, whole, atol=1e-5)
    assert seen and set(seen) == {(64, 64)}
    with pytest.raises(ValueError, match="roi_size"):
        SliceBatchInferer(4, roi_size=(64,))


def test_kd_student_takes_the_teachers_plan(tmp_path):
    from pipelines.engine import training_plan

    items = [_save(tmp_path / "a.nii.gz", (40, 40, 10), (0.8, 0.8, 3.0))]
    teacher_plan = {"target_spacing": [1.5, 1.5, 5.0], "in_plane_size": [96, 96], "window": [-200.0, 300.0]}
    teacher = tmp_path / "teacher.pt"
    torch.save({"model": {}, "settings": {"preprocessing": {"plan": teacher_plan}}}, teacher)
    assert training_plan(items, teacher_checkpoint=str(teacher)) == teacher_plan
    assert training_plan(items, teacher_checkpoint="")["target_spacing"] == [0.8, 0.8, 3.0]
    assert training_plan(items, enabled="false") is None
    plain = tmp_path / "old_teacher.pt"
    torch.save({"model": {}, "settings": {"preprocessing": {}}}, plain)
    assert training_plan(items, teacher_checkpoint=str(plain))["target_spacing"] == [0.8, 0.8, 3.0]
