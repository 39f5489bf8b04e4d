"""kd_mask='teacher_correct': masked pixels get no distillation gradient; per-class averaging by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import distill
from distill.baselines import channel_wise_divergence, dist_relations
from distill.kl import pixel_kl, tempered_probs
from distill.mask import class_balanced_mean, pixel_mean, teacher_correct
from tests.distill.tiny_nets import distill_once, np_kl, np_softmax


def test_class_balanced_mean_by_hand():
    # pixel values 1, 2, 3 of class 0 and 10 of class 1: plain mean 4, per-class mean (2 + 10) / 2 = 6
    v = torch.tensor([[1.0, 2.0, 3.0, 10.0]])
    lab = torch.tensor([[0, 0, 0, 1]])
    assert class_balanced_mean(v, lab, torch.ones_like(lab, dtype=torch.bool)).item() == pytest.approx(6.0)
    # the third pixel masked: (1.5 + 10) / 2
    assert class_balanced_mean(v, lab, torch.tensor([[True, True, False, True]])).item() == pytest.approx(5.75)
    # nothing kept -> 0
    assert class_balanced_mean(v, lab, torch.zeros_like(lab, dtype=torch.bool)).item() == 0.0


def test_pixel_mean_masks_teacher_errors_and_balances_classes():
    # teacher argmax per pixel: 0, 0, 1, 1; labels 0, 1, 1, 1 -> pixel 1 wrong; classes 0: {v0}, 1: {v2, v3}
    scores = torch.tensor([[[3.0, 2.0, 0.0, 0.0], [0.0, 1.0, 5.0, 4.0]]]).reshape(1, 2, 1, 4)
    labels = torch.tensor([0, 1, 1, 1]).reshape(1, 1, 1, 4)
    v = torch.tensor([[[4.0, 100.0, 1.0, 3.0]]])
    assert pixel_mean(v, scores, labels, "none").item() == pytest.approx(27.0)
    assert pixel_mean(v, scores, labels, "teacher_correct").item() == pytest.approx((4.0 + 2.0) / 2)
    keep, lab = teacher_correct(scores, torch.tensor([0, 1]).reshape(1, 1, 1, 2).repeat_interleave(2, dim=-1))
    assert keep.tolist() == [[[True, True, True, True]]] and lab.tolist() == [[[0, 0, 1, 1]]]  # nearest-resized labels
    with pytest.raises(ValueError, match="needs the labels"):
        pixel_mean(v, scores, None, "teacher_correct")
    with pytest.raises(ValueError, match="Unknown kd_mask 'teacher'; valid: none, teacher_correct"):
        pixel_mean(v, scores, labels, "teacher")


def _batch(seed=0, k=3):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(2, k, 8, 8, generator=g) * 3
    labels = torch.randint(0, k, (2, 1, 8, 8), generator=g)
    labels[0, 0, :4] = teacher[0, :, :4].argmax(0)  # make sure there are correct pixels of several classes
    student = torch.randn(2, k, 8, 8, generator=g, requires_grad=True)
    return student, teacher, labels


TERMS = {
    "hinton": lambda s, tt, lab: pixel_kl(s, tempered_probs(tt, 4.0), 4.0, lab, "teacher_correct"),
    "cwd": lambda s, tt, lab: channel_wise_divergence(s, tt, 4.0, teacher_correct(tt, lab)[0]),
    "dist_inter": lambda s, tt, lab: dist_relations(s, tt, 1.0, lab, "teacher_correct")[0],
    "dist_intra": lambda s, tt, lab: dist_relations(s, tt, 1.0, lab, "teacher_correct")[1],
}


@pytest.mark.parametrize("term", sorted(TERMS))
def test_masked_pixels_get_exactly_zero_gradient(term):
    s, tt, lab = _batch()
    TERMS[term](s, tt, lab).backward()
    wrong = tt.argmax(1) != lab[:, 0]
    assert 0 < int(wrong.sum()) < wrong.numel()
    g = s.grad.abs().sum(dim=1)
    assert g[wrong].max().item() == 0.0
    assert bool((g[~wrong] > 0).all())


def test_masked_hinton_matches_numpy_class_balanced_kl():
    s, tt, lab = _batch(1)
    got = pixel_kl(s, tempered_probs(tt, 4.0), 4.0, lab, "teacher_correct").item()
    sn, tn, ln = s.detach().double().numpy(), tt.double().numpy(), lab[:, 0].numpy()
    p = np_softmax(tn / 4)
    q = np_softmax(sn / 4)
    kl = (p * (np.log(p) - np.log(q))).sum(axis=1) * 16
    keep = tn.argmax(1) == ln
    want = np.mean([kl[keep & (ln == c)].mean() for c in range(3) if (keep & (ln == c)).any()])
    assert got == pytest.approx(want, rel=1e-5)
    assert pixel_kl(s, tempered_probs(tt, 4.0), 4.0).item() == pytest.approx(np_kl(sn, p, 4.0), rel=1e-5)


@pytest.mark.parametrize("method", ["hlfd", "hinton", "cwd", "dist"])
def test_methods_take_the_mask_and_others_refuse_it(method):
    _, d, sf, tf = distill_once(method, kd_mask="teacher_correct")
    labels = torch.randint(0, 2, (2, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    out = d(sf, tf, labels)
    assert torch.isfinite(out["kd_total"])
    with pytest.raises(ValueError, match="needs the labels"):
        d(sf, tf)
    plain = distill_once(method)
    assert distill.MASKABLE == ("hlfd", "hinton", "cwd", "dist")
    assert plain[1](plain[2], plain[3])["kd_total"].item() != pytest.approx(out["kd_total"].item())


def test_hlfd_mask_reaches_upd_and_ipd_only():
    _, d, sf, tf = distill_once("hlfd", kd_mask="teacher_correct")
    _, d0, sf0, tf0 = distill_once("hlfd")
    labels = torch.randint(0, 2, (2, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    masked, plain = d(sf, tf, labels), d0(sf0, tf0)
    assert masked["kd_ufd"].item() == pytest.approx(plain["kd_ufd"].item())
    assert masked["kd_ifd"].item() == pytest.approx(plain["kd_ifd"].item())
    assert masked["kd_ipd"].item() != pytest.approx(plain["kd_ipd"].item())


def test_create_distiller_refuses_a_mask_a_method_cannot_apply():
    s_net, t_net = distill_once("skd")[0], distill_once("skd")[1].teacher
    with pytest.raises(ValueError, match="method 'skd' has none"):
        distill.create_distiller("skd", s_net, t_net, kd_mask="teacher_correct")
    with pytest.raises(ValueError, match="Unknown kd_mask"):
        distill.create_distiller("hinton", s_net, t_net, kd_mask="correct")
