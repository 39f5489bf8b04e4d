"""Per-volume metrics against an independent numpy computation, edge cases, and the per-case CSV writer."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.handlers import IgniteMetricHandler, from_engine

from pipelines.engine.metrics import CASE_COLUMNS, BinaryOverlapMetric, CaseMetricsSaver, RegionMetric, case_id


def np_dsc(p: np.ndarray, g: np.ndarray) -> float:
    s = p.sum() + g.sum()
    return 1.0 if s == 0 else 2.0 * np.logical_and(p, g).sum() / s


def np_rvd(p: np.ndarray, g: np.ndarray) -> float:
    return math.nan if g.sum() == 0 else (p.sum() - g.sum()) / g.sum()


def _labels(shape, rng):
    lab = np.zeros(shape, np.int64)
    lab[4:20, 5:22, 2:9] = 1
    lab[8:14, 9:15, 3:7] = 2
    noise = rng.random(shape) < 0.05
    return lab, np.where(noise, rng.integers(0, 3, shape), lab)


def test_region_metric_matches_numpy():
    rng = np.random.default_rng(0)
    gt, pred = _labels((24, 26, 10), rng)
    aff = np.diag([0.8, 0.8, 2.5, 1.0])
    y = MetaTensor(torch.as_tensor(gt)[None, None], affine=torch.as_tensor(aff))
    yp = torch.as_tensor(pred)[None, None]
    vox_ml = 0.8 * 0.8 * 2.5 / 1000
    for region, mask in (("tumor", lambda a: a == 2), ("organ", lambda a: a >= 1)):
        p, g = mask(pred), mask(gt)
        assert RegionMetric("dsc", region)(yp, y).item() == pytest.approx(np_dsc(p, g), abs=1e-6)
        assert RegionMetric("rvd", region)(yp, y).item() == pytest.approx(np_rvd(p, g), abs=1e-6)
        assert RegionMetric("abs_rvd", region)(yp, y).item() == pytest.approx(abs(np_rvd(p, g)), abs=1e-6)
        assert RegionMetric("ml_pred", region)(yp, y).item() == pytest.approx(p.sum() * vox_ml, rel=1e-5)
        assert RegionMetric("ml_gt", region)(yp, y).item() == pytest.approx(g.sum() * vox_ml, rel=1e-5)


def test_one_hot_input_is_argmaxed():
    gt = torch.zeros(1, 1, 6, 6, 4)
    gt[..., 1:4, 1:4, :] = 2
    onehot = torch.nn.functional.one_hot(gt[:, 0].long(), 3).permute(0, 4, 1, 2, 3).float()
    assert RegionMetric("dsc", "tumor")(onehot, gt).item() == 1.0


def test_edge_cases_empty_gt():
    z = torch.zeros(1, 1, 8, 8, 4)
    some = z.clone()
    some[..., 2, 2, 1] = 2
    # empty GT, empty prediction: DSC and RVD undefined (0/0; issue 19: never a perfect 1.0 for model selection)
    assert math.isnan(RegionMetric("dsc")(z, z).item())
    assert math.isnan(RegionMetric("rvd")(z, z).item())
    # empty GT with a prediction: DSC 0, RVD undefined
    assert RegionMetric("dsc")(some, z).item() == 0.0
    assert math.isnan(RegionMetric("rvd")(some, z).item())
    # empty prediction, tumor in GT: DSC 0, RVD -1
    assert RegionMetric("dsc")(z, some).item() == 0.0
    assert RegionMetric("rvd")(z, some).item() == -1.0


def test_aggregate_excludes_nan():
    m = RegionMetric("rvd")
    z = torch.zeros(1, 1, 4, 4, 2)
    g = z.clone()
    g[..., 0:2, 0:2, 0] = 2  # 4 voxels
    p = z.clone()
    p[..., 0:2, 0:3, 0] = 2  # 6 voxels -> +0.5
    m(p, g)
    m(z, z)  # undefined
    assert m.aggregate().item() == pytest.approx(0.5)
    assert torch.isnan(m.get_buffer()).sum() == 1


def test_bad_names():
    with pytest.raises(ValueError, match="valid kinds"):
        RegionMetric("hd95")
    with pytest.raises(ValueError, match="valid regions"):
        RegionMetric("dsc", "liver")
    with pytest.raises(ValueError, match="valid kinds"):
        BinaryOverlapMetric("f1")


def test_binary_overlap_metric():
    y = torch.zeros(2, 1, 4, 4)
    y[0, 0, :2, :2] = 1  # 4 px
    p = torch.zeros(2, 1, 4, 4)
    p[0, 0, :2, :3] = 0.9  # 6 px, inter 4
    p[0, 0, 3, 3] = 0.5  # not > 0.5
    d = BinaryOverlapMetric("dice")(p, y).reshape(-1)
    i = BinaryOverlapMetric("iou")(p, y).reshape(-1)
    assert d[0].item() == pytest.approx(8 / 10)
    assert i[0].item() == pytest.approx(4 / 6)
    assert d[1].item() == 1.0 and i[1].item() == 1.0  # empty vs empty is 1, not 2


def test_case_id():
    assert case_id("/d/case_00012/imaging.nii.gz") == "case_00012"
    assert case_id("/d/volume-3.nii") == "volume-3"


def test_case_metrics_saver_through_ignite(tmp_path):
    """IgniteMetricHandler(save_details) + CaseMetricsSaver: one row per case, exact columns, numpy values."""
    rng = np.random.default_rng(1)
    cases = []
    for i in range(3):
        gt, pred = _labels((16, 16, 6), rng)
        if i == 2:
            gt[gt == 2] = 1  # no tumor in GT
        aff = np.diag([1.5, 1.5, 3.0, 1.0])
        cases.append((f"/x/case_{i:05d}/imaging.nii.gz", gt, pred, aff))

    def step(engine, batch):
        return batch

    engine = Engine(step)
    data = []
    for name, gt, pred, aff in cases:
        img = MetaTensor(torch.zeros(1, 16, 16, 6), meta={"filename_or_obj": name})
        lab = MetaTensor(torch.as_tensor(gt)[None], affine=torch.as_tensor(aff))
        data.append([{"image": img, "label": lab, "pred": torch.as_tensor(pred)[None]}])
    specs = {
        "dsc_tumor": ("dsc", "tumor"),
        "rvd_tumor": ("rvd", "tumor"),
        "dsc_organ": ("dsc", "organ"),
        "rvd_organ": ("rvd", "organ"),
        "tumor_ml_pred": ("ml_pred", "tumor"),
        "tumor_ml_gt": ("ml_gt", "tumor"),
    }
    for name, (k, r) in specs.items():
        IgniteMetricHandler(
            metric_fn=RegionMetric(k, r), output_transform=from_engine(["pred", "label"]), save_details=True
        ).attach(engine, name)
    saver = CaseMetricsSaver(save_dir=str(tmp_path))
    saver.attach(engine)
    engine.run(data, max_epochs=1)

    with open(tmp_path / "cases.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == CASE_COLUMNS
    assert [r["case"] for r in rows] == ["case_00000", "case_00001", "case_00002"]
    for r, (_, gt, pred, aff) in zip(rows, cases):
        vox = np.prod(np.diag(aff)[:3]) / 1000
        assert float(r["dsc_tumor"]) == pytest.approx(np_dsc(pred == 2, gt == 2), abs=1e-6)
        assert float(r["dsc_organ"]) == pytest.approx(np_dsc(pred >= 1, gt >= 1), abs=1e-6)
        exp = np_rvd(pred == 2, gt == 2)
        assert (math.isnan(exp) and math.isnan(float(r["rvd_tumor"]))) or float(r["rvd_tumor"]) == pytest.approx(exp, abs=1e-5)
        assert float(r["rvd_organ"]) == pytest.approx(np_rvd(pred >= 1, gt >= 1), abs=1e-5)
        assert float(r["tumor_ml_pred"]) == pytest.approx((pred == 2).sum() * vox, rel=1e-5)
        assert float(r["tumor_ml_gt"]) == pytest.approx((gt == 2).sum() * vox, rel=1e-5)
    with open(tmp_path / "summary.csv") as f:
        summ = {r["column"]: r for r in csv.DictReader(f)}
    rv = np.array([float(r["rvd_tumor"]) for r in rows])
    ok = rv[~np.isnan(rv)]
    assert int(summ["rvd_tumor"]["n"]) == 2 and int(summ["rvd_tumor"]["n_undefined"]) == 1
    assert float(summ["rvd_tumor"]["mean"]) == pytest.approx(ok.mean())
    assert float(summ["rvd_tumor"]["std"]) == pytest.approx(ok.std())
    assert float(summ["rvd_tumor"]["median"]) == pytest.approx(np.median(ok))
    # the engine's aggregated metric excludes the undefined case too
    assert engine.state.metrics["rvd_tumor"] == pytest.approx(ok.mean(), abs=1e-5)


def test_summarize_cases_against_numpy():
    import math

    import numpy as np
    import pytest

    from pipelines.engine.metrics import summarize_cases

    dsc = np.array([0.5, 0.25, 1.0, 0.0])
    rvd = np.array([0.1, np.nan, -0.3, np.nan])
    empty = np.array([np.nan] * 4)
    rows = {r[0]: r[1:] for r in summarize_cases({"dsc": dsc, "rvd": rvd, "none": empty})}
    assert rows["dsc"] == pytest.approx([0.4375, np.std(dsc), 0.375, 4, 0])
    assert rows["rvd"][:3] == pytest.approx([-0.1, 0.2, -0.1]) and rows["rvd"][3:] == [2, 2]
    assert all(math.isnan(x) for x in rows["none"][:3]) and rows["none"][3:] == [0, 4]
    assert summarize_cases({}) == []
    with pytest.raises(ValueError, match="one value per case"):
        summarize_cases({"a": np.zeros(2), "b": np.zeros(3)})
