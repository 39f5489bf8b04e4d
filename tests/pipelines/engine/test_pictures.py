"""pipelines.engine.pictures: case choice, largest-tumor slice, the PNG files, and that drawing never stops a run."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from PIL import Image

from pipelines.engine.curves import read_history
from pipelines.engine.pictures import (
    CasePictures,
    CurvePictures,
    case_slice,
    draw_case_metrics,
    draw_curves,
    largest_tumor_slice,
    select_cases,
)


def _valid_png(path, min_side=150, max_side=4000):
    """A readable PNG of sane size that is not one flat colour."""
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        assert img.format == "PNG"
        w, h = img.size
        pixels = np.asarray(img.convert("L"), dtype=np.float64)
    assert min_side <= w <= max_side and min_side <= h <= max_side, (w, h)
    assert pixels.std() > 1.0


def test_select_cases_best_median_worst():
    # sorted by DSC: c .1, a .5, d .7, b .9 (e is NaN: left out) -> median = lower middle = a
    assert select_cases({"a": 0.5, "b": 0.9, "c": 0.1, "d": 0.7, "e": math.nan}) == {"best": "b", "median": "a", "worst": "c"}
    # ties broken by name: w 0, x .3, y .3, v .6, z .8 -> the middle (index 2) is y
    assert select_cases({"x": 0.3, "y": 0.3, "z": 0.8, "w": 0.0, "v": 0.6}) == {"best": "z", "median": "y", "worst": "w"}
    assert select_cases({"only": 0.4}) == {"best": "only", "median": "only", "worst": "only"}
    assert select_cases({"n": math.nan}) == {}


def test_largest_tumor_slice_of_a_hand_built_volume():
    label = np.zeros((1, 16, 16, 10), np.uint8)
    label[0, 2:10, 2:10, 1:9] = 1  # organ on slices 1..8
    label[0, 3:6, 3:4, 2] = 2  # 3 tumor voxels on slice 2
    label[0, 3:10, 5:6, 6] = 2  # 7 on slice 6
    label[0, 3:8, 7:8, 8] = 2  # 5 on slice 8
    assert largest_tumor_slice(label) == (6, "ground-truth tumor")
    pred = np.zeros_like(label)
    pred[0, 0:2, 0:2, 4] = 2  # 4 predicted tumor voxels on slice 4 only
    assert largest_tumor_slice(label, pred) == (6, "ground-truth tumor")  # the ground truth decides
    no_tumor = np.where(label == 2, 1, label)
    assert largest_tumor_slice(no_tumor, pred) == (4, "predicted tumor")
    organ = np.zeros_like(label)
    organ[0, :, :, 7] = 1
    organ[0, :4, :4, 3] = 1
    assert largest_tumor_slice(organ, np.zeros_like(label)) == (7, "ground-truth organ")
    assert largest_tumor_slice(np.zeros_like(label)) == (5, "middle slice")
    with pytest.raises(ValueError, match="shapes differ"):
        largest_tumor_slice(label, pred[..., :5])
    with pytest.raises(ValueError, match="neither"):
        largest_tumor_slice(None, None)


def test_case_slice_values():
    image = np.zeros((3, 20, 20, 6), np.float32)
    image[1, :, :, 4] = 0.5  # the middle channel of slice 4
    label = np.zeros((1, 20, 20, 6), np.uint8)
    label[0, 0:10, 0:4, 4] = 2  # 40 tumor voxels on slice 4
    label[0, 0:2, 0:5, 1] = 2  # 10 on slice 1
    pred = np.zeros_like(label)
    pred[0, 0:10, 2:6, 4] = 2  # 40 voxels, 20 overlapping
    s = case_slice("c", image, label, pred)
    # tumor DSC 2 * 20 / (40 + 50) and RVD (40 - 50) / 50, computed by hand
    assert s.dsc == pytest.approx(40 / 90) and s.rvd == pytest.approx(-0.2)
    assert (s.z, s.basis) == (4, "ground-truth tumor")
    assert s.image.dtype == np.uint8 and s.image.shape == (20, 20) and np.all(s.image == 128)
    assert int((s.label == 2).sum()) == 40 and int((s.pred == 2).sum()) == 40
    # large slices are subsampled
    big = case_slice("b", np.zeros((1, 600, 300, 2)), np.zeros((1, 600, 300, 2)), np.zeros((1, 600, 300, 2)), max_side=256)
    assert big.image.shape == (200, 100)
    assert big.dsc == 1.0 and math.isnan(big.rvd)  # no tumor anywhere: DSC 1 by convention, RVD undefined


#: tumor shift per case (rows): a 10x10 tumor on slices 3-4 against a prediction shifted by s rows
SHIFTS = {"c0": 0, "c1": 3, "c2": 6, "c3": 1, "c4": 9}


def _case(name, shift):
    label = torch.zeros(1, 32, 32, 8)
    label[0, 5:25, 5:25, 1:7] = 1
    label[0, 10:20, 10:20, 3:5] = 2
    label[0, 10:12, 10:12, 6] = 2  # a smaller tumor part on slice 6
    pred = torch.zeros_like(label)
    pred[0, 5:25, 5:25, 1:7] = 1
    pred[0, 10 + shift : 20 + shift, 10:20, 3:5] = 2
    image = MetaTensor(torch.rand(3, 32, 32, 8), meta={"filename_or_obj": f"/data/{name}/imaging.nii.gz"})
    return {"image": image, "label": label, "pred": pred}


def _evaluate(handler, items):
    engine = Engine(lambda e, batch: [batch])
    handler.attach(engine)
    engine.run(items, max_epochs=1)
    return engine


def test_case_pictures_draw_the_right_cases(tmp_path):
    handler = CasePictures(tmp_path, prefix="val_", title="hlfd")
    _evaluate(handler, [_case(n, s) for n, s in SHIFTS.items()])
    for name, shift in SHIFTS.items():  # numpy check of every kept whole-volume tumor DSC
        item = _case(name, shift)
        gt, pr = item["label"].numpy() == 2, item["pred"].numpy() == 2
        assert handler.cases[name].dsc == pytest.approx(2 * (gt & pr).sum() / (gt.sum() + pr.sum()))
    # overlap falls with the shift: DSC order c0 > c3 > c1 > c2 > c4 -> best c0, median c1, worst c4
    assert handler.chosen == {"best": "c0", "median": "c1", "worst": "c4"}
    assert all(s.z == 3 and s.basis == "ground-truth tumor" for s in handler.cases.values())
    _valid_png(tmp_path / "val_overlays.png")
    _valid_png(tmp_path / "val_case_metrics.png")
    # the next validation replaces the files' content and the kept cases
    _evaluate(handler, [_case("c9", 2)])
    assert set(handler.cases) == {"c9"} and handler.chosen == {"best": "c9", "median": "c9", "worst": "c9"}


def test_case_pictures_skip_unlabelled_items_and_never_fail(tmp_path, caplog):
    blocked = tmp_path / "not_a_folder"
    blocked.write_text("x")
    handler = CasePictures(blocked)
    item = _case("c0", 0)
    with caplog.at_level(logging.WARNING, logger="pipelines.engine.pictures"):
        _evaluate(handler, [item, {"image": item["image"], "pred": item["pred"]}])  # second: inference, no label
    assert list(handler.cases) == ["c0"]
    assert "could not draw" in caplog.text and blocked.read_text() == "x"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipelines.engine.pictures"):
        _evaluate(CasePictures(tmp_path), [{"image": torch.zeros(1, 4, 4, 2), "label": torch.zeros(1, 4, 4, 3), "pred": torch.zeros(1, 4, 4, 3)}])
    assert "could not keep a case slice" in caplog.text
    off = CasePictures(tmp_path / "off", enabled="false")
    _evaluate(off, [_case("c0", 0)])
    assert not off.cases and not (tmp_path / "off").exists()


def test_curve_pictures_record_losses_and_draw(tmp_path):
    (tmp_path / "val_history.csv").write_text("epoch,dsc_tumor,dsc_organ\n1,0.2,0.6\n3,0.4,0.8\n")
    losses = {1: (1.0, 0.8, 0.15), 2: (0.7, 0.5, 0.1), 3: (0.5, 0.4, 0.05)}

    def publish(engine):
        total, seg, ufd = losses[engine.state.epoch]
        engine.state.metrics.update(train_loss=total, loss_seg=seg, kd_ufd=ufd, lr=1e-3)

    engine = Engine(lambda e, b: None)
    engine.add_event_handler(Events.EPOCH_COMPLETED, publish)  # what EpochAverager does, before the handler
    CurvePictures(tmp_path, title="hlfd").attach(engine)
    engine.run([0, 1], max_epochs=3)
    rows = read_history(tmp_path / "train_history.csv")
    assert [(r["epoch"], r["train_loss"], r["loss_seg"], r["kd_ufd"]) for r in rows] == [(e, *v) for e, v in ((1.0, losses[1]), (2.0, losses[2]), (3.0, losses[3]))]
    _valid_png(tmp_path / "curves.png")
    with pytest.raises(ValueError, match="png"):
        CurvePictures(tmp_path, name="curves.jpg")


def test_draw_functions_write_valid_pngs(tmp_path):
    rows = [{"case": f"case_{i:05d}", "dsc_tumor": d, "rvd_tumor": r} for i, (d, r) in enumerate([(0.8, -0.1), (0.0, math.nan), (0.5, 0.7)])]
    _valid_png(draw_case_metrics(rows, tmp_path / "cases.png", title="eval"))
    _valid_png(draw_curves([], [], tmp_path / "empty_curves.png"))  # nothing trained yet: still a picture
    with pytest.raises(ValueError, match="lack the columns"):
        draw_case_metrics([{"case": "a"}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="at least one"):
        draw_case_metrics([], tmp_path / "x.png")
    with pytest.raises(TypeError, match="val_keys must be a sequence"):
        draw_curves([], [], tmp_path / "x.png", val_keys="mdice")


def _halves(path):
    """(left, right) halves of an overlay PNG with one case: the ground-truth panel and the prediction panel, above
    the legend (whose sample lines are red too: the old pictures' only red pixels were there)."""
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.int32)
    rgb = rgb[: int(0.9 * rgb.shape[0])]
    mid = rgb.shape[1] // 2
    return rgb[:, :mid], rgb[:, mid:]


