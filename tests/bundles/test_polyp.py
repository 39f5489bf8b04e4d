"""Polyp pieces (splits, masks, multi-scale sizes) and the transfuse_polyp bundle on a few real images."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.engine import load_checkpoint
from pipelines.engine.polyp import BinarizeMaskd, find_pairs, multiscale_size, write_polyp_splits
from tests.bundles.conftest import run_bundle

TINY_TRANSFUSE = "{'embed_dim': 16, 'depth': 1, 'num_heads': 2, 'cnn_widths': [4, 8, 16], 'cnn_layers': [1, 1, 1], 'decoder_channels': [8, 4], 'head_channels': 4}"


def _fake_polyp(root, n=6):
    for ds in ("Kvasir-SEG", "CVC-ClinicDB"):
        (root / ds / "images").mkdir(parents=True)
        (root / ds / "masks").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((32, 32, 3), 10 * i, np.uint8)).save(root / ds / "images" / f"{i}.jpg")
            Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / ds / "masks" / f"{i}.jpg")


def test_multiscale_sizes_of_the_paper():
    assert [multiscale_size(352, r) for r in (0.75, 1.0, 1.25)] == [256, 352, 448]


def test_binarize_mask_threshold_127():
    m = torch.tensor([[[0.0, 127.0], [128.0, 255.0]]]).repeat(3, 1, 1)
    out = BinarizeMaskd("label")({"label": m})["label"]
    assert out.shape == (1, 2, 2)
    assert out.flatten().tolist() == [0.0, 0.0, 1.0, 1.0]


def test_splits_deterministic_and_disjoint(tmp_path):
    _fake_polyp(tmp_path / "p", n=12)
    a = json.loads(open(write_polyp_splits(tmp_path / "p", tmp_path / "a.json", seed=1)).read())
    b = json.loads(open(write_polyp_splits(tmp_path / "p", tmp_path / "b.json", seed=1)).read())
    assert {k: a[k] for k in ("training", "validation", "test")} == {k: b[k] for k in ("training", "validation", "test")}
    imgs = [e["image"] for s in ("training", "validation", "test") for e in a[s]]
    assert len(imgs) == len(set(imgs)) == 24
    assert a["meta"]["counts"]["Kvasir-SEG"]["test"] == 1  # round(12 * 100 / 1000)


def test_find_pairs_errors(tmp_path):
    with pytest.raises(ValueError, match="images"):
        find_pairs(tmp_path)
    _fake_polyp(tmp_path / "p", n=2)
    (tmp_path / "p" / "Kvasir-SEG" / "masks" / "0.jpg").unlink()
    with pytest.raises(ValueError, match="has no mask"):
        find_pairs(tmp_path / "p")


@pytest.mark.slow
def test_transfuse_polyp_bundle_on_real_images(shared_data, tmp_path):
    polyp = shared_data / "polyp"
    if not polyp.is_dir():
        pytest.skip(f"{polyp} not found")
    out = tmp_path / "run"
    run_bundle(
        "training", "bundles/transfuse_polyp/configs/train.yaml",
        "--dataset_dir", str(polyp), "--output_dir", str(out), "--limit", "4", "--size", "64", "--epochs", "1",
        "--batch_size", "4", "--num_workers", "0", "--network_kwargs", TINY_TRANSFUSE,
    )  # fmt: skip
    ck = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ck["epoch"] == 1 and ck["network"]["name"] == "transfuse_s" and ck["network"]["out_channels"] == 1
    run_bundle("evaluating", "bundles/transfuse_polyp/configs/evaluate.yaml", "--output_dir", str(out), "--num_workers", "0")
    with open(out / "eval" / "cases.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == ("case", "mdice", "miou")
    split = json.loads((out / "checkpoints" / "splits.json").read_text())
    test_images = [e for e in split["test"]]
    assert len(rows) == len(test_images) == 2
    # the same checkpoint's inference masks, scored with numpy against the JPEG masks, give the CSV's values
    src = tmp_path / "in"
    src.mkdir()
    for e in test_images:
        shutil.copy(e["image"], src)
    masks = tmp_path / "masks"
    run_bundle(
        "inferring", "bundles/transfuse_polyp/configs/inference.yaml", "--input_dir", str(src), "--output_dir", str(masks),
        "--checkpoint", str(out / "checkpoints" / "best.pt"),
    )  # fmt: skip
    by_case = {r["case"]: r for r in rows}
    for e in test_images:
        name = e["image"].rsplit("/", 1)[-1].rsplit(".", 1)[0]
        pred = np.asarray(Image.open(masks / f"{name}.png")) > 127
        gt = np.asarray(Image.open(e["label"]).convert("L")) > 127
        assert pred.shape == gt.shape
        s = pred.sum() + gt.sum()
        inter = np.logical_and(pred, gt).sum()
        dice = 1.0 if s == 0 else 2 * inter / s
        iou = 1.0 if s == 0 else inter / (s - inter)
        assert float(by_case[name]["mdice"]) == pytest.approx(dice, abs=1e-6)
        assert float(by_case[name]["miou"]) == pytest.approx(iou, abs=1e-6)
