from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.losses import DiceLoss, FocalLoss

from networks.losses import SegLoss, StructureLoss, structure_loss


def np_structure(logits, mask, k):
    """TransFuse structure loss in numpy, average pool with zero padding counted (count_include_pad)."""
    b, c, h, w = logits.shape
    pad = k // 2
    mp = np.pad(mask, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    local = np.zeros_like(mask)
    for i in range(h):
        for j in range(w):
            local[:, :, i, j] = mp[:, :, i : i + k, j : j + k].sum(axis=(2, 3)) / (k * k)
    weit = 1 + 5 * np.abs(local - mask)
    bce = np.maximum(logits, 0) - logits * mask + np.log1p(np.exp(-np.abs(logits)))
    wbce = (weit * bce).sum(axis=(2, 3)) / weit.sum(axis=(2, 3))
    p = 1 / (1 + np.exp(-logits))
    inter = (p * mask * weit).sum(axis=(2, 3))
    union = ((p + mask) * weit).sum(axis=(2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return (wbce + wiou).mean()


def test_structure_loss_by_hand_constant_prediction():
    # logits 0 -> p = 1/2, bce = ln 2 everywhere; all-ones mask with k=1 -> weights 1;
    # inter = 16 * 1/2 = 8, union = 16 * 3/2 = 24 -> wiou = 1 - 9/17
    logits = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    assert structure_loss(logits, mask, kernel_size=1).item() == pytest.approx(np.log(2) + 1 - 9 / 17)


@pytest.mark.parametrize("k", [3, 31])
def test_structure_loss_matches_numpy(k):
    g = np.random.default_rng(0)
    logits, mask = g.normal(size=(2, 2, 4, 4)), (g.random((2, 2, 4, 4)) > 0.5).astype(float)
    got = structure_loss(torch.tensor(logits), torch.tensor(mask), kernel_size=k).item()
    assert got == pytest.approx(np_structure(logits, mask, k), rel=1e-9)


def test_structure_loss_deep_supervision_weights():
    g = np.random.default_rng(1)
    preds = [g.normal(size=(2, 1, 4, 4)) for _ in range(3)]
    labels = g.integers(0, 2, size=(2, 1, 4, 4))
    want = sum(w * np_structure(p, (labels > 0).astype(float), 31) for w, p in zip((0.5, 0.3, 0.2), preds))
    got = StructureLoss()(tuple(torch.tensor(p) for p in preds), torch.tensor(labels)).item()
    assert got == pytest.approx(want, rel=1e-9)
    # K channels: one-hot targets, channel by channel
    logits = g.normal(size=(2, 3, 4, 4))
    lab3 = g.integers(0, 3, size=(2, 1, 4, 4))
    onehot = np.eye(3)[lab3[:, 0]].transpose(0, 3, 1, 2)
    assert StructureLoss()(torch.tensor(logits), torch.tensor(lab3)).item() == pytest.approx(np_structure(logits, onehot, 31), rel=1e-9)
    with pytest.raises(ValueError, match="3 ds_weights"):
        StructureLoss()((torch.zeros(1, 1, 4, 4),) * 2, torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="odd"):
        StructureLoss(kernel_size=4)


def test_seg_loss_is_dice_focal_and_handles_deep_supervision():
    torch.manual_seed(0)
    preds = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    labels = torch.randint(0, 3, (2, 1, 8, 8))
    dice, focal = DiceLoss(softmax=True, to_onehot_y=True), FocalLoss(use_softmax=True, to_onehot_y=True)

    def ref(p, y):
        return dice(p, y) + focal(p, y)

    assert SegLoss()(preds[0], labels).item() == pytest.approx(ref(preds[0], labels).item())
    want = sum(w * ref(p, labels).item() for w, p in zip((0.5, 0.3, 0.2), preds))
    assert SegLoss(ds_weights=(0.5, 0.3, 0.2))(tuple(preds), labels).item() == pytest.approx(want, rel=1e-6)
    equal = sum(ref(p, labels).item() for p in preds) / 3  # default: equal weights over the outputs
    assert SegLoss()(tuple(preds), labels).item() == pytest.approx(equal, rel=1e-6)
    # a map at a lower resolution is resized to the label size
    assert torch.isfinite(SegLoss()(torch.randn(2, 3, 4, 4), labels))
    # perfect one-hot-like logits give a small loss
    perfect = torch.nn.functional.one_hot(labels[:, 0], 3).movedim(-1, 1).float() * 50
    assert SegLoss()(perfect, labels).item() < 1e-3