def _red(rgb):
    return int(((rgb[..., 0] > 200) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)).sum())


def _tinted(rgb):
    """Share of pixels whose red clearly exceeds green and blue (the translucent red over grey CT)."""
    return float(((rgb[..., 0] - rgb[..., 1] > 40) & (rgb[..., 0] - rgb[..., 2] > 40)).mean())


def _yellow(rgb):
    return int(((rgb[..., 0] > 200) & (rgb[..., 1] > 200) & (rgb[..., 2] < 80)).sum())


def test_overlay_shows_the_truth_by_pixel_colours(tmp_path):
    """Issue 18: a slice where the tumor is the whole foreground (its contour IS the organ+tumor contour) shows red
    ground-truth pixels; a prediction that fills the slice tints the prediction panel red; an empty one is labelled."""
    from pipelines.engine.pictures import CaseSlice, draw_overlays

    image = np.full((64, 64), 100, np.uint8)
    label = np.zeros((64, 64), np.uint8)
    label[12:52, 16:48] = 2  # tumor only: organ+tumor and tumor contours coincide
    full = np.full_like(label, 2)
    partial = np.zeros_like(label)
    partial[20:40, 20:40] = 1

    def draw(pred, name):
        s = CaseSlice("case_1", dsc=0.5, rvd=0.1, z=3, basis="ground-truth tumor", image=image, label=label, pred=pred, dsc_organ=0.75, spacing=(0.8, 0.8))
        return _halves(draw_overlays({"best": s}, tmp_path / name))

    gt_panel, pred_panel = draw(full, "full.png")
    assert _red(gt_panel) > 100, "the ground-truth tumor contour is visible"
    assert _tinted(pred_panel) > 0.25, "a prediction filling the slice is visible"
    assert _tinted(gt_panel) < 0.05, "the ground-truth panel is not filled"
    _, empty_panel = draw(np.zeros_like(label), "empty.png")
    _, normal_panel = draw(partial, "partial.png")
    assert _tinted(empty_panel) < 0.01 and _yellow(empty_panel) > _yellow(normal_panel) + 100, "an empty prediction says so"


def test_curves_have_integer_epoch_ticks(tmp_path):
    import matplotlib.pyplot as plt

    from pipelines.engine import pictures

    seen = []
    real_save = pictures._save
    pictures._save = lambda fig, path, dpi=100: (seen.extend(ax.get_xticks() for ax in fig.axes), real_save(fig, path, dpi))[1]
    try:
        rows = [{"epoch": e, "train_loss": 1.0 / e} for e in (1, 2, 3)]
        draw_curves(rows, [{"epoch": e, "dsc_tumor": 0.1 * e} for e in (1, 2, 3)], tmp_path / "c.png")
    finally:
        pictures._save = real_save
        plt.close("all")
    assert seen and all(float(t).is_integer() for ticks in seen for t in ticks)
