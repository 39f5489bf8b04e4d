"""BatchRotateFlip: the batched HLFD augmentation against independent per-sample computations (scipy, MONAI's
Rotate, numpy flips) and the drawn parameters' distribution."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.transforms import Rotate

from transforms.device_augment import AugmentParams, BatchRotateFlip, rotation_theta

H, W = 11, 15  # non-square: the normalised-coordinate aspect correction matters


def _params(b: int, angles=None, flip_h=None, flip_w=None) -> AugmentParams:
    angles = torch.zeros(b) if angles is None else torch.as_tensor(angles, dtype=torch.float32)
    no = torch.zeros(b, dtype=torch.bool)
    return AugmentParams(
        rotate=angles != 0,
        angles=angles,
        flip_h=no if flip_h is None else torch.as_tensor(flip_h),
        flip_w=no if flip_w is None else torch.as_tensor(flip_w),
    )


def _smooth_image(b: int, c: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, c, H, W, generator=g)


def _block_label(b: int) -> torch.Tensor:
    label = torch.zeros(b, 1, H, W)
    label[:, :, 2:8, 3:10] = 1
    label[:, :, 4:6, 5:8] = 2
    return label


def test_rotation_matches_scipy_affine_transform_per_sample():
    ndimage = pytest.importorskip("scipy.ndimage")
    angles = [0.21, -0.26, 0.0]
    image = _smooth_image(3, 2)
    out, _ = BatchRotateFlip.apply(image, None, _params(3, angles))
    c = np.array([(H - 1) / 2, (W - 1) / 2])
    for b, a in enumerate(angles):
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        for ch in range(2):
            # input index = R (output index - c) + c; 'nearest' extension = grid_sample's border padding
            ref = ndimage.affine_transform(
                image[b, ch].double().numpy(), rot, offset=c - rot @ c, order=1, mode="nearest"
            )
            np.testing.assert_allclose(out[b, ch].numpy(), ref, atol=1e-5)


def test_rotation_matches_monai_rotate_of_the_loader_path():
    """Same convention as RandRotated in transforms.augment (bilinear image, nearest label, border, keep_size)."""
    angle = 0.2
    image, label = _smooth_image(1, 3), _block_label(1)
    out_img, out_lab = BatchRotateFlip.apply(image, label, _params(1, [angle]))
    ref_img = Rotate(angle, keep_size=True, mode="bilinear", padding_mode="border")(image[0])
    ref_lab = Rotate(angle, keep_size=True, mode="nearest", padding_mode="border")(label[0])
    np.testing.assert_allclose(out_img[0].numpy(), np.asarray(ref_img), atol=1e-5)
    # nearest neighbour may break exact .5 ties differently: allow a couple of pixels
    assert (out_lab[0].numpy() != np.asarray(ref_lab)).sum() <= 2


def test_label_nearest_keeps_class_values_and_agrees_with_scipy_order0():
    ndimage = pytest.importorskip("scipy.ndimage")
    angle = -0.17
    label = _block_label(2)
    _, out = BatchRotateFlip.apply(torch.zeros(2, 1, H, W), label, _params(2, [angle, angle]))
    assert set(out.unique().tolist()) <= {0.0, 1.0, 2.0}
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    c = np.array([(H - 1) / 2, (W - 1) / 2])
    ref = ndimage.affine_transform(label[0, 0].numpy(), rot, offset=c - rot @ c, order=0, mode="nearest")
    assert (out[0, 0].numpy() != ref).sum() <= 2
    assert torch.equal(out[0], out[1])


def test_flips_follow_numpy_flips_per_sample():
    image = _smooth_image(4, 2)
    label = _block_label(4)
    fh, fw = [False, True, False, True], [False, False, True, True]
    out_img, out_lab = BatchRotateFlip.apply(image, label, _params(4, flip_h=fh, flip_w=fw))
    for b in range(4):
        ref = image[b].numpy()
        ref_lab = label[b].numpy()
        if fh[b]:
            ref, ref_lab = ref[:, ::-1, :], ref_lab[:, ::-1, :]
        if fw[b]:
            ref, ref_lab = ref[:, :, ::-1], ref_lab[:, :, ::-1]
        np.testing.assert_array_equal(out_img[b].numpy(), ref)
        np.testing.assert_array_equal(out_lab[b].numpy(), ref_lab)
    assert torch.equal(image, _smooth_image(4, 2))  # inputs untouched


def test_drawn_parameters_have_the_hlfd_ranges_and_probabilities():
    aug = BatchRotateFlip(rotate_degrees=15.0, rotate_prob=0.5, flip_prob=0.5)
    p = aug.draw(20000, torch.Generator().manual_seed(3))
    a = math.radians(15.0)
    # binomial(20000, 0.5): std 0.0035 -> 0.015 is > 4 sigma
    for mask in (p.rotate, p.flip_h, p.flip_w):
        assert abs(mask.float().mean().item() - 0.5) < 0.015
    rotated = p.angles[p.rotate]
    assert rotated.abs().max() <= a and (p.angles[~p.rotate] == 0).all()
    # uniform on [-a, a]: mean 0, std a / sqrt(3)
    assert abs(rotated.mean().item()) < 0.02 * a
    assert abs(rotated.std().item() - a / math.sqrt(3)) < 0.02 * a
    again = aug.draw(20000, torch.Generator().manual_seed(3))
    assert torch.equal(p.angles, again.angles) and torch.equal(p.flip_w, again.flip_w)


def test_no_rotation_when_disabled_and_validation():
    p = BatchRotateFlip(rotate_degrees=0.0, rotate_prob=1.0, flip_prob=0.0).draw(100, torch.Generator().manual_seed(0))
    assert not p.rotate.any() and not p.flip_h.any()
    for kwargs in ({"rotate_degrees": -1.0}, {"rotate_prob": 1.5}, {"flip_prob": -0.1}):
        with pytest.raises(ValueError):
            BatchRotateFlip(**kwargs)
    with pytest.raises(ValueError, match="batch"):
        BatchRotateFlip.apply(torch.zeros(2, 1, H, W), None, _params(3))
    with pytest.raises(ValueError, match="2x2"):
        rotation_theta(torch.zeros(1), 1, 5)
